"""The OpenAI endpoint over real HTTP: one local Ray + Serve with four apps for the whole module.

- main (/):           tiny-gpt2, auth off, up to 4 sequences in flight, answers up to 400 tokens
- guarded (/guarded): auth on (the key is set in this process only after Ray started, so it reaches
                      the replica with the deployment), and a request timeout (1 microsecond)
                      that every generation misses: the 504 path, deterministically
- broken (/broken):   a checkpoint with NaN weights: the internal-error (500) path
- victim (/victim):   4 requests at once and 2 queued at the proxy, the rest get 503; its replica
                      process is killed (kill -9) by the last test, noticed at the next health
                      check (every second here)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
import torch
from ray import serve
from ray.serve import RunTarget
from sockets import free_port

from rayrlhf.actors.runtime.models import load_policy, resolve_policy, save_policy
from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.jobs.config.serve import ServeConfig
from rayrlhf.jobs.serve import build_app

KEY_ENV = "RAYRLHF_TEST_SERVE_KEY"
KEY = "sk-test-0123456789"
PROMPT = "What is 2 plus 3?"
COMMON = dict(model="tiny-gpt2", num_cpus=0.5, torch_threads=1, max_tokens=32, max_prompt_tokens=48)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model, tok = load_policy(resolve_policy("tiny-gpt2"))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    nan_dir = save_policy(model, tok, tmp_path_factory.mktemp("nan") / "ckpt")
    configs = [
        ServeConfig(**{**COMMON, "max_tokens": 400}, app_name="main", max_batch_size=4, auth_env=None),
        ServeConfig(**COMMON, app_name="guarded", route_prefix="/guarded", auth_env=KEY_ENV, request_timeout_s=1e-6),
        ServeConfig(**{**COMMON, "model": str(nan_dir)}, served_model_name="broken", app_name="broken",
                    route_prefix="/broken", auth_env=None),
        ServeConfig(**{**COMMON, "max_tokens": 400}, app_name="victim", route_prefix="/victim", auth_env=None,
                    max_batch_size=4, max_ongoing_requests=4, max_queued_requests=2, retry_after_s=3,
                    health_check_period_s=1),
    ]
    port = free_port()
    init_ray(num_cpus=4, object_store_mb=256)
    os.environ[KEY_ENV] = KEY  # after Ray started: Ray's processes (replicas included) never see it
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run_many([RunTarget(build_app(c), name=c.app_name, route_prefix=c.route_prefix) for c in configs])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False) as http:
            yield http
    finally:
        serve.shutdown()
        shutdown_ray()
        os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def local():
    """The same tiny model in this process, to compute what the server must answer."""
    return load_policy(resolve_policy("tiny-gpt2"))


def greedy(local, ids: list[int], n: int) -> str:
    model, tok = local
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def events(response: httpx.Response) -> list:
    """Server-sent events as JSON objects (the final [DONE] kept as a string)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: ")
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def completion(client, path: str = "/v1/completions", **body) -> httpx.Response:
    return client.post(path, json={"model": "tiny-gpt2", **body})


def test_models_and_health(client):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny-gpt2"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-gpt2"]


def test_completion_is_the_models_greedy_answer(client, local):
    r = completion(client, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    ids = local[1](PROMPT).input_ids
    assert body["object"] == "text_completion" and body["model"] == "tiny-gpt2" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": greedy(local, ids, 6), "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}


