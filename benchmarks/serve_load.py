"""Load on the OpenAI endpoint over loopback: throughput, time to first token and latency, batching on and off.

    python benchmarks/serve_load.py --model tiny-gpt2 --clients 1 4 16 --requests 64
    python benchmarks/serve_load.py --model tiny-gpt2 --clients 1 4 16 --requests 64 --mixed
    python benchmarks/serve_load.py --model smollm2-135m-instruct --clients 1 4 16 --requests 64 --time-limit 600
    python benchmarks/serve_load.py --model smollm2-135m-instruct --clients 1 4 16 --requests 64 --mixed --time-limit 600

For each mode and each client count C, C concurrent closed-loop clients send greedy streaming
/v1/completions requests (each client sends its next request when its previous one has ended)
until --requests have been sent; every run has a hard time limit, after which the rest is
cancelled and counted as unfinished. Answer budgets are --max-tokens each, or with --mixed a
fixed sequence spread over 8..64 tokens. "batched" serves with max_batch_size = the largest C
(continuous batching: a request joins the running decode batch at the next step), "unbatched"
with max_batch_size 1 (one request at a time). Time to first token is measured to the first
streamed text; latency to the end of the stream. The client runs in this process (asyncio,
light) on the same cores as the server: the figures include that. The replica has Serve's defaults
(on this 2-CPU local Ray: both CPUs, hence 2 torch threads); `--set FIELD=VALUE` changes any
ServeConfig field for both modes (e.g. `--set num_cpus=1`).

Writes benchmarks/results/serve_load.json (one entry per model and workload, merged with earlier
runs) and prints a table. Not a test: figures only, on an idle machine. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import common  # first: the offline defaults, before Ray, torch and transformers load

import httpx
from ray import serve

from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.jobs.config.base import merge, parse_overrides, validate
from rayrlhf.jobs.config.serve import ServeConfig
from rayrlhf.jobs.serve import build_app, prepare, with_replica_cpus

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a child.",
    "List some good habits for studying.",
    "Describe the weather on a cold winter morning.",
    "What should I pack for a weekend trip to the mountains?",
]
MIXED = (8, 64, 16, 40, 24, 56, 12, 32)
"""--mixed answer budgets, in turn (mean 31.5 tokens, about the fixed default's 32)."""


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)


def _steady(ends: list[float], start: float, last_sent: float) -> float | None:
    """Requests/s before the drain: those finished by the time the last request was sent, over that time.
    After it the clients run out of work one by one, so the batch empties (requests_per_s includes that)."""
    span = last_sent - start
    return round(sum(end <= last_sent for end in ends) / span, 3) if span > 0 else None


