"""The one edge through which the daemons read and write a guest's allocation tags, shaped as
KVM's `KVM_ARM_MTE_COPY_TAGS` ioctl on a VM file descriptor.

What a KVM VMM has, and all the daemons get: a guest physical address and a length, both
page-aligned, a direction flag, and a user buffer of `length / 16` bytes holding one tag per
byte in its low nibble (the kernel keeps them packed; the ioctl converts). Every call is a
system call on a real host, so the count of calls (one per run of consecutive pages) and the
bytes they move are counted and reported: they are what tags cost a VMM beyond the wire.

The guest emulation itself (vCPU tag stores and loads, the postcopy journal) works on the
packed tag storage directly, as hardware does; tests/test_structure.py holds every module of
the daemons to this edge.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from common.constants import GRANULE_SIZE, PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE, TAG_MASK
from common.indices import contiguous

try:  # the compiled part converts at memory speed (common/_pagehash.c); numpy otherwise
    from common import _pagehash

    NATIVE = hasattr(_pagehash, "unpack_tags")
except ImportError:
    NATIVE = False

# The ioctl's flags, as Linux's arm64 uapi defines them: the direction, and nothing else (KVM
# refuses any other bit).
KVM_ARM_TAGS_TO_GUEST = 0
KVM_ARM_TAGS_FROM_GUEST = 1
TAGS_PER_PAGE = PAGE_SIZE // GRANULE_SIZE

Indices = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]


class TagStorage(Protocol):
    page_count: int
    page_tags: U8  # (page_count, 128), packed
    tags_populated: npt.NDArray[np.bool_]


class TagCopyError(ValueError):
    """What KVM answers with EINVAL or ENOENT: a misaligned or out-of-range copy, a bad flag."""


@dataclass
class TagCopyCounters:
    calls: int = 0
    bytes_from_guest: int = 0  # one tag per byte, as the ioctl's buffer holds them
    bytes_to_guest: int = 0
    # parallel channels encode tag batches in threads of their own: no count may be lost
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, calls: int, from_guest: int, to_guest: int) -> None:
        with self._lock:
            self.calls += calls
            self.bytes_from_guest += from_guest
            self.bytes_to_guest += to_guest

    def as_report(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "bytes_from_guest": self.bytes_from_guest,
            "bytes_to_guest": self.bytes_to_guest,
        }


class MteCopyTags:
    def __init__(self, storage: TagStorage) -> None:
        self.storage = storage
        self.counters = TagCopyCounters()

    # -- the ioctl itself ------------------------------------------------------------------------
    def copy_tags(
        self, guest_ipa: int, length: int, buffer: U8, flags: int, reserved: tuple[int, int] = (0, 0)
    ) -> int:
        """KVM_ARM_MTE_COPY_TAGS: copies `length / 16` tags, one per byte of `buffer`, to the
        guest (KVM_ARM_TAGS_TO_GUEST) or from it (KVM_ARM_TAGS_FROM_GUEST). Returns the bytes
        of guest memory covered."""
        if any(reserved):
            raise TagCopyError("reserved fields must be zero")
        first, count = self._check(guest_ipa, length, flags)
        if buffer.dtype != np.uint8 or buffer.size != count * TAGS_PER_PAGE:
            raise TagCopyError(f"buffer of {buffer.size} bytes for {count * TAGS_PER_PAGE} tags")
        if not buffer.flags.c_contiguous:
            raise TagCopyError("the buffer must be one contiguous block of memory, as a user pointer is")
        rows = self.storage.page_tags[first : first + count]
        if flags == KVM_ARM_TAGS_FROM_GUEST:
            buffer.reshape(count, TAGS_PER_PAGE)[:] = unpack_rows(rows)
            self.counters.add(1, buffer.size, 0)
        else:
            rows[:] = pack_rows(buffer.reshape(count, TAGS_PER_PAGE))
            self.storage.tags_populated[first : first + count] = True
            self.counters.add(1, 0, buffer.size)
        return length

    def _check(self, guest_ipa: int, length: int, flags: int) -> tuple[int, int]:
        if flags not in (KVM_ARM_TAGS_FROM_GUEST, KVM_ARM_TAGS_TO_GUEST):
            raise TagCopyError(f"flags {flags:#x}: only the direction bit is defined")
        if guest_ipa % PAGE_SIZE or length % PAGE_SIZE:
            raise TagCopyError(f"copy of {length} bytes at {guest_ipa:#x} is not page-aligned")
        first, count = guest_ipa // PAGE_SIZE, length // PAGE_SIZE
        if guest_ipa < 0 or first + count > self.storage.page_count:
            raise TagCopyError(f"copy of {length} bytes at {guest_ipa:#x} leaves guest memory")
        return first, count

    # -- what the daemons use: packed rows for the wire, one call per run of pages ----------------
    def read_pages(self, pages: Indices) -> U8:
        """The packed tags (n, 128) of `pages`, as a VMM gets them: one ioctl per run of
        consecutive pages into a one-tag-per-byte buffer, packed here for the wire. The runs
        are done together: the same copies in one pass (tests/test_dirty_models.py holds it to
        the call-by-call result)."""
        pages = np.asarray(pages, dtype=np.int64)
        self._check_pages(pages)
        table = self.storage.page_tags
        rows = table[int(pages[0]) : int(pages[0]) + pages.size] if contiguous(pages) else table[pages]
        unpacked = unpack_rows(rows)  # the ioctls' buffers, end to end
        self.counters.add(run_count(pages), unpacked.size, 0)
        return pack_rows(unpacked)

    def write_pages(self, pages: Indices, packed: U8) -> None:
        """Place packed rows (n, 128) into `pages`: unpacked here to the ioctl's layout, one
        call per run of consecutive pages."""
        pages = np.asarray(pages, dtype=np.int64)
        self._check_pages(pages)
        unpacked = unpack_rows(np.asarray(packed, dtype=np.uint8).reshape(-1, PACKED_TAG_BYTES_PER_PAGE))
        if unpacked.shape[0] != pages.size:
            raise TagCopyError(f"{unpacked.shape[0]} pages of tags for {pages.size} pages")
        if contiguous(pages):
            first = int(pages[0])
            self.storage.page_tags[first : first + pages.size] = pack_rows(unpacked)
            self.storage.tags_populated[first : first + pages.size] = True
        else:
            self.storage.page_tags[pages] = pack_rows(unpacked)
            self.storage.tags_populated[pages] = True
        self.counters.add(run_count(pages), 0, unpacked.size)

    def _check_pages(self, pages: Indices) -> None:
        if pages.size and (int(pages.min()) < 0 or int(pages.max()) >= self.storage.page_count):
            raise TagCopyError(
                f"a tag copy names a page outside guest memory of {self.storage.page_count} pages"
            )


def run_count(pages: Indices) -> int:
    """Runs of consecutive pages: the ioctl calls a copy of these pages takes."""
    if pages.size <= 1:
        return int(pages.size)
    return int(np.count_nonzero(np.diff(pages) != 1)) + 1


def unpack_rows(packed: U8, *, native: bool = NATIVE) -> U8:
    """(n, 128) packed to (n, 256) one tag per byte: granule 2k is byte k's low nibble."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    out = np.empty((packed.shape[0], TAGS_PER_PAGE), dtype=np.uint8)
    if native:
        _pagehash.unpack_tags(packed, out)
        return out
    np.bitwise_and(packed, TAG_MASK, out=out[:, 0::2])
    np.right_shift(packed, 4, out=out[:, 1::2])
    return out


def pack_rows(tags: U8, *, native: bool = NATIVE) -> U8:
    """(n, 256) one tag per byte (the high nibble ignored, as KVM does) to (n, 128) packed.
    Without the extension, each pair of bytes is read as one little-endian u16 (even granule
    low): two whole-array operations instead of strided ones."""
    tags = np.ascontiguousarray(tags, dtype=np.uint8)
    if native:
        out = np.empty((tags.shape[0], PACKED_TAG_BYTES_PER_PAGE), dtype=np.uint8)
        _pagehash.pack_tags(tags, out)
        return out
    pairs = tags.view("<u2") & 0x0F0F  # each byte's tag, high nibbles gone
    return (pairs | (pairs >> 4)).astype(np.uint8)  # the low byte: even tag | odd tag << 4
