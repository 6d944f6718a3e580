"""MKL's sgemm (F.linear) against oneDNN's packed GEMM (actors/runtime/cpu_linear.py) on the policy's shapes.

    python benchmarks/cpu_linear.py --threads 2

Two measures, each side in the same process, interleaved:
- layers: every linear layer of the policy (distinct weights, so they stream from memory as in a
  forward), at 1, 16, 64 and 1,024 rows: ms for all of them and the GFLOP/s that makes;
- policy: a generate of 4 prompts x 4 samples x 32 tokens (the default rollout's shape) and a
  no-grad forward of 16 rows x 96 tokens (the reference's), the whole model plain and packed.
Writes benchmarks/results/cpu_linear.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common  # first: the offline defaults

import torch
import torch.nn.functional as F

from rayrlhf.actors.generation.engine import LocalEngine
from rayrlhf.actors.generation.requests import SamplingParams
from rayrlhf.actors.runtime.cpu_linear import PACK_ROWS_HINT
from rayrlhf.actors.runtime.models import SMOLLM2, load_policy, resolve_policy


def best_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def layers(model: torch.nn.Module, repeats: int) -> list[dict]:
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in weights]
    out = []
    for rows in (1, 16, 64, 1024):
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
        flops = sum(2 * rows * w.numel() for w in weights)

        def mkl():
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

        def onednn():
            for w, p in zip(weights, packed):
                torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none", [], "")

        ms = {"mkl": best_ms(mkl, repeats), "onednn": best_ms(onednn, repeats)}
        row = {"rows": rows, **{f"{k}_ms": round(v, 2) for k, v in ms.items()},
               **{f"{k}_gflops": round(flops / v / 1e6, 1) for k, v in ms.items()},
               "speedup": round(ms["mkl"] / ms["onednn"], 2)}  # fmt: skip
        print(row)
        out.append(row)
    return out


def policy(path, repeats: int) -> dict:
    engines = {}
    for side in ("mkl", "onednn"):
        engine = LocalEngine(*load_policy(path))
        if side == "mkl":  # undo what ModelRunner did
            for m in engine.model.modules():
                if isinstance(m, torch.nn.Linear):
                    m.__class__ = torch.nn.Linear
        engines[side] = engine
    tok = engines["mkl"].tokenizer
    questions = [f"Explain briefly why the sky is blue, and what makes sunsets red ({i})." for i in range(4)]
    prompts = [tok(q)["input_ids"] for q in questions]
    params = SamplingParams(max_tokens=32, temperature=1.0, top_p=1.0, stop=(), seed=0)
    ids = torch.randint(100, 10000, (16, 96), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {f"{k}_{s}": [] for k in ("generate", "forward") for s in engines}
    for _ in range(repeats):  # interleaved
        for side, engine in engines.items():
            times[f"generate_{side}"].append(best_ms(lambda: engine.generate(prompts, 4, params), 1) / 1e3)
            with torch.no_grad():
                times[f"forward_{side}"].append(best_ms(lambda: engine.model(input_ids=ids), 1) / 1e3)
    out = {k: round(statistics.median(v), 3) for k, v in times.items()}
    out["generate_speedup"] = round(out["generate_mkl"] / out["generate_onednn"], 2)
    out["forward_speedup"] = round(out["forward_mkl"] / out["forward_onednn"], 2)
    print(out)
    return out


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_policy(SMOLLM2)
    model, _ = load_policy(path)
    report = {"threads": args.threads, "cpu": cpu_name(),
              "layers": layers(model, args.repeats), "policy": policy(path, args.repeats)}  # fmt: skip
    common.write_results("cpu_linear.json", report)


if __name__ == "__main__":
    main()
