"""Metrics of n sampled answers per held-out prompt: mean@n of every reward component and pass@k
(k = 1, 2, 4, ... <= n) of every component whose scores are all 0 or 1 (a checkable answer).

pass@k is the unbiased estimator of Chen et al. (2021): for a prompt with c correct answers among n,
1 - C(n - c, k) / C(n, k), the chance that k answers drawn without replacement hold a correct one,
averaged over prompts. Not 1 - (1 - c/n)^k, which is biased low for k > 1.
"""

from __future__ import annotations

from math import comb

import numpy as np


def pass_at_k(correct: int, n: int, k: int) -> float:
    """The chance that k of n answers, c of them correct, drawn without replacement hold a correct one."""
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got c={correct}, n={n}, k={k}")
    return 1.0 - comb(n - correct, k) / comb(n, k)


def ks(n: int) -> list[int]:
    """The k reported for n samples: powers of two below n, and n."""
    return sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n})


def sampled_metrics(components: dict[str, np.ndarray], n: int) -> dict[str, float]:
    """mean@n per component and pass@k per 0/1 component, from [P * n] scores ordered prompt by prompt
    (NaN: the component does not apply to that row; such prompts are left out of its pass@k)."""
    out: dict[str, float] = {}
    for name, values in components.items():
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).any():
            continue
        out[f"eval/{name}/mean@{n}"] = float(np.nanmean(values))
        per_prompt = values.reshape(-1, n)
        applies = np.isfinite(per_prompt).all(axis=1)
        scored = per_prompt[applies]
        if not len(scored) or not np.isin(scored, (0.0, 1.0)).all():
            continue
        correct = scored.sum(axis=1).astype(int)
        for k in ks(n):
            out[f"eval/{name}/pass@{k}"] = float(np.mean([pass_at_k(int(c), n, k) for c in correct]))
    return out
