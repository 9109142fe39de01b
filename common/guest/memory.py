"""Guest RAM and allocation tags, with the dirty tracking a migration reads.

RAM and tags live in private anonymous mappings reserved without commit, as a real VMM's
guest memory does: a 16 GiB guest costs nothing until its pages are touched. Tags are kept
packed (two 4-bit tags per byte, granule 2k in the low nibble of byte k), which is both the
kernel's layout and our wire's, so sending tags never converts them.
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from common.constants import (
    GRANULE_SIZE,
    HUGE_PAGE_ALIGN,
    MAX_RAM_BYTES,
    MIN_RAM_BYTES,
    PACKED_TAG_BYTES_PER_PAGE,
    PAGE_SIZE,
    TAG_MASK,
)
from common.guest.pagehash import place_checked
from common.guest.tag_ioctl import MteCopyTags
from common.indices import contiguous
from common.units import exact_size, format_size

# Not exported by the mmap module on every Python; the Linux value.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

PageIndices = npt.NDArray[np.int64]


class AccessGate(Protocol):
    def check(self, addr: int, length: int, writing: bool) -> None: ...


class GuestAddressError(ValueError):
    """An access outside guest RAM (a real guest would take an external abort)."""


@dataclass(frozen=True)
class DirtySync:
    """What one dirty sync took: the pages whose data, and whose tags, changed."""

    data_pages: PageIndices
    tag_pages: PageIndices


def lazy_zeroed(size: int) -> tuple[mmap.mmap, npt.NDArray[np.uint8]]:
    """`size` zero bytes, committed only when touched, starting on a huge-page boundary: a
    transparent huge page can back a 2 MiB region only if the region is aligned, and where the
    kernel did not align the mapping, population fell back to 4 KiB pages (0.55 s per GiB
    instead of 0.15 here). The extra 2 MiB of address space is never touched."""
    mapping = mmap.mmap(
        -1,
        size + HUGE_PAGE_ALIGN,
        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
    )
    whole = np.frombuffer(mapping, dtype=np.uint8)
    pad = -whole.ctypes.data % HUGE_PAGE_ALIGN
    return mapping, whole[pad : pad + size]


# A guest's RAM and tag storage: (mapping, RAM bytes, mapping, packed tag bytes).
Backing = tuple[mmap.mmap, npt.NDArray[np.uint8], mmap.mmap, npt.NDArray[np.uint8]]


def fresh_backing(ram_bytes: int) -> Backing:
    ram_map, ram = lazy_zeroed(ram_bytes)
    tag_map, tags = lazy_zeroed(ram_bytes // PAGE_SIZE * PACKED_TAG_BYTES_PER_PAGE)
    return ram_map, ram, tag_map, tags


def check_ram_size(ram_bytes: int) -> None:
    if not MIN_RAM_BYTES <= ram_bytes <= MAX_RAM_BYTES:
        raise ValueError(
            f"RAM size {exact_size(ram_bytes)} is outside {format_size(MIN_RAM_BYTES)} .. {format_size(MAX_RAM_BYTES)}"
        )
    if ram_bytes % PAGE_SIZE:
        raise ValueError(
            f"RAM size {ram_bytes} bytes ({format_size(ram_bytes)}) is not a whole number of 4 KiB pages"
        )


class GuestMemory:
    """RAM in 4 KiB pages plus one 4-bit allocation tag per 16-byte granule."""

    def __init__(self, ram_bytes: int, backing: Backing | None = None) -> None:
        """`backing`: zeroed storage of at least this size made earlier (a destination's
        preallocation); by default fresh storage, committed as pages are touched."""
        check_ram_size(ram_bytes)
        self.ram_bytes = ram_bytes
        self.page_count = ram_bytes // PAGE_SIZE
        self._ram_map, ram, self._tag_map, tag_bytes = backing or fresh_backing(ram_bytes)
        self.ram = ram[:ram_bytes]
        self.pages = self.ram.reshape(self.page_count, PAGE_SIZE)
        self.tag_storage = tag_bytes[: self.page_count * PACKED_TAG_BYTES_PER_PAGE]
        self.page_tags = self.tag_storage.reshape(self.page_count, PACKED_TAG_BYTES_PER_PAGE)
        # What the hardware knows: which pages' data, and which pages' tags, vCPU stores changed.
        # A VMM sees them only through a dirty model (common/guest/dirtylog.py): on KVM the two
        # are one bit per page.
        self.data_dirty = np.zeros(self.page_count, dtype=np.bool_)
        self.tag_dirty = np.zeros(self.page_count, dtype=np.bool_)
        # The VMM's own marks for its own writes (devices, DMA), which no vCPU dirty log sees:
        # QEMU's memory API sets its migration bitmap the same way.
        self.device_dirty = np.zeros(self.page_count, dtype=np.bool_)
        # Pages ever written: a page never written is known to be zero without reading it,
        # which keeps digests and the first round cheap for large, mostly idle guests.
        self.data_populated = np.zeros(self.page_count, dtype=np.bool_)
        self.tags_populated = np.zeros(self.page_count, dtype=np.bool_)
        # Guards the dirty bitmaps against a vCPU thread: a store and its dirty mark happen
        # under it, and a dirty sync takes it, so no write slips between read and clear.
        self.lock = threading.RLock()
        # How the daemons reach the tags: only as a KVM VMM can (common/guest/tag_ioctl.py).
        self.tag_ioctl = MteCopyTags(self)
        # Postcopy on the destination: sees every guest access first (presence.PresenceGate).
        self.gate: AccessGate | None = None

    # -- bounds -----------------------------------------------------------------------------
    def check_range(self, addr: int, length: int) -> None:
        if length < 0 or addr < 0 or addr + length > self.ram_bytes:
            raise GuestAddressError(
                f"access of {length} bytes at {addr:#x} is outside guest RAM of {self.ram_bytes:#x} bytes"
            )

    def _mark(self, bitmap: npt.NDArray[np.bool_], addr: int, length: int) -> None:
        if length:
            bitmap[addr // PAGE_SIZE : (addr + length - 1) // PAGE_SIZE + 1] = True

    # -- data ---------------------------------------------------------------------------
    def read(self, addr: int, length: int) -> bytes:
        self.check_range(addr, length)
        if self.gate is not None:
            self.gate.check(addr, length, False)
        return self.ram[addr : addr + length].tobytes()

    def write(self, addr: int, data: bytes | npt.NDArray[np.uint8]) -> None:
        length = len(data)
        self.check_range(addr, length)
        if self.gate is not None:
            self.gate.check(addr, length, True)
        with self.lock:
            self.ram[addr : addr + length] = (
                np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else data
            )
            self._mark(self.data_dirty, addr, length)
            self._mark(self.data_populated, addr, length)

    def dma_write(self, addr: int, data: bytes, *, mark_dirty: bool) -> None:
        """A device's write into guest RAM from the host side: the vCPU's dirty log does not
        see it; `mark_dirty` is the device doing what QEMU's memory API does for it."""
        length = len(data)
        self.check_range(addr, length)
        if self.gate is not None:
            self.gate.check(addr, length, True)  # a postcopy destination faults it in first
        with self.lock:
            self.ram[addr : addr + length] = np.frombuffer(data, dtype=np.uint8)
            self._mark(self.data_populated, addr, length)
            if mark_dirty:
                self._mark(self.device_dirty, addr, length)

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little"))

    # -- tags ---------------------------------------------------------------------------
    def get_tag(self, addr: int) -> int:
        """LDG: the allocation tag of the granule holding addr."""
        self.check_range(addr, 1)
        if self.gate is not None:
            self.gate.check(addr, 1, False)
        granule = addr // GRANULE_SIZE
        byte = int(self.tag_storage[granule >> 1])
        return (byte >> 4) & TAG_MASK if granule & 1 else byte & TAG_MASK

    def granule_tags(self, addr: int, length: int) -> npt.NDArray[np.uint8]:
        """The allocation tags, one per byte, of every granule that [addr, addr+length) touches."""
        self.check_range(addr, length)
        if self.gate is not None:
            self.gate.check(addr, length, False)
        first = addr // GRANULE_SIZE
        last = (addr + max(length, 1) - 1) // GRANULE_SIZE
        packed = self.tag_storage[first >> 1 : (last >> 1) + 1]
        unpacked = unpack_tags(packed)
        start = first & 1
        return unpacked[start : start + last - first + 1]

    def set_tags(self, addr: int, length: int, tag: int) -> None:
        """STG/STGM: give every granule of a granule-aligned range the same tag."""
        if addr % GRANULE_SIZE or length % GRANULE_SIZE:
            raise GuestAddressError(f"tag store at {addr:#x}+{length} is not granule aligned")
        self.check_range(addr, length)
        if not length:
            return
        if self.gate is not None:
            self.gate.check(addr, length, True)
        tag &= TAG_MASK
        first = addr // GRANULE_SIZE
        end = first + length // GRANULE_SIZE
        with self.lock:
            # The first and last granule by nibble (either may share its byte with a granule
            # outside the range), every whole byte between them at once.
            self._set_nibble(first, tag)
            self._set_nibble(end - 1, tag)
            self.tag_storage[(first + 1) >> 1 : end >> 1] = tag | (tag << 4)
            self._mark(self.tag_dirty, addr, length)
            self._mark(self.tags_populated, addr, length)

    def _set_nibble(self, granule: int, tag: int) -> None:
        i = granule >> 1
        byte = int(self.tag_storage[i])
        self.tag_storage[i] = (byte & 0x0F) | (tag << 4) if granule & 1 else (byte & 0xF0) | tag

    # -- bulk per page range -----------------------------------------------------------------
    def read_tags_packed(self, first_page: int, count: int) -> npt.NDArray[np.uint8]:
        self.check_range(first_page * PAGE_SIZE, count * PAGE_SIZE)
        return self.page_tags[first_page : first_page + count].copy()

    def write_tags_packed(self, first_page: int, packed: npt.ArrayLike) -> None:
        values = np.asarray(packed, dtype=np.uint8).reshape(-1, PACKED_TAG_BYTES_PER_PAGE)
        count = values.shape[0]
        self.check_range(first_page * PAGE_SIZE, count * PAGE_SIZE)
        with self.lock:
            self.page_tags[first_page : first_page + count] = values
            self.tag_dirty[first_page : first_page + count] = True
            self.tags_populated[first_page : first_page + count] = True

    # -- placement by a migration (no dirtying: these are not guest writes) -------------------
    def place_pages(self, indices: PageIndices, data: npt.NDArray[np.uint8]) -> None:
        _scatter(self.pages, indices, data)
        _scatter(self.data_populated, indices, True)

    def place_checked_pages(
        self, indices: PageIndices, data: npt.NDArray[np.uint8], digests: npt.NDArray[np.uint64]
    ) -> int:
        """Place the pages, each hashed where it landed; returns how many leading pages hold
        their digest's bytes (those after may hold anything, and are marked written)."""
        placed = place_checked(self.pages, indices, data, digests)
        _scatter(self.data_populated, indices, True)
        return placed

    def place_zero_pages(self, indices: PageIndices) -> None:
        populated = indices[self.data_populated[indices]]
        self.pages[populated] = 0

    def place_tags(self, indices: PageIndices, packed: npt.NDArray[np.uint8]) -> None:
        _scatter(self.page_tags, indices, packed)
        _scatter(self.tags_populated, indices, True)

    # -- migration support ----------------------------------------------------------------
    def dirty_sync(self) -> DirtySync:
        """Take and clear every dirty bitmap in one step (the migration's 'dirty sync'), as the
        hardware knows it: data (vCPU and marked device writes) and tags apart. What a VMM may
        learn from it depends on the dirty model (common/guest/dirtylog.py)."""
        with self.lock:
            data = np.flatnonzero(self.data_dirty | self.device_dirty)
            tags = np.flatnonzero(self.tag_dirty)
            self._clear_dirty()
        return DirtySync(data_pages=data, tag_pages=tags)

    def _clear_dirty(self) -> None:
        self.data_dirty[:] = False
        self.tag_dirty[:] = False
        self.device_dirty[:] = False

    def populated_pages(self) -> DirtySync:
        """Every page that may differ from a fresh guest: what a first round must send."""
        with self.lock:
            self._clear_dirty()
            return DirtySync(
                data_pages=np.flatnonzero(self.data_populated),
                tag_pages=np.flatnonzero(self.tags_populated),
            )

    def close(self) -> None:
        # numpy views keep the mapping's buffer exported; drop them before closing.
        del self.pages, self.ram, self.page_tags, self.tag_storage
        self._ram_map.close()
        self._tag_map.close()


def _scatter(table: npt.NDArray[Any], indices: PageIndices, values: Any) -> None:
    """table[indices] = values; a slice assignment where the pages are contiguous."""
    if contiguous(indices):
        table[int(indices[0]) : int(indices[0]) + indices.size] = values
    else:
        table[indices] = values


def unpack_tags(packed: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    flat = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.empty(flat.size * 2, dtype=np.uint8)
    out[0::2] = flat & TAG_MASK
    out[1::2] = flat >> 4
    return out
