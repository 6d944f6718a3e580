"""Keep freed host memory in the process for reuse: the allocator setting of every role that
computes on the CPU.

A CPU learner step allocates and frees about a gigabyte in blocks over 32 MB (logits over a 49k
vocabulary, their gradients, the activations of 16 rows). glibc maps each such block fresh from the
kernel and unmaps it when freed, so every step faults ~310k zeroed pages back in: a visible share of a
learn call on SmolLM2 (benchmarks/host_memory.py; figures in benchmarks/README.md). With mmap off and the
trim threshold at its maximum, freed blocks stay in the heap and the next step reuses them; after the
first steps a learn call takes no page faults. The price: a process keeps its peak resident memory,
which a long-lived role reaches again every step anyway, plus what the heap's layout wastes (the
default learner: 13% more). GPU roles keep their tensors on the device, so they are left as they are.
"""

from __future__ import annotations

import ctypes
import sys

import torch

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
MAX_INT = 2**31 - 1


def keep_freed_memory(device: torch.device) -> bool:
    """On a CPU role under glibc, serve every allocation from the heap and never hand freed memory back
    to the kernel; returns whether the setting applies (False on GPUs and other C libraries)."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: their allocator is left alone
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, MAX_INT))
