"""Postcopy as a user feels it (issue 23): its own bandwidth cap (QEMU's max-postcopy-bandwidth),
which after the switchover paces the background stream, never the answers to the guest's page
requests (before it, a capped postcopy ran at full speed while `ctl parameters` showed the
cap); and the report of where each of the guest's waits for a page went."""

from __future__ import annotations

import pytest

from common.guest.workload import Fill
from common.protocol.params import MigrationParameters
from common.protocol.phases import SourcePhase
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import Faults, Pair, altered, busy_guest, running_postcopy

RAM = 8 << 20


def postcopy_seconds(pair: Pair) -> float:
    """From the handover to the end: how long the background stream took."""
    report = pair.src.report(pair.now)
    started = next(e["at_ms"] for e in report["timeline"] if e["event"] == "postcopy started")
    return (report["total_time_ms"] - started) / 1000


def handed_over_at_once(**params: object) -> Pair:
    migration = MigrationParameters(postcopy=True, postcopy_after_rounds=0, **params)  # type: ignore[arg-type]
    pair = Pair(busy_guest(seed=4, ram=RAM, fill=Fill.RANDOM), migration).run(max_seconds=60.0)
    assert pair.src.report(pair.now)["status"] == "completed"
    return pair


def capped_random_guest_running_there(cap: int) -> Pair:
    """A postcopy of a guest whose every page has content, handed over at once under `cap`,
    started; its destination runs the guest on: every page it touches is asked for."""
    migration = MigrationParameters(postcopy=True, postcopy_after_rounds=0, max_postcopy_bandwidth=cap)
    pair = Pair(busy_guest(seed=5, fill=Fill.RANDOM), migration, guest_speed=2000, dest_steps=100_000)
    pair.src.start(pair.now)
    return pair


@pytest.mark.parametrize("cap", [1 << 20, 3 << 20])
def test_the_postcopy_cap_paces_the_background_stream(cap: int) -> None:
    pair = handed_over_at_once(max_postcopy_bandwidth=cap)
    sent = pair.src.report(pair.now)["ram"]["postcopy_bytes"]
    assert sent > RAM // 2, "the guest's pages went in postcopy"
    # the bucket starts with one burst of credit (at least 1 MiB), then the cap holds
    assert postcopy_seconds(pair) == pytest.approx((sent - (1 << 20)) / cap, rel=0.25)


def test_the_precopy_cap_does_not_hold_back_postcopy() -> None:
    unlimited = handed_over_at_once(max_bandwidth=1 << 20)
    # 8 MiB at the precopy cap would take about 7 s; uncapped, postcopy takes a fraction of it
    assert postcopy_seconds(unlimited) < 1.0


def test_page_requests_never_wait_for_the_cap() -> None:
    # a cap so low that the background stream would need minutes: the guest's misses are
    # answered at once all the same
    pair = capped_random_guest_running_there(16 << 10)
    pair.run_until(lambda: (pair.dst.report(pair.now).get("postcopy") or {}).get("requests", 0) >= 4, 5.0)
    report = pair.dst.report(pair.now)["postcopy"]
    assert report["requests"] >= 4 and report["fault_latency_ms"]["max"] < 5.0, report
    sent = pair.src.report(pair.now)["ram"]["postcopy_bytes"]
    assert sent < (1 << 20) + 16 * (16 << 10) + 64 * 4096, "the background stream kept to its cap"


def test_the_postcopy_cap_is_set_and_read_like_the_others() -> None:
    params = MigrationParameters()
    assert params.settable()["max_postcopy_bandwidth"] == 0
    assert params.updated({"max_postcopy_bandwidth": "12MiB"}).max_postcopy_bandwidth == 12 << 20
    with pytest.raises(ValueError, match="max_postcopy_bandwidth: 'fast' is not a size"):
        params.updated({"max_postcopy_bandwidth": "fast"})
    with pytest.raises(ValueError, match="max postcopy bandwidth -1 is negative"):
        MigrationParameters(max_postcopy_bandwidth=-1).check()
    # so slow that a destination would give up on its source between two background messages
    with pytest.raises(ValueError, match="below 16384 B/s"):
        params.updated({"max_postcopy_bandwidth": 1000})


def test_a_postcopy_cap_set_after_the_switchover_takes_effect() -> None:
    pair = running_postcopy(seed=6)
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase.value == "postcopy", 10.0)
    assert pair.src.bucket.rate == 0
    pair.src.set_parameters(pair.src.params.updated({"max_postcopy_bandwidth": 1 << 20}), pair.now)
    assert pair.src.bucket.rate == 1 << 20


