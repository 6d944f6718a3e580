"""The `rayrlhf` command: one sub-command per user verb, each a thin wrapper over its job."""

from __future__ import annotations

import argparse
import sys

from jobs import serve as serve_job
from jobs import sft as sft_job
from jobs import submit, train, train_rm
from jobs import tune as tune_job
from jobs.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayrlhf", description="Distributed RLHF on Ray.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    train_parser = verbs.add_parser("train", help="RL-train a policy (GRPO, PPO, REINFORCE)")
    train.add_arguments(train_parser)
    train_parser.set_defaults(run=train.run_from_args)
    sft_parser = verbs.add_parser("sft", help="supervised fine-tuning of the policy (Ray Train + DeepSpeed)")
    sft_job.add_arguments(sft_parser)
    sft_parser.set_defaults(run=sft_job.run_from_args)
    rm_parser = verbs.add_parser("train-rm", help="train a scalar reward model (Ray Train + DeepSpeed)")
    train_rm.add_arguments(rm_parser)
    rm_parser.set_defaults(run=train_rm.run_from_args)
    tune_parser = verbs.add_parser("tune", help="search the reward weights (alpha, beta, ...) with Ray Tune")
    tune_job.add_arguments(tune_parser)
    tune_parser.set_defaults(run=tune_job.run_from_args)
    serve_parser = verbs.add_parser("serve", help="serve a policy behind an OpenAI-compatible endpoint (Ray Serve)")
    serve_job.add_arguments(serve_parser)
    serve_parser.set_defaults(run=serve_job.run_from_args)
    submit_parser = verbs.add_parser("submit", help="run a verb on a Ray cluster as a Ray Job")
    submit.add_submit_arguments(submit_parser)
    submit_parser.set_defaults(run=submit.run_submit)
    jobs_parser = verbs.add_parser("jobs", help="list, inspect, follow or stop the Ray Jobs of a cluster")
    submit.add_jobs_arguments(jobs_parser)
    jobs_parser.set_defaults(run=submit.run_jobs)
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
