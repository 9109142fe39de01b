"""Postcopy's decisions on their own: what the source sends next, and what the destination
accepts, places and asks for."""

from __future__ import annotations

import numpy as np
import pytest

from common.constants import PAGE_SIZE
from common.guest.digest import UNTAGGED_DIGEST, ZERO_PAGE_DIGEST, DigestCache, manifest_digest, page_manifest
from common.guest.memory import GuestMemory
from common.guest.pagehash import row_digests
from common.protocol.postcopy import (
    BACKGROUND_BATCH_PAGES,
    MANIFEST_CHUNK_PAGES,
    DestPostcopy,
    SourcePostcopy,
    manifest_messages,
)
from common.wire import mte_migration_pb2 as pb
from common.wire.codec import PostcopyBatch
from common.wire.framing import WireError


def test_nothing_is_sent_before_the_destination_says_what_it_holds() -> None:
    pc = SourcePostcopy(1000)
    assert pc.next_background() is None and not pc.background_left and pc.missing() == 1000


def test_the_background_stream_goes_in_order_and_wraps_around() -> None:
    pc = SourcePostcopy(300)
    present = np.zeros(300, dtype=bool)
    present[:100] = True
    pc.holds(present)
    assert pc.missing() == 200
    first = pc.next_background()
    assert first is not None and first.tolist() == list(range(100, 100 + BACKGROUND_BATCH_PAGES))
    assert pc.cursor == 100 + BACKGROUND_BATCH_PAGES and pc.background_pages == BACKGROUND_BATCH_PAGES
    assert pc.background_left
    second = pc.next_background()
    assert second is not None and second.tolist() == list(range(228, 300))
    assert pc.next_background() is None and not pc.background_left and pc.missing() == 0


def test_a_batch_that_reaches_the_end_fills_up_from_the_start() -> None:
    pc = SourcePostcopy(1000)
    present = np.zeros(1000, dtype=bool)
    present[10:20] = True
    pc.holds(present)
    pc.request([994], 0.0)
    pc.next_urgent()
    batch = pc.next_background()
    assert batch is not None and batch.tolist()[:5] == [995, 996, 997, 998, 999]
    assert batch.tolist()[5:8] == [0, 1, 2] and batch.size == BACKGROUND_BATCH_PAGES


def test_a_request_goes_first_and_the_stream_carries_on_after_it() -> None:
    pc = SourcePostcopy(1000)
    pc.holds(np.zeros(1000, dtype=bool))
    pc.request([700, 10, 700], 0.0)
    assert pc.requests == 3 and pc.cursor == 701
    urgent = pc.next_urgent()
    assert urgent is not None and urgent.tolist() == [10, 700], "once each, in page order"
    assert pc.next_urgent() is None
    batch = pc.next_background()
    assert batch is not None and batch[0] == 701, "the neighbours of the requested page come next"
    # wrapping: what is left before the cursor comes after the end
    tail = []
    while (b := pc.next_background()) is not None:
        tail.extend(b.tolist())
    assert 10 not in tail and 700 not in tail and 0 in tail and 999 in tail
    assert sorted([*batch.tolist(), *tail]) == [p for p in range(1000) if p not in (10, 700)]


def test_a_page_asked_for_again_is_answered_again() -> None:
    pc = SourcePostcopy(10)
    pc.holds(np.zeros(10, dtype=bool))
    pc.request([3], 0.0)
    assert pc.next_urgent().tolist() == [3]  # type: ignore[union-attr]
    pc.request([3], 0.0)  # the destination found the copy wrong
    assert pc.next_urgent().tolist() == [3]  # type: ignore[union-attr]
    assert pc.cursor == 4 and pc.background_left
    pc.request([9], 0.0)
    assert pc.cursor == 0, "after the last page: from the start"


def guest_with_content() -> GuestMemory:
    mem = GuestMemory(2 << 20)  # 512 pages
    mem.write(5 * PAGE_SIZE, b"five")
    mem.set_tags(7 * PAGE_SIZE, 64, 9)
    mem.write(300 * PAGE_SIZE + 100, b"x" * 50)
    return mem


