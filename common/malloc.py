"""glibc tuning for a process that moves 1 MiB buffers all day.

glibc serves a 1 MiB allocation with a fresh mmap and returns it to the kernel on free, so
every batch (our encoded pages, libzmq's received messages) pays 256 page faults on first
touch. Raising the mmap and trim thresholds keeps such buffers in the heap for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit
_TRIM_THRESHOLD = 1 << 30


def keep_large_buffers() -> bool:
    """Best effort: False where this is not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
