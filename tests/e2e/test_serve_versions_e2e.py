"""A versioned endpoint over real HTTP (127.0.0.1): two tiny versions A and B with B at 20%, a
rollout and rollback under traffic, per-version stats, episodes routed to the version that served
them, and feedback on served answers trained into a reward model, together with the feedback of a
plain single-model endpoint (/plain, `rayrlhf serve --model tiny-gpt2`) on the same Serve instance.
One Serve deployment (router, two versions, the state actors, the plain app) for the whole module."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from ray import serve
from sockets import free_port

from rayrlhf.jobs.config.serve import FeedbackConfig, ServeConfig, VersionConfig
from rayrlhf.jobs.config.supervised import RMConfig, load_job_config
from rayrlhf.jobs.data.episodes import read_episodes
from rayrlhf.jobs.serve import deploy_single, prepare, start
from rayrlhf.jobs.serve_feedback import stop_state
from rayrlhf.jobs.serve_router import deploy_versioned
from rayrlhf.jobs.train_rm import train_rm

KEY_ENV = "RAYRLHF_TEST_VERSIONS_KEY"
KEY = "sk-versions-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


COMMON = dict(auth_env=KEY_ENV, num_cpus=0.5, torch_threads=1, max_tokens=16, max_prompt_tokens=48)


@pytest.fixture(scope="module")
def endpoint(local_ray, tmp_path_factory):
    feedback_dir = tmp_path_factory.mktemp("feedback")
    cfg = ServeConfig(
        versions=[VersionConfig(name="A", model="tiny-gpt2"), VersionConfig(name="B", model="tiny-gpt2")],
        traffic={"B": 0.2}, port=free_port(), app_name="versions", routing_refresh_s=0.5, **COMMON,
        feedback=FeedbackConfig(output_dir=str(feedback_dir)), episodes_file=str(feedback_dir / "episodes.jsonl"),
    )
    os.environ[KEY_ENV] = KEY  # after Ray started: its processes never see it
    cfg = prepare(cfg, local=True)
    try:
        start(cfg, deploy_versioned)
        with httpx.Client(base_url=f"http://127.0.0.1:{cfg.port}", timeout=60, trust_env=False, headers=AUTH) as http:
            yield http, feedback_dir
    finally:
        serve.shutdown()
        stop_state(cfg.app_name)
        os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def plain(endpoint, tmp_path_factory):
    """The single-model endpoint of `rayrlhf serve --model tiny-gpt2` at /plain (Serve runs already);
    its feedback goes to a folder of its own."""
    feedback_dir = tmp_path_factory.mktemp("plain_feedback")
    cfg = ServeConfig(model="tiny-gpt2", app_name="plain", route_prefix="/plain", **COMMON,
                      feedback=FeedbackConfig(output_dir=str(feedback_dir)))
    deploy_single(prepare(cfg, local=False))
    try:
        yield feedback_dir
    finally:
        stop_state(cfg.app_name)


def complete(http: httpx.Client, model: str = "versions", prefix: str = "", **body) -> httpx.Response:
    return http.post(f"{prefix}/v1/completions", json={"model": model, "prompt": "2 plus 3 is", "max_tokens": 1, **body})


def without_key(http: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, str(http.base_url).rstrip("/") + path, trust_env=False, **kwargs)


def test_models_list_the_versions_with_their_shares(endpoint):
    http, _ = endpoint
    models = http.get("/v1/models").json()
    assert {m["id"]: m["traffic"] for m in models["data"]} == {"A": pytest.approx(0.8), "B": pytest.approx(0.2)}
    assert models["router"] == "versions"
    assert without_key(http, "GET", "/v1/models").status_code == 401


def test_shares_are_followed_and_a_pinned_request_gets_its_version(endpoint):
    http, _ = endpoint
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: complete(http), range(300)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200][:3]
    counts = Counter(r.json()["model"] for r in replies)
    # binomial(300, 0.2): mean 60, sd 6.9; the round-robin is exact (60), a sampler would pass too
    assert 32 <= counts["B"] <= 88 and counts["A"] + counts["B"] == 300, counts
    assert [complete(http, model="B").json()["model"] for _ in range(5)] == ["B"] * 5
    assert complete(http, model="C").json()["error"]["param"] == "model"
    stats = http.get("/stats").json()["versions"]
    assert stats["B"]["ok"] >= counts["B"] + 5 and stats["B"]["traffic"] == pytest.approx(0.2)
    assert stats["A"]["failed"] == 0 and stats["A"]["latency_p50_s"] > 0


def test_rollout_and_rollback_while_serving_fail_no_request(endpoint):
    http, _ = endpoint
    stop = threading.Event()
    results: list[tuple[int, str | None, bool]] = []

    def traffic(stream: bool) -> None:
        while not stop.is_set():
            r = complete(http, stream=stream, max_tokens=2)
            model = None
            if r.status_code == 200:
                text = r.text.split("\n\n")[0].removeprefix("data: ") if stream else r.text
                model = json.loads(text)["model"]
            results.append((r.status_code, model, stop.is_set()))
            stop.wait(0.1)  # steady traffic that leaves the cores room to load the new version's replica

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(traffic, i % 2 == 1) for i in range(4)]
        rollout = http.post("/admin/versions", json={"name": "C", "model": "tiny-gpt2", "traffic": 0.5}, timeout=120)
        assert rollout.status_code == 200, rollout.text
        assert rollout.json()["shares"]["C"] == 0.5
        while sum(model == "C" for _, model, _ in results) < 10:
            threading.Event().wait(0.2)
        assert http.post("/admin/traffic", json={"B": 0}).json()["shares"]["B"] == 0  # B rolled back to 0
        rollback = http.delete("/admin/versions/C", timeout=120)
        assert rollback.status_code == 200, rollback.text
        after = len(results)
        threading.Event().wait(1)  # the 4 senders' next requests, all routed without C
        stop.set()
        for w in workers:
            w.result()
    assert [code for code, _, _ in results if code != 200] == []
    assert not any(model == "C" for _, model, _ in results[after + 4:])  # 4 may have been on their way
    assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {"A", "B"}
    assert http.post("/admin/traffic", json={"B": 0.2}).status_code == 200
    assert http.delete("/admin/versions/C").json()["error"]["code"] == "model_not_found"


def rate_answers(http: httpx.Client, prompts: int, model: str = "versions", prefix: str = "") -> int:
    """Two different answers to each prompt: rated up and down, then a preference of the second; how
    many prompts got them."""
    sent = 0
    for i in range(prompts):
        r = complete(http, model, prefix, prompt=f"{i} plus 3 is", n=2, max_tokens=8, temperature=1.0, seed=i)
        choices = r.json()["choices"]
        if not all(c["text"].strip() for c in choices) or choices[0]["text"] == choices[1]["text"]:
            continue
        rid = r.json()["id"]
        assert http.post(f"{prefix}/v1/feedback", json={"id": rid, "index": 0, "rating": 1}).json()["pairs"] == 0
        assert http.post(f"{prefix}/v1/feedback", json={"id": rid, "index": 1, "rating": 0}).json()["pairs"] == 1
        explicit = http.post(f"{prefix}/v1/feedback", json={"chosen": {"id": rid, "index": 1}, "rejected": rid})
        assert explicit.json() == {"object": "feedback", "ratings": 0, "pairs": 1}
        sent += 1
    return sent


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_feedback_on_served_answers_trains_a_reward_model(endpoint, plain, tmp_path):
    http, feedback_dir = endpoint
    sent = rate_answers(http, 16)
    assert sent >= 12
    pairs = rows(feedback_dir / "preferences.jsonl")
    ratings = (feedback_dir / "ratings.jsonl").read_text().splitlines()
    assert len(pairs) == 2 * sent and len(ratings) == 2 * sent
    assert {p["kind"] for p in pairs} == {"ratings", "explicit"} and {p["chosen_version"] for p in pairs} <= {"A", "B"}
    assert http.get("/stats").json()["feedback"]["pairs"] == 2 * sent

    # the plain endpoint: the same routes, checks and files; a chat answer (messages as the prompt)
    # and a streamed one are kept too
    plain_sent = rate_answers(http, 10, "tiny-gpt2", "/plain")
    assert plain_sent >= 6
    chat = http.post("/plain/v1/chat/completions", json={
        "model": "tiny-gpt2", "messages": [{"role": "user", "content": "2 plus 3?"}], "max_tokens": 8, "seed": 1})
    assert http.post("/plain/v1/feedback", json={"id": chat.json()["id"], "rating": 0.75}).json()["ratings"] == 1
    streamed = complete(http, "tiny-gpt2", "/plain", prompt="Streamed:", max_tokens=8, seed=3, stream=True).text
    stream_id = json.loads(streamed.split("\n\n")[0].removeprefix("data: "))["id"]
    assert http.post("/plain/v1/feedback", json={"id": stream_id, "rating": 1}).status_code == 200
    plain_pairs = rows(plain / "preferences.jsonl")
    plain_ratings = rows(plain / "ratings.jsonl")
    assert len(plain_pairs) == 2 * plain_sent and len(plain_ratings) == 2 * plain_sent + 2
    assert [set(r) for r in (plain_pairs[0], plain_ratings[0])] == [set(pairs[0]), set(json.loads(ratings[0]))]
    assert {p["chosen_version"] for p in plain_pairs} == {"tiny-gpt2"}
    assert plain_ratings[-2]["prompt"] == [{"role": "user", "content": "2 plus 3?"}]
    assert plain_ratings[-2]["score"] == 0.75 and plain_ratings[-2]["label"] == 1
    assert http.post("/plain/v1/feedback", json={"id": "cmpl-never", "rating": 1}).status_code == 404
    assert http.post("/v1/feedback", json={"id": stream_id, "rating": 1}).status_code == 404  # another endpoint's
    assert without_key(http, "POST", "/plain/v1/feedback", json={"id": stream_id, "rating": 1}).status_code == 401
    assert http.get("/plain/stats").json()["feedback"] == {  # 10 completions, the chat and the stream kept
        "kept": 12, "ratings": 2 * plain_sent + 2, "pairs": 2 * plain_sent, "output_dir": str(plain)}

    # train on the plain endpoint's pairs, evaluate on the versioned endpoint's: train-rm reads both as written
    cfg = load_job_config(RMConfig, "rm_tiny", [
        f"data.train={plain / 'preferences.jsonl'}", f"data.eval={feedback_dir / 'preferences.jsonl'}",
        f"output_dir={tmp_path / 'rm'}", "trainer.num_workers=1", "trainer.micro_batch_size=4", "trainer.max_steps=2",
        "trainer.checkpoint_every=0", "trainer.zero_stage=0",
    ], "rm_tiny")
    result = train_rm(cfg)
    assert (result.final_dir / "config.json").exists() and "eval/pairwise_accuracy" in result.after


def test_stats_count_each_versions_requests_and_latencies(endpoint):
    http, _ = endpoint
    before = http.get("/stats").json()["versions"]
    assert complete(http, "B", stream=True).status_code == 200
    assert all(complete(http, "B").status_code == 200 for _ in range(3))
    assert complete(http, "B", max_tokens=10_000).status_code == 400  # B refuses it: above its max_tokens
    after = http.get("/stats").json()["versions"]
    counts = ("requests", "ok", "refused", "failed")
    assert {k: after["B"][k] - before["B"][k] for k in counts} == {"requests": 5, "ok": 4, "refused": 1, "failed": 0}
    assert after["A"] == before["A"]
    assert 0 < after["B"]["latency_p50_s"] <= after["B"]["latency_p95_s"] and after["B"]["latency_mean_s"] > 0
    # Ray's metrics on this node's Prometheus export (after the earlier tests' traffic: at the first look)
    wanted = [("ray_rayrlhf_version_requests_total{", 'outcome="ok"'), ("ray_rayrlhf_version_latency_s_count{", "")]
    deadline = time.monotonic() + 60
    while True:
        scrape = httpx.get(f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics", trust_env=False, timeout=30)
        exported = [line for line in scrape.text.splitlines() if 'version="B"' in line]
        if all(any(line.startswith(name) and tag in line for line in exported) for name, tag in wanted):
            break
        assert time.monotonic() < deadline, exported[:5]
        time.sleep(1)


def test_an_episode_goes_to_the_version_that_served_its_turns(endpoint):
    http, feedback_dir = endpoint

    def turn(model: str, prompt) -> tuple[str, list[int], list[int]]:
        r = complete(http, model, prompt=prompt, max_tokens=3, logprobs=0, return_token_ids=True, seed=5).json()
        return r["id"], r["choices"][0]["prompt_token_ids"], r["choices"][0]["token_ids"]

    first, prompt, answer = turn("B", "2 plus 3 is")
    second, _, answer2 = turn("B", prompt + answer + [5, 6])  # the program added two tokens
    posted = http.post("/v1/episodes", json={"requests": [first, second], "reward": 1.0})
    assert posted.status_code == 200, posted.text
    episode = posted.json()
    assert episode["model"] == "B" and episode["prompt_ids"] == prompt
    assert episode["completion_ids"] == answer + [5, 6] + answer2
    assert episode["loss_mask"] == [1] * len(answer) + [0, 0] + [1] * len(answer2)
    assert read_episodes(feedback_dir / "episodes.jsonl")[-1].model == "B"  # B's replica wrote it
    on_a, _, _ = turn("A", "2 plus 3 is")
    mixed = http.post("/v1/episodes", json={"requests": [on_a, second], "reward": 1.0})
    assert mixed.status_code == 400 and mixed.json()["error"]["param"] == "requests", mixed.text
    assert http.post("/v1/episodes", json={"requests": ["cmpl-never"], "reward": 0}).status_code == 404
    assert without_key(http, "POST", "/v1/episodes", json={"requests": [first], "reward": 0}).status_code == 401


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"id": "cmpl-never", "rating": 1}, 404, "id"),
    ({"id": "cmpl-never", "rating": 2}, 400, "rating"),
    ({"chosen": "cmpl-never"}, 400, "rejected"),
])
def test_bad_feedback_gets_an_openai_error_naming_the_field(endpoint, body, status, param):
    http, _ = endpoint
    r = http.post("/v1/feedback", json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert http.post("/v1/feedback", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
    assert without_key(http, "POST", "/v1/feedback", json=body).status_code == 401


def test_admin_needs_the_key_and_checks_its_input(endpoint):
    http, _ = endpoint
    assert without_key(http, "DELETE", "/admin/versions/B").status_code == 401
    assert without_key(http, "POST", "/admin/traffic", json={"B": 0}).status_code == 401
    for path, body, param in [("/admin/traffic", {"B": 2}, "traffic"), ("/admin/traffic", {"Z": 0.1}, "traffic"),
                              ("/admin/versions", {"name": "D", "model": "relative/ckpt"}, "model"),
                              ("/admin/versions", {"name": "A", "model": "tiny-gpt2"}, "name")]:
        r = http.post(path, json=body)
        assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param, r.text
    assert {m["id"]: m["traffic"] for m in http.get("/v1/models").json()["data"]} == {
        "A": pytest.approx(0.8), "B": pytest.approx(0.2)}  # nothing changed