def test_the_manifest_hashes_written_pages_and_knows_the_rest() -> None:
    mem = guest_with_content()
    ram, tags = page_manifest(mem)
    assert ram[0] == ZERO_PAGE_DIGEST and tags[0] == UNTAGGED_DIGEST
    assert ram[5] == row_digests(mem.pages[5:6])[0] != ZERO_PAGE_DIGEST
    assert tags[7] == row_digests(mem.page_tags[7:8])[0] != UNTAGGED_DIGEST
    messages, digest = manifest_messages(mem)
    assert [m.first_page for m in messages] == list(range(0, 512, MANIFEST_CHUNK_PAGES))
    assert digest == manifest_digest(ram, tags)
    dest = DestPostcopy(512)
    for m in messages:
        dest.add_manifest(m)
    assert dest.manifest_complete and dest.digest() == digest


@pytest.mark.parametrize(
    "first, ram_bytes, tag_bytes",
    [
        (1, 8, 8),  # not at a block boundary
        (512, 8, 8),  # past the end
        (0, 16, 8),  # data and tags of different lengths
        (0, 12, 12),  # not whole digests
        (0, 0, 0),  # empty
        (256, 8 * 257, 8 * 257),  # runs past the end
    ],
)
def test_a_malformed_manifest_is_refused(first: int, ram_bytes: int, tag_bytes: int) -> None:
    dest = DestPostcopy(512)
    with pytest.raises(WireError, match=f"page manifest at page {first} is malformed"):
        dest.add_manifest(
            pb.PageDigests(first_page=first, ram_digests=bytes(ram_bytes), tag_digests=bytes(tag_bytes))
        )
    assert not dest.manifest_complete


def started(mem: GuestMemory, dest_mem: GuestMemory) -> DestPostcopy:
    dest = DestPostcopy(mem.page_count)
    for m in manifest_messages(mem)[0]:
        dest.add_manifest(m)
    dest.start(dest_mem)
    return dest


def test_at_the_start_what_matches_is_present_and_half_a_page_is_not() -> None:
    src = guest_with_content()
    dst = GuestMemory(2 << 20)
    dst.pages[5] = src.pages[5]  # data there, tags too (untagged both sides)
    dst.pages[7] = src.pages[7]  # data there (zero), tags not: not present
    dst.data_populated[5] = True
    dest = DestPostcopy(512)
    assert dest.vcpu_digest == b"" and not dest.started, "no vCPU state yet: nothing can match it"
    with pytest.raises(WireError, match="postcopy start before the manifest"):
        dest.start(dst)
    dest = started(src, dst)
    assert dest.present[5] and not dest.present[7] and not dest.present[300] and dest.present[0]
    assert dest.missing() == 2 and not dest.complete


def test_placement_checks_each_page_and_never_overwrites_a_present_one() -> None:
    src = guest_with_content()
    dst = GuestMemory(2 << 20)
    dst.pages[5] = src.pages[5]  # arrived in precopy
    dst.data_populated[5] = True
    dest = started(src, dst)
    dst.pages[5, 0] = 0xAB  # and the guest here wrote it since
    wrong = src.pages[[7, 300]].copy()
    wrong[1, 0] ^= 1
    batch = PostcopyBatch(
        np.array([7, 300, 5]),
        np.concatenate([wrong, src.pages[[5]]]),
        src.page_tags[[7, 300, 5]].copy(),
    )
    assert dest.to_request([300, 300, 5], now=1.0, miss=True) == [300], "present pages are not asked for"
    placed = dest.place(dst, batch, requested=True, now=1.5)
    assert placed.pages.tolist() == [7] and placed.rejected.tolist() == [300] and placed.duplicates == 1
    assert (dst.page_tags[7] == src.page_tags[7]).all() and dst.tags_populated[7] and dst.data_populated[7]
    assert not dst.pages[300].any(), "a copy that does not match is never placed"
    assert dst.pages[5, 0] == 0xAB, "a late copy never overwrites what the guest wrote"
    assert dest.present[7] and not dest.present[300]
    assert dest.rejected_pages == 1 and dest.duplicate_pages == 1 and dest.requested_pages == 1
    assert dest.latencies_s == [], "page 300 was asked for but is still missing"
    assert dest.to_request([300], now=2.0) == [300], "asked for again (not a new miss)"
    good = PostcopyBatch(np.array([300]), src.pages[[300]].copy(), src.page_tags[[300]].copy())
    dest.place(dst, good, requested=False, now=2.25)
    assert dest.latencies_s == [1.25], "from the first time the guest missed it"
    assert dest.background_pages == 1 and dest.complete and dest.missing() == 0
    assert dest.latency_ms() == {"p50": 1250.0, "p99": 1250.0, "max": 1250.0}
    assert not dest.outstanding and dest.overdue(100.0, 1.0) == [], "a placed page is not asked for again"


