"""The verifier's verdicts and the bandwidth meter, on their own."""

from __future__ import annotations

import numpy as np
import pytest

from common.guest.digest import DigestCache
from common.protocol.stats import BandwidthMeter, ms
from common.protocol.verify import SourceVerifier, destination_verdict
from common.wire import mte_migration_pb2 as pb
from common.wire.framing import WireError
from tests.protocol_harness import busy_guest


def verifier() -> SourceVerifier:
    guest = busy_guest()  # 8 MiB: 2048 pages, 8 digest blocks
    digests = DigestCache(guest.memory)
    digests.mark(np.arange(2048), np.arange(2048))
    return SourceVerifier(guest, digests)


def block_with_wrong_pages(
    v: SourceVerifier, first: int, wrong: list[int], wrong_tags: tuple[int, ...] = (), count: int = 256
) -> pb.PageDigests:
    ram, tags = v.digests.page_digests(first, count)
    ram, tags = ram.copy(), tags.copy()
    ram[wrong] ^= 1
    tags[list(wrong_tags)] ^= 1
    return pb.PageDigests(
        first_page=first, ram_digests=ram.astype("<u8").tobytes(), tag_digests=tags.astype("<u8").tobytes()
    )


def test_a_result_may_name_every_block_of_the_guest_but_no_more() -> None:
    v = verifier()
    v.request()
    blocks = [block_with_wrong_pages(v, 256 * b, []) for b in range(8)]
    assert v.judge(pb.VerifyResult(ok=False, attempt=1, page_digests=blocks)) is not None
    with pytest.raises(WireError, match="more blocks than the guest has"):
        v.judge(pb.VerifyResult(ok=False, attempt=1, page_digests=[*blocks, blocks[0]]))


def test_the_last_attempt_names_at_most_eight_pages_or_the_vcpu_state() -> None:
    v = verifier()
    v.request()
    v.request()  # the second attempt is the last
    wrong = list(range(10))
    with pytest.raises(WireError, match=r"pages 0, 1, 2, 3, 4, 5, 6, 7 still differ$") as failed:
        v.judge(pb.VerifyResult(ok=False, attempt=2, page_digests=[block_with_wrong_pages(v, 0, wrong)]))
    assert failed.value.code == pb.ERROR_VERIFICATION_FAILED and v.verified is False
    assert v.mismatched_pages == wrong
    v2 = verifier()
    v2.request()
    v2.request()
    with pytest.raises(WireError, match="pages vCPU state still differ"):
        v2.judge(pb.VerifyResult(ok=False, attempt=2, vcpu_mismatch=True))


def test_the_first_mismatch_asks_for_exactly_the_pages_at_fault() -> None:
    v = verifier()
    v.request()
    data, tags = v.judge(
        pb.VerifyResult(ok=False, attempt=1, page_digests=[block_with_wrong_pages(v, 512, [3, 9])])
    )  # type: ignore[misc]
    assert data.tolist() == [515, 521] and tags.tolist() == [] and v.verified is None


def test_the_destination_refuses_digests_of_a_guest_of_another_size() -> None:
    guest = busy_guest()
    digests = DigestCache(guest.memory)
    request = pb.VerifyRequest(
        attempt=1, source=pb.GuestDigests(ram_block_digests=bytes(8 * 7), tag_block_digests=bytes(64))
    )
    with pytest.raises(WireError, match=r"another size \(expected 8 blocks\)"):
        destination_verdict(request, guest, digests)
    request.source.ram_block_digests = bytes(64)
    request.source.tag_block_digests = bytes(8 * 9)
    with pytest.raises(WireError, match="another size"):
        destination_verdict(request, guest, digests)