def test_chat_uses_the_chat_template(client, local):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    r = client.post("/v1/chat/completions", json={"model": "tiny-gpt2", "messages": messages,
                                                  "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    templated = (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>\n"
                 "<|im_start|>assistant\n")
    ids = local[1](templated, add_special_tokens=False).input_ids
    assert body["object"] == "chat.completion" and body["usage"]["prompt_tokens"] == len(ids)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": greedy(local, ids, 5)}
    assert body["choices"][0]["finish_reason"] == "length"


def test_streaming_gives_the_same_text_in_pieces(client):
    plain = completion(client, prompt=PROMPT, max_tokens=8, temperature=0).json()["choices"][0]["text"]
    r = completion(client, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    assert r.status_code == 200 and r.headers["x-rayrlhf-batch-requests"] == "1"
    chunks = events(r)
    assert chunks[-1] == "[DONE]" and len(chunks) >= 3  # tokens arrive in several events
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == plain
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"

    r = client.post("/v1/chat/completions", json={
        "model": "tiny-gpt2", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    chunks = events(r)
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 4
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-2])
    plain_chat = client.post("/v1/chat/completions", json={
        "model": "tiny-gpt2", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0})
    assert streamed == plain_chat.json()["choices"][0]["message"]["content"]


def test_n_seed_top_p_and_stop(client):
    body = dict(prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, n=2, seed=3)
    first, again = (completion(client, **body).json()["choices"] for _ in range(2))
    assert [c["index"] for c in first] == [0, 1]
    assert first == again and first[0]["text"] != first[1]["text"]

    full = completion(client, prompt=PROMPT, max_tokens=12, temperature=0).json()["choices"][0]["text"]
    stop = full[5:8]
    r = completion(client, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "never-seen"])
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.find(stop)] and choice["finish_reason"] == "stop"


def test_beam_search_is_hf_generate_with_num_beams(client, local):
    model, tok = local
    ids = tok(PROMPT).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, num_beams=3, num_return_sequences=2,
                             do_sample=False, early_stopping=True, pad_token_id=tok.pad_token_id)
    expected = [tok.decode(o[len(ids):], skip_special_tokens=True) for o in out]
    r = completion(client, prompt=PROMPT, max_tokens=6, num_beams=3, n=2)
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == expected and expected[0] != expected[1]
    chunks = events(completion(client, prompt=PROMPT, max_tokens=6, num_beams=3, n=2, stream=True))
    assert sorted((c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks[:-1]) == list(enumerate(expected))
    for bad, param in (({"num_beams": 0}, "num_beams"), ({"num_beams": 2, "n": 3}, "n"),
                       ({"num_beams": 5}, "num_beams"), ({"num_beams": 1.5}, "num_beams")):
        r = completion(client, prompt=PROMPT, max_tokens=4, **bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_sampled_requests_finish_while_a_long_beam_search_runs(client):
    """Decode steps run between a beam search's tokens: short sampled requests sent while a 400-token
    beam search decodes finish before it (they used to wait for its end)."""
    finished: dict[str, float] = {}

    def beams() -> httpx.Response:
        r = completion(client, prompt=PROMPT, max_tokens=400, num_beams=2)
        finished["beams"] = time.monotonic()
        return r

    def short(i: int) -> httpx.Response:
        r = completion(client, prompt=f"Hi {i}", max_tokens=3, temperature=1.0, seed=i)
        finished[f"short {i}"] = time.monotonic()
        return r

    with ThreadPoolExecutor(4) as pool:
        long = pool.submit(beams)
        deadline = time.monotonic() + 10
        while not client.get("/stats").json().get("beam_searches") and time.monotonic() < deadline:
            time.sleep(0.02)
        shorts = list(pool.map(short, range(3)))
        assert long.result().status_code == 200, long.result().text
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3 for r in shorts)
    assert long.result().json()["usage"]["completion_tokens"] > 100  # it was long
    assert max(finished[f"short {i}"] for i in range(3)) < finished["beams"], finished
    assert client.get("/stats").json()["beam_searches"] == 0


def test_concurrent_requests_share_decode_steps(client):
    before = client.get("/stats").json()
    bodies = [dict(prompt=f"{PROMPT} {i}", max_tokens=8, temperature=0) for i in range(6)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: completion(client, **b), bodies))
    assert all(r.status_code == 200 for r in responses)
    shared = [int(r.headers["x-rayrlhf-batch-requests"]) for r in responses]
    assert max(shared) >= 2 and all(1 <= s <= 4 for s in shared)  # batched, within max_batch_size=4
    assert all(r.headers["x-rayrlhf-batch-sequences"] == str(s) for r, s in zip(responses, shared))
    after = client.get("/stats").json()
    assert after["requests"] - before["requests"] == 6 and after["max_rows_in_step"] <= 4
    assert after["steps"] - before["steps"] < 6 * 8  # fewer steps than one request at a time
    assert after["replica"] == before["replica"] and after["max_batch_size"] == 4