def test_an_unanswered_request_is_made_again_after_a_while() -> None:
    dest = DestPostcopy(16)
    dest.started = True
    assert dest.latency_ms() == {"p50": None, "p99": None, "max": None}
    assert dest.to_request([3, 4], now=10.0) == [3, 4]
    assert dest.to_request([3], now=10.5) == [], "already asked"
    assert dest.overdue(10.9, 1.0) == []
    assert dest.overdue(11.01, 1.0) == [3, 4] and dest.retried_requests == 2
    assert dest.overdue(11.5, 1.0) == [], "the clock restarted"


def test_split_placement_shows_data_before_tags_until_the_next_turn() -> None:
    src = guest_with_content()
    dst = GuestMemory(2 << 20)
    dest = started(src, dst)
    dest.split_placement = True
    batch = PostcopyBatch(np.array([7]), src.pages[[7]].copy(), src.page_tags[[7]].copy())
    dest.place(dst, batch, requested=False, now=3.0)
    assert dest.present[7] and not dst.page_tags[7].any(), "present, tags not yet there"
    dest.place_late_tags(dst, now=3.0)
    assert not dst.page_tags[7].any(), "not in the same turn"
    dest.place_late_tags(dst, now=3.001)
    assert (dst.page_tags[7] == src.page_tags[7]).all() and not dest.late_tags and dst.tags_populated[7]


def test_fault_latencies_are_reported_in_milliseconds_to_the_microsecond() -> None:
    dest = DestPostcopy(16)
    dest.latencies_s = [0.00123456]
    assert dest.latency_ms() == {"p50": 1.235, "p99": 1.235, "max": 1.235}


def test_only_pages_the_guest_waits_for_count_as_faults() -> None:
    dest = DestPostcopy(16)
    dest.started = True
    dest.ram[:], dest.tags[:] = ZERO_PAGE_DIGEST, UNTAGGED_DIGEST
    dest.to_request([3], now=1.0)  # a rejected copy asked again: the guest was not waiting
    dest.to_request([4], now=1.0, miss=True)
    batch = PostcopyBatch(np.array([3, 4]), np.zeros((2, PAGE_SIZE), np.uint8), np.zeros((2, 128), np.uint8))
    dest.place(GuestMemory(1 << 20), batch, requested=True, now=1.5)
    assert dest.latencies_s == [0.5]


def test_at_the_start_pages_checked_on_arrival_are_not_hashed_again() -> None:
    src = guest_with_content()
    dst = GuestMemory(2 << 20)
    known = DigestCache(dst)
    # precopy placed page 5 (its data checked against its digest) and page 300's data as it
    # was before the source's guest changed it (so not present), and page 7's tags
    dst.pages[5] = src.pages[5]
    dst.pages[300] = 1
    dst.data_populated[[5, 300]] = True
    known.record_ram(np.array([5, 300]), row_digests(dst.pages[[5, 300]]), np.array([], dtype=np.int64))
    dst.page_tags[7] = src.page_tags[7]
    dst.tags_populated[7] = True
    known.record_tags(np.array([7]), row_digests(dst.page_tags[[7]]), np.array([], dtype=np.int64))
    assert known.stale_pages == 0
    reads = dst.tag_ioctl.counters.calls
    dest = DestPostcopy(512)
    for m in manifest_messages(src)[0]:
        dest.add_manifest(m)
    dest.start(dst, known)
    assert dst.tag_ioctl.counters.calls == reads, "no tag read: every digest was known"
    assert np.array_equal(dest.present, started(src, dst).present), "as hashing them all says"
    assert dest.present[5] and dest.present[7] and not dest.present[300]
    # a page written here without a record is stale: hashed, and what it holds decides
    dst.pages[300] = src.pages[300]
    known.mark(np.array([300]), np.array([], dtype=np.int64))
    dest.start(dst, known)
    assert dest.present[300] and dest.complete
