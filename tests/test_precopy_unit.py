"""Precopy's decisions at their boundaries, fed exact numbers: when to wait, when to stop the
guest, when to give up, and how hard auto-converge holds the guest back."""

from __future__ import annotations

import pytest

from common.constants import PAGE_SIZE
from common.guest.digest import DigestCache
from common.guest.dirtylog import DirtyModel
from common.guest.memory import GuestMemory
from common.protocol.params import MigrationParameters
from common.protocol.precopy import Precopy, Verdict
from common.protocol.stats import BandwidthMeter

RATE = 4096 * 1000  # bytes per second the meter says the link carries: 1000 pages/s
T0 = 100.0  # when round 1 began (a monotonic clock is never zero)


def setup(dirty_pages: int = 0, dirty_tags: int = 0) -> tuple[Precopy, GuestMemory, BandwidthMeter]:
    mem = GuestMemory(32 << 20)
    pre = Precopy(mem, DigestCache(mem))
    pre.first_round(T0)
    for p in range(dirty_pages):
        mem.write(p * PAGE_SIZE, b"x")
    for p in range(dirty_tags):
        mem.set_tags(p * PAGE_SIZE + 2048, 16, 5)
    meter = BandwidthMeter()
    meter.add(T0, 0)
    meter.add(T0 + 1.0, RATE)
    return pre, mem, meter


def decide(
    pre: Precopy,
    meter: BandwidthMeter,
    *,
    limit_ms: float = 10,
    now: float = T0 + 2.0,
    previous_ms: float | None = 0.0,
    **kw: int,
) -> Verdict:
    """One round's end; `previous_ms` is the estimate the round before it made (by default
    one any estimate exceeds: no further round would shrink it, so the limit alone decides)."""
    params = MigrationParameters(downtime_limit_ms=limit_ms, convergence_timeout_s=kw.pop("timeout", 60))
    pre.expected_downtime_s = None if previous_ms is None else previous_ms / 1000
    end = pre.end_of_round(
        now,
        in_flight=kw.get("in_flight", 0),
        active_for=kw.get("active_for", 1),
        meter=meter,
        params=params,
    )
    return end.verdict


def test_before_round_one_nothing_is_claimed() -> None:
    mem = GuestMemory(1 << 20)
    pre = Precopy(mem, DigestCache(mem))
    assert (pre.round, pre.pass_, pre.throttle, pre.expected_downtime_s, pre.dirty_pages_rate) == (
        0,
        None,
        0.0,
        None,
        0.0,
    )


@pytest.mark.parametrize(
    ("model", "tag_pages"),
    [
        (DirtyModel.SPLIT, [7]),  # the tags ever written
        (DirtyModel.KVM, [3, 7]),  # the tags of every backed page: which hold tags, only a read says
        (DirtyModel.TCG, list(range(32))),  # the 4 KiB of QEMU's tag block that holds page 7's
    ],
)
def test_round_one_sends_every_written_page_and_counts_the_rest_as_free(
    model: DirtyModel, tag_pages: list[int]
) -> None:
    mem = GuestMemory(1 << 20)  # 256 pages
    mem.write(3 * PAGE_SIZE, b"x")
    mem.set_tags(7 * PAGE_SIZE, 16, 1)
    pre = Precopy(mem, DigestCache(mem), model)
    assert pre.first_round(5.0) == (255, 256 - len(tag_pages))
    assert pre.round == 1 and pre.t_round == 5.0
    assert pre.pass_ is not None and pre.pass_.data.tolist() == [3] and pre.pass_.tags.tolist() == tag_pages
    assert pre.digests.stale_pages > 0, "what round 1 sends is marked for hashing"


def test_the_guest_stops_when_the_rest_fits_the_limit_exactly() -> None:
    pre, _, meter = setup(dirty_pages=10)  # 10 pages at 1000 pages/s: 10 ms
    assert decide(pre, meter, limit_ms=10) is Verdict.SWITCHOVER
    assert pre.expected_downtime_s == pytest.approx(0.010)


def test_one_page_more_than_fits_is_another_round() -> None:
    pre, _, meter = setup(dirty_pages=11)
    assert decide(pre, meter, limit_ms=10, now=T0 + 2.0) is Verdict.NEXT_ROUND
    assert pre.expected_downtime_s == pytest.approx(0.011)
    assert pre.dirty_pages_rate == pytest.approx(11 / 2.0), "pages dirtied over the round's time"
    assert pre.round == 2 and pre.t_round == T0 + 2.0
    assert pre.pass_ is not None and pre.pass_.data.size == 11


