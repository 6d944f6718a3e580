"""Runs that survive outside the test bench: durable checkpoints (jobs/run/checkpoint.py), on a path and
in a bucket, and one driver per output_dir (jobs/run/run_lock.py), tested with real processes: killed
writers, a second driver, a lock left by a SIGKILLed one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.run import checkpoint
from rayrlhf.jobs.run.run_lock import LOCK_NAME, OutputDirInUse, RunLock, this_machine

REPO = Path(__file__).resolve().parents[2]


def python(code: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


# --- durable checkpoints ---------------------------------------------------------------------


def write_copy(out: Path, step: int, copy: int) -> Path:
    """A checkpoint whose every file says which copy it is (a rank's file in a nested folder too)."""
    def learner(location: str) -> None:
        (Path(location) / "state").mkdir(parents=True)
        (Path(location) / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text(f"copy {copy}")

    return checkpoint.write(out, step, {"seed": 0}, {"copy": copy}, learner, {}, keep=2)


def test_every_file_and_folder_is_fsynced_before_the_rename_that_completes_a_checkpoint(tmp_path, monkeypatch):
    synced: list[str] = []
    at_rename: dict[str, tuple[set[str], set[str], int]] = {}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        if Path(dst).parent.name == "checkpoints":
            at_rename[Path(dst).name] = {str(p) for p in Path(src).rglob("*")} | {str(src)}, set(synced), len(synced)
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_copy(tmp_path, 2, 1)
    tree, done, renamed_at = at_rename["step_000002"]
    assert len(tree) == 7  # the folder, config, driver state, manifest, learner/, learner/state/, the rank's file
    assert tree <= done, sorted(tree - done)
    assert str(tmp_path / "checkpoints") in synced[renamed_at:]  # the rename itself, after it


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_durability import write_copy
out, kill_at = Path(sys.argv[1]), sys.argv[2]
real, renames = os.replace, []
def replace(src, dst):  # SIGKILL before or after the n-th rename of a checkpoint folder
    folder = Path(dst).parent.name == "checkpoints"
    renames.extend([dst] if folder else [])
    if folder and kill_at == f"before {{len(renames)}}":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
    if folder and kill_at == f"after {{len(renames)}}":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
write_copy(out, 2, 2)
"""


@pytest.mark.parametrize("kill_at, survivor", [("before 1", 1), ("after 1", 1), ("after 2", 2), ("never", 2)])
def test_a_rewrite_of_a_step_killed_at_any_stage_leaves_a_complete_copy(tmp_path, kill_at, survivor):
    """Rewriting step 2 (copy 1 -> copy 2): the old copy goes aside (rename 1), the new one in
    (rename 2), the old one is deleted. The writer is SIGKILLed around each rename."""
    write_copy(tmp_path, 2, 1)
    proc = python(KILLED_WRITER.format(tests=str(REPO / "tests" / "e2e")), str(tmp_path), kill_at)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (0 if kill_at == "never" else -signal.SIGKILL), err
    found = checkpoint.at_step(tmp_path, 2)
    assert found is not None and [checkpoint.step_of(p) for p in checkpoint.complete(tmp_path)] == [2]
    assert checkpoint.latest(tmp_path) == found
    _, _, state = checkpoint.read(found)
    shard = found / "learner" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert state == {"copy": survivor} and shard.read_text() == f"copy {survivor}"  # whole: never a mix

    write_copy(tmp_path, 2, 3)  # the next write of the step tidies what the kill left
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]
    assert checkpoint.read(checkpoint.latest(tmp_path))[2] == {"copy": 3}
    write_copy(tmp_path, 4, 1)
    write_copy(tmp_path, 6, 1)  # keep=2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004", "step_000006"]


def write_copy_to_bucket(driver: Path, bucket: Path, step: int, copy: int) -> Path:
    """write_copy for a URI output_dir: the rank uploads its file to the bucket, the driver keeps its copy."""
    def learner(location: str) -> None:
        with Storage(location).writable_dir() as folder:
            (folder / "state").mkdir()
            (folder / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text(f"copy {copy}")

    return checkpoint.write(driver, step, {"seed": 0}, {"copy": copy}, learner, {}, keep=2,
                            remote=Storage(f"file://{bucket}"))


KILLED_BUCKET_WRITER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from rayrlhf.cluster.storage import Storage
from test_durability import write_copy_to_bucket
driver, bucket, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
calls = []
for name in ("remove", "write_bytes", "copy", "upload"):  # every change to the bucket
    def counted(self, *args, _real=getattr(Storage, name), **kwargs):
        calls.append(1)
        if len(calls) == kill_at:  # SIGKILL before the kill_at-th change
            os.kill(os.getpid(), signal.SIGKILL)
        return _real(self, *args, **kwargs)
    setattr(Storage, name, counted)
write_copy_to_bucket(driver, bucket, 2, 2)
"""


def test_a_rewrite_of_a_step_in_a_bucket_killed_at_any_change_leaves_a_complete_copy(tmp_path):
    """Rewriting step 2 in a file:// bucket (copy 1 -> copy 2), the writer SIGKILLed before each of its
    changes to the bucket in turn: a rerun's copy of the bucket always finds step 2 whole (its driver
    state and its learner file from one copy), and its next write leaves one clean copy."""
    script = KILLED_BUCKET_WRITER.format(tests=str(REPO / "tests" / "e2e"))
    for kill_at in range(1, 30):
        out = tmp_path / str(kill_at)
        bucket = out / "bucket"
        write_copy_to_bucket(out / "driver", bucket, 2, 1)
        proc = python(script, str(out / "driver"), str(bucket), str(kill_at))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, -signal.SIGKILL), err
        rerun = out / "rerun"
        remote = Storage(f"file://{bucket}")
        checkpoint.mirror(remote, rerun)
        found = checkpoint.latest(rerun)
        assert found is not None and checkpoint.step_of(found) == 2, (kill_at, os.listdir(bucket / "checkpoints"))
        copy = checkpoint.read(found)[2]["copy"]
        shard = Path(checkpoint.learner_location(found, rerun, remote).removeprefix("file://"))
        assert (shard / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_text() == f"copy {copy}"
        write_copy_to_bucket(rerun, bucket, 2, 3)  # the rerun writes it again: what the kill left goes
        assert sorted(os.listdir(bucket / "checkpoints")) == ["step_000002"], kill_at
        assert json.loads((bucket / "checkpoints" / "step_000002" / "driver.json").read_text())["copy"] == 3
        if proc.returncode == 0:  # killed before none of its changes: every one was tried
            assert copy == 2 and kill_at > 5
            break
    else:
        pytest.fail("the writer was killed at every change it made")


def test_a_lone_aside_copy_is_found_then_pruned_by_keep(tmp_path):
    write_copy(tmp_path, 2, 1)
    os.replace(tmp_path / "checkpoints" / "step_000002", tmp_path / "checkpoints" / ".old-step_000002")
    assert checkpoint.at_step(tmp_path, 2) == tmp_path / "checkpoints" / ".old-step_000002"
    write_copy(tmp_path, 4, 1)  # a lone aside is the step's only copy: kept
    assert [checkpoint.step_of(p) for p in checkpoint.complete(tmp_path)] == [2, 4]
    write_copy(tmp_path, 6, 1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004", "step_000006"]


# --- one run per output_dir ------------------------------------------------------------------


HOLDER = """
import sys, time
from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.run.run_lock import RunLock
lock = RunLock(Storage(sys.argv[1]), sys.argv[2], lease=float(sys.argv[3]), renew=float(sys.argv[4]))
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[5]))
lock.release()
"""


def hold(location, name: str, lease: float = 120, renew: float = 30, seconds: float = 600) -> subprocess.Popen:
    proc = python(HOLDER, str(location), name, str(lease), str(renew), str(seconds))
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def holder_of(out: Path) -> dict:
    return json.loads((out / LOCK_NAME).read_text())


@pytest.mark.parametrize("on_uri", [False, True])
def test_a_second_driver_is_refused_and_a_sigkilled_drivers_lock_taken_over(tmp_path, on_uri):
    out = tmp_path / "run"
    location = f"file://{out}" if on_uri else str(out)
    first = hold(location, "first")
    try:
        held = holder_of(out)
        assert (held["pid"], held["host"], held["run"]) == (first.pid, socket.gethostname(), "first")
        cli = [sys.executable, "-m", "rayrlhf.jobs.cli", "train", "--config", "tiny", "--set", f"output_dir={location}"]
        second = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        refusal = second.stderr.strip().splitlines()[-1]
        assert f"is in use by run 'first' (host {socket.gethostname()}, pid {first.pid}, started {held['started']})" in refusal
        assert "wait for it to end, stop it, or use another output_dir" in refusal
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()  # it touched nothing
        assert holder_of(out)["run_id"] == held["run_id"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()  # reaped: a zombie would still answer os.kill(pid, 0)
    third = python(HOLDER, location, "third", "120", "30", "0")
    _, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    assert f"taking over the lock" in err and f"of run 'first'" in err and f"its process {first.pid} is gone" in err
    assert not (out / LOCK_NAME).exists()  # released at the end


def write_lock(out: Path, **fields) -> dict:
    holder = {"host": "elsewhere", "machine": "elsewhere/boot/1", "pid": 4242, "run": "remote",
              "run_id": "x" * 32, "started": "2026-01-01 00:00:00 UTC", **fields}
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps(holder))
    return holder


def test_a_lease_expires_and_a_live_one_is_renewed(tmp_path, capsys):
    out = tmp_path / "run"
    write_lock(out, lease_until=time.time() + 2.0)  # another machine: its pid cannot be checked here
    with pytest.raises(OutputDirInUse, match=r"in use by run 'remote' \(host elsewhere, pid 4242, started 2026-01-01"):
        RunLock(Storage(out), "mine").acquire()
    with pytest.raises(OutputDirInUse, match=r"in use by run 'remote' \(host elsewhere, pid 4242"):
        RunLock(Storage(out), "mine").refuse_if_held()  # the CLI's look before its imports: the same refusal
    time.sleep(2.2)
    RunLock(Storage(out), "mine").refuse_if_held()  # expired: a look refuses nothing and takes nothing
    assert holder_of(out)["run"] == "remote"
    lock = RunLock(Storage(out), "mine", lease=2.0, renew=0.1)
    with lock:
        assert "its lease expired at" in capsys.readouterr().err
        first = holder_of(out)
        assert first["run"] == "mine" and first["pid"] == os.getpid() and first["machine"] == this_machine()
        time.sleep(2.5)  # past the first lease: renewed meanwhile
        renewed = holder_of(out)
        assert renewed["run_id"] == first["run_id"] and renewed["lease_until"] > time.time()
        with pytest.raises(OutputDirInUse):  # this very process: alive, so not stale
            RunLock(Storage(out), "again").acquire()
    assert not (out / LOCK_NAME).exists()


def test_a_lock_is_released_on_an_exception_and_a_half_written_one_expires(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), RunLock(Storage(out), "mine"):
        assert (out / LOCK_NAME).exists()
        raise RuntimeError("the run failed")
    assert not (out / LOCK_NAME).exists()

    (out / LOCK_NAME).write_text("")  # a driver died between creating the file and writing it
    with pytest.raises(OutputDirInUse):
        RunLock(Storage(out), "mine").acquire()
    past = time.time() - 200
    os.utime(out / LOCK_NAME, (past, past))
    with RunLock(Storage(out), "mine"):
        assert holder_of(out)["run"] == "mine"


def test_a_lease_object_on_a_uri_expires_and_is_left_out_of_the_drivers_copy(tmp_path):
    bucket = tmp_path / "bucket" / "run"
    storage = Storage(f"file://{bucket}")
    write_lock(bucket, lease_until=time.time() + 60)
    with pytest.raises(OutputDirInUse, match="host elsewhere"):
        RunLock(storage, "mine").acquire()
    write_lock(bucket, lease_until=time.time() - 1)
    with RunLock(storage, "mine"):
        assert holder_of(bucket)["run"] == "mine"
        checkpoint.mirror(storage, tmp_path / "driver")
        assert not (tmp_path / "driver" / LOCK_NAME).exists()  # else uploading the copy would rewind the lease
    assert not (bucket / LOCK_NAME).exists()


# --- real Ray ---------------------------------------------------------------------------------


def test_two_real_drivers_on_one_output_dir(tmp_path):
    """The issue's case: a second `rayrlhf train` on the folder of a live one. It is refused at once,
    touching nothing; the first runs on, and stopped by SIGINT its metrics and checkpoint agree."""
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "rayrlhf.jobs.cli", "train", "--config", "tiny", "--set", f"output_dir={out}",
           "--set", "steps=200", "--set", "logging.tensorboard=false", "--set", "kl.coef=0"]  # no reference actor
    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        first = subprocess.Popen(cli, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        steps_done = lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2  # noqa: E731
        deadline = time.time() + 300
        while not steps_done() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert steps_done(), log.read_text()[-3000:]
        second = subprocess.run([*cli, "--resume", "never"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr[-3000:]
        assert first.poll() is None and holder_of(out)["pid"] == first.pid
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=300) == 130, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    saved = checkpoint.latest(out)
    assert saved is not None, log.read_text()[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(checkpoint.step_of(saved) + 1))  # nothing truncated or cleared by the second
    assert not (out / LOCK_NAME).exists()
