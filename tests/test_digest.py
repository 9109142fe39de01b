"""The digest cache always agrees with a digest computed from scratch, whether its leaves were
recorded as pages travelled or hashed from memory."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.constants import PAGE_SIZE
from common.guest.digest import DigestCache, memory_digests
from common.guest.memory import GuestMemory
from common.guest.pagehash import NATIVE, gather_content, place_checked, row_digests, table_digests
from common.wire.codec import encode_ram_pages, encode_tag_sections

PAGES = 512 + 37  # two whole digest blocks and a short one


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["data", "tags"]),
            st.integers(0, PAGES - 1),
            st.integers(1, 255),
            st.booleans(),
            st.booleans(),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_recorded_and_hashed_leaves_match_from_scratch(ops: list[tuple[str, int, int, bool, bool]]) -> None:
    mem = GuestMemory(PAGES * PAGE_SIZE)
    cache = DigestCache(mem)
    cache.digests()
    for kind, page, value, send, round_ends in ops:
        if kind == "data":
            mem.write(page * PAGE_SIZE + value, bytes([value]))
        else:
            mem.set_tags(page * PAGE_SIZE, 16 * (value % 8 + 1), value & 0xF)
        sync = mem.dirty_sync()  # what a migration marks after each dirty sync
        cache.mark(sync.data_pages, sync.tag_pages)
        if send:  # ... and what it records when it sends those pages
            _, _, data = encode_ram_pages(mem.pages, sync.data_pages, use_lz4=False)
            cache.record_ram(data.content, data.digests, data.empty)
            _, _, tags = encode_tag_sections(mem.page_tags, sync.tag_pages, use_lz4=False)
            cache.record_tags(tags.content, tags.digests, tags.empty)
            assert not cache.ram.stale[sync.data_pages].any() and not cache.tags.stale[sync.tag_pages].any()
        if round_ends:
            cache.update_blocks()
    assert cache.digests() == memory_digests(mem)
    assert cache.stale_pages == 0


def test_after_a_round_only_the_blocks_written_since_are_hashed_again() -> None:
    """What the verification inside the downtime costs: the blocks of the last pass, not every
    block the migration wrote."""
    mem = GuestMemory(PAGES * PAGE_SIZE)
    mem.pages[:] = 7
    mem.data_populated[:] = True
    cache = DigestCache(mem)
    everything = np.arange(PAGES, dtype=np.int64)
    cache.record_ram(everything, table_digests(mem.pages, everything), everything[:0])
    assert np.count_nonzero(cache.ram.block_stale) == 3
    cache.update_blocks()
    mem.pages[300] = 9
    last = np.array([300], dtype=np.int64)
    cache.record_ram(last, table_digests(mem.pages, last), last[:0])
    assert np.flatnonzero(cache.ram.block_stale).tolist() == [1], "the block of page 300 alone"
    assert cache.digests() == memory_digests(mem)


def test_a_page_marked_but_never_sent_is_hashed_from_memory() -> None:
    """The safety net: what changed and was never sent shows as a mismatch, not a stale match."""
    mem = GuestMemory(PAGES * PAGE_SIZE)
    cache = DigestCache(mem)
    before = cache.digests()
    mem.write(300 * PAGE_SIZE, b"x")
    cache.mark(mem.dirty_sync().data_pages, [])
    after = cache.digests()
    assert after.ram != before.ram and after == memory_digests(mem)


def test_a_change_is_named_down_to_its_page() -> None:
    mem = GuestMemory(PAGES * PAGE_SIZE)
    mem.write(300 * PAGE_SIZE, b"x")
    cache = DigestCache(mem)
    first = cache.digests()
    old_pages, _ = cache.page_digests(256, 256)
    mem.pages[300, 0] ^= 1  # a change no dirty bit saw
    after = memory_digests(mem)
    assert after.ram != first.ram and after.tags == first.tags
    assert np.flatnonzero(after.ram_blocks != first.ram_blocks).tolist() == [1]
    new_pages, _ = DigestCache(mem).page_digests(256, 256)
    assert (np.flatnonzero(new_pages != old_pages) + 256).tolist() == [300]


@settings(max_examples=30, deadline=None)
@given(
    width=st.sampled_from([1, 8, 128, 4096, 2048 + 8]),
    count=st.integers(0, 40),
    seed=st.integers(0, 2**32 - 1),
    picks=st.lists(st.integers(0, 39), max_size=12, unique=True),
)
def test_native_and_python_row_digests_agree(width: int, count: int, seed: int, picks: list[int]) -> None:
    rows = np.random.default_rng(seed).integers(0, 256, (count, width), dtype=np.uint8)
    python = row_digests(rows, native=False)
    assert python.size == count
    assert row_digests(rows).tolist() == python.tolist()
    pages = np.array(sorted(p for p in picks if p < count), dtype=np.int64)
    assert table_digests(rows, pages).tolist() == python[pages].tolist()
    assert table_digests(rows, pages, native=False).tolist() == python[pages].tolist()


def test_the_extension_is_built_where_the_install_script_ran() -> None:
    """scripts/install.sh installs xxhash.h and builds common/_pagehash: a Python fallback
    would pass every other test at twice the hashing cost."""
    assert NATIVE, "common._pagehash is missing: run `bash scripts/install.sh` (needs libxxhash-dev)"


@settings(max_examples=60, deadline=None)
@given(
    width=st.sampled_from([128, 4096, 100]),
    seed=st.integers(0, 2**32 - 1),
    picks=st.lists(st.integers(0, 31), max_size=12, unique=True),
    zeroed=st.sets(st.integers(0, 31)),
    last_byte_only=st.sets(st.integers(0, 31)),
    damage=st.one_of(st.none(), st.integers(0, 11)),
)
def test_gather_and_checked_placement_agree_with_the_python_loops(
    width: int, seed: int, picks: list[int], zeroed: set[int], last_byte_only: set[int], damage: int | None
) -> None:
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 256, (32, width), dtype=np.uint8)
    table[sorted(zeroed | last_byte_only)] = 0
    table[sorted(last_byte_only - zeroed), -1] = 1  # content only in the last byte: not a zero row
    pages = np.array(picks, dtype=np.int64)
    want_zero = [not table[p].any() for p in picks]
    content = pages[~np.array(want_zero, dtype=np.bool_)] if picks else pages
    for native in sorted({NATIVE, False}):
        for copy in (True, False):
            zero, rows, digests = gather_content(table, pages, copy=copy, native=native)
            assert zero.tolist() == want_zero
            assert digests.tolist() == row_digests(table[content], native=False).tolist()
            assert rows is None if not copy else rows.tolist() == table[content].tolist()
    expected = row_digests(table[pages], native=False)
    if damage is not None and damage < pages.size:
        expected[damage] ^= 1  # the row at `damage` arrived damaged
    want = damage if damage is not None and damage < pages.size else pages.size
    for native in sorted({NATIVE, False}):
        target = np.zeros_like(table)
        assert place_checked(target, pages, table[pages], expected, native=native) == want
        assert target[pages[:want]].tolist() == table[pages[:want]].tolist()
        if native and want < pages.size:
            assert not target[pages[want + 1 :]].any(), "the native loop stops at the bad row"


@pytest.mark.skipif(not NATIVE, reason="common._pagehash is not built")
def test_the_native_calls_refuse_rows_outside_the_table() -> None:
    table = np.zeros((4, 128), dtype=np.uint8)
    with pytest.raises(IndexError, match="row 4 is outside a table of 4 rows"):
        gather_content(table, np.array([1, 4], dtype=np.int64))
    with pytest.raises(IndexError, match="row -1"):
        place_checked(
            table, np.array([-1], dtype=np.int64), np.zeros((1, 128), np.uint8), np.zeros(1, np.uint64)
        )
