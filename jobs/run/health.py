"""Training-health monitors: is the policy getting better, or only better at the reward?

The RL loop hands every step's metrics (and each held-out evaluation) to `HealthMonitor.observe`,
which checks them against monitor.* thresholds, adds a 0/1 flag `health/<check>` per check to the
metrics (so they reach metrics.jsonl, TensorBoard and wandb), prints a warning when a check starts
failing (once per crossing, again only after it has recovered), and returns True when a check in
`monitor.stop_on` fails. `plot` writes training.png at the end. No Ray here: plain dicts in, plain
dicts out.

Checks compare like with like, over the mean of the last `window` steps (one step's batch is noisy):
length (sampled answers' length against their references, relative to the same ratio over the run's
own first `window` steps: a base model's samples run long, a healthy run shortens them, a gaming one
lengthens them), truncation (sampled answers cut at the token cap; in a multi-turn run, episodes with
a reply cut or no room left: reward/env_cut, since an episode lost on turns is not a token-cap
problem), entropy (collapse), kl (drift
from the reference policy) and hacking: a weighted reward component rose over the training steps
between two evaluations while the held-out metric fell. Thresholds are calibrated on the default's
per-step metrics (benchmarks/health_calibration.py): healthy runs do not warn.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rayrlhf.jobs.config.run import RewardConfig

CHECKS = ("length", "truncation", "entropy", "kl", "hacking")

# What to do about answers cut at the token cap, by reward.truncation: the one advice that fits every
# reward was wrong for 0/1 rewards (a penalty on a sparse reward became its only signal: math.yaml).
TRUNCATION_ADVICE = {
    "penalize": "raise rollout.max_new_tokens (each cut answer already loses reward.truncation_penalty)",
    "keep": "raise rollout.max_new_tokens; cut answers are scored as written (reward.truncation=keep): a "
            "checked 0/1 answer cut before its final answer already scores 0, but with a graded reward "
            "(similarity, a reward model) set reward.truncation=penalize so cut answers lose reward",
    "mask": "raise rollout.max_new_tokens: cut answers are left out of the loss (reward.truncation=mask), "
            "so this share of each batch teaches nothing",
}  # fmt: skip


def weighted_components(reward: RewardConfig) -> list[str]:
    """The reward components the policy is trained on (weight != 0), by their logged names."""
    weights = {"freq": reward.alpha, "sim": reward.beta, "bleu": reward.bleu, "rouge_l": reward.rouge_l,
               "rm": reward.rm_weight, **{f.name: f.weight for f in reward.functions}}  # fmt: skip
    if reward.remote is not None:
        weights["remote"] = reward.remote.weight
    return [name for name, weight in weights.items() if weight != 0]


def trend(points: list[tuple[int, float]]) -> float | None:
    """Change over the span of the least-squares line through (step, value) points; None if < 2 steps."""
    steps = np.array([s for s, _ in points], dtype=float)
    if len(points) < 2 or np.ptp(steps) == 0:
        return None
    # the closed form, not np.polyfit: a flat series gets exactly 0 (LAPACK's solver left ~1e-16 on
    # some CPUs, and a flat component then counted as rising)
    values = np.array([v for _, v in points], dtype=float)
    dx = steps - steps.mean()
    slope = (dx * (values - values.mean())).sum() / (dx * dx).sum()
    return float(slope * np.ptp(steps))


class HealthMonitor:
    def __init__(
        self, cfg: dict[str, Any], components: list[str], write: Callable[[str], None] = print,
        truncation: str = "penalize", episodes: bool = False,
    ) -> None:
        unknown = set(cfg["stop_on"]) - set(CHECKS)
        if unknown:
            raise ValueError(f"monitor.stop_on: unknown checks {sorted(unknown)}; expected some of {CHECKS}")
        self.cfg, self.components, self.write = cfg, components, write
        self.truncation_advice = TRUNCATION_ADVICE[truncation]
        self.episodes = episodes
        """A multi-turn run (env): the truncation check reads reward/env_cut."""
        self.history: list[tuple[int, dict[str, float]]] = []
        self.failing = dict.fromkeys(CHECKS, False)
        self.last_eval: tuple[int, float] | None = None
        self.stop_reason: str | None = None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to warn, stop and plot as the uninterrupted one would (JSON-friendly)."""
        return {"history": [[s, m] for s, m in self.history], "failing": dict(self.failing),
                "last_eval": self.last_eval, "stop_reason": self.stop_reason}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(s, dict(m)) for s, m in state["history"]]
        self.failing = dict(state["failing"])
        self.last_eval = tuple(state["last_eval"]) if state["last_eval"] is not None else None
        self.stop_reason = state["stop_reason"]

    def observe(self, step: int, metrics: dict[str, float]) -> bool:
        """Check one step's metrics (an evaluation's too); adds health/<check> flags; True: stop."""
        self.history.append((step, dict(metrics)))
        stop = False
        for check, problem in self._problems(step, metrics).items():
            metrics[f"health/{check}"] = float(problem is not None)
            if problem is not None and not self.failing[check]:
                self.write(f"health warning (step {step}, {check}): {problem}")
                if check in self.cfg["stop_on"] and self.stop_reason is None:
                    self.stop_reason = f"{check} at step {step}: {problem}"
                    self.write(f"stopping early (monitor.stop_on: {check})")
                    stop = True
            self.failing[check] = problem is not None
        return stop

    def _recent(self, key: str) -> list[float]:
        """This metric's training-step values so far, oldest first (evaluations log other keys)."""
        return [m[key] for _, m in self.history if key in m]

    def _problems(self, step: int, m: dict[str, float]) -> dict[str, str | None]:
        """What is wrong, per check evaluated on these metrics (checks whose inputs are absent are skipped)."""
        c, out = self.cfg, dict[str, str | None]()
        window = c["window"]
        over = f" (mean of the last {window} steps)" if window > 1 else ""
        limits = [  # check, metric, limit, +1: fails above the limit / -1: below it, message
            ("length", "reward/length_ratio", c["max_length_growth"], 1,
             "sampled answers, against their references, are {v:.2f}x as long as in the run's first "
             f"{window} step(s){over}, limit {{t}}: the policy may be padding answers for reward; look at "
             "examples.jsonl, raise reward.overlong_penalty or lower rollout.max_new_tokens"),
            ("truncation", "reward/env_cut", c["max_truncated_frac"], 1,
             f"{{v:.0%}} of sampled episodes hit a token cap (a reply cut at rollout.max_new_tokens, or "
             f"env.max_tokens used up){over}, limit {{t:.0%}}: raise rollout.max_new_tokens or env.max_tokens")
            if self.episodes else
            ("truncation", "reward/truncated_frac", c["max_truncated_frac"], 1,
             f"{{v:.0%}} of sampled answers were cut at rollout.max_new_tokens{over}, limit {{t:.0%}}: "
             + self.truncation_advice),
            ("entropy", "entropy", c["min_entropy"], -1,
             f"policy entropy {{v:.4f}} < {{t}}{over}: it is collapsing onto a few answers; raise kl.coef "
             "or lower learner.lr"),
            ("kl", "kl", c["max_kl"], 1,
             f"KL to the reference {{v:.4f}} > {{t}}{over}: the policy is drifting far from where it started; "
             "raise kl.coef or lower learner.lr"),
        ]  # fmt: skip
        for check, key, limit, side, message in limits:
            if limit is None or key not in m:
                continue
            values = self._recent(key)
            value = float(np.mean(values[-window:]))
            if check == "length":  # against the run's own start; nothing to compare with until it is known
                baseline = float(np.nanmean(values[:window])) if np.isfinite(values[:window]).any() else 0.0
                value = value / baseline if len(values) > window and baseline > 0 else float(np.nan)
                if np.isfinite(m[key]) and not np.isfinite(value):
                    out[check] = None
                    continue
            if not np.isfinite(m[key]):  # NaN compares false with any limit: it must fail, not pass
                out[check] = f"{key} is {m[key]} (the run is diverging)"
            elif not np.isfinite(value):
                out[check] = f"{key} was not finite within the last {window} steps (the run is diverging)"
            else:
                out[check] = message.format(v=value, t=limit) if side * (value - limit) > 0 else None
        if c["held_out"] in m:
            out["hacking"] = self._hacking(step, m[c["held_out"]])
        return out

    def _hacking(self, step: int, held_out: float) -> str | None:
        if not np.isfinite(held_out):
            return f"{self.cfg['held_out']} is {held_out}: the policy no longer answers sensibly"
        previous, self.last_eval = self.last_eval, (step, held_out)
        if previous is None:
            return None
        since, before = previous
        change = held_out - before
        if change >= -self.cfg["hacking_tolerance"]:
            return None
        rising = []
        for name in self.components:
            key = f"reward/{name}"
            rise = trend([(s, m[key]) for s, m in self.history if since <= s <= step and key in m])
            if rise is not None and rise > 0:
                rising.append(f"{key} {rise:+.4f}")
        if not rising:
            return None
        return (f"{', '.join(rising)} rose from step {since} to {step} while {self.cfg['held_out']} fell "
                f"{change:+.4f}: the policy may be gaming the reward; look at examples.jsonl and lower the weight "
                "of the rising component")  # fmt: skip

    def plot(self, path: Path) -> Path:
        """training.png: reward components, length, KL and entropy, held-out metrics over steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def series(key: str) -> tuple[list[int], list[float]]:
            points = [(s, m[key]) for s, m in self.history if key in m and np.isfinite(m[key])]
            return [s for s, _ in points], [v for _, v in points]

        keys = {k for _, m in self.history for k in m}
        fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
        panels = [
            (axes[0, 0], "reward components (raw)", ["reward/raw", *(f"reward/{c}" for c in self.components)]),
            (axes[0, 1], "length", ["response_length", "eval/length"]),
            (axes[1, 0], "KL and entropy", ["kl", "entropy"]),
            (axes[1, 1], "held-out", sorted(k for k in keys if k.startswith("eval/") and k not in
                                            ("eval/length", "eval/empty_frac"))),  # fmt: skip
        ]
        for ax, title, names in panels:
            for key in names:
                steps, values = series(key)
                if steps:
                    ax.plot(steps, values, marker="o" if key.startswith("eval/") else ".", label=key)
            ax.set_title(title)
            if ax.lines:
                ax.legend(fontsize=7)
        right = axes[0, 1].twinx()  # fractions next to the token counts
        for key in ("reward/length_ratio", "reward/truncated_frac"):
            steps, values = series(key)
            if steps:
                right.plot(steps, values, linestyle="--", label=key)
        if right.lines:
            right.legend(fontsize=7, loc="lower right")
        for ax in axes[1]:
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path
