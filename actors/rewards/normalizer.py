"""Running mean/std z-scoring of rewards (the seed's r̄ = (r − μ)/σ), resumable from JSON."""

from __future__ import annotations

from typing import Any

import numpy as np


class RunningNormalizer:
    """Mean and population std over every value seen so far, merged batch by batch (Chan et al.).

    NaN values (a component that does not apply to a row) are left out of the statistics and
    stay NaN when normalised. With fewer than 2 values seen there is no spread yet, so
    `normalize` only centres: it returns x - mean (x itself when nothing has been seen).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        """Sum of squared deviations from the mean."""

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.count)) if self.count else 0.0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).ravel()
        x = x[np.isfinite(x)]
        n = int(x.size)
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def normalize(self, x: np.ndarray, update: bool) -> np.ndarray:
        """Z-score x with the running statistics, after folding x into them if `update`."""
        if update:
            self.update(x)
        x = np.asarray(x, dtype=np.float64)
        if self.count < 2:
            return x - self.mean
        return (x - self.mean) / (self.std + self.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"count": int(self.count), "mean": float(self.mean), "m2": float(self.m2)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
