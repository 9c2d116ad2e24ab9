"""A CPU training process's resident memory kept near what it uses (glibc's allocator; elsewhere nothing changes).

glibc serves blocks of up to 32 MiB from its heaps once such a block has been freed (its mmap threshold adapts
upward), and keeps freed heap memory for reuse. A DPO step on CPU allocates and frees activations layer by layer,
so the heaps grow by about twice what the step holds at once and stay that size: the demo's training (SmolLM2-135M,
bf16, 2 steps, ``benchmarks/dpo_training.py``) peaked at 2.17-2.42 GiB, of which ~0.5 GiB were the step's live
tensors (1.50 GiB with nothing kept). With blocks from 2 MiB on mapped on their own (returned when freed) and free
memory handed back before the first step and after every step: 1.70-1.90 GiB in 4 runs, 26 s instead of 21 s
(page faults on fresh memory; 4 MiB: 1.86-2.13 GiB, 1 MiB: 1.48 GiB at 32 s). Training results are unchanged:
only where the allocator places memory differs."""

from __future__ import annotations

import ctypes
import sys
from functools import cache
from typing import Any


#: glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD)
M_MMAP_THRESHOLD = -3
#: blocks from this size on are mapped on their own and returned to the system when freed
LARGE_BLOCK = 2 * 2**20


@cache
def _glibc() -> Any:
    """glibc, or None (not Linux, or another C library such as musl: the allocator is left as it is)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # no glibc under that name: nothing to tune, training runs as it would
        return None


def map_large_blocks() -> bool:
    """For the rest of this process, blocks of ``LARGE_BLOCK`` bytes or more are mapped on their own (a fixed
    threshold: glibc's adaptive one stops adapting). True when set."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))


def release_freed_memory() -> bool:
    """Hand the allocator's free memory back to the system (``malloc_trim(0)``); True when some was."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
