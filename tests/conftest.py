"""Test-wide settings: offline, loopback only, nothing sent off the machine."""

import os

from rayrlhf.cluster.offline import DEAD_END_PROXY, apply_offline_defaults

apply_offline_defaults()
os.environ.update(DEAD_END_PROXY)  # tests never need the network: block it for the whole session
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the machine has no GPU; DeepSpeed's probe stays quiet
