"""Guest memory: lazy allocation, tag layouts, dirty tracking and bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.constants import GRANULE_SIZE, GRANULES_PER_PAGE, PAGE_SIZE
from common.guest.memory import GuestAddressError, GuestMemory, pack_tags, unpack_tags


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


@pytest.mark.parametrize("size", [0, 4096, (1 << 20) - 4096, (16 << 30) + 4096, (1 << 20) + 1])
def test_bad_sizes_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="RAM size"):
        GuestMemory(size)


def test_out_of_range_access_is_refused() -> None:
    mem = GuestMemory(1 << 20)
    with pytest.raises(GuestAddressError, match="outside guest RAM"):
        mem.write((1 << 20) - 2, b"abc")
    with pytest.raises(GuestAddressError):
        mem.get_tag(1 << 20)
    with pytest.raises(GuestAddressError, match="page 256"):
        mem.check_pages([0, 256])
    with pytest.raises(GuestAddressError, match="granule aligned"):
        mem.set_tags(8, 16, 1)


@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda t: len(t) % 2 == 0))
def test_pack_unpack_round_trip(tags: list[int]) -> None:
    arr = np.array(tags, dtype=np.uint8)
    packed = pack_tags(arr)
    assert packed.size == arr.size // 2
    assert int(packed[0]) == tags[0] | (tags[1] << 4)  # granule 2k in the low nibble
    assert np.array_equal(unpack_tags(packed), arr)


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
    got = mem.read_tags_unpacked(0, 4).reshape(-1).tolist()
    assert got == model
    assert [mem.get_tag(g * GRANULE_SIZE + 7) for g in range(len(model))] == model


def test_kvm_layout_round_trip_and_validation() -> None:
    mem = GuestMemory(1 << 20)
    unpacked = (np.arange(2 * GRANULES_PER_PAGE) % 16).astype(np.uint8)
    mem.write_tags_unpacked(3, unpacked)
    assert np.array_equal(mem.read_tags_unpacked(3, 2).reshape(-1), unpacked)
    assert mem.read_tags_packed(3, 2).shape == (2, 128)
    with pytest.raises(ValueError, match="wider than 4 bits"):
        mem.write_tags_unpacked(0, np.full(GRANULES_PER_PAGE, 16, dtype=np.uint8))


def test_granule_tags_per_element() -> None:
    mem = GuestMemory(1 << 20)
    mem.set_granule_tags(GRANULE_SIZE, [1, 2, 3])
    assert [mem.get_tag(g * GRANULE_SIZE) for g in range(5)] == [0, 1, 2, 3, 0]


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