def test_a_request_joins_a_running_stream_and_leaves_before_it(client):
    """Continuous batching: the short request neither waits for the long one nor for a batch."""
    body = {"model": "tiny-gpt2", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as long:
        lines = long.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the long one is decoding
        short = completion(client, prompt="Hi", max_tokens=3, temperature=0)
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
        assert short.headers["x-rayrlhf-batch-requests"] == "2"  # it shared steps with the long one
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and len(rest) > 2  # the long one went on after it


def test_a_client_that_leaves_mid_stream_frees_its_row(client):
    before = client.get("/stats").json()
    body = {"model": "tiny-gpt2", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        received = 0
        for line in r.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while (stats := client.get("/stats").json())["cancelled"] == before["cancelled"] or stats["running_rows"]:
        assert time.monotonic() < deadline, stats  # the row leaves at the step after the disconnect
        time.sleep(0.1)
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["row_steps"] - before["row_steps"] < 400  # it stopped well before its 400 tokens
    assert completion(client, prompt=PROMPT, max_tokens=2).status_code == 200


BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": ', 400, None),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "temperature": "hot"}', 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "temperature": -1}', 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "n": "2"}', 400, "n"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "n": 0}', 400, "n"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "seed": -5}', 400, "seed"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "seed": "7"}', 400, "seed"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "top_p": 1.5}', 400, "top_p"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "top_p": NaN}', 400, None),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "stop": [1, 2]}', 400, "stop"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "stop": "x", "max_tokens": 2.5}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": ""}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "a \\ud800 b"}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
     400, None),
    ("/v1/chat/completions", b'{"model": "tiny-gpt2", "messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-gpt2", "messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-gpt2", "messages": [{"role": "user"}]}', 400, "messages[0].content"),
    ("/v1/completions", json.dumps({"model": "tiny-gpt2", "prompt": "word " * 100}).encode(), 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 401}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-gpt2", "prompt": "hi", "n": 5}', 400, "n"),
    ("/v1/completions", b'{"model": "gpt-4o", "prompt": "hi"}', 404, "model"),
]


def test_bad_requests_get_openai_errors_and_the_server_stays_up(client):
    for path, body, status, param in BAD_REQUESTS:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body[:80], r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"], body[:80]
        assert r.headers["x-request-id"]  # Serve's request id, on every response
    # values at the edges of their ranges are fine
    r = completion(client, prompt=PROMPT, max_tokens=2, top_p=0, seed=0, temperature=2)
    assert r.status_code == 200, r.text
    assert client.get("/no/such/route").json()["error"]["code"] == "404"
    assert client.get("/health").status_code == 200
    assert completion(client, prompt=PROMPT, max_tokens=2).status_code == 200


