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


def block_with_wrong_pages(v: SourceVerifier, first: int, wrong: list[int]) -> pb.PageDigests:
    ram, tags = v.digests.page_digests(first, 256)
    ram = ram.copy()
    ram[wrong] ^= 1
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
