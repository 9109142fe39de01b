"""The arithmetic behind the reports' numbers, checked against the sessions' own state: downtime
and request rates in postcopy, what is left mid-run, per-round bytes, the destination's blocktime,
and the edges (a report taken at the first instant, a round that has not yet lasted)."""

from __future__ import annotations

import pytest

from common.constants import PAGE_STATE_BYTES
from common.guest.workload import Fill
from common.protocol.handshake import source_hello
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from common.protocol.stats import BandwidthMeter, RoundRecord, TransferStats
from tests.protocol_harness import Faults, Pair, busy_guest
from tests.test_postcopy import postcopy_pair, run_to_end


def timeline(report: dict) -> dict[str, float]:
    return {entry["event"]: entry["at_ms"] for entry in report["timeline"]}


def test_postcopy_downtime_is_one_figure_on_both_sides_and_requests_are_per_second_of_it() -> None:
    pair = run_to_end(postcopy_pair(seed=5, after_rounds=0))
    src = pair.src.report(pair.now)
    dst = pair.dst.report(pair.now)
    when = timeline(src)
    # each side measured its part and told the other: the same parts, the same sum
    assert src["downtime_parts_ms"] == dst["downtime_parts_ms"]
    assert (
        src["downtime_ms"]
        == dst["downtime_ms"]
        == pytest.approx(sum(src["downtime_parts_ms"].values()), abs=2e-3)
    )
    # the guest runs again at the destination's start, long before the migration ends
    assert src["downtime_ms"] < src["total_time_ms"] - when["guest stopped"] - 1.0
    requests = src["postcopy"]["requests"]
    assert requests > 0
    running_s = (src["total_time_ms"] - when["destination running"]) / 1000.0
    assert src["postcopy"]["requests_per_s"] == pytest.approx(requests / running_s, abs=0.1)


def test_postcopy_downtime_is_unknown_until_the_destination_runs() -> None:
    pair = Pair(
        busy_guest(seed=5),
        params=MigrationParameters(postcopy=True, postcopy_after_rounds=0),
        to_source=Faults(latency_s=0.01),
    )
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.t_stop is not None, max_seconds=10)
    src = pair.src.report(pair.now)
    assert pair.src.t_dest_running is None
    assert src["downtime_ms"] is None
    assert src["postcopy"]["requests_per_s"] == 0.0


def test_what_is_left_mid_postcopy_is_what_the_destination_lacks() -> None:
    pair = postcopy_pair(guest=busy_guest(seed=5, ram=16 << 20, fill=Fill.RANDOM, working_set=4 << 20))
    pair.src.start(pair.now)
    while pair.src.dest_missing is None and pair.elapsed < 10:
        pair.turn()
    pc = pair.src.postcopy
    assert pc is not None and pair.src.phase is SourcePhase.POSTCOPY
    src = pair.src.report(pair.now)
    assert pair.src.dest_missing is not None and pair.src.dest_missing > 0
    # what the source has yet to send of what the destination said it lacks
    assert (
        src["remaining_bytes"] == pc.missing() * PAGE_STATE_BYTES <= pair.src.dest_missing * PAGE_STATE_BYTES
    )
    assert 0.0 <= src["progress_percent"] < 100.0


def test_what_is_left_mid_precopy_is_the_rest_of_the_pass() -> None:
    pair = Pair(busy_guest(seed=3), guest_speed=2000, params=MigrationParameters(max_bandwidth=4 << 20))
    pair.src.start(pair.now)
    pair.run_until(
        lambda: pair.src.precopy.pass_ is not None and pair.src.precopy.pass_.remaining_bytes > 0,
        max_seconds=10,
    )
    src = pair.src.report(pair.now)
    assert src["phase"] == SourcePhase.ACTIVE.value
    assert src["remaining_bytes"] == pair.src.precopy.pass_.remaining_bytes  # type: ignore[union-attr]
    assert 0.0 < src["progress_percent"] < 100.0


def test_rounds_detail_counts_each_rounds_own_bytes() -> None:
    slow = MigrationParameters(max_bandwidth=4 << 20, downtime_limit_ms=5)
    pair = Pair(busy_guest(seed=12), guest_speed=2000, params=slow).run()
    src = pair.src.report(pair.now)
    rounds = src["rounds_detail"]
    assert len(rounds) >= 2, "a busy guest takes more than one round"
    for key, total in (
        ("ram_wire_bytes", src["ram"]["wire_bytes"]),
        ("tag_wire_bytes", src["tags"]["wire_bytes"]),
    ):
        assert all(r[key] >= 0 for r in rounds)
        assert 0 < sum(r[key] for r in rounds) <= total, key
    assert rounds[0]["ram_wire_bytes"] > rounds[-1]["ram_wire_bytes"], "round 1 carries the bulk"


