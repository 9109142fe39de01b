"""A virtio-like device: the VMM's own writes into guest RAM, which no vCPU dirty log sees.

Every `period` steps the device completes a request by writing one page of its buffer ring
(a block read landing in a guest buffer, say) from the host side. KVM's dirty log does not see
such a write: QEMU's memory API marks the page in its own migration bitmap, and a device
(or a vhost backend) that writes through a raw host pointer and forgets is a known way to
corrupt a guest in a migration. This device marks its pages, unless built to forget
(`marks_dirty=False`, a test build's `--debug-device-forgets`): then only a verification that
hashes the source's memory (`--verify-rehash`) sees the pages the destination lacks.

What it writes is a function of the workload's seed and step alone, and it writes at step
boundaries of the workload, so a migrated run still equals the unmigrated one.
"""

from __future__ import annotations

import numpy as np

from common.constants import PAGE_SIZE
from common.guest.memory import GuestMemory

_WORDS = PAGE_SIZE // 8


class DmaDevice:
    def __init__(
        self,
        mem: GuestMemory,
        first_page: int,
        pages: int,
        period: int,
        seed: int,
        *,
        marks_dirty: bool = True,
    ) -> None:
        self.mem = mem
        self.first_page = first_page
        self.pages = pages
        self.period = period
        self.seed = seed
        self.marks_dirty = marks_dirty

    def after_step(self, step: int) -> None:
        """The device's work due after workload step `step` (none between requests)."""
        if not self.period or step % self.period:
            return
        request = step // self.period
        page = self.page_of(request)
        self.mem.dma_write(page * PAGE_SIZE, self.completion(request), mark_dirty=self.marks_dirty)

    def page_of(self, request: int) -> int:
        return self.first_page + request % self.pages

    def completion(self, request: int) -> bytes:
        """The page a request leaves behind: its number, then words derived from the seed."""
        words = np.arange(_WORDS, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        words ^= np.uint64((self.seed * 0xBF58476D1CE4E5B9 + request) & 0xFFFF_FFFF_FFFF_FFFF)
        words[0] = request
        return words.astype("<u8").tobytes()
