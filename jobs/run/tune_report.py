"""What a finished (or interrupted) search leaves behind, in its experiment folder.

results.csv / results.json: every trial's weights, objective, reward components, KL and status;
objective.png: the objective over the first two weights (matplotlib, Agg);
schedule.png (PBT): the settings that trained the best trial's policy, step by step, exploits marked;
best_config.yaml: the best weights as a run config for `rayrlhf train` (without the trial budget);
and the best trial's checkpoint path (the final policy, a Hugging Face directory).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.config.tune import TuneSetup
from rayrlhf.jobs.run import pbt

if TYPE_CHECKING:
    from ray.tune import Result, ResultGrid

SHOWN = ("eval/rouge_l", "eval/sim", "eval/freq", "eval/bleu", "eval/length", "reward/sim", "reward/freq")
"""Columns of the console table besides the weights, objective and KL (the files have them all)."""


@dataclass
class TuneSummary:
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_checkpoint: str | None
    metric: str
    table_path: Path | str
    """A path when the experiment's folder is a path, else its location in the storage (a URI); so are the others."""
    json_path: Path | str
    plot_path: Path | str
    best_config_path: Path | str | None
    schedule: list[dict[str, Any]] | None = None
    """PBT: the best trial's settings from step 0 (jobs/run/pbt.py schedule), else None."""
    schedule_path: Path | str | None = None


def _status(result: Result) -> str:
    metrics = result.metrics or {}
    if result.error is not None:
        return "error"
    if metrics.get("final") == 1.0:
        return "done"
    return "stopped"


def trial_rows(setup: TuneSetup, grid: ResultGrid) -> list[dict[str, Any]]:
    rows = []
    for i in range(len(grid)):  # a ResultGrid is indexed (its types declare no __iter__)
        result = grid[i]
        metrics = result.metrics or {}
        if "objective" not in metrics and result.error is None:
            continue  # not run yet (an interrupted search): nothing to show
        row: dict[str, Any] = {"trial": Path(result.path).name, "status": _status(result)}
        row.update(setup.cfg.search.field_values(result.config) if result.config else {})
        row["objective"] = metrics.get("objective")
        row["kl"] = metrics.get("kl")
        row.update({k: v for k, v in sorted(metrics.items()) if k.startswith(("eval/", "reward/"))})
        row["evaluations"] = metrics.get("training_iteration", 0)
        row["checkpoint"] = metrics.get("policy_dir") if row["status"] == "done" else None
        row["error"] = str(result.error).strip().splitlines()[-1] if result.error is not None else None
        rows.append(row)
    return rows


def best_row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] == "done" and r["objective"] is not None and math.isfinite(r["objective"])]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r["objective"])


