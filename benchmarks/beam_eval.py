"""Greedy vs beam search on the held-out prompts: the same policy, the same scorer, only
`eval.num_beams` differs. Run it on the default run's final policy:

    python benchmarks/beam_eval.py --policy outputs/default/final --beams 1 2 4

Writes benchmarks/results/beam_eval.json and prints one column per beam width. In-process (no
Ray): one rollout worker and one reward scorer, built exactly as the RL job builds them.
"""

from __future__ import annotations

import argparse
import os
import time

import common  # first: the offline defaults, before Ray, torch and transformers load

from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run.roles import role_table
from rayrlhf.jobs.run.pipeline import reward_metrics
from rayrlhf.jobs.train import prepare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default", help="the run config whose held-out prompts and reward are used")
    parser.add_argument("--policy", default=None, help="a policy directory (default: the config's untrained policy)")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    _, held_out = prepare(cfg)
    if args.policy:
        cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"model": args.policy})})
    roles = {role.name: role for role in role_table(cfg)}
    worker, scorer = roles["rollout"].instantiate(), roles["reward"].instantiate()
    max_new = cfg.eval_max_new_tokens or cfg.rollout.max_new_tokens
    columns = {}
    for beams in args.beams:
        start = time.perf_counter()
        traj = worker.generate(held_out, greedy=True, max_new_tokens=max_new, num_beams=beams)
        metrics = reward_metrics([scorer.score(traj, update_stats=False)], "eval")
        metrics["eval/length"] = float(traj.response_lengths.mean())
        metrics["seconds"] = time.perf_counter() - start
        columns[beams] = metrics
    keys = [k for k in columns[args.beams[0]] if k != "eval/total"]
    print(f"{'held-out metric':<22}" + "".join(f"{f'beams={b}':>12}" for b in args.beams))
    for key in keys:
        values = "".join(f"{columns[b].get(key, float('nan')):>12.4f}" for b in args.beams)
        print(f"{key.removeprefix('eval/'):<22}{values}")
    report = {"config": args.config, "policy": args.policy, "overrides": args.overrides, "prompts": len(held_out),
              "load_average_1_5_15": os.getloadavg(), "columns": columns}
    common.write_results("beam_eval.json", report)


if __name__ == "__main__":
    main()
