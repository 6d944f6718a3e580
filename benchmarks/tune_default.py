"""The embedded default search (`rayrlhf tune`, ray_configs/tune.yaml): its wall time, and whether
the best weights beat alpha = beta = 0.5 on the held-out objective.

The search ranks trials on the first data.num_eval held-out prompts, so the winner is also scored
on the rest of the built-in held-out split (prompts no trial trained or was ranked on), next to
the alpha = beta = 0.5 trial and the untrained policy: the comparison free of selection bias.

    .venv/bin/python benchmarks/tune_default.py [--set trial.steps=2 ...]

Writes benchmarks/results/tune_default.json and prints the comparison. Not a test: figures only.
A fresh experiment name per run (the default one would be resumed, not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import common  # first: the offline defaults, before Ray, torch and transformers load

from rayrlhf.jobs.config.tune import load_tune_config
from rayrlhf.jobs.data.prompts import load_task
from rayrlhf.jobs.data.task import HELD_OUT_BLOCK
from rayrlhf.jobs.run.roles import role_table
from rayrlhf.jobs.run.pipeline import reward_metrics
from rayrlhf.jobs.train import prepare
from rayrlhf.jobs.tune import tune_weights


def score_on_unseen(setup, policies: dict[str, str]) -> dict[str, float]:
    """The objective of each policy directory on the held-out prompts the search did not rank on."""
    cfg = setup.run_config({})
    seen = cfg.data.num_eval
    full = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_eval": HELD_OUT_BLOCK})})
    _, held_out = prepare(full)
    _, ranked_on = load_task(cfg.data.train, cfg.data.eval, cfg.data.num_train, seen, cfg.seed)
    if [p.text for p in held_out[:seen]] != [p.text for p in ranked_on]:
        raise RuntimeError("the search's held-out prompts are not a prefix of the full held-out split")
    unseen = held_out[seen:]
    scores = {}
    for name, policy in {"untrained": full.policy.model, **policies}.items():
        with_policy = full.model_copy(update={"policy": full.policy.model_copy(update={"model": policy})})
        roles = {role.name: role for role in role_table(with_policy)}
        traj = roles["rollout"].instantiate().generate(
            unseen, greedy=True, max_new_tokens=cfg.eval_max_new_tokens or cfg.rollout.max_new_tokens
        )
        rewards = roles["reward"].instantiate().score(traj, update_stats=False)
        scores[name] = reward_metrics([rewards], "eval")[setup.cfg.objective.metric]
    return {"prompts": len(unseen), **scores}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tune")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    name = f"bench_{time.strftime('%Y%m%d_%H%M%S')}"
    setup = load_tune_config(args.config, [f"name={name}", *args.overrides])
    load_before = os.getloadavg()
    start = time.perf_counter()
    outcome = tune_weights(setup)
    wall = time.perf_counter() - start
    rows = outcome.summary.rows
    extra = [f for f in setup.cfg.search.space if f.startswith("reward.")]  # extra components: off in the reference
    reference = next((r for r in rows if r.get("reward.alpha") == 0.5 and r.get("reward.beta") == 0.5
                      and all(r.get(f) == 0 for f in extra)), None)  # fmt: skip
    best = outcome.summary.best
    untrained = None
    if reference is not None:
        eval_json = Path(setup.cfg.experiment_dir()) / reference["trial"] / "run" / "eval.json"
        if eval_json.exists():
            untrained = json.loads(eval_json.read_text())["before"].get(setup.cfg.objective.metric)
    figures = {
        "command": "python benchmarks/tune_default.py " + " ".join(f"--set {o}" for o in args.overrides),
        "experiment_dir": str(setup.cfg.experiment_dir()),
        "wall_s": round(wall, 1),
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "metric": setup.cfg.objective.metric,
        "untrained_policy": untrained,
        "reference_alpha_beta_0.5": reference and reference["objective"],
        "best": best and {k: best[k] for k in (*setup.cfg.search.weight_fields(), "objective", "trial")},
        "best_beats_reference": bool(best and reference and best["objective"] > reference["objective"]),
        "unseen_held_out": score_on_unseen(setup, {
            "alpha_beta_0.5": reference["checkpoint"], "best": best["checkpoint"]
        }) if reference and best and reference["checkpoint"] and best["checkpoint"] else None,
        "trials": [{k: v for k, v in r.items() if k not in ("checkpoint",)} for r in rows],
        "trial_budget": setup.cfg.trial,
    }
    common.write_results("tune_default.json", figures)
    print(json.dumps({k: figures[k] for k in ("wall_s", "untrained_policy", "reference_alpha_beta_0.5", "best",
                                              "best_beats_reference", "unseen_held_out",
                                              "load_average_1_5_15_before")}, indent=2))


if __name__ == "__main__":
    main()