def test_a_guests_wait_is_told_apart_where_it_went() -> None:
    """The report says where each wait for a page went (queued at the destination, held at the
    source, on the way), so the next bottleneck shows without a profiler (issue 23)."""
    pair = running_postcopy(seed=5, to_dest=Faults(latency_s=0.01))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase is SourcePhase.COMPLETED, 30.0)
    pc = pair.dst.postcopy
    assert pc is not None and pc.parts_s.shape == (len(pc.latencies_s), 3)
    for wait, (queued, held, on_the_way) in zip(pc.latencies_s, pc.parts_s, strict=True):
        assert min(queued, held, on_the_way) >= 0.0
        # the parts add up to the wait (the source's clock is its own: it can only lower `held`)
        assert queued + held + on_the_way == pytest.approx(wait, abs=1e-6)
    answered = [p for p in pc.parts_s if p[2] >= 0.01]
    assert answered, "an answer crossed the 10 ms link"
    parts = pair.dst.report(pair.now)["postcopy"]["fault_latency_parts_ms"]
    assert set(parts) == {"queued_at_destination", "at_source", "in_flight"}
    assert parts["in_flight"]["p99"] >= 10.0


def boast(env: pb.Envelope) -> None:
    env.postcopy_pages.source_held_us = (1 << 32) - 1


def test_a_source_claiming_to_have_held_a_request_for_ever_cannot_skew_the_parts() -> None:
    pair = running_postcopy(seed=5, to_dest=Faults(latency_s=0.005, tamper=altered("postcopy_pages", boast)))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase is SourcePhase.COMPLETED, 30.0)
    pc = pair.dst.postcopy
    assert pc is not None and pc.parts_s.size
    for wait, (queued, held, on_the_way) in zip(pc.latencies_s, pc.parts_s, strict=True):
        assert held <= wait - queued + 1e-9 and on_the_way >= 0.0


def test_the_time_a_source_holds_a_request_reaches_the_report() -> None:
    """Encoding an answer costs the source time its clock sees and the session's `now` does
    not: the answer says so, and the destination's report counts it at the source."""
    pair = running_postcopy(seed=5, to_dest=Faults(latency_s=0.001))
    ticks = iter(range(10**9))
    pair.src.postcopy_side.clock = lambda: next(ticks) * 0.0003  # each reading 0.3 ms later
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase is SourcePhase.COMPLETED, 30.0)
    parts = pair.dst.report(pair.now)["postcopy"]["fault_latency_parts_ms"]
    assert parts["at_source"]["p99"] == pytest.approx(0.3, abs=0.01), "an answered wait held 0.3 ms there"


def test_answers_count_against_the_postcopy_cap_without_waiting_for_it() -> None:
    cap = 1 << 20
    pair = capped_random_guest_running_there(cap)
    pair.run_until(lambda: pair.src.phase.value == "postcopy", 10.0)
    tokens = pair.src.bucket.tokens
    pair.src.postcopy.request([5, 6, 7], pair.now)  # type: ignore[union-attr]
    pair.src.postcopy_side.answer_requests(pair.now)
    assert pair.src.take_urgent(), "the answers went at once, capped or not"
    assert pair.src.bucket.tokens <= tokens - 3 * 4096, "and the background pays for them"


def test_the_sources_postcopy_progress_never_goes_back() -> None:
    """The live line showed [ 98.6 %] in precopy, then [  0.0 %] at the switchover (before the
    destination's bitmap, everything counted as missing), and 5 % with 70 % there after a
    recovery."""
    migration = MigrationParameters(
        postcopy=True, postcopy_after_rounds=1, max_bandwidth=1 << 20, max_postcopy_bandwidth=1 << 20
    )
    pair = Pair(
        busy_guest(seed=6, ram=RAM, fill=Fill.RANDOM), migration, guest_speed=2000, dest_steps=100_000
    )
    seen: list[tuple[str, float | None]] = []

    def sample() -> bool:
        report = pair.src.report(pair.now)
        seen.append((report["phase"], report["progress_percent"]))
        return report["status"] != "active"

    pair.src.start(pair.now)
    pair.run_until(sample, 120.0)
    assert pair.src.phase is SourcePhase.COMPLETED
    postcopy = [p for phase, p in seen if phase == "postcopy"]
    assert postcopy and None not in postcopy[-10:], "known once the destination said what it holds"
    known = [p for p in postcopy if p is not None]
    assert known == sorted(known), "never backwards"
    precopy_last = [p for phase, p in seen if phase == "active" and p is not None][-1]
    assert known[0] >= precopy_last - 5.0, (precopy_last, known[:3])
