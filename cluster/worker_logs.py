"""A quiet console: Ray workers' output goes to the run's log file; only their warnings reach the console.

By default Ray prints every line a worker writes on the driver's console, prefixed
`(RolloutWorker pid=...)`: model-loading progress bars, library notices, shard writes, and its own
"repeated Nx across cluster" hints. `quiet()` swaps Ray's printer for ours (the stream Ray already
forwards to the driver, so nothing is lost): every line is appended to the run's `workers.log`
(`write_to`; lines before it is known are kept and written then), and a line that looks like a
warning or an error is printed once, on stderr, with the role's name. `rayrlhf --verbose` (or
RAYRLHF_VERBOSE=1) keeps Ray's own printing instead.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, TextIO

HANDLER = "rayrlhf_worker_logs"
RAY_HANDLER = "ray_print_logs"  # the name Ray 2.x gives its printer in ray._private.worker.connect
ALERT = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL|FATAL|Traceback)\b|\w*(Warning|Error|Exception):")
_NUMBERS = re.compile(r"\d+")


def verbose() -> bool:
    return os.environ.get("RAYRLHF_VERBOSE", "") not in ("", "0")


class WorkerLogs:
    """Ray's stdout/stderr dispatcher calls `__call__` with a batch: {"lines", "pid", "actor_name", "is_err", ...}."""

    def __init__(self, console: TextIO | None = None) -> None:
        self.console = console
        self._file: TextIO | None = None
        self._early: deque[str] = deque(maxlen=20_000)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, data: dict[str, Any]) -> None:
        role = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({role} pid={data.get('pid')}) "
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its status every few seconds: only its events, as Ray prints them
            from ray._private.worker import filter_autoscaler_events

            lines, prefix = list(filter_autoscaler_events(lines)), "(autoscaler) "
        with self._lock:
            for line in lines:
                self._write(prefix + line + "\n")
                if ALERT.search(line):
                    key = role + _NUMBERS.sub("#", line)  # once per role and message, whatever its numbers
                    if key not in self._seen:
                        self._seen.add(key)
                        print(f"({role}) {line.strip()}", file=self.console or sys.stderr, flush=True)

    def _write(self, text: str) -> None:
        if self._file is None:
            self._early.append(text)
        else:
            self._file.write(text)
            self._file.flush()

    def write_to(self, path: Path) -> None:
        """From now on (and the lines before), workers' output goes to this file (appended)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a")
            self._file.writelines(self._early)
            self._file.flush()
            self._early.clear()


_logs = WorkerLogs()


def quiet() -> None:
    """Before ray.init(log_to_driver=True): hide Ray's token-auth note; after it: replace Ray's printer
    with WorkerLogs. Idempotent; nothing with --verbose."""
    if verbose():
        return
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    # Ray 2.60's note that a local cluster has token auth on (it is, on loopback): not the user's concern
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_auth_enabled)
    dispatcher.remove_handler(RAY_HANDLER)
    dispatcher.remove_handler(HANDLER)
    dispatcher.add_handler(HANDLER, _logs)


def _not_auth_enabled(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def write_to(path: Path) -> None:
    """The run's log file for its workers' output (a no-op with --verbose, where Ray prints it)."""
    if not verbose():
        _logs.write_to(path)
