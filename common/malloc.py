"""Process tuning for a daemon that moves 8 MiB buffers all day: glibc and the collector.

glibc serves a large allocation with a fresh mmap and returns it to the kernel on free, so
every batch (our encoded pages, libzmq's received messages) pays a page fault per 4 KiB on
first touch. Raising the mmap and trim thresholds keeps such buffers in the heap for reuse.
One arena: libzmq's I/O thread otherwise allocates every received message in an arena of its
own, whose 64 MiB heaps glibc unmaps whenever one empties, whatever the trim threshold; the
kernel then zeroed each message's memory again on receipt, a third of that thread's time in a
1 GiB migration (perf, 2026-12-06), on the busiest thread of the destination.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
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
    # before libzmq's threads first allocate: a thread keeps the arena it got
    done = [
        mallopt(option, value)
        for option, value in (
            (_M_ARENA_MAX, 1),
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
        )
    ]  # every one is tried, whatever the others did
    return all(done)


def quiet_collector() -> None:
    """Move what start-up allocated (modules, parsers, the guest's bookkeeping) out of the
    cyclic collector's reach and collect young objects less often: with per-message objects
    churning, full collections rescanning start-up objects took 2 to 4 % of a daemon's CPU."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
