"""One run per output_dir: a lock in the folder, naming the driver that holds it.

`<output_dir>/.rayrlhf.lock` is JSON: {host, machine, pid, run, run_id, started, lease_until}
(`machine`: host name, boot id and PID namespace, so two containers sharing a host name are not one
machine; `lease_until`: Unix seconds). The driver creates it atomically before it touches anything
in the folder and renews the lease from a daemon thread (nothing per step); it deletes it on every
exit the process lives through (the `with` ends on return, on an exception, and on the SIGINT/SIGTERM
paths, which raise). A lock left behind (SIGKILL, a crash of the machine) is stale when its lease
expired, or at once when its holder ran on this machine and its process is gone: a new driver takes
it over, saying so. Any other lock refuses the new driver at once, with one line naming the holder.

On a path (local or a shared filesystem) the lock is created with O_CREAT|O_EXCL, atomic on local
filesystems and NFSv3+. On a pyarrow URI it is a lease object: an object store has no exclusive
create, so the driver writes it and reads it back to check it is its own. Two drivers starting
within one write-and-read of each other can both read back their own (the later write wins the
object, not the check); the loser finds at its first renewal that the lease is not its own and
says so loudly, but keeps running: it cannot be stopped safely from a thread.

Leases compare this machine's clock with the writer's: the clocks must agree to well within
LEASE_SECONDS (NTP does).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from rayrlhf.cluster.durable import write_atomic
from rayrlhf.cluster.storage import Storage
from rayrlhf.jobs.config.base import ConfigError

LOCK_NAME = ".rayrlhf.lock"
LEASE_SECONDS = 120.0
"""How long a lock outlives its driver's last renewal: a driver stalled for a while (swapping, a slow
bucket) keeps it; a run restarted on another machine after its driver's machine died waits this long."""
RENEW_SECONDS = 30.0
"""Four renewals per lease, so a renewal or two that fail (a bucket's hiccup) do not lose it."""


class OutputDirInUse(ConfigError):
    """Another live driver holds the output_dir's lock (the CLI prints it and exits 2)."""


def this_machine() -> str:
    """What tells whether a pid can be checked here: host name, boot and PID namespace."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    boot_id = boot.read_text().strip() if boot.exists() else ""
    namespace = os.stat("/proc/self/ns/pid").st_ino if os.path.exists("/proc/self/ns/pid") else 0
    return f"{socket.gethostname()}/{boot_id}/{namespace}"


def process_alive(pid: int) -> bool:
    """Whether a process of this machine runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stale_reason(holder: dict[str, Any], now: float) -> str | None:
    """Why a lock no longer holds (its lease expired, its process is gone), or None if it holds."""
    if holder.get("lease_until", 0) < now:
        return f"its lease expired at {utc(holder.get('lease_until', 0))}"
    if holder.get("machine") == this_machine() and not process_alive(int(holder.get("pid", 0))):
        return f"its process {holder.get('pid')} is gone"
    return None


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def describe(holder: dict[str, Any]) -> str:
    return (f"run {holder.get('run', '?')!r} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')})")


