"""Digests of guest RAM, tags and vCPU state: a three-level tree of xxh3 hashes.

A leaf hashes a run of pages: DIGEST_LEAF_PAGES of RAM (64 KiB), or a whole block of packed
tags (32 KiB); a block digest hashes the leaves of DIGEST_BLOCK_PAGES pages; the root hashes
the blocks. A leaf whose pages were never written is known to be zero, so a large idle guest
costs almost nothing.

Leaves and blocks are cached and refreshed only where pages changed: a migration marks the
pages each dirty sync (source) or each placement (destination) touched, refreshes in small
budgets while the guest still runs, and after the guest stops only the last pass's leaves are
hashed again. That keeps the verification handshake out of the downtime. Why 16-page leaves:
one xxh3 call per 4 KiB page made Python's call overhead a quarter of the source's CPU; per
64 KiB it is a sixteenth, and a page changed in the last pass costs 2.7 us instead of 0.4.
Per-page digests, which name the pages at fault after a mismatch, are computed on demand for
the mismatched blocks only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from common.constants import DIGEST_BLOCK_PAGES, DIGEST_LEAF_PAGES, PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE
from common.guest.memory import GuestMemory

U64Array = npt.NDArray[np.uint64]


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
    """Cached leaves over one byte array (RAM or packed tags), each covering `pages_per_leaf`.

    The stale count and a low-water cursor are kept up to date so that asking "how much is
    left" and finding the next stale leaves never scans a whole 16 GiB bitmap.
    """

    _SCAN = 1 << 14  # leaves looked at per step of the cursor

    def __init__(
        self,
        flat: npt.NDArray[np.uint8],
        row_bytes: int,
        populated: npt.NDArray[np.bool_],
        pages_per_leaf: int,
    ) -> None:
        self.view = memoryview(flat)  # type: ignore[arg-type]
        self.total_bytes = populated.size * row_bytes
        self.pages_per_leaf = pages_per_leaf
        self.leaf_bytes = pages_per_leaf * row_bytes
        count = (populated.size + pages_per_leaf - 1) // pages_per_leaf
        self.leaves = np.full(count, xxhash.xxh3_64_intdigest(bytes(self.leaf_bytes)), dtype="<u8")
        if count and self.total_bytes % self.leaf_bytes:
            self.leaves[-1] = xxhash.xxh3_64_intdigest(bytes(self.total_bytes % self.leaf_bytes))
        # A leaf of never-written pages already holds the right (zero) digest.
        self.stale = (
            np.logical_or.reduceat(populated, np.arange(0, populated.size, pages_per_leaf))
            if count
            else np.zeros(0, dtype=np.bool_)
        )
        self.stale_count = int(np.count_nonzero(self.stale))
        self.cursor = 0  # no stale leaf below this
        self.leaves_per_block = DIGEST_BLOCK_PAGES // pages_per_leaf
        block_count = (count + self.leaves_per_block - 1) // self.leaves_per_block
        self.block_digests = np.zeros(block_count, dtype=np.uint64)
        self.block_stale = np.ones(block_count, dtype=np.bool_)

    @property
    def stale_pages(self) -> int:
        return self.stale_count * self.pages_per_leaf

    def mark(self, pages: npt.ArrayLike) -> None:
        idx = np.asarray(pages, dtype=np.int64)
        if idx.size == 0:
            return
        leaves = np.unique(idx // self.pages_per_leaf)
        fresh = leaves[~self.stale[leaves]]
        self.stale[fresh] = True
        self.stale_count += int(fresh.size)
        self.cursor = min(self.cursor, int(leaves[0]))

    def refresh(self, budget_pages: int | None) -> int:
        """Hash stale leaves, up to about budget_pages pages; returns pages hashed."""
        budget = None if budget_pages is None else max(1, budget_pages // self.pages_per_leaf)
        done = 0
        n = self.stale.size
        while self.stale_count and self.cursor < n and (budget is None or done < budget):
            hits = np.flatnonzero(self.stale[self.cursor : self.cursor + self._SCAN])
            want = hits.size if budget is None else min(hits.size, budget - done)
            if want:
                self._hash(hits[:want] + self.cursor)
                done += want
            if want == hits.size:
                self.cursor += self._SCAN
        if self.stale_count == 0:
            self.cursor = n
        return done * self.pages_per_leaf

    def _hash(self, pending: npt.NDArray[np.int64]) -> None:
        self.block_stale[pending // self.leaves_per_block] = True
        self.stale[pending] = False
        self.stale_count -= int(pending.size)
        lb, view, end = self.leaf_bytes, self.view, self.total_bytes
        self.leaves[pending] = np.fromiter(
            (xxhash.xxh3_64_intdigest(view[p * lb : min((p + 1) * lb, end)]) for p in pending.tolist()),
            dtype=np.uint64,
            count=pending.size,
        )

    def blocks(self) -> U64Array:
        """Block digests, recomputing only blocks whose leaves changed since last time."""
        stale = np.flatnonzero(self.block_stale)
        if stale.size:
            raw = memoryview(self.leaves).cast("B")
            step = self.leaves_per_block * 8
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


def _per_page(flat: npt.NDArray[np.uint8], row_bytes: int, first: int, count: int) -> U64Array:
    view = memoryview(flat)  # type: ignore[arg-type]
    return np.fromiter(
        (
            xxhash.xxh3_64_intdigest(view[p * row_bytes : (p + 1) * row_bytes])
            for p in range(first, first + count)
        ),
        dtype=np.uint64,
        count=count,
    )


class DigestCache:
    """Digests of one guest's memory, kept fresh incrementally."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.ram = _Leaves(mem.ram, PAGE_SIZE, mem.data_populated, DIGEST_LEAF_PAGES)
        self.tags = _Leaves(mem.tag_bytes, PACKED_TAG_BYTES_PER_PAGE, mem.tags_populated, DIGEST_BLOCK_PAGES)

    def mark(self, data_pages: npt.ArrayLike, tag_pages: npt.ArrayLike) -> None:
        self.ram.mark(data_pages)
        self.tags.mark(tag_pages)

    def refresh(self, budget: int | None = None) -> int:
        """Hash up to about `budget` stale pages (all when None); returns pages hashed."""
        done = self.ram.refresh(budget)
        return done + self.tags.refresh(None if budget is None else max(0, budget - done))

    @property
    def stale_pages(self) -> int:
        return self.ram.stale_pages + self.tags.stale_pages

    def digests(self) -> MemoryDigests:
        self.refresh()
        ram_blocks = self.ram.blocks()
        tag_blocks = self.tags.blocks()
        n = self.mem.page_count
        return MemoryDigests(
            root_digest(b"ram", n, ram_blocks), root_digest(b"tags", n, tag_blocks), ram_blocks, tag_blocks
        )

    def page_digests(self, first: int, count: int) -> tuple[U64Array, U64Array]:
        """Per-page digests of RAM and tags, computed now: they name the pages at fault."""
        return (
            _per_page(self.mem.ram, PAGE_SIZE, first, count),
            _per_page(self.mem.tag_bytes, PACKED_TAG_BYTES_PER_PAGE, first, count),
        )


