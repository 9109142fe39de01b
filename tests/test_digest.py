"""The incremental digest cache always agrees with a digest computed from scratch."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from common.constants import PAGE_SIZE
from common.guest.digest import DigestCache, memory_digests
from common.guest.memory import GuestMemory

PAGES = 512  # two digest blocks


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["data", "tags"]),
            st.integers(0, PAGES - 1),
            st.integers(1, 255),
            st.integers(1, 300),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_incremental_digests_match_from_scratch(ops: list[tuple[str, int, int, int]]) -> None:
    mem = GuestMemory(PAGES * PAGE_SIZE)
    cache = DigestCache(mem)
    cache.refresh()
    for kind, page, value, budget in ops:
        if kind == "data":
            mem.write(page * PAGE_SIZE + value, bytes([value]))
        else:
            mem.set_tags(page * PAGE_SIZE, 16 * (value % 8 + 1), value & 0xF)
        sync = mem.dirty_sync()  # what a migration marks after each dirty sync
        cache.mark(sync.data_pages, sync.tag_pages)
        cache.refresh(budget)  # partial refreshes, as while the guest runs
    assert cache.digests() == memory_digests(mem)
    assert cache.stale_pages == 0


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
    new_pages, _ = cache.page_digests(256, 256)
    assert (np.flatnonzero(new_pages != old_pages) + 256).tolist() == [300]
