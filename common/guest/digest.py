"""Digests of guest RAM, tags and vCPU state: a three-level tree of xxh3 hashes.

Leaves are one xxh3-64 per page (of its 4096 data bytes, or its 128 packed tag bytes); a
block digest hashes the leaves of DIGEST_BLOCK_PAGES pages; the root hashes the blocks. A page
never written is known to be zero, so its leaf is a constant and a large idle guest costs
almost nothing.

Leaves are cached and refreshed only where pages changed: a migration marks the pages each
dirty sync (source) or each placement (destination) touched, refreshes in small budgets while
the guest still runs, and after the guest stops only the last pass's pages are hashed again.
That keeps the verification handshake out of the downtime budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from common.constants import DIGEST_BLOCK_PAGES, PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE
from common.guest.memory import GuestMemory

U64Array = npt.NDArray[np.uint64]
_ZERO_PAGE_LEAF = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))
_UNTAGGED_LEAF = xxhash.xxh3_64_intdigest(bytes(PACKED_TAG_BYTES_PER_PAGE))


@dataclass(frozen=True, eq=False)
class MemoryDigests:
    ram: bytes
    tags: bytes
    ram_blocks: U64Array
    tag_blocks: U64Array

    def __eq__(self, other: object) -> bool:
        # The roots commit to every block, so they decide equality.
        return isinstance(other, MemoryDigests) and (self.ram, self.tags) == (other.ram, other.tags)

    def __hash__(self) -> int:
        return hash((self.ram, self.tags))


class _Leaves:
    """Cached per-page leaves of one byte array (RAM or packed tags).

    The stale count and a low-water cursor are kept up to date so that asking "how much is
    left" and finding the next stale pages never scans a whole 16 GiB bitmap.
    """

    _SCAN = 1 << 16  # pages looked at per step of the cursor

    def __init__(
        self, flat: npt.NDArray[np.uint8], row_bytes: int, populated: npt.NDArray[np.bool_], zero_leaf: int
    ) -> None:
        self.view = memoryview(flat)  # type: ignore[arg-type]
        self.row_bytes = row_bytes
        self.populated = populated
        self.zero_leaf = zero_leaf
        self.leaves = np.full(populated.size, zero_leaf, dtype="<u8")
        self.stale = populated.copy()  # unpopulated pages already hold the right leaf
        self.stale_count = int(np.count_nonzero(self.stale))
        self.cursor = 0  # no stale page below this
        block_count = (populated.size + DIGEST_BLOCK_PAGES - 1) // DIGEST_BLOCK_PAGES
        self.block_digests = np.zeros(block_count, dtype=np.uint64)
        self.block_stale = np.ones(block_count, dtype=np.bool_)

    def mark(self, pages: npt.ArrayLike) -> None:
        idx = np.asarray(pages, dtype=np.int64)
        if idx.size == 0:
            return
        fresh = np.unique(idx[~self.stale[idx]])
        self.stale[fresh] = True
        self.stale_count += int(fresh.size)
        self.cursor = min(self.cursor, int(idx.min()))

    def refresh(self, budget: int | None) -> int:
        done = 0
        n = self.stale.size
        while self.stale_count and self.cursor < n and (budget is None or done < budget):
            window = self.stale[self.cursor : self.cursor + self._SCAN]
            hits = np.flatnonzero(window)
            want = hits.size if budget is None else min(hits.size, budget - done)
            if want:
                self._hash(hits[:want] + self.cursor)
                done += want
            if want == hits.size:
                self.cursor += self._SCAN
        if self.stale_count == 0:
            self.cursor = n
        return done

    def _hash(self, pending: npt.NDArray[np.int64]) -> None:
        self.block_stale[pending // DIGEST_BLOCK_PAGES] = True
        self.stale[pending] = False
        self.stale_count -= int(pending.size)
        rb = self.row_bytes
        view = self.view
        live_mask = self.populated[pending]
        live = pending[live_mask]
        self.leaves[pending[~live_mask]] = self.zero_leaf
        self.leaves[live] = np.fromiter(
            (xxhash.xxh3_64_intdigest(view[p * rb : (p + 1) * rb]) for p in live.tolist()),
            dtype=np.uint64,
            count=live.size,
        )

    def blocks(self) -> U64Array:
        """Block digests, recomputing only blocks whose leaves changed since last time."""
        stale = np.flatnonzero(self.block_stale)
        if stale.size:
            raw = memoryview(self.leaves).cast("B")
            step = DIGEST_BLOCK_PAGES * 8
            self.block_digests[stale] = np.fromiter(
                (xxhash.xxh3_64_intdigest(raw[b * step : (b + 1) * step]) for b in stale.tolist()),
                dtype=np.uint64,
                count=stale.size,
            )
            self.block_stale[stale] = False
        return self.block_digests.copy()


def root_digest(kind: bytes, page_count: int, blocks: U64Array) -> bytes:
    h = xxhash.xxh3_128()
    h.update(kind)
    h.update(page_count.to_bytes(8, "little"))
    h.update(blocks.astype("<u8").tobytes())
    return h.digest()


class DigestCache:
    """Per-page digests of one guest's memory, kept fresh incrementally."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.ram = _Leaves(mem.ram, PAGE_SIZE, mem.data_populated, _ZERO_PAGE_LEAF)
        self.tags = _Leaves(mem.tag_bytes, PACKED_TAG_BYTES_PER_PAGE, mem.tags_populated, _UNTAGGED_LEAF)

    def mark(self, data_pages: npt.ArrayLike, tag_pages: npt.ArrayLike) -> None:
        self.ram.mark(data_pages)
        self.tags.mark(tag_pages)

    def refresh(self, budget: int | None = None) -> int:
        """Hash up to budget stale pages (all when None); returns how many were hashed."""
        done = self.ram.refresh(budget)
        return done + self.tags.refresh(None if budget is None else max(0, budget - done))

    @property
    def stale_pages(self) -> int:
        return self.ram.stale_count + self.tags.stale_count

    def digests(self) -> MemoryDigests:
        self.refresh()
        ram_blocks = self.ram.blocks()
        tag_blocks = self.tags.blocks()
        n = self.mem.page_count
        return MemoryDigests(
            root_digest(b"ram", n, ram_blocks), root_digest(b"tags", n, tag_blocks), ram_blocks, tag_blocks
        )

    def page_leaves(self, first: int, count: int) -> tuple[U64Array, U64Array]:
        self.refresh()
        return self.ram.leaves[first : first + count].copy(), self.tags.leaves[first : first + count].copy()


def memory_digests(mem: GuestMemory) -> MemoryDigests:
    return DigestCache(mem).digests()


def block_pages(block: int, page_count: int) -> tuple[int, int]:
    """First page and page count of a digest block."""
    first = block * DIGEST_BLOCK_PAGES
    return first, min(DIGEST_BLOCK_PAGES, page_count - first)
