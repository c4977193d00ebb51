"""The process's memory allocator: keep freed memory for the next tensor.

By default glibc hands large freed blocks back to the kernel (``mmap`` per allocation, heap trimming),
and the next activation of that size is page-faulted in again, as often as the process's history makes
it. On this machine's VM that cost both the figures and the time of a conversion:

- timing: the static model's batch-256 time was 104-144 ms from one process to the next (103-105 ms
  kept), and every ratio against it, which costs the wider network more, moved by up to a third;
- work after training: scoring six archs after 60 supernet steps took 29-41 s against 20-22 s in a
  fresh process (20-23 s kept either way); the demo's search phase went from 220 to 133 s.

The price is a resident set that stays at its peak.
"""

from __future__ import annotations

import ctypes
import functools
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, (1 << 31) - 1), (M_TOP_PAD, 256 << 20))


@functools.cache  # timing calls it before every measurement
def keep_freed_memory() -> bool:
    """Every block from the heap (no mmap), the heap never trimmed, grown 256 MB at a time; True when glibc
    took it. Every CLI command calls it first, and timing before it measures. A no-op (False) where the C
    library has no ``mallopt`` (macOS, Windows); musl accepts and ignores it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in SETTINGS)
