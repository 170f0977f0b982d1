"""Freed memory kept for reuse: glibc's allocator set so that large temporaries are not handed back to the kernel
and faulted in again at every pass.

A batch of prompts allocates and frees tensors of megabytes many times a pass: activations, logits, and the float64
log-probabilities its scores read (49152 × 8 bytes a row on SmolLM2). By default glibc serves a block above its mmap
threshold with fresh pages and returns it to the kernel when it is freed, and gives back memory freed at the heap's
top once more of it is free than twice that threshold. Each new block then costs a page fault per 4 KiB page, and the
kernel zeroes every page. `keep_freed()` fixes the mmap threshold at MMAP_BYTES (32 MiB, the most glibc accepts)
and keeps up to TRIM_BYTES free at the heap's top, so those blocks are reused instead.

The command line applies it; `benchmarks/bench_allocator.py` measures what it changes. A process that sets its own
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES in the environment) keeps it, as OMP_NUM_THREADS
keeps its threads. Elsewhere than glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

__all__ = ["keep_freed", "MMAP_BYTES", "TRIM_BYTES"]

import ctypes
import os
import sys

MMAP_BYTES = 32 << 20  # blocks up to this come from the heap, where freed memory is reused
TRIM_BYTES = 512 << 20  # freed memory kept at the heap's top before any is returned to the kernel
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
OWN_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed(env=None) -> bool:
    """Set glibc's mmap and trim thresholds (MMAP_BYTES, TRIM_BYTES) for this process; returns whether it did (not
    outside glibc, and not where the environment `env` (default os.environ) sets the allocator itself)."""
    env = os.environ if env is None else env
    if not glibc() or any(env.get(k) for k in OWN_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))


def glibc() -> bool:
    """Whether this process runs on glibc."""
    try:
        return sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False
