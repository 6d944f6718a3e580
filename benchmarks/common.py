"""What every benchmark shares: the offline set-up and the one way its figures are written.

Importing this module applies the offline defaults (no telemetry, a dead-end proxy, loopback Ray), so
a benchmark imports it before Ray, torch or transformers. Scripts run as `python benchmarks/NAME.py`,
which puts this folder on sys.path.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from rayrlhf.cluster.offline import apply_offline_defaults

apply_offline_defaults()

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str | Path, report: Any) -> Path:
    """`report` (JSON data) to benchmarks/results/NAME (an absolute path as given); prints where."""
    out = RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return out


def free_port() -> int:
    """A free loopback port, for the rendezvous of a learner (or a server) started in this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