def _finite(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def format_table(rows: list[dict[str, Any]], weights: list[str]) -> str:
    cols = ["trial", "status", *weights, "objective", "kl", *[c for c in SHOWN if any(c in r for r in rows)]]

    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))

    widths = [max([len(c), *(len(cell(r.get(c))) for r in rows)]) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(cell(r.get(c)).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def plot_objective(
    rows: list[dict[str, Any]], weights: list[str], best: dict[str, Any] | None, metric: str, path: Path
) -> None:
    """Scatter of the objective over the first two weights (or over one weight), best starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["objective"] is not None]
    feasible = [r for r in scored if math.isfinite(r["objective"])]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    two = len(weights) >= 2
    x_of = lambda r: r[weights[0]]  # noqa: E731
    y_of = (lambda r: r[weights[1]]) if two else (lambda r: r["objective"])  # noqa: E731
    if feasible:
        points = ax.scatter([x_of(r) for r in feasible], [y_of(r) for r in feasible],
                            c=[r["objective"] for r in feasible], cmap="viridis", s=80, edgecolors="k")
        fig.colorbar(points, ax=ax, label=f"objective ({metric}, held-out)")
        for r in feasible:
            label = f"{r['objective']:.3f}" + (" (stopped early)" if r["status"] == "stopped" else "")
            ax.annotate(label, (x_of(r), y_of(r)), textcoords="offset points", xytext=(6, 6), fontsize=8)
    over = [r for r in scored if not math.isfinite(r["objective"])]
    if over:
        ax.scatter([x_of(r) for r in over], [r[weights[1]] if two else 0.0 for r in over], marker="x", c="grey",
                   label="over the KL budget")
    if best is not None:
        ax.scatter([x_of(best)], [y_of(best)], marker="*", s=400, c="red", label="best", zorder=3)
    ax.set_xlabel(weights[0])
    ax.set_ylabel(weights[1] if two else f"objective ({metric})")
    ax.set_title(f"held-out {metric} per trial")
    if best is not None or over:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_schedule(schedule: list[dict[str, Any]], fields: list[str], last_step: int, path: Path) -> None:
    """One panel per field: its value over the steps that trained the best policy; a dotted line where
    the lineage took over another trial's checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(fields), 1, figsize=(6, 1.2 + 1.6 * len(fields)), sharex=True, squeeze=False)
    steps = [s["step"] for s in schedule] + [max(last_step, schedule[-1]["step"])]
    for ax, field in zip(axes[:, 0], fields):
        values = [s[field] for s in schedule]
        ax.step(steps, values + values[-1:], where="post", marker="o")
        ax.set_ylabel(field, fontsize=8)
        for before, after in zip(schedule, schedule[1:]):
            if after["trial"] != before["trial"]:
                ax.axvline(after["step"], ls=":", c="grey")
    axes[0, 0].set_title(f"best trial's schedule ({schedule[-1]['trial']})", fontsize=9)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def weights_of(row: dict[str, Any], weights: list[str]) -> dict[str, float]:
    return {name: row[name] for name in weights}


def export_best(setup: TuneSetup, best: dict[str, Any], folder: Path, exp_dir: str, metric: str) -> Path:
    """The base run config + overrides + the best weights, ready for `rayrlhf train --config`."""
    data = setup.export_data(weights_of(best, setup.cfg.search.weight_fields()))
    data["name"] = f"{data.get('name', 'rayrlhf')}-tuned"
    data["output_dir"] = f"{exp_dir}/best_run"
    header = (
        f"# Best weights of the search {exp_dir} (trial {best['trial']}, held-out {metric} = {best['objective']:.4f}).\n"
        f"# Base run config {setup.base_path} plus the search's overrides; run: rayrlhf train --config {exp_dir}/best_config.yaml\n"
    )
    path = folder / "best_config.yaml"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


def summarize(setup: TuneSetup, grid: ResultGrid, storage: Storage) -> TuneSummary:
    """Write the summary files into the experiment's folder (staged and uploaded when it is a URI)."""
    metric, mode = setup.cfg.objective.metric, setup.cfg.objective.mode
    rows = trial_rows(setup, grid)
    weights = setup.cfg.search.weight_fields()
    best = best_row(rows, mode)
    names = ("results.csv", "results.json", "objective.png", "best_config.yaml")
    schedule = None
    with storage.writable_dir() as folder:
        if setup.cfg.search.algorithm == "pbt":  # a path: PBT refuses a URI storage_path
            events = {r["trial"]: pbt.read_events(folder / r["trial"]) for r in rows}
            for r in rows:
                r["exploits"] = sum(e["kind"] == "exploit" for e in events[r["trial"]])
            schedule = pbt.schedule(events, best["trial"]) if best else None
            if best and schedule:  # empty: the best trial recorded no start (its events file is gone)
                steps = setup.run_config(weights_of(best, weights)).steps
                plot_schedule(schedule, weights, steps, folder / "schedule.png")
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(folder / names[0], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: _finite(r.get(k)) for k in columns} for r in rows)
        plot_objective(rows, weights, best, metric, folder / names[2])
        if best:
            export_best(setup, best, folder, storage.location, metric)
        (folder / names[1]).write_text(json.dumps({
            "metric": metric, "mode": mode, "weights": weights,
            "rows": [{k: _finite(v) for k, v in r.items()} for r in rows],
            "best": {k: _finite(v) for k, v in best.items()} if best else None,
            "best_checkpoint": best["checkpoint"] if best else None,
            "best_config": storage.join(names[3]) if best else None,
            "schedule": schedule,
        }, indent=2))
    # where a user finds them: paths for a path, locations in the bucket for a URI
    table_path, json_path, plot_path, best_config = (storage.shown(n) for n in names)
    summary = TuneSummary(
        rows, best, best["checkpoint"] if best else None, metric, table_path, json_path, plot_path,
        best_config if best else None, schedule, storage.shown("schedule.png") if schedule else None,
    )
    print(format_table(rows, weights))
    print(f"\nresults: {table_path}\nplot: {plot_path}")
    if best:
        print(f"best: {', '.join(f'{w}={best[w]:.4g}' for w in weights)} -> {metric} = {best['objective']:.4f}")
        print(f"best config: {best_config}\nbest checkpoint: {summary.best_checkpoint}")
        if schedule:
            print(f"best trial's schedule: {summary.schedule_path}")
    else:
        print("no trial finished: no best config")
    return summary
