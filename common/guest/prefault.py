"""Faulting in a destination's guest pages on a helper thread, ahead of placement.

A fresh destination pays a page fault (the kernel zeroing a page) for every page it places:
0.4 to 1.5 s per GiB on this kind of machine, more than everything else it does. Measured
here, per GiB: touching 4 KiB pages 0.5 s; MADV_POPULATE_WRITE on 4 KiB pages 0.3 to 0.4 s;
MADV_POPULATE_WRITE on transparent huge pages 0.10 to 0.12 s; huge pages taken by touching
them 0.12 to 2.6 s (compaction on the fault path). So the helper thread populates ahead of
placement, in ascending order, and asks for huge pages only for 2 MiB regions the source
says are fully populated: a sparse guest never grows by a huge page for one written page.
madvise is called through ctypes, which drops the GIL, so this runs on the other core.

A destination may instead commit all of a guest's memory before any source arrives
(`dest-node --preallocate SIZE`, QEMU's -mem-prealloc): a Preallocation, timed on its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from common.constants import PAGE_SIZE, PREFAULT_LEAD_BYTES
from common.guest.memory import Backing, GuestMemory, check_ram_size, fresh_backing
from common.indices import runs

_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_MAX_CALL_BYTES = 32 << 20  # per madvise call: a stop is noticed soon


def _huge_page_pages() -> int:
    try:
        size = int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text())
    except (OSError, ValueError):
        size = 2 << 20
    return max(1, size // PAGE_SIZE)


def libc_madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if not name:
        return None
    fn = ctypes.CDLL(name, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def page_runs(pages: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """Sorted page numbers as [start, end) runs of consecutive pages."""
    return [(int(pages[a]), int(pages[b - 1]) + 1) for a, b in runs(pages)]


def plan(pages: npt.NDArray[np.int64], page_count: int, huge_pages: int) -> list[tuple[int, int, bool]]:
    """Ascending [start, end, huge) ranges to populate: whole huge-page regions where every
    page is populated, exact runs of 4 KiB pages elsewhere."""
    populated = np.zeros(page_count, dtype=np.bool_)
    populated[pages] = True
    regions = page_count // huge_pages
    full = (
        populated[: regions * huge_pages].reshape(regions, huge_pages).all(axis=1)
        if regions
        else np.zeros(0, dtype=np.bool_)
    )
    in_full = np.zeros(page_count, dtype=np.bool_)
    in_full[: regions * huge_pages] = np.repeat(full, huge_pages)
    out = [(a, b, True) for a, b in page_runs(np.flatnonzero(in_full))]
    out += [(a, b, False) for a, b in page_runs(np.flatnonzero(populated & ~in_full))]
    return sorted(out)


def populate(
    madvise: Callable[[int, int, int], int], base: int, length: int, huge: bool, stopped: Callable[[], bool]
) -> int:
    """Commit [base, base + length) in pieces, on huge pages if asked; returns bytes committed
    (less when stopped, or on a kernel without MADV_POPULATE_WRITE)."""
    if huge:
        madvise(base, length, _MADV_HUGEPAGE)
    done = 0
    while done < length and not stopped():
        piece = min(_MAX_CALL_BYTES, length - done)
        if madvise(base + done, piece, _MADV_POPULATE_WRITE) != 0:
            break
        done += piece
    return done


class Preallocation:
    """A guest's RAM and tag storage committed ahead of a migration, on a helper thread, so
    that the stream never waits on the kernel zeroing pages. Used by the first guest that fits;
    `seconds` says what committing cost (reported apart from any migration's time)."""

    def __init__(self, ram_bytes: int) -> None:
        check_ram_size(ram_bytes)
        self.ram_bytes = ram_bytes
        self.backing: Backing | None = fresh_backing(ram_bytes)
        self.committed_bytes = 0
        self.seconds: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="preallocate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        self._thread.join(timeout_s)
        return self.seconds is not None

    def take(self, ram_bytes: int) -> Backing | None:
        """The storage, once, for a guest of at most the preallocated size."""
        if self.backing is None or ram_bytes > self.ram_bytes:
            return None
        backing, self.backing = self.backing, None
        return backing

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        madvise = libc_madvise()
        backing = self.backing
        if madvise is None or backing is None:
            return
        began = time.monotonic()
        for area in (backing[1], backing[3]):
            self.committed_bytes += populate(madvise, area.ctypes.data, area.size, True, self._stop.is_set)
        self.seconds = time.monotonic() - began


class Prefaulter:
    """`arrived`: how many pages have been placed so far; the helper commits at most `lead_pages`
    more than that (a hint that names every page commits nothing it does not send)."""

    def __init__(
        self,
        mem: GuestMemory,
        pages: npt.NDArray[np.int64],
        arrived: Callable[[], int] = lambda: 0,
        lead_pages: int = PREFAULT_LEAD_BYTES // PAGE_SIZE,
    ) -> None:
        self.mem = mem
        self.ranges = plan(np.asarray(pages, dtype=np.int64), mem.page_count, _huge_page_pages())
        self.faulted_pages = 0
        self.arrived = arrived
        self.lead_pages = lead_pages
        self.held_back = False  # it reached its lead at least once and waited for arrivals
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefault", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the helper to stop; it notices within one madvise call. No waiting here: this
        is called at switchover, inside the downtime."""
        self._stop.set()

    def join(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def _within_lead(self, pages: int) -> bool:
        """Wait until committing `pages` more stays within the lead; False once stopped."""
        while self.faulted_pages + pages > self.arrived() + self.lead_pages:
            self.held_back = True
            if self._stop.wait(0.01):
                return False
        return not self._stop.is_set()

    def _run(self) -> None:
        madvise = libc_madvise()
        if madvise is None:
            return
        base = self.mem.ram.ctypes.data
        placed = self.mem.data_populated
        step = _MAX_CALL_BYTES // PAGE_SIZE
        # Huge pages for every full region first: placement that overtakes this thread then
        # faults in 2 MiB at a time too, instead of 4 KiB pages that can never be merged.
        for start, end, huge in self.ranges:
            if huge:
                madvise(base + start * PAGE_SIZE, (end - start) * PAGE_SIZE, _MADV_HUGEPAGE)
        for start, end, _ in self.ranges:
            for lo in range(start, end, step):
                if self._stop.is_set():
                    return
                hi = min(end, lo + step)
                if placed[hi - 1]:
                    continue  # placement is already past this piece
                if not self._within_lead(hi - lo):
                    return
                if madvise(base + lo * PAGE_SIZE, (hi - lo) * PAGE_SIZE, _MADV_POPULATE_WRITE) != 0:
                    return  # an older kernel: placement faults as before
                self.faulted_pages += hi - lo
