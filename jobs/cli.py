"""The `rayrlhf` command: one sub-command per user verb.

Light to import on purpose: a verb's configuration is validated with the config schemas alone
(pydantic, PyYAML), and its job module (torch, transformers, DeepSpeed, Ray Tune or Serve) is
imported only once the verb runs. So `rayrlhf --help` and a config error answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from rayrlhf.actors.rl.nonfinite import NonFiniteError
from rayrlhf.cluster.errors import LaunchError
from rayrlhf.jobs.run.checkpoint import Interrupted
from rayrlhf.jobs.config.base import ConfigError


def _overrides(args: argparse.Namespace, address_field: str) -> list[str]:
    """--set pairs, plus --address as the config field that names the cluster."""
    return list(args.overrides) + ([f"{address_field}={args.address}"] if args.address else [])


def _train(args: argparse.Namespace) -> object:
    from rayrlhf.jobs.config.run import load_config

    cfg = load_config(args.config, _overrides(args, "cluster.address"))
    from rayrlhf.cluster.storage import Storage
    from rayrlhf.jobs.run.run_lock import RunLock

    RunLock(Storage(cfg.output_dir), cfg.name).refuse_if_held()  # a second driver: refused before the imports
    from rayrlhf.jobs.train import train

    return train(cfg, resume=args.resume)


def _eval(args: argparse.Namespace) -> object:
    from rayrlhf.jobs.config.run import load_config

    extra = [f"policy.model={args.model}"] + ([f"data.eval={args.data}"] if args.data else [])
    cfg = load_config(args.config, _overrides(args, "cluster.address") + extra)
    from rayrlhf.jobs.eval import run_eval

    return run_eval(cfg, args.output)


def _tune(args: argparse.Namespace) -> object:
    from rayrlhf.jobs.config.tune import load_tune_config

    setup = load_tune_config(args.config, _overrides(args, "trial.cluster.address"))
    from rayrlhf.jobs.tune import tune_weights

    return tune_weights(setup)


def _serve(args: argparse.Namespace) -> object:
    from rayrlhf.jobs.config.serve import load_serve_config

    extra = [f"port={args.port}"] if args.port else []
    if len(args.model) == 1 and "=" not in args.model[0]:
        extra.append(f"model={args.model[0]}")
    elif args.model:  # versions: NAME=MODEL, or MODEL named after itself
        versions = [dict(zip(("name", "model"), m.split("=", 1) if "=" in m else (m, m))) for m in args.model]
        extra.append(f"versions={json.dumps(versions)}")
    for item in args.traffic:
        name, sep, share = item.partition("=")
        if not sep:
            raise ConfigError(f"--traffic {item}: expected NAME=SHARE, e.g. --traffic B=0.1")
        extra.append(f"traffic.{name}={share}")
    cfg = load_serve_config(args.config, list(args.overrides) + extra)
    from rayrlhf.jobs.serve import run

    if cfg.versions:
        from rayrlhf.jobs.serve_router import deploy_versioned

        run(cfg, args.address, deploy_versioned)
    else:
        run(cfg, args.address)
    return 0


def _sft(args: argparse.Namespace) -> object:
    from rayrlhf.jobs.config.supervised import SFTConfig, load_job_config

    cfg = load_job_config(SFTConfig, args.config, _overrides(args, "cluster.address"), "sft.yaml")
    from rayrlhf.jobs.sft import sft

    return sft(cfg)


def _train_rm(args: argparse.Namespace) -> object:
    from rayrlhf.jobs.config.supervised import RMConfig, load_job_config

    cfg = load_job_config(RMConfig, args.config, _overrides(args, "cluster.address"), "rm.yaml")
    from rayrlhf.jobs.train_rm import train_rm

    return train_rm(cfg)


def _submit(args: argparse.Namespace) -> int:
    from rayrlhf.jobs.submit import run_submit

    return run_submit(args, build_parser())


def _jobs(args: argparse.Namespace) -> int:
    from rayrlhf.jobs.submit import run_jobs

    return run_jobs(args)


def config_options(parser: argparse.ArgumentParser, default: str, example: str, what: str = "config") -> None:
    """--config / --address / --set, shared by every verb that runs from a config file."""
    parser.add_argument("--config", help=f"{what} YAML file or a name in ray_configs/ (default: {default})")
    parser.add_argument("--address", help="Ray cluster to attach to (default: $RAY_ADDRESS or a local Ray)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"override a {what} field, e.g. --set {example} (repeatable)")


def address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 "
                        "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")


def _train_options(parser: argparse.ArgumentParser) -> None:
    config_options(parser, "default.yaml", "learner.zero_stage=3")
    parser.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                        help="auto (default): continue from the latest complete checkpoint in output_dir, if any; "
                        "never: start over; PATH: a checkpoint folder (or an output_dir) to continue from")


def _eval_options(parser: argparse.ArgumentParser) -> None:
    config_options(parser, "default.yaml", "eval.samples_per_prompt=8", what="run config (rewards, data, eval)")
    parser.add_argument("--model", required=True, help="policy to evaluate: a Hugging Face directory (a run's "
                        "final/ or best/) or a built-in name")
    parser.add_argument("--data", help="held-out prompt file (JSONL/Parquet; default: the config's held-out split)")
    parser.add_argument("--output", help="JSON file (path or URI) for the metrics and answers "
                        "(default: <output_dir>/eval_<model name>.json)")


def _tune_options(parser: argparse.ArgumentParser) -> None:
    config_options(parser, "tune.yaml", "search.num_samples=4", what="tune-config")


def _serve_options(parser: argparse.ArgumentParser) -> None:
    config_options(parser, "serve.yaml", "max_batch_size=16", what="ServeConfig")
    parser.add_argument("--model", action="append", default=[], metavar="[NAME=]MODEL",
                        help="checkpoint directory or built-in name (sets model); twice or more, or NAME=MODEL: "
                        "versions behind one endpoint (docs/serving_versions.md)")
    parser.add_argument("--traffic", action="append", default=[], metavar="NAME=SHARE",
                        help="a version's traffic share in [0, 1], e.g. --traffic B=0.1 (the others split the rest)")
    parser.add_argument("--port", type=int, help="HTTP port (sets port)")


def _sft_options(parser: argparse.ArgumentParser) -> None:
    config_options(parser, "sft.yaml", "trainer.zero_stage=3")


def _rm_options(parser: argparse.ArgumentParser) -> None:
    config_options(parser, "rm.yaml", "loss.name=hinge")


def _submit_options(parser: argparse.ArgumentParser) -> None:
    address_option(parser)
    parser.add_argument("--wait", action="store_true", help="follow the logs and exit with the job's status")
    parser.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="pass this environment variable (by name; its value is never printed), repeatable")
    parser.add_argument("--pip", action="store_true",
                        help="install the project's dependencies in the job (runtime_env pip), for clusters "
                        "whose image lacks them")
    parser.add_argument("--working-dir", help="a folder of your files (data, configs) to upload as the job's "
                        "working directory")
    parser.add_argument("--stop-wait", type=int, metavar="SECONDS",
                        help="on `jobs stop` the run gets this long after SIGTERM to finish its step and write a "
                        "checkpoint before Ray's SIGKILL (default: 5 minutes; Ray's own is 3 s)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- VERB [ARGS]",
                        help="the rayrlhf verb to run: train, eval, sft, train-rm, tune, serve")


def _jobs_options(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    address_option(actions.add_parser("list", help="all jobs of the cluster"))
    for name, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        action = actions.add_parser(name, help=text)
        action.add_argument("job_id")
        address_option(action)
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="stream until the job ends")


@dataclass(frozen=True)
class Verb:
    help: str
    options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], object]
    """Returns an exit status (an int) or a result the CLI does not use."""


VERBS = {
    "train": Verb("RL-train a policy (GRPO, PPO, REINFORCE)", _train_options, _train),
    "sft": Verb("supervised fine-tuning of the policy (Ray Train + DeepSpeed)", _sft_options, _sft),
    "train-rm": Verb("train a scalar reward model (Ray Train + DeepSpeed)", _rm_options, _train_rm),
    "eval": Verb("evaluate a policy on held-out prompts as training does (pass@k, mean@n)", _eval_options, _eval),
    "tune": Verb("search the reward weights (alpha, beta, ...) with Ray Tune", _tune_options, _tune),
    "serve": Verb("serve a policy behind an OpenAI-compatible endpoint (Ray Serve)", _serve_options, _serve),
    "submit": Verb("run a verb on a Ray cluster as a Ray Job", _submit_options, _submit),
    "jobs": Verb("list, inspect, follow or stop the Ray Jobs of a cluster", _jobs_options, _jobs),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayrlhf", description="Distributed RLHF on Ray.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for name, verb in VERBS.items():
        sub = verbs.add_parser(name, help=verb.help)
        verb.options(sub)
        sub.add_argument("--verbose", action="store_true", help="print Ray workers' output and library "
                         "messages on the console (default: in the run's workers.log) and errors' tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:  # read where Ray starts (cluster/worker_logs.py)
        os.environ["RAYRLHF_VERBOSE"] = "1"
    try:
        result = VERBS[args.verb].run(args)
    except (ConfigError, LaunchError, NonFiniteError, Interrupted) as e:
        if args.verbose:
            traceback.print_exc()
        return _exit_status(args.verb, e)
    return result if isinstance(result, int) else 0  # submit/jobs return an exit status


def _exit_status(verb: str, error: Exception) -> int:
    """One line naming the cause (the error's message names the fix), and the exit status a shell expects."""
    if isinstance(error, Interrupted):  # SIGINT/SIGTERM: a checkpoint was written; 130/143
        message, status = str(error), error.exit_code
    elif isinstance(error, NonFiniteError):  # the last finite state was saved where it could be
        message, status = f"the run diverged: {error}", 1
    elif isinstance(error, LaunchError):  # the cluster lacks room, or a model is missing on a node
        message, status = f"could not start the run: {error}", 2
    else:
        message, status = str(error), 2
    print(f"rayrlhf {verb}: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