class RunLock:
    """`with RunLock(storage, run_name):` holds `storage`'s lock for the block (see the module docstring)."""

    def __init__(self, storage: Storage, run_name: str, lease: float = LEASE_SECONDS, renew: float = RENEW_SECONDS) -> None:
        self.storage, self.lease, self.renew = storage, lease, renew
        self.path = storage.local_path / LOCK_NAME if storage.local_path is not None else None
        self.shown = storage.shown(LOCK_NAME)
        self.mine = {
            "host": socket.gethostname(), "machine": this_machine(), "pid": os.getpid(), "run": run_name,
            "run_id": uuid.uuid4().hex, "started": utc(time.time()), "lease_until": 0.0,
        }
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (taking over a stale one) or raise OutputDirInUse naming its holder."""
        for _ in range(3):  # a lock released or taken over between our look and our create: look again
            self.mine["lease_until"] = time.time() + self.lease
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue
            reason = stale_reason(holder, time.time())
            if reason is None:
                raise self._in_use(holder)
            print(f"taking over the lock {self.shown} of {describe(holder)}: {reason}", file=sys.stderr, flush=True)
            self._take_over(holder)
        else:
            raise OutputDirInUse(f"{self.storage}: another driver keeps taking its lock {self.shown}; try again")
        self._renewer = threading.Thread(target=self._keep_renewing, name="rayrlhf-run-lock", daemon=True)
        self._renewer.start()

    def refuse_if_held(self) -> None:
        """Raise OutputDirInUse if a live driver holds the lock: a look only, acquire() still decides.
        The CLI looks before it imports the job's heavy modules, so a second driver is refused at once."""
        holder = self._read()
        if holder is not None and stale_reason(holder, time.time()) is None:
            raise self._in_use(holder)

    def _in_use(self, holder: dict[str, Any]) -> OutputDirInUse:
        return OutputDirInUse(
            f"{self.storage} is in use by {describe(holder)}: wait for it to end, stop it, or use another "
            f"output_dir (if that driver is gone, its lock {self.shown} expires at {utc(holder['lease_until'])})"
        )

    def release(self) -> None:
        """Stop renewing and delete the lock if it is still ours."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        holder = self._read()
        if holder is not None and holder.get("run_id") == self.mine["run_id"]:
            if self.path is not None:
                self.path.unlink(missing_ok=True)
            else:
                self.storage.remove(LOCK_NAME)

    def _keep_renewing(self) -> None:
        warned = False
        while not self._stop.wait(self.renew):
            try:
                holder = self._read()
                if holder is None or holder.get("run_id") != self.mine["run_id"]:
                    if not warned:
                        print(f"WARNING: the lock {self.shown} is no longer this run's (now: "
                              f"{describe(holder or {})}): two drivers may be writing {self.storage}",
                              file=sys.stderr, flush=True)
                    warned = True
                    continue
                self.mine["lease_until"] = time.time() + self.lease
                self._write(self.mine)
            except OSError as e:  # a bucket's hiccup: the lease has room for a few missed renewals
                print(f"WARNING: could not renew the lock {self.shown}: {e}", file=sys.stderr, flush=True)

    # --- the lock itself: a file on a path, an object on a URI ---------------------------------------

    def _create(self) -> bool:
        """Create the lock if there is none; True if it is now ours."""
        data = json.dumps(self.mine).encode()
        if self.path is None:
            if self.storage.exists(LOCK_NAME):
                return False
            self.storage.write_bytes(LOCK_NAME, data)
            holder = self._read()
            return holder is not None and holder.get("run_id") == self.mine["run_id"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> dict[str, Any] | None:
        """The lock's content; None if there is none. One that cannot be read (a driver died while
        creating it) counts as written when the file was, with a lease from then."""
        try:
            if self.path is not None:
                text, written = self.path.read_text(), self.path.stat().st_mtime
            else:
                if not self.storage.exists(LOCK_NAME):
                    return None
                text, written = self.storage.read_text(LOCK_NAME), time.time()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        return holder if isinstance(holder, dict) else {"lease_until": written + self.lease}

    def _write(self, data: dict[str, Any]) -> None:
        if self.path is not None:
            write_atomic(self.path, json.dumps(data).encode())
        else:
            self.storage.write_bytes(LOCK_NAME, json.dumps(data).encode())

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Remove a stale lock, unless another driver replaced it since we read it (then we look again)."""
        if self.path is None:
            self.storage.remove(LOCK_NAME)  # the read-back in _create settles who got it
            return
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.mine['run_id']}")
        try:
            os.rename(self.path, aside)  # of two drivers taking over, one moves it; the other finds none
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text()).get("run_id")
        except ValueError:
            moved = None
        if moved != stale.get("run_id"):
            os.rename(aside, self.path)  # a live lock created after our look: put it back, look again
            return
        aside.unlink()