def test_a_round_that_has_not_yet_lasted_has_no_throughput() -> None:
    record = RoundRecord(round=1, t_start=10.0, start=TransferStats(), throttle=0.0)
    moved = TransferStats(ram_bytes=5000, tag_bytes=300)
    assert record.section(10.0, 10.0, moved)["throughput_bytes_per_s"] is None
    section = record.section(10.0, 12.0, moved)
    assert section["throughput_bytes_per_s"] == 2650
    assert (section["ram_wire_bytes"], section["tag_wire_bytes"]) == (5000, 300)


def test_the_bandwidth_meter_needs_a_millisecond_between_samples() -> None:
    meter = BandwidthMeter()
    meter.add(1.0, 100)
    assert meter.rate() is None
    meter.add(1.0005, 100)
    assert meter.rate() is None, "too short a span to measure"
    meter.add(1.5, 300)
    assert meter.rate() == pytest.approx(400 / 0.5)


def test_a_destination_report_at_its_first_instant_divides_by_nothing() -> None:
    pair = Pair(busy_guest(seed=3))
    dst = pair.dst.report(pair.dst.t_start)
    assert dst["total_time_ms"] == 0.0
    assert dst["throughput_bytes_per_s"] == 0
    assert dst["status"] == "none" and dst["progress_percent"] is None


def test_a_cancelled_migration_says_cancelled_on_the_destination_too() -> None:
    pair = Pair(busy_guest(), guest_speed=2000, params=MigrationParameters(max_bandwidth=1 << 20))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.elapsed > 0.2)
    pair.src.cancel(pair.now)
    pair.run_until(pair.settled, max_seconds=1)
    assert pair.dst.phase is DestPhase.FAILED
    assert pair.dst.report(pair.now)["status"] == "cancelled"
    assert pair.src.report(pair.now)["status"] == "cancelled"


def test_the_destinations_blocktime_is_the_sum_of_its_waits() -> None:
    pair = run_to_end(postcopy_pair(seed=5, after_rounds=0))
    pc = pair.dst.postcopy
    assert pc is not None and pc.latencies_s
    section = pair.dst.report(pair.now)["postcopy"]
    assert section["blocktime_ms"] == pytest.approx(sum(pc.latencies_s) * 1000.0, abs=1e-2)
    assert section["fault_latencies_ms"][-1] == pytest.approx(pc.latencies_s[-1] * 1000.0, abs=1e-3)


def test_the_hello_carries_timeouts_in_milliseconds() -> None:
    params = MigrationParameters(postcopy=True, reconnect_timeout_s=2.5, postcopy_recover_timeout_s=7.25)
    hello = source_hello(busy_guest(seed=1), params, "node")
    assert hello.reconnect_timeout_ms == 2500
    assert hello.postcopy_recover_timeout_ms == 7250


def test_a_round_counts_its_own_pages_and_sections_from_where_it_started() -> None:
    start = TransferStats(ram_bytes=1000, tag_bytes=100, pages=10, tag_sections=7)
    record = RoundRecord(round=2, t_start=11.0, start=start, throttle=0.25)
    now = TransferStats(ram_bytes=5000, tag_bytes=300, pages=30, tag_sections=12)
    section = record.section(10.0, 13.0, now)
    assert (section["pages"], section["tag_sections"]) == (20, 5)
    assert (section["ram_wire_bytes"], section["tag_wire_bytes"]) == (4000, 200)
    assert section["start_ms"] == 1000.0 and section["duration_ms"] == 2000.0
    assert section["throughput_bytes_per_s"] == 2100 and section["throttle"] == 0.25


def test_the_requests_rate_at_the_instant_the_destination_runs_is_zero() -> None:
    pair = postcopy_pair(guest=busy_guest(seed=5, ram=16 << 20, fill=Fill.RANDOM, working_set=4 << 20))
    pair.src.start(pair.now)
    while pair.src.t_dest_running is None and pair.elapsed < 10:
        pair.turn()
    assert pair.src.t_dest_running is not None and pair.src.t_end is None
    report = pair.src.report(pair.src.t_dest_running)
    assert report["postcopy"]["requests_per_s"] == 0.0


def test_a_destination_that_ran_a_guest_it_could_not_verify_says_failed() -> None:
    pair = Pair(busy_guest(seed=3)).run()
    dst = pair.dst.report(pair.now)
    assert dst["status"] == "completed" and dst["remaining_bytes"] == 0 and dst["progress_percent"] == 100.0
    pair.dst.verified = False  # type: ignore[misc]
    assert pair.dst.report(pair.now)["status"] == "failed"
