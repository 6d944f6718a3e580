"""Load on the OpenAI endpoint over loopback: throughput and latency with batching on and off.

    python benchmarks/serve_load.py --model tiny-gpt2 --clients 16 --requests 128
    python benchmarks/serve_load.py --model smollm2-135m-instruct --requests 64

C concurrent clients send a fixed number of greedy /v1/completions requests (fixed max_tokens),
each client sending its next request when the previous one returns; every mode has a hard time
limit, after which the rest is cancelled and counted as unfinished. "batched" serves with
max_batch_size=C, "unbatched" with max_batch_size=1 (one request per decode loop). The client
runs in this process (asyncio, light) on the same 2 cores as the server: figures include that.

Writes benchmarks/results/serve_load.json (one entry per model, merged with earlier runs) and
prints a table. Not a test: figures only. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from rayrlhf.cluster.offline import apply_offline_defaults

apply_offline_defaults()

import httpx
from ray import serve

from rayrlhf.cluster.local import init_ray, shutdown_ray
from rayrlhf.jobs.config.serve import ServeConfig
from rayrlhf.jobs.serve import build_app, prepare

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a child.",
    "List some good habits for studying.",
    "Describe the weather on a cold winter morning.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _load(url: str, model: str, clients: int, requests: int, max_tokens: int, limit_s: float) -> dict:
    latencies: list[float] = []
    tokens = errors = 0
    issued = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued, tokens, errors
        while issued < requests:
            prompt = PROMPTS[issued % len(PROMPTS)]
            issued += 1
            start = time.perf_counter()
            r = await http.post("/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=limit_s, trust_env=False) as http:
        start = time.perf_counter()
        tasks = [asyncio.create_task(client(http)) for _ in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=limit_s)
        for task in pending:
            task.cancel()
        wall = time.perf_counter() - start
        for task in done:
            task.result()  # surface client-side exceptions
    return {
        "completed": len(latencies), "errors": errors, "unfinished": requests - len(latencies) - errors,
        "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(_percentile(latencies, 0.5), 3) if latencies else None,
        "latency_p99_s": round(_percentile(latencies, 0.99), 3) if latencies else None,
        "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
    }


def run_mode(cfg: ServeConfig, url: str, args: argparse.Namespace) -> dict:
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/")
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as http:
        for prompt in PROMPTS[:2]:  # warm-up: first forward passes, tokenizer caches
            http.post("/v1/completions", json={"model": cfg.model_name, "prompt": prompt, "max_tokens": 4})
        before = http.get("/stats").json()
        figures = asyncio.run(_load(url, cfg.model_name, args.clients, args.requests, args.max_tokens, args.time_limit))
        after = http.get("/stats").json()
    batches = after["batches"] - before["batches"]
    figures["batches"] = batches
    figures["mean_batch_requests"] = round((after["requests"] - before["requests"]) / max(batches, 1), 2)
    serve.delete(cfg.app_name)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per mode; the rest is cancelled")
    parser.add_argument("--modes", nargs="+", default=["batched", "unbatched"], choices=["batched", "unbatched"])
    args = parser.parse_args(argv)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    base = prepare(ServeConfig(model=args.model, port=port, auth_env=None, max_ongoing_requests=max(32, args.clients),
                               num_cpus=1, request_timeout_s=args.time_limit), local=True)
    init_ray(num_cpus=2, object_store_mb=256)
    runs = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode in args.modes:
            batch = args.clients if mode == "batched" else 1
            cfg = base.model_copy(update={"max_batch_size": batch, "batch_wait_timeout_s": 0.02 if batch > 1 else 0.0})
            runs[mode] = {"max_batch_size": batch, "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
                          **run_mode(cfg, url, args)}
            print(mode, runs[mode], flush=True)
    finally:
        serve.shutdown()
        shutdown_ray()

    entry = {
        "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
        "time_limit_s": args.time_limit, "cores": os.cpu_count(),
        "load_avg_1m_before": round(load_before[0], 2), "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "serve_load.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.model] = entry
    out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{args.model}: {args.clients} clients, {args.requests} requests x {args.max_tokens} tokens")
    print(f"{'mode':<10}{'req/s':>8}{'tok/s':>8}{'p50 s':>8}{'p99 s':>8}{'batch':>7}{'done':>6}")
    for mode, r in runs.items():
        print(f"{mode:<10}{r['requests_per_s']:>8}{r['tokens_per_s']:>8}{r['latency_p50_s']:>8}"
              f"{r['latency_p99_s']:>8}{r['mean_batch_requests']:>7}{r['completed']:>6}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
