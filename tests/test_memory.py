"""Guest memory: lazy allocation, tag layouts, dirty tracking and bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.constants import GRANULE_SIZE, GRANULES_PER_PAGE, PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE
from common.guest.memory import GuestAddressError, GuestMemory


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_16gib_guest_costs_memory_only_for_touched_pages() -> None:
    before = rss_bytes()
    mem = GuestMemory(16 << 30)
    mem.write(5 << 30, b"hello")
    mem.set_tags(9 << 30, PAGE_SIZE, 3)
    grown = rss_bytes() - before
    # the bitmaps are 4 MiB each; RAM and tags stay unbacked
    assert grown < 64 << 20, grown
    assert mem.read(5 << 30, 5) == b"hello" and mem.get_tag(9 << 30) == 3
    assert mem.read(7 << 30, 16) == bytes(16)
    mem.close()


@pytest.mark.parametrize(
    "size, reason",
    [
        (0, "0 B is outside 1 MiB .. 16 GiB"),
        (4096, "4 KiB is outside"),
        ((1 << 20) - 4096, "1020 KiB is outside"),
        ((16 << 30) + 4096, "17179873280 bytes is outside"),
        ((1 << 20) + 1, "whole number of 4 KiB pages"),
        ((2 << 20) + 2048, "whole number of 4 KiB pages"),
    ],
)
def test_bad_sizes_are_refused(size: int, reason: str) -> None:
    with pytest.raises(ValueError, match=f"RAM size .*{reason}"):
        GuestMemory(size)


@pytest.mark.parametrize("size", [1 << 20, (1 << 20) + 4096, 16 << 30])
def test_sizes_at_the_limits_are_accepted(size: int) -> None:
    mem = GuestMemory(size)
    assert (mem.ram_bytes, mem.page_count) == (size, size // PAGE_SIZE)
    assert mem.pages.shape == (size // PAGE_SIZE, PAGE_SIZE)
    assert mem.page_tags.shape == (size // PAGE_SIZE, PACKED_TAG_BYTES_PER_PAGE)
    mem.write(size - 8, b"last8byt")
    mem.set_tags(size - GRANULE_SIZE, GRANULE_SIZE, 0xD)
    assert mem.read(size - 8, 8) == b"last8byt" and mem.get_tag(size - 1) == 0xD
    assert mem.pages[-1, -8:].tobytes() == b"last8byt" and mem.page_tags[-1, -1] == 0xD0
    mem.close()


RAM = 1 << 20


@pytest.mark.parametrize(
    "access",
    [
        lambda m: m.write(RAM - 2, b"abc"),
        lambda m: m.write(-1, b"a"),
        lambda m: m.read(RAM - 7, 8),
        lambda m: m.read(RAM, 1),
        lambda m: m.read(-PAGE_SIZE, 16),
        lambda m: m.read(16, -1),
        lambda m: m.read_u64(RAM - 4),
        lambda m: m.write_u64(RAM, 1),
        lambda m: m.get_tag(RAM),
        lambda m: m.get_tag(-1),
        lambda m: m.granule_tags(RAM - 8, 16),
        lambda m: m.set_tags(RAM - GRANULE_SIZE, 2 * GRANULE_SIZE, 1),
        lambda m: m.set_tags(-GRANULE_SIZE, GRANULE_SIZE, 1),
        lambda m: m.read_tags_packed(RAM // PAGE_SIZE - 1, 2),
        lambda m: m.write_tags_packed(RAM // PAGE_SIZE, np.ones(PACKED_TAG_BYTES_PER_PAGE, dtype=np.uint8)),
    ],
)
def test_out_of_range_access_is_refused_and_changes_nothing(access) -> None:  # type: ignore[no-untyped-def]
    mem = GuestMemory(RAM)
    with pytest.raises(GuestAddressError, match="outside guest RAM"):
        access(mem)
    assert not mem.ram.any() and not mem.tag_storage.any()
    sync = mem.dirty_sync()
    assert sync.data_pages.size == 0 and sync.tag_pages.size == 0


def test_accesses_that_end_at_the_end_of_ram_are_allowed() -> None:
    mem = GuestMemory(RAM)
    mem.write(RAM - 3, b"abc")
    assert mem.read(RAM - 3, 3) == b"abc" and mem.read(RAM, 0) == b""
    mem.write_u64(RAM - 8, 0x0102_0304_0506_0708)
    assert mem.read(RAM - 8, 8) == bytes([8, 7, 6, 5, 4, 3, 2, 1])  # little-endian
    assert mem.read_u64(RAM - 8) == 0x0102_0304_0506_0708
    assert mem.granule_tags(RAM - GRANULE_SIZE, GRANULE_SIZE).tolist() == [0]


def test_u64_stores_wrap_to_64_bits() -> None:
    mem = GuestMemory(RAM)
    mem.write_u64(64, -1)
    assert mem.read_u64(64) == 0xFFFF_FFFF_FFFF_FFFF
    mem.write_u64(64, (1 << 64) + 5)
    assert mem.read_u64(64) == 5 and mem.read(72, 8) == bytes(8)


@pytest.mark.parametrize("addr, length", [(8, 16), (16, 8), (24, 24), (PAGE_SIZE + 1, PAGE_SIZE)])
def test_unaligned_tag_store_is_refused(addr: int, length: int) -> None:
    mem = GuestMemory(RAM)
    with pytest.raises(GuestAddressError, match=rf"tag store at {addr:#x}\+{length} is not granule aligned"):
        mem.set_tags(addr, length, 1)
    assert not mem.tag_storage.any()


@pytest.mark.parametrize("granule", [0, 1, 2, 3])
def test_empty_tag_store_changes_nothing(granule: int) -> None:
    mem = GuestMemory(RAM)
    mem.set_tags(0, 4 * GRANULE_SIZE, 0x6)
    mem.dirty_sync()
    mem.set_tags(granule * GRANULE_SIZE, 0, 0x9)
    assert mem.granule_tags(0, 4 * GRANULE_SIZE).tolist() == [6, 6, 6, 6]
    assert mem.dirty_sync().tag_pages.size == 0


def test_tag_store_keeps_only_four_bits() -> None:
    mem = GuestMemory(RAM)
    mem.set_tags(GRANULE_SIZE, 3 * GRANULE_SIZE, 0x1C)
    assert mem.granule_tags(0, 5 * GRANULE_SIZE).tolist() == [0, 0xC, 0xC, 0xC, 0]


@settings(max_examples=60)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 3 * GRANULES_PER_PAGE - 1), st.integers(1, 40), st.integers(0, 15)),
        min_size=1,
        max_size=20,
    )
)
def test_tag_stores_match_a_reference_model(ops: list[tuple[int, int, int]]) -> None:
    mem = GuestMemory(1 << 20)
    model = [0] * (4 * GRANULES_PER_PAGE)
    for first, count, tag in ops:
        mem.set_tags(first * GRANULE_SIZE, count * GRANULE_SIZE, tag)
        for g in range(first, first + count):
            model[g] = tag
    got = mem.granule_tags(0, 4 * PAGE_SIZE).tolist()
    assert got == model
    assert [mem.get_tag(g * GRANULE_SIZE + 7) for g in range(len(model))] == model
    # the packed layout the wire and the kernel use: granule 2k in the low nibble of byte k
    assert mem.tag_storage[: len(model) // 2].tolist() == [
        model[2 * k] | model[2 * k + 1] << 4 for k in range(len(model) // 2)
    ]
    touched = {g * GRANULE_SIZE // PAGE_SIZE for f, c, _ in ops for g in range(f, f + c)}
    assert mem.dirty_sync().tag_pages.tolist() == sorted(touched)


@settings(max_examples=80)
@given(
    seed=st.integers(0, 2**32 - 1),
    addr=st.integers(0, 3 * PAGE_SIZE - 1),
    length=st.integers(0, 3 * GRANULE_SIZE + 1),
)
def test_granule_tags_are_those_of_every_granule_touched(seed: int, addr: int, length: int) -> None:
    """One tag per granule that [addr, addr + length) touches (a zero-length access is checked
    at the granule holding its address)."""
    tags = np.random.default_rng(seed).integers(0, 16, 3 * GRANULES_PER_PAGE).tolist()
    mem = GuestMemory(RAM)
    packed = [tags[2 * k] | tags[2 * k + 1] << 4 for k in range(len(tags) // 2)]
    mem.write_tags_packed(0, packed)
    length = min(length, 3 * PAGE_SIZE - addr)
    first, last = addr // GRANULE_SIZE, (addr + max(length, 1) - 1) // GRANULE_SIZE
    assert mem.granule_tags(addr, length).tolist() == tags[first : last + 1]
    assert mem.get_tag(addr) == tags[first]


def test_tag_only_change_dirties_only_tags() -> None:
    mem = GuestMemory(1 << 20)
    mem.set_tags(2 * PAGE_SIZE, GRANULE_SIZE, 7)
    mem.write(5 * PAGE_SIZE + 10, b"x")
    sync = mem.dirty_sync()
    assert sync.tag_pages.tolist() == [2]
    assert sync.data_pages.tolist() == [5]
    again = mem.dirty_sync()
    assert again.tag_pages.size == 0 and again.data_pages.size == 0


def test_write_spanning_pages_dirties_both() -> None:
    mem = GuestMemory(1 << 20)
    mem.write(PAGE_SIZE - 2, b"abcd")
    assert mem.dirty_sync().data_pages.tolist() == [0, 1]


def test_write_ending_at_a_page_boundary_dirties_one_page() -> None:
    mem = GuestMemory(RAM)
    mem.write(2 * PAGE_SIZE - 4, b"abcd")
    mem.set_tags(5 * PAGE_SIZE - GRANULE_SIZE, GRANULE_SIZE, 1)
    mem.write(7 * PAGE_SIZE, b"")  # an empty write dirties nothing
    sync = mem.dirty_sync()
    assert sync.data_pages.tolist() == [1] and sync.tag_pages.tolist() == [4]


def test_write_accepts_bytes_bytearray_and_arrays() -> None:
    mem = GuestMemory(RAM)
    mem.write(0, b"ab")
    mem.write(2, bytearray(b"cd"))
    mem.write(4, np.frombuffer(b"ef", dtype=np.uint8))
    assert mem.read(0, 6) == b"abcdef"


def test_packed_tags_round_trip_by_page_range() -> None:
    mem = GuestMemory(RAM)
    rows = np.random.default_rng(1).integers(0, 256, (2, PACKED_TAG_BYTES_PER_PAGE), dtype=np.uint8)
    mem.write_tags_packed(3, rows)
    assert np.array_equal(mem.read_tags_packed(3, 2), rows)
    assert mem.read_tags_packed(2, 1).tolist() == [[0] * PACKED_TAG_BYTES_PER_PAGE]
    # low nibble first: granule 0 of page 3 has the low nibble of the row's first byte
    assert mem.get_tag(3 * PAGE_SIZE) == rows[0, 0] & 0xF
    assert mem.get_tag(3 * PAGE_SIZE + GRANULE_SIZE) == rows[0, 0] >> 4
    copy = mem.read_tags_packed(3, 1)
    copy[:] = 0  # a copy: changing it does not retag the guest
    assert np.array_equal(mem.read_tags_packed(3, 1), rows[:1])
    assert mem.dirty_sync().tag_pages.tolist() == [3, 4]
    assert mem.populated_pages().tag_pages.tolist() == [3, 4]


def test_populated_pages_are_every_page_ever_written_and_restart_dirty_tracking() -> None:
    mem = GuestMemory(RAM)
    mem.write(3 * PAGE_SIZE, b"x")
    mem.set_tags(6 * PAGE_SIZE, GRANULE_SIZE, 2)
    assert mem.dirty_sync().data_pages.tolist() == [3]  # taken: no longer dirty, still populated
    mem.write(9 * PAGE_SIZE, b"y")
    mem.set_tags(10 * PAGE_SIZE, GRANULE_SIZE, 2)
    first = mem.populated_pages()
    assert first.data_pages.tolist() == [3, 9] and first.tag_pages.tolist() == [6, 10]
    after = mem.dirty_sync()  # what round 1 sends is no longer dirty
    assert after.data_pages.size == 0 and after.tag_pages.size == 0


def test_placement_by_a_migration_does_not_dirty_but_populates() -> None:
    mem = GuestMemory(RAM)
    rows = np.full((2, PAGE_SIZE), 7, dtype=np.uint8)
    mem.place_pages(np.array([4, 9], dtype=np.int64), rows)  # a scatter
    mem.place_pages(np.array([20, 21], dtype=np.int64), rows + 1)  # a slice
    tags = np.full((2, PACKED_TAG_BYTES_PER_PAGE), 0x33, dtype=np.uint8)
    mem.place_tags(np.array([5, 2], dtype=np.int64), tags)
    mem.place_tags(np.array([30, 31], dtype=np.int64), tags + 0x11)
    assert mem.read(4 * PAGE_SIZE, 1) == b"\x07" and mem.read(21 * PAGE_SIZE + 4095, 1) == b"\x08"
    assert mem.read(5 * PAGE_SIZE, 1) == b"\x00" and mem.read(22 * PAGE_SIZE, 1) == b"\x00"
    assert mem.get_tag(2 * PAGE_SIZE) == 3 and mem.get_tag(31 * PAGE_SIZE) == 4 and mem.get_tag(0) == 0
    sync = mem.dirty_sync()
    assert sync.data_pages.size == 0 and sync.tag_pages.size == 0
    populated = mem.populated_pages()
    assert populated.data_pages.tolist() == [4, 9, 20, 21]
    assert populated.tag_pages.tolist() == [2, 5, 30, 31]


def test_placing_zero_pages_clears_what_was_there() -> None:
    mem = GuestMemory(RAM)
    mem.write(4 * PAGE_SIZE, b"\xff" * PAGE_SIZE)
    mem.write(6 * PAGE_SIZE + 100, b"\xff")
    mem.place_zero_pages(np.array([4, 5, 6], dtype=np.int64))
    assert not mem.ram.any()


@pytest.mark.parametrize("what", ["ram", "tags"])
def test_closing_a_guest_gives_its_memory_back(what: str) -> None:
    """A discarded guest (a failed migration's destination) must not keep its RAM or tags."""
    touched = 64 << 20
    size = touched if what == "ram" else touched * 32  # tags are 1/32 of RAM
    before = rss_bytes()
    mem = GuestMemory(size)
    (mem.ram if what == "ram" else mem.tag_storage)[:] = 1
    resident = rss_bytes()
    assert resident - before > touched * 3 // 4  # the premise: it is resident now
    mem.close()
    assert resident - rss_bytes() > touched * 3 // 4


@pytest.mark.parametrize("granule", [4, 5])
def test_retagging_one_granule_keeps_its_byte_neighbour(granule: int) -> None:
    """Two granules share a byte: every old and new tag of one leaves the other alone."""
    mem = GuestMemory(RAM)
    neighbour = granule ^ 1
    for old in range(16):
        for new in range(16):
            mem.set_tags(neighbour * GRANULE_SIZE, GRANULE_SIZE, 15 - old)
            mem.set_tags(granule * GRANULE_SIZE, GRANULE_SIZE, old)
            mem.set_tags(granule * GRANULE_SIZE, GRANULE_SIZE, new)
            assert mem.granule_tags(3 * GRANULE_SIZE, 4 * GRANULE_SIZE).tolist() == [
                0,
                *((new, 15 - old) if granule == 4 else (15 - old, new)),
                0,
            ]