def test_auth_on_and_off(client):
    assert client.get("/v1/models").status_code == 200  # main: auth off
    assert client.get("/guarded/health").status_code == 200  # health stays open
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = client.get("/guarded/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
    r = client.post("/guarded/v1/completions", json={"model": "tiny-gpt2", "prompt": "hi"})
    assert r.status_code == 401
    r = client.get("/guarded/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny-gpt2"


def test_timeouts_give_504_not_a_hang(client):
    auth = {"Authorization": f"Bearer {KEY}"}
    for stream in (False, True):
        start = time.monotonic()
        r = client.post("/guarded/v1/completions", headers=auth,
                        json={"model": "tiny-gpt2", "prompt": PROMPT, "max_tokens": 4, "stream": stream})
        assert r.status_code == 504 and "request_timeout_s=1e-06" in r.json()["error"]["message"], r.text
        assert time.monotonic() - start < 10


def test_the_key_travels_with_the_deployment_not_the_replicas_environment(client):
    """The key is only in this process's environment (set after Ray started), yet the replica enforces it."""
    assert client.get("/guarded/stats").status_code == 401
    stats = client.get("/guarded/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    with open(f"/proc/{stats['pid']}/environ", "rb") as f:
        assert KEY.encode() not in f.read()
    assert KEY not in _server_log()


def test_json_endpoints_take_only_json_content(client):
    body = json.dumps({"model": "tiny-gpt2", "prompt": PROMPT, "max_tokens": 2}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         None):
        headers = {"content-type": content_type} if content_type else {}
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = client.post(path, content=body, headers=headers)
            assert r.status_code == 415, (content_type, path, r.text)
            assert r.json()["error"]["code"] == "unsupported_media_type" and "application/json" in r.text
    r = client.post("/v1/completions", content=body, headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


def _raw_post(port: int, head: bytes, body: bytes, timeout_s: float) -> bytes:
    """Send a request line, headers and (part of) a body; the response as far as it came in."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(head + b"\r\n\r\n" + body)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b"}}" in out:
                    break
        except TimeoutError:
            pass
        return out


def test_bodies_above_max_body_bytes_get_413_before_they_are_read(client):
    cap = ServeConfig().max_body_bytes
    port = client.base_url.port
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {20 * cap}").encode()
    start = time.monotonic()
    response = _raw_post(port, head, b'{"model": "tiny-gpt2", "prompt": "' + b"x" * 1000, timeout_s=10)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]  # the other 20 MB were never sent
    assert b"max_body_bytes=%d" % cap in response and time.monotonic() - start < 5

    def chunks():  # no Content-Length: the server stops reading past the cap
        yield b'{"model": "tiny-gpt2", "prompt": "'
        for _ in range(cap // 65536 + 1):
            yield b"word " * 13107
        yield b'"}'

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert client.get("/health").status_code == 200


STALL_BOUND_S = 0.5
"""Most a health check, a small request or a gap in a running stream may take while a huge prompt
is tokenised (before, tokenisation ran on the event loop and held the decode thread's lock)."""


def test_a_huge_prompt_stalls_neither_streams_nor_small_requests_nor_health(client):
    words = " ".join(f"{i * 2654435761 % 2**32:x}" for i in range(110_000))  # distinct words: slow to tokenise
    big = json.dumps({"model": "tiny-gpt2", "prompt": words}).encode()  # ~700k tokens
    assert len(big) <= ServeConfig().max_body_bytes  # allowed in, refused after tokenising
    finished: dict[str, float] = {}

    def send_big() -> None:
        r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        finished["big"] = time.monotonic()

    body = {"model": "tiny-gpt2", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as long:
        lines = (line for line in long.iter_lines() if line.startswith("data: "))
        assert next(lines)
        sender = threading.Thread(target=send_big)
        sender.start()
        time.sleep(0.3)  # its body is in; it is being tokenised
        start = time.monotonic()
        assert client.get("/health").status_code == 200
        health_s = time.monotonic() - start
        start = time.monotonic()
        assert completion(client, prompt="Hi", max_tokens=2, temperature=0).status_code == 200
        small_s = time.monotonic() - start
        finished["small"] = time.monotonic()
        gaps, last = [], time.monotonic()
        for _ in lines:  # the stream keeps going while the big one is handled
            gaps.append(time.monotonic() - last)
            last = time.monotonic()
            if "big" in finished:
                break
        sender.join(timeout=120)
    assert not sender.is_alive() and "big" in finished
    assert finished["big"] > finished["small"], "the big request was over too soon to test anything"
    print(f"health {health_s:.3f} s, small request {small_s:.3f} s, longest stream gap {max(gaps, default=0):.3f} s")
    assert health_s < STALL_BOUND_S and small_s < STALL_BOUND_S and max(gaps, default=0) < STALL_BOUND_S


def test_a_flood_beyond_the_queue_gets_503_with_retry_after_and_nothing_hangs(client):
    """victim: 4 ongoing + 2 queued at the proxy; of 16 at once, most are turned away at once (Serve's
    hand-off to the replica lets a few more than 6 in)."""
    body = {"model": "tiny-gpt2", "prompt": PROMPT, "max_tokens": 400, "temperature": 0}
    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: completion(client, path="/victim/v1/completions", **body), range(16),
                                  timeout=120))
    statuses = sorted(r.status_code for r in responses)
    rejected = [r for r in responses if r.status_code == 503]
    assert set(statuses) == {200, 503} and len(rejected) >= 6, statuses
    assert all(r.headers["retry-after"] == "3" for r in rejected)
    assert "max_queued_requests" in rejected[0].text
    assert time.monotonic() - start < 60
    assert completion(client, path="/victim/v1/completions", prompt=PROMPT, max_tokens=2).status_code == 200


def _server_log() -> str:
    """Everything the Serve replicas of this test's Ray instance have logged."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    return "\n".join(p.read_text(errors="replace") for p in logs.glob("replica_*.log"))


def test_internal_errors_give_a_generic_500_with_a_request_id(client):
    ids = []
    for stream in (False, True, False):
        start = time.monotonic()
        r = client.post("/broken/v1/completions",
                        json={"model": "broken", "prompt": PROMPT, "max_tokens": 4, "stream": stream})
        assert r.status_code == 500, r.text
        error, rid = r.json()["error"], r.headers["x-request-id"]
        assert error["type"] == "server_error" and rid in error["message"]
        assert "NaN" not in r.text and "Traceback" not in r.text and "GenerationError" not in r.text
        assert time.monotonic() - start < 10
        ids.append(rid)
    assert len(set(ids)) == 3
    assert client.get("/broken/health").json() == {"status": "ok", "model": "broken"}
    deadline = time.monotonic() + 10
    while not all(f"request {rid} failed: GenerationError" in _server_log() for rid in ids):
        assert time.monotonic() < deadline, "the failures are not in the replica log under their ids"
        time.sleep(0.2)
    log = _server_log()
    assert "Traceback" in log and "non-finite logits" in log


def test_a_killed_replica_is_restarted_and_requests_meanwhile_never_hang(client):
    """Runs last: kills the victim app's replica process (kill -9), as an OOM killer or a crash would."""
    stats = client.get("/victim/stats").json()
    pid = stats["pid"]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().startswith(b"ray::ServeReplica:victim:OpenAIServer")
    body = {"model": "tiny-gpt2", "prompt": PROMPT, "max_tokens": 32, "temperature": 0}
    statuses: list[int] = []

    def during_outage() -> None:  # requests sent while the replica is dead or restarting
        with httpx.Client(base_url=str(client.base_url), timeout=60, trust_env=False) as http:
            for _ in range(5):
                statuses.append(http.post("/victim/v1/completions", json=body).status_code)
                time.sleep(0.3)

    start = time.monotonic()
    long = {**body, "max_tokens": 400, "stream": True}
    with client.stream("POST", "/victim/v1/completions", json=long) as in_flight:
        lines = in_flight.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(pid, signal.SIGKILL)
        try:  # the stream in flight breaks off (its replica is gone); it does not hang
            rest = list(lines)
        except httpx.HTTPError:
            rest = ["(connection broken)"]
        assert rest[-1] != "data: [DONE]" and time.monotonic() - start < 30
    sender = threading.Thread(target=during_outage)
    sender.start()
    sender.join(timeout=120)
    assert not sender.is_alive(), "a request hung"
    assert set(statuses) <= {200, 503}, statuses
    deadline = time.monotonic() + 60
    while True:  # Serve brings up a new replica, which serves
        r = completion(client, path="/victim/v1/completions", prompt=PROMPT, max_tokens=2)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(0.5)
    assert client.get("/victim/stats").json()["pid"] != pid
    print(f"replica back after {time.monotonic() - start:.1f} s; statuses meanwhile {statuses}")
