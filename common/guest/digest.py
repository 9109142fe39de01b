"""Digests of guest RAM, tags and vCPU state: a two-level tree of xxh3 hashes.

Level one hashes blocks of DIGEST_BLOCK_PAGES pages; the root hashes the block digests. A
block whose pages were never written hashes to a precomputed constant, so a large idle guest
costs almost nothing. A mismatched root is narrowed to blocks, then to pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import xxhash

from common.constants import DIGEST_BLOCK_PAGES, PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE
from common.guest.memory import GuestMemory

U64Array = npt.NDArray[np.uint64]


@lru_cache(maxsize=16)
def _zero_digest(length: int) -> int:
    return xxhash.xxh3_64_intdigest(bytes(length))


def block_digests(
    flat: npt.NDArray[np.uint8], bytes_per_page: int, populated: npt.NDArray[np.bool_]
) -> U64Array:
    page_count = populated.size
    blocks = (page_count + DIGEST_BLOCK_PAGES - 1) // DIGEST_BLOCK_PAGES
    out = np.empty(blocks, dtype=np.uint64)
    any_populated = np.logical_or.reduceat(populated, np.arange(0, page_count, DIGEST_BLOCK_PAGES))
    view = memoryview(flat)  # type: ignore[arg-type]
    block_bytes = DIGEST_BLOCK_PAGES * bytes_per_page
    for b in range(blocks):
        start = b * block_bytes
        end = min(start + block_bytes, page_count * bytes_per_page)
        if any_populated[b]:
            out[b] = xxhash.xxh3_64_intdigest(view[start:end])
        else:
            out[b] = _zero_digest(end - start)
    return out


def page_digests(flat: npt.NDArray[np.uint8], bytes_per_page: int, first: int, count: int) -> U64Array:
    view = memoryview(flat)  # type: ignore[arg-type]
    return np.fromiter(
        (
            xxhash.xxh3_64_intdigest(view[p * bytes_per_page : (p + 1) * bytes_per_page])
            for p in range(first, first + count)
        ),
        dtype=np.uint64,
        count=count,
    )


def root_digest(kind: bytes, page_count: int, blocks: U64Array) -> bytes:
    h = xxhash.xxh3_128()
    h.update(kind)
    h.update(page_count.to_bytes(8, "little"))
    h.update(blocks.astype("<u8").tobytes())
    return h.digest()


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


def memory_digests(mem: GuestMemory) -> MemoryDigests:
    ram_blocks = block_digests(mem.ram, PAGE_SIZE, mem.data_populated)
    tag_blocks = block_digests(mem.tag_bytes, PACKED_TAG_BYTES_PER_PAGE, mem.tags_populated)
    return MemoryDigests(
        ram=root_digest(b"ram", mem.page_count, ram_blocks),
        tags=root_digest(b"tags", mem.page_count, tag_blocks),
        ram_blocks=ram_blocks,
        tag_blocks=tag_blocks,
    )


def block_pages(block: int, page_count: int) -> tuple[int, int]:
    """First page and page count of a digest block."""
    first = block * DIGEST_BLOCK_PAGES
    return first, min(DIGEST_BLOCK_PAGES, page_count - first)


def ram_page_digests(mem: GuestMemory, first: int, count: int) -> U64Array:
    return page_digests(mem.ram, PAGE_SIZE, first, count)


def tag_page_digests(mem: GuestMemory, first: int, count: int) -> U64Array:
    return page_digests(mem.tag_bytes, PACKED_TAG_BYTES_PER_PAGE, first, count)