def test_tags_count_at_their_size() -> None:
    # 9 pages and 32 tag sections of 128 bytes (one page's worth): 10 pages' time exactly
    pre, _, meter = setup(dirty_pages=9, dirty_tags=32)
    assert decide(pre, meter, limit_ms=10) is Verdict.SWITCHOVER
    pre, _, meter = setup(dirty_pages=9, dirty_tags=33)
    assert decide(pre, meter, limit_ms=10) is Verdict.NEXT_ROUND


def test_nothing_dirty_is_a_switchover_whatever_the_limit() -> None:
    pre, _, meter = setup()
    assert decide(pre, meter, limit_ms=0.001) is Verdict.SWITCHOVER


@pytest.mark.parametrize(
    "kw, waits",
    [
        ({"in_flight": 1}, True),
        ({"in_flight": 0}, False),
        ({"in_flight": 1, "active_for": 61}, False),  # past the convergence timeout: decide now
        ({"in_flight": 1, "active_for": 60}, True),
    ],
)
def test_the_stop_waits_for_what_is_in_flight(kw: dict[str, int], waits: bool) -> None:
    pre, _, meter = setup(dirty_pages=1)
    assert (decide(pre, meter, **kw) is Verdict.WAIT) is waits


def test_giving_up_says_how_far_from_the_limit_it_was() -> None:
    pre, _, meter = setup(dirty_pages=50)
    assert decide(pre, meter, limit_ms=10, now=T0 + 2.0, active_for=61, timeout=60) is Verdict.GIVE_UP
    pre2, _, meter2 = setup(dirty_pages=50)
    end = pre2.end_of_round(
        T0 + 2.0,
        in_flight=0,
        active_for=61,
        meter=meter2,
        params=MigrationParameters(downtime_limit_ms=10, convergence_timeout_s=60),
    )
    assert end.reason == (
        "not converging after 60 s and 1 rounds: 25 pages/s dirtied, expected downtime 50 ms over the "
        "10 ms limit at throttle 0%"
    )
    pre3, _, meter3 = setup(dirty_pages=50)
    assert decide(pre3, meter3, limit_ms=10, active_for=60, timeout=60) is Verdict.NEXT_ROUND


def test_auto_converge_starts_in_round_two_and_steps_up_to_its_cap() -> None:
    pre, mem, meter = setup(dirty_pages=100)
    params = MigrationParameters(
        downtime_limit_ms=1, throttle_initial=0.2, throttle_increment=0.3, throttle_max=0.7
    )
    throttles = []
    t = 2.0
    for _ in range(5):
        end = pre.end_of_round(t, in_flight=0, active_for=1, meter=meter, params=params)
        assert end.verdict is Verdict.NEXT_ROUND
        throttles.append(pre.throttle)
        meter.add(t, 10 * PAGE_SIZE)  # the round sent 10 pages, and the guest dirtied 100 again
        for p in range(100):
            mem.write(p * PAGE_SIZE, b"y")
        t += 1
    assert throttles == pytest.approx([0.0, 0.2, 0.5, 0.7, 0.7])


def test_auto_converge_holds_back_only_when_over_half_of_what_was_sent_is_dirty_again() -> None:
    params = MigrationParameters(downtime_limit_ms=0.5)
    for dirty, throttled in ((5, False), (6, True)):
        pre, mem, meter = setup(dirty_pages=1)
        first = pre.end_of_round(2.0, in_flight=0, active_for=1, meter=meter, params=params)
        assert first.verdict is Verdict.NEXT_ROUND and pre.throttle == 0, "never in round 1"
        meter.add(2.5, 10 * PAGE_SIZE)  # round 2 sent 10 pages' worth
        for p in range(dirty):
            mem.write(p * PAGE_SIZE, b"z")
        pre.end_of_round(3.0, in_flight=0, active_for=1, meter=meter, params=params)
        assert (pre.throttle > 0) is throttled, dirty


def test_the_dirty_rate_counts_pages_and_tag_sections_over_the_round() -> None:
    pre, _, meter = setup(dirty_pages=6, dirty_tags=40)
    decide(pre, meter, limit_ms=1, now=T0 + 4.0)
    assert pre.dirty_pages_rate == pytest.approx((6 + 40) / 4.0)


