"""keep_freed_memory: large blocks freed and allocated again, round after round, come back without page faults.

Each case runs in a fresh interpreter: the setting is process-wide and must not leak into the others.
"""

import subprocess
import sys

import pytest
import torch

from rayrlhf.actors.runtime.host_memory import keep_freed_memory

# Page faults of the last of 8 rounds that allocate and free a 64 MB and a 12 MB tensor, as a training
# step does with its large tensors (4 KB pages: 64 MB is 16k of them).
LAST_ROUND_FAULTS = """
import resource, sys, torch
from rayrlhf.actors.runtime.host_memory import keep_freed_memory
applied = keep_freed_memory(torch.device("cpu")) if sys.argv[1] == "keep" else None
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    big, small = torch.ones(16 * 2**20), torch.ones(3 * 2**20)
    del big, small
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def last_round_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", LAST_ROUND_FAULTS, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's; other systems keep their allocator")
def test_freed_blocks_are_reused_without_page_faults():
    applied, kept = last_round_faults("keep")
    _, default = last_round_faults("default")
    assert applied == "True"
    assert default > 10_000  # glibc's default: the 64 MB block is mapped afresh every round
    assert kept < 1_000  # kept: after the first rounds the heap hands the same pages back


def test_gpu_roles_are_left_alone():
    assert keep_freed_memory(torch.device("meta")) is False
