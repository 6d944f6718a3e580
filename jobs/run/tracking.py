"""Where a run's metrics go: metrics.jsonl, the console, wandb and TensorBoard.

One `log(step, metrics)` call feeds all of them, so a metric logged once is visible everywhere.
wandb runs offline unless the config asks for online; it writes under the run's output dir.
`state()` goes into the run checkpoint; a Tracker built with `resume=state` (or `rewind(state)`)
continues from it: metrics.jsonl cut back to that point, TensorBoard events after it purged, and
the same wandb run continued (its id).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tqdm import tqdm

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

CONSOLE_KEYS = ("reward/total", "reward/sim", "reward/freq", "kl", "response_length", "time/step")


class Tracker:
    def __init__(
        self,
        output_dir: Path,
        *,
        run_name: str,
        config: dict[str, Any],
        total_steps: int,
        wandb_mode: Literal["offline", "online", "disabled"],
        wandb_project: str,
        tensorboard: bool,
        progress_bar: bool,
        resume: dict[str, Any] | None = None,
    ) -> None:
        self.output_dir = output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        self.step, self._lines = 0, 0
        self._jsonl = open(output_dir / "metrics.jsonl", "a" if resume else "w")
        self._bar = tqdm(total=total_steps, desc="rl steps", unit="step", disable=not progress_bar)
        self._tensorboard = tensorboard
        self._tb: SummaryWriter | None = None
        self._wandb = None
        if resume is not None:
            self.rewind(resume)
        elif tensorboard:
            self._open_tensorboard(None)
        if wandb_mode != "disabled":
            import wandb

            run_id = (resume or {}).get("wandb_id")
            self._wandb = wandb.init(
                project=wandb_project, name=run_name, mode=wandb_mode, dir=str(output_dir), config=config,
                id=run_id, resume="allow" if run_id else None,
            )

    def _open_tensorboard(self, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self._tb is not None:
            self._tb.close()
        self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=purge_step)

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "metrics_lines": self._lines, "wandb_id": self._wandb.id if self._wandb else None}

    def rewind(self, state: dict[str, Any]) -> None:
        """Continue from `state`: later lines of metrics.jsonl and later TensorBoard events are dropped.
        (wandb keeps what it was sent; a step logged again there is ignored.)"""
        path = self.output_dir / "metrics.jsonl"
        self._jsonl.close()
        kept = path.read_text().splitlines(keepends=True)[: state["metrics_lines"]] if path.exists() else []
        path.write_text("".join(kept))
        self._jsonl = open(path, "a")
        self.step, self._lines = state["step"], len(kept)
        self._bar.n = self.step
        self._bar.refresh()
        if self._tensorboard:
            self._open_tensorboard(self.step + 1)

    def log(self, step: int, metrics: dict[str, float], advance: bool = True) -> None:
        # a NaN or inf is logged as it is (metrics.jsonl writes NaN / Infinity, as Python's json reads
        # them): a diverging run must show, not vanish from the logs
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        self._lines += 1
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if advance:
            self.step = step
            self._bar.set_postfix({k.split("/")[-1]: f"{clean[k]:.3g}" for k in CONSOLE_KEYS if k in clean})
            self._bar.update(1)

    def write(self, message: str) -> None:
        """Print above the progress bar without breaking it."""
        self._bar.write(message)

    def summary(self, text: str) -> None:
        """The run's closing text, below the finished progress bar."""
        self._bar.close()
        print(text, flush=True)

    def close(self) -> None:
        self._bar.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def format_table(before: dict[str, float], after: dict[str, float]) -> str:
    """The held-out before/after table that ends every run (RL, SFT, reward model)."""
    width = max([18] + [len(key) - 3 for key in before])  # eval/ dropped, two spaces kept
    rows = [f"{'held-out metric':<{width}}{'before':>10}{'after':>10}{'change':>10}"]
    for key in before:
        name = key.removeprefix("eval/")
        rows.append(f"{name:<{width}}{before[key]:>10.4f}{after[key]:>10.4f}{after[key] - before[key]:>+10.4f}")
    return "\n".join(rows)


def what_you_have(places: Mapping[str, object], policy: object | None) -> str:
    """The block that ends a run: where its results are, and the commands that open them."""
    width = max(map(len, places)) + 2
    rows = ["what you have:"] + [f"  {name:<{width}}{where}" for name, where in places.items()]
    if policy is not None:
        rows.append(f"  {'serve it':<{width}}rayrlhf serve --model {policy}")
    return "\n".join(rows)