def test_without_a_recent_rate_the_average_over_the_migration_is_used() -> None:
    pre, _, _ = setup(dirty_pages=20)
    meter = BandwidthMeter()
    meter.add(T0, RATE * 4)  # one sample: no windowed rate yet
    assert meter.rate() is None
    decide(pre, meter, limit_ms=1, active_for=2)
    assert pre.expected_downtime_s == pytest.approx(20 * 4096 / (RATE * 4 / 2))


def test_with_nothing_measured_and_nothing_dirty_it_switches_over() -> None:
    pre, _, _ = setup()
    assert decide(pre, BandwidthMeter(), limit_ms=1) is Verdict.SWITCHOVER
    assert pre.expected_downtime_s is None
    pre2, _, _ = setup(dirty_pages=1)
    assert decide(pre2, BandwidthMeter(), limit_ms=1) is Verdict.NEXT_ROUND, "no rate: cannot promise"


def test_giving_up_gives_the_expected_downtime_in_milliseconds() -> None:
    pre, _, meter = setup(dirty_pages=2000)
    end = pre.end_of_round(
        T0 + 2.0, in_flight=0, active_for=61, meter=meter,
        params=MigrationParameters(downtime_limit_ms=10, convergence_timeout_s=60),
    )  # fmt: skip
    assert "expected downtime 2000 ms over the 10 ms limit" in end.reason


def test_pages_written_before_round_one_and_before_the_stop_are_hashed() -> None:
    """What the guest wrote after the digest cache was made, and between the deciding sync and
    the stop, must be hashed again: the digests then equal a fresh hash of memory."""
    mem = GuestMemory(1 << 20)
    digests = DigestCache(mem)
    mem.write(9 * PAGE_SIZE, b"late")  # after the cache, before round 1
    pre = Precopy(mem, digests)
    pre.first_round(T0)
    assert digests.digests() == DigestCache(mem).digests()
    meter = BandwidthMeter()
    meter.add(T0, 0)
    meter.add(T0 + 1.0, RATE)
    end = pre.end_of_round(
        T0 + 2.0, in_flight=0, active_for=2, meter=meter,
        params=MigrationParameters(downtime_limit_ms=1000),
    )  # fmt: skip
    assert end.verdict is Verdict.SWITCHOVER and end.sync is not None
    mem.set_tags(12 * PAGE_SIZE, 16, 3)  # after the deciding sync, before the stop
    pre.final_pass(end.sync)
    assert digests.digests() == DigestCache(mem).digests()
    assert pre.pass_ is not None and 12 in pre.pass_.tags.tolist()


# -- aiming below the limit -------------------------------------------------------------------
@pytest.mark.parametrize(
    "dirty_pages, previous_ms, verdict",
    [
        (2, None, Verdict.SWITCHOVER),  # 2 ms: inside a quarter of the 10 ms limit, stop at once
        (3, None, Verdict.NEXT_ROUND),  # 3 ms fits, but nothing says another round would not help
        (3, 5.9, Verdict.SWITCHOVER),  # shrank by less than half since the last round: stop
        (3, 6.0, Verdict.NEXT_ROUND),  # halved: one more round
        (10, 10.0, Verdict.SWITCHOVER),
        (11, 30.0, Verdict.NEXT_ROUND),  # over the limit, shrinking or not
    ],
)
def test_a_fitting_rest_waits_for_another_round_while_rounds_still_halve_it(
    dirty_pages: int, previous_ms: float | None, verdict: Verdict
) -> None:
    pre, _, meter = setup(dirty_pages=dirty_pages)
    assert decide(pre, meter, limit_ms=10, previous_ms=previous_ms) is verdict
    assert pre.expected_downtime_s == pytest.approx(dirty_pages / 1000)


def test_late_in_the_convergence_time_a_fitting_rest_stops_the_guest() -> None:
    pre, _, meter = setup(dirty_pages=5)
    assert decide(pre, meter, previous_ms=None, active_for=30, timeout=60) is Verdict.NEXT_ROUND
    pre, _, meter = setup(dirty_pages=5)
    assert decide(pre, meter, previous_ms=None, active_for=31, timeout=60) is Verdict.SWITCHOVER


def test_the_expected_downtime_counts_two_handshakes_after_the_last_page() -> None:
    pre, _, meter = setup(dirty_pages=7)  # 7 ms of pages: they alone would fit 10 ms
    pre.round_trip_s = 0.002  # the fastest acknowledgement seen: two of them follow the pages
    assert decide(pre, meter, limit_ms=10) is Verdict.NEXT_ROUND
    assert pre.expected_downtime_s == pytest.approx(0.011)