def test_the_meter_measures_over_its_window() -> None:
    meter = BandwidthMeter(window_s=1.0)
    assert meter.rate() is None
    meter.add(0.0, 100)
    assert meter.rate() is None, "one sample is no rate"
    meter.add(0.0005, 100)
    assert meter.rate() is None, "under a millisecond is no rate either"
    meter.add(0.5, 1000)
    assert meter.rate() == pytest.approx((100 + 1000) / 0.5)  # what came after the first sample
    for t in range(1, 40):
        meter.add(0.5 + t * 0.1, 1000)  # 10 kB/s from here on
    assert meter.rate() == pytest.approx(10_000, rel=0.15)
    assert meter.total == 100 + 100 + 1000 + 39 * 1000


def test_milliseconds_are_rounded_to_microseconds() -> None:
    assert ms(None) is None
    assert ms(0.0123456) == 12.346
    assert ms(2) == 2000.0


def test_tag_mismatches_are_named_by_page_and_the_digests_of_both_sides_are_kept() -> None:
    v = verifier()
    assert v.source_digests is None and v.dest_digests is None
    v.request()
    mine = v.guest.digests()
    assert v.source_digests == {"ram": mine.ram.hex(), "tags": mine.tags.hex(), "vcpu": mine.vcpu.hex()}
    theirs = pb.GuestDigests(ram_digest=b"\x01" * 8, tag_digest=b"\x02" * 8, vcpu_digest=b"\x03" * 8)
    result = pb.VerifyResult(
        ok=False, attempt=1, destination=theirs, page_digests=[block_with_wrong_pages(v, 256, [1], (0, 7))]
    )
    data, tags = v.judge(result)  # type: ignore[misc]
    assert data.tolist() == [257] and tags.tolist() == [256, 263]
    assert v.mismatched_pages == [256, 257, 263]
    assert v.dest_digests == {"ram": "01" * 8, "tags": "02" * 8, "vcpu": "03" * 8}


def test_a_block_must_lie_inside_the_guest() -> None:
    guest = busy_guest(ram=2100 * 4096)  # the last block holds 52 pages, not 256
    digests = DigestCache(guest.memory)
    digests.mark(np.arange(2100), np.arange(2100))
    v = SourceVerifier(guest, digests)
    v.request()
    last = block_with_wrong_pages(v, 2048, [51], count=52)
    data, _ = v.judge(pb.VerifyResult(ok=False, attempt=1, page_digests=[last]))  # type: ignore[misc]
    assert data.tolist() == [2099]
    too_long = pb.PageDigests(first_page=2048, ram_digests=bytes(8 * 53), tag_digests=bytes(8 * 53))
    past_the_end = pb.PageDigests(first_page=2304, ram_digests=b"", tag_digests=b"")
    for block in (too_long, past_the_end):
        with pytest.raises(WireError, match="are malformed"):
            v.judge(pb.VerifyResult(ok=False, attempt=1, page_digests=[block]))
    v8 = verifier()  # 2048 pages: an empty block just past the end is refused as well
    v8.request()
    with pytest.raises(WireError, match="at page 2048 are malformed"):
        v8.judge(pb.VerifyResult(ok=False, attempt=1, page_digests=[pb.PageDigests(first_page=2048)]))


def test_the_meter_keeps_exactly_the_samples_that_span_its_window() -> None:
    meter = BandwidthMeter(window_s=1.0)
    meter.add(0.0, 100)
    meter.add(0.5, 1000)
    assert meter.rate() == 1000 / 0.5
    meter.add(1.0, 10)
    assert meter.rate() == 1010 / 1.0
    # the second sample is exactly one window old: the first still marks the window's start
    meter.add(1.5, 1)
    assert meter.rate() == pytest.approx(1011 / 1.5)
    # later, all but the last sample at least a window old are dropped
    meter.add(3.0, 5)
    assert meter.rate() == pytest.approx(5 / 1.5)
    edge = BandwidthMeter()
    edge.add(0.0, 0)
    edge.add(0.001, 1)
    assert edge.rate() == pytest.approx(1000), "a millisecond apart is enough to measure"
