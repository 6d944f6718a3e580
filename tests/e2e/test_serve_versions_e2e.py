"""A versioned endpoint over real HTTP (127.0.0.1): two tiny versions A and B with B at 20%, a
rollout and rollback under traffic, feedback on served answers trained into a reward model.
One Serve deployment (router, two versions, the state actor) for the whole module."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray import serve
from sockets import free_port

from rayrlhf.jobs.config.serve import FeedbackConfig, ServeConfig, VersionConfig
from rayrlhf.jobs.config.supervised import RMConfig, load_job_config
from rayrlhf.jobs.serve import prepare, start
from rayrlhf.jobs.serve_router import deploy_versioned
from rayrlhf.jobs.serve_state import stop_state
from rayrlhf.jobs.train_rm import train_rm

KEY_ENV = "RAYRLHF_TEST_VERSIONS_KEY"
KEY = "sk-versions-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def endpoint(local_ray, tmp_path_factory):
    feedback_dir = tmp_path_factory.mktemp("feedback")
    cfg = ServeConfig(
        versions=[VersionConfig(name="A", model="tiny-gpt2"), VersionConfig(name="B", model="tiny-gpt2")],
        traffic={"B": 0.2}, port=free_port(), app_name="versions", auth_env=KEY_ENV, num_cpus=0.5,
        torch_threads=1, max_tokens=16, max_prompt_tokens=48, routing_refresh_s=0.5,
        feedback=FeedbackConfig(output_dir=str(feedback_dir)),
    )
    os.environ[KEY_ENV] = KEY  # after Ray started: its processes never see it
    cfg = prepare(cfg, local=True)
    try:
        start(cfg, deploy_versioned)
        with httpx.Client(base_url=f"http://127.0.0.1:{cfg.port}", timeout=60, trust_env=False, headers=AUTH) as http:
            yield http, feedback_dir
    finally:
        serve.shutdown()
        stop_state(cfg)
        os.environ.pop(KEY_ENV, None)


def complete(http: httpx.Client, model: str = "versions", **body) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": "2 plus 3 is", "max_tokens": 1, **body})


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
        threading.Event().wait(2)
        stop.set()
        for w in workers:
            w.result()
    assert [code for code, _, _ in results if code != 200] == []
    assert not any(model == "C" for _, model, _ in results[after + 4:])  # 4 may have been on their way
    assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {"A", "B"}
    assert http.post("/admin/traffic", json={"B": 0.2}).status_code == 200
    assert http.delete("/admin/versions/C").json()["error"]["code"] == "model_not_found"


def test_feedback_on_served_answers_trains_a_reward_model(endpoint, tmp_path):
    http, feedback_dir = endpoint
    sent = 0
    for i in range(16):
        r = complete(http, prompt=f"{i} plus 3 is", n=2, max_tokens=8, temperature=1.0, seed=i)
        choices = r.json()["choices"]
        if not all(c["text"].strip() for c in choices) or choices[0]["text"] == choices[1]["text"]:
            continue
        rid = r.json()["id"]
        assert http.post("/v1/feedback", json={"id": rid, "index": 0, "rating": 1}).json()["pairs"] == 0
        assert http.post("/v1/feedback", json={"id": rid, "index": 1, "rating": 0}).json()["pairs"] == 1
        explicit = http.post("/v1/feedback", json={"chosen": {"id": rid, "index": 1}, "rejected": rid})
        assert explicit.json() == {"object": "feedback", "ratings": 0, "pairs": 1}
        sent += 1
    assert sent >= 12
    pairs = [json.loads(line) for line in (feedback_dir / "preferences.jsonl").read_text().splitlines()]
    ratings = (feedback_dir / "ratings.jsonl").read_text().splitlines()
    assert len(pairs) == 2 * sent and len(ratings) == 2 * sent
    assert {p["kind"] for p in pairs} == {"ratings", "explicit"} and {p["chosen_version"] for p in pairs} <= {"A", "B"}
    cfg = load_job_config(RMConfig, "rm_tiny", [
        f"data.train={feedback_dir / 'preferences.jsonl'}", f"output_dir={tmp_path / 'rm'}",
        "trainer.num_workers=1", "trainer.micro_batch_size=4", "trainer.max_steps=2", "trainer.checkpoint_every=0",
    ], "rm_tiny")
    result = train_rm(cfg)
    assert (result.final_dir / "config.json").exists() and "eval/pairwise_accuracy" in result.after
    assert http.get("/stats").json()["feedback"]["pairs"] == 2 * sent


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
