"""The `rayrlhf` command: one sub-command per user verb, each a thin wrapper over its job."""

from __future__ import annotations

import argparse
import sys

from jobs import serve as serve_job
from jobs import sft as sft_job
from jobs import submit, train, train_rm
from jobs import tune as tune_job
from jobs.config import ConfigError


VERBS = (
    # verb, help, adds its arguments, runs it
    ("train", "RL-train a policy (GRPO, PPO, REINFORCE)", train.add_arguments, train.run_from_args),
    ("sft", "supervised fine-tuning of the policy (Ray Train + DeepSpeed)", sft_job.add_arguments,
     sft_job.run_from_args),
    ("train-rm", "train a scalar reward model (Ray Train + DeepSpeed)", train_rm.add_arguments,
     train_rm.run_from_args),
    ("tune", "search the reward weights (alpha, beta, ...) with Ray Tune", tune_job.add_arguments,
     tune_job.run_from_args),
    ("serve", "serve a policy behind an OpenAI-compatible endpoint (Ray Serve)", serve_job.add_arguments,
     serve_job.run_from_args),
    ("submit", "run a verb on a Ray cluster as a Ray Job", submit.add_submit_arguments, submit.run_submit),
    ("jobs", "list, inspect, follow or stop the Ray Jobs of a cluster", submit.add_jobs_arguments, submit.run_jobs),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayrlhf", description="Distributed RLHF on Ray.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb, text, add_arguments, run in VERBS:
        verb_parser = verbs.add_parser(verb, help=text)
        add_arguments(verb_parser)
        verb_parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except ConfigError as e:
        print(f"rayrlhf {args.verb}: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0  # submit/jobs return an exit status


if __name__ == "__main__":
    sys.exit(main())
