"""Digests of guest RAM, tags and vCPU state: a three-level tree of xxh3 hashes.

A leaf is one page: the xxh3-64 of its 4096 bytes of data, or of its 128 bytes of packed tags.
A block digest hashes the leaves of DIGEST_BLOCK_PAGES pages; the root hashes the blocks. A page
never written is known to be zero, so a large idle guest costs almost nothing.

The leaves are the digests that travel with each page batch (common/wire/codec.py): a source
records the digest of what it sent, a destination the digest it checked on arrival, so neither
hashes a page a second time for the verification. A page marked stale (the source's dirty
syncs mark what changed; a sent copy replaces the mark) is hashed from memory before digests
are given out, so a page that changed and was never sent still shows up as a mismatch. Per-page
digests name the pages at fault after a mismatch.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from common.constants import DIGEST_BLOCK_PAGES, PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE
from common.guest.memory import GuestMemory
from common.guest.pagehash import row_digests, table_digests

U64Array = npt.NDArray[np.uint64]

ZERO_PAGE_DIGEST = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))
UNTAGGED_DIGEST = xxhash.xxh3_64_intdigest(bytes(PACKED_TAG_BYTES_PER_PAGE))
READ_CHUNK_PAGES = 65536  # 8 MiB of packed tags, 16 MiB in the ioctl's layout


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
    """Per-page leaves over one table (RAM pages or packed tags), with block digests cached
    and refreshed only where leaves changed.

    A leaf of 0 stands for the empty page's digest (a page never written, or zero), so that the
    leaves of a large guest's untouched memory are never touched either: a 16 GiB guest's 32 MiB
    of leaves per table stay unallocated where its pages are. (A page whose real digest is 0,
    one chance in 2^64, counts as empty on both sides alike.)"""

    def __init__(
        self,
        table: npt.NDArray[np.uint8] | Callable[[npt.NDArray[np.int64]], npt.NDArray[np.uint8]],
        populated: npt.NDArray[np.bool_],
        empty: int,
    ) -> None:
        """`table`: the rows (page_count, width), read in place, or how this side reads the
        rows of given pages where it may not read them in place (tags: through the
        KVM_ARM_MTE_COPY_TAGS edge)."""
        self.table = table
        self.empty = np.uint64(empty)
        pages = populated.size
        self.leaves = np.zeros(pages, dtype=np.uint64)  # calloc: untouched pages cost nothing
        self.stale = populated.copy()
        self.stale_count = int(np.count_nonzero(self.stale))
        block_count = (pages + DIGEST_BLOCK_PAGES - 1) // DIGEST_BLOCK_PAGES
        self.block_digests = np.zeros(block_count, dtype=np.uint64)
        # blocks of empty pages only, known without reading a leaf
        whole, tail = divmod(pages, DIGEST_BLOCK_PAGES)
        self.block_digests[:whole] = self._hash_block(np.full(DIGEST_BLOCK_PAGES, self.empty, np.uint64))
        if tail:
            self.block_digests[-1] = self._hash_block(np.full(tail, self.empty, np.uint64))
        self.block_stale = (
            np.logical_or.reduceat(populated, np.arange(0, pages, DIGEST_BLOCK_PAGES))
            if pages
            else np.zeros(0, dtype=np.bool_)
        )

    @staticmethod
    def _hash_block(leaves: U64Array) -> int:
        return xxhash.xxh3_64_intdigest(leaves.astype("<u8").tobytes())

    def mark(self, pages: npt.ArrayLike) -> None:
        idx = np.asarray(pages, dtype=np.int64)
        if idx.size == 0:
            return
        self.stale_count += int(idx.size - np.count_nonzero(self.stale[idx]))
        self.stale[idx] = True

    def record(self, pages: npt.NDArray[np.int64], digests: U64Array | int) -> None:
        """Leaves known without hashing: what was sent or checked on arrival."""
        if pages.size == 0:
            return
        self.stale_count -= int(np.count_nonzero(self.stale[pages]))
        self.stale[pages] = False
        values = np.asarray(digests, dtype=np.uint64)
        self.leaves[pages] = np.where(values == self.empty, np.uint64(0), values)
        self.block_stale[pages // DIGEST_BLOCK_PAGES] = True

    def refresh(self) -> int:
        """Hash every stale page from memory; returns pages hashed."""
        if not self.stale_count:
            return 0
        pending = np.flatnonzero(self.stale)
        if callable(self.table):
            self.record(pending, read_digests(self.table, pending))
        else:
            self.record(pending, table_digests(self.table, pending))
        return int(pending.size)

    def known(self, pages: npt.NDArray[np.int64]) -> tuple[U64Array, npt.NDArray[np.bool_]]:
        """The leaves of `pages` (the digests of what was last sent or checked) and which of
        them are stale (to be hashed again: not known)."""
        leaves = self.leaves[pages]
        return np.where(leaves == 0, self.empty, leaves), self.stale[pages]

    def of(self, first: int, count: int) -> U64Array:
        """The real digests of pages [first, first + count)."""
        leaves = self.leaves[first : first + count]
        return np.where(leaves == 0, self.empty, leaves)

    def blocks(self) -> U64Array:
        """Block digests, recomputing only blocks whose leaves changed since last time (in one
        native call: at the verification request, inside the downtime, that is every block
        the migration wrote)."""
        stale = np.flatnonzero(self.block_stale)
        if stale.size:
            whole = self.leaves.size // DIGEST_BLOCK_PAGES
            full = stale[stale < whole]
            if full.size:
                rows = self.leaves[: whole * DIGEST_BLOCK_PAGES].reshape(whole, -1)[full]  # a copy
                rows[rows == 0] = self.empty
                self.block_digests[full] = row_digests(rows.astype("<u8", copy=False).view(np.uint8))
            if stale[-1] >= whole:  # a last, shorter block
                self.block_digests[-1] = self._hash_block(
                    self.of(whole * DIGEST_BLOCK_PAGES, DIGEST_BLOCK_PAGES)
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
    """Digests of one guest's memory: leaves recorded as pages travel, stale ones hashed."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.ram = _Leaves(mem.pages, mem.data_populated, ZERO_PAGE_DIGEST)
        self.tags = _Leaves(mem.tag_ioctl.read_pages, mem.tags_populated, UNTAGGED_DIGEST)

    def mark(self, data_pages: npt.ArrayLike, tag_pages: npt.ArrayLike) -> None:
        self.ram.mark(data_pages)
        self.tags.mark(tag_pages)

    def record_ram(
        self, pages: npt.NDArray[np.int64], digests: U64Array, zero: npt.NDArray[np.int64]
    ) -> None:
        self.ram.record(pages, digests)
        self.ram.record(zero, ZERO_PAGE_DIGEST)

    def record_tags(
        self, pages: npt.NDArray[np.int64], digests: U64Array, untagged: npt.NDArray[np.int64]
    ) -> None:
        self.tags.record(pages, digests)
        self.tags.record(untagged, UNTAGGED_DIGEST)

    def refresh(self) -> int:
        """Hash every stale page; returns pages hashed."""
        return self.ram.refresh() + self.tags.refresh()

    @property
    def stale_pages(self) -> int:
        return self.ram.stale_count + self.tags.stale_count

    def update_blocks(self) -> None:
        """Bring the block digests up to date with the leaves recorded so far. Called at the end
        of each round, so that the verification inside the downtime has only the blocks of the
        last pass left to hash (2 to 3 ms per GiB of written guest on each side). Stale pages
        stay stale: they are hashed when digests are given out."""
        self.ram.blocks()
        self.tags.blocks()

    def digests(self) -> MemoryDigests:
        self.refresh()
        ram_blocks = self.ram.blocks()
        tag_blocks = self.tags.blocks()
        n = self.mem.page_count
        return MemoryDigests(
            root_digest(b"ram", n, ram_blocks), root_digest(b"tags", n, tag_blocks), ram_blocks, tag_blocks
        )

    def page_digests(self, first: int, count: int) -> tuple[U64Array, U64Array]:
        """Per-page digests of RAM and tags: they name the pages at fault."""
        self.refresh()
        return self.ram.of(first, count), self.tags.of(first, count)


