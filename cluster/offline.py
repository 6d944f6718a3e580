"""Keep every run on this machine: offline model loading and a dead-end proxy for Ray.

`ray.init` probes the cloud metadata address before it reads the usage-stats opt-out. Pointing
the proxy variables at a closed loopback port stops that; Ray's own traffic is loopback and
listed in no_proxy. Processes Ray starts inherit the environment, so the proxy is set while a
local cluster starts and restored afterwards (the driver may still log to wandb online).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

OFFLINE_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # makes Ray bind 127.0.0.1 instead of all interfaces
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_SILENT": "true",
    "WANDB_DISABLE_GIT": "true",
}
"""No DS_ACCELERATOR here: each learner names the accelerator it really has (actors/runtime/devices.py)."""

_DEAD_END = "http://127.0.0.1:9"
DEAD_END_PROXY = {
    "http_proxy": _DEAD_END,
    "https_proxy": _DEAD_END,
    "HTTP_PROXY": _DEAD_END,
    "HTTPS_PROXY": _DEAD_END,
    "no_proxy": "127.0.0.1,localhost,::1",
    "NO_PROXY": "127.0.0.1,localhost,::1",
}


def apply_offline_defaults() -> None:
    """Offline defaults that a user's own environment may still override."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


@contextmanager
def dead_end_proxy() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in DEAD_END_PROXY}
    os.environ.update(DEAD_END_PROXY)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