def memory_digests(mem: GuestMemory) -> MemoryDigests:
    return DigestCache(mem).digests()


def block_pages(block: int, page_count: int) -> tuple[int, int]:
    """First page and page count of a digest block."""
    first = block * DIGEST_BLOCK_PAGES
    return first, min(DIGEST_BLOCK_PAGES, page_count - first)


# -- postcopy: one digest per page, data and tags apart ------------------------------------------
ZERO_PAGE_DIGEST = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))
UNTAGGED_DIGEST = xxhash.xxh3_64_intdigest(bytes(PACKED_TAG_BYTES_PER_PAGE))


def row_digests(rows: npt.NDArray[np.uint8]) -> U64Array:
    """xxh3-64 of each row: a page's data (4096 bytes) or its packed tags (128 bytes)."""
    rows = np.ascontiguousarray(rows)
    width = rows.shape[1] if rows.ndim == 2 else 0
    view = memoryview(rows.reshape(-1))  # type: ignore[arg-type]
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(view[i : i + width]) for i in range(0, rows.shape[0] * width, width)),
        dtype=np.uint64,
        count=rows.shape[0],
    )


def _digests_of(flat: npt.NDArray[np.uint8], row_bytes: int, pages: npt.NDArray[np.int64]) -> U64Array:
    view = memoryview(flat)  # type: ignore[arg-type]
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(view[p * row_bytes : (p + 1) * row_bytes]) for p in pages.tolist()),
        dtype=np.uint64,
        count=pages.size,
    )


def page_manifest(mem: GuestMemory) -> tuple[U64Array, U64Array]:
    """Per-page digests of data and of tags, over the whole guest. A page never written is
    known to be zero and costs nothing, so an idle guest's manifest is cheap."""
    ram = np.full(mem.page_count, ZERO_PAGE_DIGEST, dtype=np.uint64)
    tags = np.full(mem.page_count, UNTAGGED_DIGEST, dtype=np.uint64)
    written = np.flatnonzero(mem.data_populated)
    ram[written] = _digests_of(mem.ram, PAGE_SIZE, written)
    tagged = np.flatnonzero(mem.tags_populated)
    tags[tagged] = _digests_of(mem.tag_bytes, PACKED_TAG_BYTES_PER_PAGE, tagged)
    return ram, tags


def manifest_digest(ram: U64Array, tags: U64Array) -> bytes:
    """What both sides compare at the end of postcopy: the manifest the destination checked
    every page against is the one the source computed."""
    h = xxhash.xxh3_128()
    h.update(ram.astype("<u8").tobytes())
    h.update(tags.astype("<u8").tobytes())
    return h.digest()
