"""`rayrlhf submit` and `rayrlhf jobs`: run any verb on a Ray cluster as a Ray Job.

A thin layer over Ray's Job Submission API (the dashboard's HTTP endpoint, port 8265). This
installation's `rayrlhf` package travels with the job (runtime_env py_modules), so the cluster runs
exactly the code that validated the command, and the verb runs as
`python -m rayrlhf.jobs.cli VERB ARGS`; `--working-dir` uploads a folder of your files (data,
configs) as the job's working directory.
Environment variables (a wandb key...) are passed by name only: their values are read from this
shell, never typed on a command line and never printed. With token auth (Ray >= 2.52) the token
is read where Ray itself looks for it and sent as a Bearer header.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from ray.exceptions import AuthenticationError, RayError
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.run import load_config

PACKAGE_PARTS = ("actors", "cluster", "jobs", "ray_configs")
"""The folders of the `rayrlhf` import root, shipped to the job as one py_module."""
EXCLUDES = [".venv", ".git", "outputs", "wandb", ".pytest_cache", "**/__pycache__", "*.egg-info"]
"""Never uploaded with a working_dir: environments, VCS data and run outputs."""
NOT_SUBMITTABLE = {"submit", "jobs"}
STOP_TIMEOUT_S = 60
STOP_WAIT_S = 300
"""Seconds between Ray's SIGTERM and its SIGKILL of a stopped job (Ray's own default, 3 s, kills a run
before it can finish its step and write a checkpoint): sent as the job's RAY_JOB_STOP_WAIT_TIME_S."""
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def auth_headers(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """A Bearer token header when token auth is asked for, else nothing.

    Ray's own clients send a token only with RAY_AUTH_MODE=token; setting RAY_AUTH_TOKEN or
    RAY_AUTH_TOKEN_PATH is taken as asking for it too.
    """
    wanted = environ.get("RAY_AUTH_MODE", "").lower() == "token" or any(
        environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    )
    if not wanted:
        return {}
    token = local_token()
    if token is None:
        raise ConfigError("token auth is on but no token was found: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
    return {"Authorization": "Bearer " + token}


def local_token() -> str | None:
    """The token Ray's own loader finds, in Ray's order: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token (where `ray start --head` writes it)."""
    from ray._raylet import (  # type: ignore[attr-defined]  # compiled: its stub does not list it
        AuthenticationTokenLoader,  # Ray's token lookup (C++), not public API
    )

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the environment may have changed since the last lookup
    return loader.get_raw_token(ignore_auth_mode=True) if loader.has_token(ignore_auth_mode=True) else None


def connect(address: str | None) -> JobSubmissionClient:
    """A client for the dashboard at `address` (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS).

    A cluster that asks for a token gets the one Ray keeps locally, even without RAY_AUTH_MODE=token
    (Ray 2.60's `ray start --head` turns token auth on and writes ~/.ray/auth_token); with none to
    send, the error says exactly what to set."""
    headers = auth_headers()
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        if headers:  # the token we sent was refused: Ray's own message says so
            raise
        token = local_token()
        if token is None:
            raise ConfigError(
                f"the cluster at {address or 'RAY_ADDRESS'} asks for a token: set RAY_AUTH_TOKEN=<its token> "
                "(or RAY_AUTH_TOKEN_PATH=<file>); on the head node `ray get-auth-token` prints it"
            ) from None
        return JobSubmissionClient(address, headers={"Authorization": "Bearer " + token})


def project_dependencies() -> list[str]:
    """The installed distribution's runtime requirements (pyproject.toml's, without extras)."""
    return [r for r in importlib.metadata.requires("rayrlhf") or [] if "extra ==" not in r]


def stage_package(into: Path) -> Path:
    """A copy of this installation's `rayrlhf` package (editable or wheel) under `into`."""
    package = into / "rayrlhf"
    for part in PACKAGE_PARTS:
        source = Path(importlib.import_module(f"rayrlhf.{part}").__path__[0])
        shutil.copytree(source, package / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return package


def build_runtime_env(
    env_names: list[str], pip: bool, package: Path, working_dir: str | None = None,
    environ: Mapping[str, str] = os.environ, stop_wait_s: int = STOP_WAIT_S,
) -> dict:
    for name in env_names:
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(f"--env {name}: give a variable's name; its value is read from this shell")
    missing = [name for name in env_names if name not in environ]
    if missing:
        raise ConfigError(f"--env {', '.join(missing)}: not set in this shell")
    runtime_env: dict = {"py_modules": [str(package)]}
    if working_dir:
        if not Path(working_dir).is_dir():
            raise ConfigError(f"--working-dir {working_dir}: not a directory")
        runtime_env.update(working_dir=str(Path(working_dir).resolve()), excludes=EXCLUDES)
    # Ray's job supervisor reads the stop wait from the job's own environment
    runtime_env["env_vars"] = {"RAY_JOB_STOP_WAIT_TIME_S": str(stop_wait_s), **{name: environ[name] for name in env_names}}
    if pip:
        runtime_env["pip"] = project_dependencies()
    return runtime_env


def check_command(command: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Parse VERB ARGS with `rayrlhf`'s own parser, and validate a train config, before anything is sent."""
    command = command[1:] if command[:1] == ["--"] else command
    if not command or command[0] in NOT_SUBMITTABLE or command[0].startswith("-"):
        raise ConfigError("give the verb to run after --, e.g. `rayrlhf submit -- train --config tiny`")
    parsed = parser.parse_args(command)
    if parsed.verb == "train":
        load_config(parsed.config, parsed.overrides)
    return command


def entrypoint(command: list[str]) -> str:
    return shlex.join(["python", "-m", "rayrlhf.jobs.cli", *command])


def wait_until_done(client: JobSubmissionClient, job_id: str, timeout: float | None = None) -> JobDetails:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or the timeout passes)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(0.5)


def follow_logs(client: JobSubmissionClient, job_id: str) -> JobDetails:
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    return wait_until_done(client, job_id)


def exit_code(info: JobDetails) -> int:
    """0 for SUCCEEDED; else the driver's exit code when it has one, or 1."""
    if info.status == JobStatus.SUCCEEDED:
        return 0
    code = info.driver_exit_code
    return code if code and code > 0 else 1


def report(info: JobDetails) -> None:
    detail = f": {info.message}" if info.status != JobStatus.SUCCEEDED and info.message else ""
    print(f"job {info.submission_id} {info.status.value}{detail}", file=sys.stderr)


def _guarded(action: Callable[[], int]) -> int:
    """Cluster-side errors (unreachable, bad token, unknown job id) as one line and exit 1."""
    try:
        return action()
    except (ConnectionError, RuntimeError, RayError) as e:
        print(f"rayrlhf: {e}", file=sys.stderr)
        return 1


def run_submit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    command = check_command(args.command, parser)
    with tempfile.TemporaryDirectory(prefix="rayrlhf-submit-") as staging:
        runtime_env = build_runtime_env(args.env, args.pip, stage_package(Path(staging)), args.working_dir,
                                        stop_wait_s=args.stop_wait or STOP_WAIT_S)
        return _guarded(lambda: _submit(args, command, runtime_env))


def _submit(args: argparse.Namespace, command: list[str], runtime_env: dict) -> int:
    client = connect(args.address)
    job_id = client.submit_job(entrypoint=entrypoint(command), runtime_env=runtime_env)
    print(job_id, flush=True)
    if not args.wait:
        print(f"follow it with: rayrlhf jobs logs {job_id} --follow", file=sys.stderr)
        return 0
    try:
        info = follow_logs(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job runs on (rayrlhf jobs stop {job_id})", file=sys.stderr)
        return 130
    report(info)
    return exit_code(info)


def _started(job: JobDetails) -> str:
    return datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else "-"


def run_jobs(args: argparse.Namespace) -> int:
    def act() -> int:
        client = connect(args.address)
        if args.action == "list":
            for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
                job_id = job.submission_id or job.job_id
                print(f"{job_id:<30} {job.status.value:<10} {_started(job)}  {job.entrypoint[:80]}")
            return 0
        if args.action == "status":
            info = client.get_job_info(args.job_id)
            print(f"{args.job_id} {info.status.value}")
            if info.message:
                print(info.message)
            return 0
        if args.action == "logs":
            if args.follow:
                report(follow_logs(client, args.job_id))
            else:
                print(client.get_job_logs(args.job_id), end="")
            return 0
        if not client.stop_job(args.job_id):
            print(f"job {args.job_id} was not running", file=sys.stderr)
        info = wait_until_done(client, args.job_id, timeout=STOP_TIMEOUT_S)
        report(info)
        return 0 if info.status.is_terminal() else 1

    return _guarded(act)