async def _request(http: httpx.AsyncClient, body: dict) -> tuple[float | None, float, int]:
    """(time to first text, latency, completion tokens) of one streamed completion."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and any(c["text"] for c in event["choices"]):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first, time.perf_counter() - start, tokens


async def _load(url: str, model: str, clients: int, budgets: list[int], limit_s: float) -> dict:
    ttft: list[float] = []
    latencies: list[float] = []
    tokens = errors = 0
    queue = list(enumerate(budgets))
    ends: list[float] = []
    last_sent = 0.0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors, last_sent
        while queue:
            i, budget = queue.pop(0)
            last_sent = time.perf_counter()
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": budget, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            try:
                first, latency, n = await _request(http, body)
            except (RuntimeError, httpx.HTTPError) as e:
                errors += 1
                print(f"  request {i} failed: {e}", flush=True)
                continue
            latencies.append(latency)
            ends.append(time.perf_counter())
            tokens += n
            if first is not None:
                ttft.append(first)

    async with httpx.AsyncClient(base_url=url, timeout=limit_s, trust_env=False) as http:
        start = time.perf_counter()
        tasks = [asyncio.create_task(client(http)) for _ in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=limit_s)
        for task in pending:
            task.cancel()
        wall = time.perf_counter() - start
    done = len(latencies)
    return {
        "completed": done, "errors": errors, "unfinished": len(budgets) - done - errors,
        "wall_s": round(wall, 2), "requests_per_s": round(done / wall, 3),
        "steady_requests_per_s": _steady(ends, start, last_sent), "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99),
        "latency_p50_s": _percentile(latencies, 0.5), "latency_p99_s": _percentile(latencies, 0.99),
    }


def run_mode(cfg: ServeConfig, url: str, args: argparse.Namespace, budgets: list[int]) -> dict:
    """Deploy with cfg, then one load run per client count."""
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    out = {}
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as http:
        for prompt in PROMPTS[:2]:  # warm-up: first forward passes, tokenizer caches
            http.post("/v1/completions", json={"model": cfg.model_name, "prompt": prompt, "max_tokens": 4})
        for clients in args.clients:
            before = http.get("/stats").json()
            figures = asyncio.run(_load(url, cfg.model_name, clients, budgets, args.time_limit))
            after = http.get("/stats").json()
            steps = after["steps"] - before["steps"]
            figures["mean_rows_per_step"] = round((after["row_steps"] - before["row_steps"]) / max(steps, 1), 2)
            out[str(clients)] = figures
            print(f"  {clients} clients: {figures}", flush=True)
    serve.delete(cfg.app_name)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=64, help="requests per run (one run per mode and C)")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer budget (ignored with --mixed)")
    parser.add_argument("--mixed", action="store_true", help="answer budgets spread over 8..64 tokens")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per run; the rest is cancelled")
    parser.add_argument("--modes", nargs="+", default=["batched", "unbatched"], choices=["batched", "unbatched"])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a ServeConfig field for both modes, e.g. torch_threads=2 (repeatable)")
    parser.add_argument("--output", type=Path, default=common.RESULTS / "serve_load.json")
    args = parser.parse_args(argv)
    budgets = [MIXED[i % len(MIXED)] if args.mixed else args.max_tokens for i in range(args.requests)]
    workload = "mixed_8_64" if args.mixed else f"fixed_{args.max_tokens}"

    port = common.free_port()
    url = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    most = max(args.clients)
    fields = {"model": args.model, "port": port, "auth_env": None, "max_ongoing_requests": max(32, most),
              "max_tokens": max(64, args.max_tokens), "request_timeout_s": args.time_limit}
    base = prepare(validate(ServeConfig, merge(fields, parse_overrides(args.set)), "--set"), local=True)
    init_ray(num_cpus=2, object_store_mb=256)
    base = with_replica_cpus(base)  # what build_app gives the replica
    runs = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode in args.modes:
            batch = most if mode == "batched" else 1
            print(f"{mode} (max_batch_size {batch})", flush=True)
            runs[mode] = {"max_batch_size": batch,
                          "clients": run_mode(base.model_copy(update={"max_batch_size": batch}), url, args, budgets)}
    finally:
        serve.shutdown()
        shutdown_ray()

    entry = {
        "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "requests": args.requests, "join_wait_steps": base.join_wait_steps, "torch_threads": base.threads,
        "dtype": base.dtype, "num_cpus": base.num_cpus, "budgets": sorted(set(budgets)), "time_limit_s": args.time_limit,
        "cores": os.cpu_count(), "load_avg_1m_before": round(load_before[0], 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2), "runs": runs,
    }
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    per_model = results.get(args.model, {})
    if "runs" in per_model:  # the layout before workloads (one-batch-at-a-time figures): replaced
        per_model = {}
    results[args.model] = {**per_model, workload: entry}
    common.write_results(args.output, results)

    print(f"\n{args.model}, {workload}: {args.requests} requests per run")
    print(f"{'mode':<10}{'C':>4}{'req/s':>8}{'tok/s':>8}{'ttft50':>8}{'ttft99':>8}{'p50 s':>8}{'p99 s':>8}"
          f"{'rows':>6}{'done':>6}")
    for mode, run in runs.items():
        for clients, r in run["clients"].items():
            print(f"{mode:<10}{clients:>4}{r['requests_per_s']:>8}{r['tokens_per_s']:>8}{r['ttft_p50_s']!s:>8}"
                  f"{r['ttft_p99_s']!s:>8}{r['latency_p50_s']!s:>8}{r['latency_p99_s']!s:>8}"
                  f"{r['mean_rows_per_step']:>6}{r['completed']:>6}")
    if {"batched", "unbatched"} <= runs.keys():
        b, u = runs["batched"]["clients"][str(most)], runs["unbatched"]["clients"][str(most)]
        if u["requests_per_s"]:
            print(f"batched / unbatched requests/s at {most} clients: {b['requests_per_s'] / u['requests_per_s']:.2f}x")
        if u["steady_requests_per_s"] and b["steady_requests_per_s"]:
            print(f"  before the drain (steady_requests_per_s): "
                  f"{b['steady_requests_per_s'] / u['steady_requests_per_s']:.2f}x")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
