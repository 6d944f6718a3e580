"""Ray Jobs on a real local cluster: `rayrlhf submit` / `rayrlhf jobs` and plain `ray job submit`.

One head for the module, started with `ray start --head --block` as a process this test owns
(loopback only, token auth on, a dashboard for the Job API) and stopped by its own PIDs.
The job's `python` is this venv's (first on the head's PATH, as on a cluster image), so nothing
is pip-installed.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from ray._raylet import AuthenticationTokenLoader
from ray.job_submission import JobStatus, JobSubmissionClient
from safetensors.numpy import load_file
from sockets import free_port, is_loopback, listening

from rayrlhf.actors.runtime.models import resolve_policy
from rayrlhf.cluster.offline import DEAD_END_PROXY, OFFLINE_DEFAULTS
from rayrlhf.jobs.cli import main
from rayrlhf.jobs.run import checkpoint
from rayrlhf.jobs.submit import EXCLUDES, connect, wait_until_done

VENV_BIN = Path(sys.executable).parent
PROJECT_DIR = Path(__file__).resolve().parents[2]
SMALL_RUN = ["--set", "data.num_eval=4", "--set", "eval_max_new_tokens=4", "--set", "kl.coef=0"]
"""A small eval and no reference actor (kl.coef=0): parts of a run that no test of a job checks."""
TINY_RUN = ["--set", "steps=1", *SMALL_RUN]
"""One step of SMALL_RUN: the cheapest real training job."""
SECRET_NAME = "RAYRLHF_TEST_SECRET"


class LocalHead:
    """A one-node cluster with a dashboard on 127.0.0.1, token auth on, owned by this process."""

    def __init__(self, num_cpus: int) -> None:
        self.token = secrets.token_hex(16)
        self.temp_dir = tempfile.mkdtemp(prefix="rrhead", dir="/tmp")  # short: Ray's socket paths have a limit
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(OFFLINE_DEFAULTS, **DEAD_END_PROXY, WANDB_MODE="disabled", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=self.token, PATH=f"{self._python_dir()}{os.pathsep}{env['PATH']}")
        ports = ["--port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--num-cpus", str(num_cpus), "--object-store-memory", str(512 << 20), "--temp-dir", self.temp_dir,
               "--disable-usage-stats", *[a for flag in ports for a in (flag, str(free_port()))]]
        self.log = Path(self.temp_dir) / "head.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout=120)

    def _python_dir(self) -> Path:
        """A PATH entry holding only `python` (this venv's), as a cluster image provides it.

        Not the whole venv bin/: its `ninja` differs from the system one, and alternating ninja
        versions make every process rebuild DeepSpeed's JIT op in the shared torch_extensions cache.
        """
        bin_dir = Path(self.temp_dir) / "bin"
        bin_dir.mkdir()
        (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{VENV_BIN / "python"}" "$@"\n')
        (bin_dir / "python").chmod(0o755)
        return bin_dir

    def _wait_ready(self, timeout: float) -> None:
        """Until a trivial job succeeds: the Job API answers before the head's job agent is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                client = JobSubmissionClient(self.address, headers=self.headers)
                if wait_until_done(client, client.submit_job(entrypoint="true"), timeout=30).status.is_terminal():
                    return
            except (requests.RequestException, ConnectionError, RuntimeError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Ray head did not come up:\n{self.log.read_text()[-3000:]}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops its services), then SIGKILL what is left of its tree."""
        procs = self.processes()
        self.proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    resolve_policy("tiny-gpt2")  # build the cached tiny model once, before two jobs race to build it
    cluster = LocalHead(num_cpus=4)  # logical CPUs: two tiny jobs (1.5 each) share the 2 cores
    try:
        with pytest.MonkeyPatch.context() as env:  # restores both variables after the module
            env.setenv("RAY_AUTH_TOKEN", cluster.token)  # how a user hands the token to rayrlhf / ray CLIs
            env.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
            yield cluster
    finally:
        AuthenticationTokenLoader.instance().reset_cache()  # later in-process clusters use their own token
        cluster.stop()
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in cluster.processes())


def ray_job_submit(head: LocalHead, *entrypoint: str) -> str:
    """The documented plain-Ray equivalent: `ray job submit --working-dir . -- python -m rayrlhf.jobs.cli train ...`."""
    submission_id = f"rr-cli-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token}
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.address, "--submission-id", submission_id,
           "--working-dir", str(PROJECT_DIR), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
           "--no-wait", "--", *entrypoint]
    done = subprocess.run(cmd, env=env, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return submission_id


def rayrlhf(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def trained_checkpoint(output_dir: Path) -> None:
    final = output_dir / "final"
    start = load_file(str(resolve_policy("tiny-gpt2") / "model.safetensors"))
    end = load_file(str(final / "model.safetensors"))
    assert start.keys() == end.keys() and (final / "config.json").exists()
    assert any((start[k] != end[k]).any() for k in start)  # one step with lr 1e-3 moved the weights


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_head_is_loopback_only_and_refuses_requests_without_the_token(head, capsys, monkeypatch):
    addresses = [ip for _, ip in listening(head.processes())]
    assert addresses and all(is_loopback(ip) for ip in addresses)

    assert requests.get(f"{head.address}/api/jobs/", timeout=10).status_code == 401  # no token
    assert requests.get(f"{head.address}/api/jobs/", headers=head.headers, timeout=10).status_code == 200
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    code, _, err = rayrlhf(capsys, "jobs", "list", "--address", head.address)
    assert code == 1 and "Invalid authentication token" in err


def test_the_token_ray_keeps_locally_is_used_without_ray_auth_mode(head, capsys, monkeypatch, tmp_path):
    """`ray start --head` writes ~/.ray/auth_token; a user who set nothing else still gets in."""
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, _, err = rayrlhf(capsys, "jobs", "list", "--address", head.address)
    assert code == 2 and "asks for a token: set RAY_AUTH_TOKEN" in err  # no token anywhere: what to set
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(head.token)
    code, out, err = rayrlhf(capsys, "jobs", "list", "--address", head.address)
    assert code == 0, err


def test_bad_input_is_refused_before_anything_is_submitted(head, capsys):
    before = len(connect(head.address).list_jobs())
    code, _, err = rayrlhf(capsys, "submit", "--address", head.address, "--", "train", "--set", "learner.zero_stage=9")
    assert code == 2 and "learner.zero_stage" in err
    code, _, err = rayrlhf(capsys, "submit", "--address", head.address, "--env", "RAYRLHF_UNSET_VAR", "--", "train")
    assert code == 2 and "RAYRLHF_UNSET_VAR" in err
    assert len(connect(head.address).list_jobs()) == before


def test_tiny_training_job_through_the_api_and_through_ray_job_submit(head, tmp_path, capsys, monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv(SECRET_NAME, secret)
    cli_id = ray_job_submit(head, "python", "-m", "rayrlhf.jobs.cli", "train", "--config", "ray_configs/tiny.yaml",
                           "--set", f"output_dir={tmp_path / 'cli'}", *TINY_RUN)

    code, out, err = rayrlhf(capsys, "submit", "--address", head.address, "--wait", "--env", SECRET_NAME, "--",
                             "train", "--config", "tiny", "--set", f"output_dir={tmp_path / 'api'}", *TINY_RUN)
    api_id = out.splitlines()[0]
    assert code == 0, err
    assert "held-out metric" in out and f"rayrlhf serve --model {tmp_path / 'api' / 'final'}" in out  # followed logs
    assert secret not in out + err
    client = connect(head.address)
    info = client.get_job_info(api_id)
    assert info.status == JobStatus.SUCCEEDED and info.driver_exit_code == 0
    assert info.runtime_env["env_vars"] == {SECRET_NAME: secret,  # reached the job, by name only
                                            "RAY_JOB_STOP_WAIT_TIME_S": "300"}  # time to checkpoint on a stop
    assert info.entrypoint.startswith("python -m rayrlhf.jobs.cli train --config tiny")

    assert wait_until_done(client, cli_id, timeout=300).status == JobStatus.SUCCEEDED
    trained_checkpoint(tmp_path / "api")
    trained_checkpoint(tmp_path / "cli")

    code, out, _ = rayrlhf(capsys, "jobs", "list", "--address", head.address)
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert code == 0 and rows[api_id] == rows[cli_id] == "SUCCEEDED"
    assert secret not in out
    code, out, _ = rayrlhf(capsys, "jobs", "status", api_id, "--address", head.address)
    assert code == 0 and out.splitlines()[0] == f"{api_id} SUCCEEDED"
    code, out, _ = rayrlhf(capsys, "jobs", "logs", cli_id, "--address", head.address)
    assert code == 0 and f"rayrlhf serve --model {tmp_path / 'cli' / 'final'}" in out


def test_a_failing_job_reports_failed_with_its_error(head, tmp_path, capsys):
    # The config is valid (so `rayrlhf submit` sends it) but names a data file the cluster lacks:
    # the job's driver fails before claiming any resource, and its error and exit status come back.
    missing = tmp_path / "absent.jsonl"
    code, out, err = rayrlhf(capsys, "submit", "--address", head.address, "--wait", "--", "train",
                             "--config", "tiny", "--set", f"data.train={missing}")
    job_id = out.splitlines()[0]
    assert code == 2  # the driver's exit status: `rayrlhf train` exits 2 on bad input
    assert f"rayrlhf train: {missing}: file not found" in out  # the followed logs
    assert f"job {job_id} FAILED" in err

    info = connect(head.address).get_job_info(job_id)
    assert info.status == JobStatus.FAILED and info.driver_exit_code == 2
    assert f"{missing}: file not found" in info.message
    code, out, _ = rayrlhf(capsys, "jobs", "status", job_id, "--address", head.address)
    assert code == 0 and out.startswith(f"{job_id} FAILED") and "file not found" in out


def test_a_stopped_job_checkpoints_and_a_resubmitted_one_continues_exactly(head, tmp_path, capsys):
    """`rayrlhf jobs stop` sends SIGTERM; the job's stop wait (set by submit) lets the driver finish its
    step and write a checkpoint before Ray's SIGKILL; the same command, resubmitted, trains the rest."""
    marker = f"stopme-{uuid.uuid4().hex[:6]}"
    output_dir = tmp_path / marker
    # 12 steps: the stop lands during step 2 or 3 with room to spare, and the resubmitted job trains the rest
    command = ["--", "train", "--config", "tiny", "--set", "steps=12", "--set", f"output_dir={output_dir}", *SMALL_RUN]
    code, out, _ = rayrlhf(capsys, "submit", "--address", head.address, *command)
    job_id = out.strip()
    assert code == 0

    def driver() -> list[psutil.Process]:
        return [p for p in head.processes() if marker in " ".join(_cmdline(p))]

    def steps_logged() -> list[int]:
        path = output_dir / "metrics.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []

    deadline = time.monotonic() + 120
    while max(steps_logged(), default=0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert max(steps_logged(), default=0) >= 2, "the job never trained two steps"
    code, _, err = rayrlhf(capsys, "jobs", "stop", job_id, "--address", head.address)
    assert code == 0 and f"job {job_id} STOPPED" in err
    assert connect(head.address).get_job_status(job_id) == JobStatus.STOPPED
    _, alive = psutil.wait_procs(driver(), timeout=60)
    assert alive == []
    saved = checkpoint.latest(output_dir)
    assert saved is not None, "the stopped run left no checkpoint"
    stopped_at = checkpoint.step_of(saved)
    assert 2 <= stopped_at < 12

    code, out, err = rayrlhf(capsys, "submit", "--address", head.address, "--wait", *command)
    assert code == 0, err
    logged = steps_logged()
    assert logged == [0, *range(1, 13), 12]  # every step once: none lost, none trained twice
    trained_checkpoint(output_dir)