def memory_digests(mem: GuestMemory) -> MemoryDigests:
    return DigestCache(mem).digests()


def block_pages(block: int, page_count: int) -> tuple[int, int]:
    """First page and page count of a digest block."""
    first = block * DIGEST_BLOCK_PAGES
    return first, min(DIGEST_BLOCK_PAGES, page_count - first)


# -- postcopy: one digest per page, data and tags apart ------------------------------------------


def page_manifest(mem: GuestMemory) -> tuple[U64Array, U64Array]:
    """Per-page digests of data and of tags, over the whole guest. A page never written is
    known to be zero and costs nothing, so an idle guest's manifest is cheap."""
    ram = np.full(mem.page_count, ZERO_PAGE_DIGEST, dtype=np.uint64)
    tags = np.full(mem.page_count, UNTAGGED_DIGEST, dtype=np.uint64)
    written = np.flatnonzero(mem.data_populated)
    # which pages hold tags only a read of them says: every backed page's are read
    backed = np.flatnonzero(mem.data_populated | mem.tags_populated)
    # data and tags side by side: the native loops release the GIL (postcopy's switchover
    # waits for this: 1 GiB in 0.14 s one after the other, about 0.07 s together on 2 cores)
    with ThreadPoolExecutor(1, "tag-digests") as pool:
        tag_digests = pool.submit(read_digests, mem.tag_ioctl.read_pages, backed)
        ram[written] = table_digests(mem.pages, written)
        tags[backed] = tag_digests.result()
    return ram, tags


def known_manifest(cache: DigestCache) -> tuple[U64Array, U64Array]:
    """`page_manifest` from what a side's cache already knows: a page is hashed again only if
    it was written since it was last sent or checked on arrival (the precopy's verification
    trusts the same leaves)."""
    cache.refresh()
    count = cache.mem.page_count
    return cache.ram.of(0, count), cache.tags.of(0, count)


def read_digests(
    read_rows: Callable[[npt.NDArray[np.int64]], npt.NDArray[np.uint8]], pages: npt.NDArray[np.int64]
) -> U64Array:
    """Digests of rows read through `read_rows` (tags: the KVM_ARM_MTE_COPY_TAGS edge), a
    chunk of pages at a time: a whole large guest's tags, read at once with their one-tag-per-
    byte buffers, would cost gigabytes of transient memory."""
    out = np.empty(pages.size, dtype=np.uint64)
    for start in range(0, pages.size, READ_CHUNK_PAGES):
        chunk = pages[start : start + READ_CHUNK_PAGES]
        out[start : start + chunk.size] = row_digests(read_rows(chunk))
    return out


def manifest_digest(ram: U64Array, tags: U64Array) -> bytes:
    """What both sides compare at the end of postcopy: the manifest the destination checked
    every page against is the one the source computed."""
    h = xxhash.xxh3_128()
    h.update(ram.astype("<u8").tobytes())
    h.update(tags.astype("<u8").tobytes())
    return h.digest()
