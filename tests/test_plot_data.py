"""The numbers behind `source-node plot` (issue 24: the title said 6 rounds over 5 bars, a
postcopy showed a precopy limit and a dirty-rate axis below zero, and an 8 s outage was not
drawn): from reports written for the purpose, and from a real migration's samples."""

from __future__ import annotations

import math
from typing import Any

import pytest

from common.samples import Samples
from source_node.plot_data import MIB, plot_data, title


def report(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "mode": "precopy",
        "status": "completed",
        "rounds": 3,  # the report counts the pass after the stop too
        "downtime_ms": 12.5,
        "downtime_limit_ms": 300.0,
        "total_time_ms": 4000.0,
        "rounds_detail": [
            {"round": 1, "start_ms": 0.0, "duration_ms": 2000.0},
            {"round": 2, "start_ms": 2000.0, "duration_ms": 1500.0},
        ],
        "timeline": [{"event": "guest stopped", "at_ms": 3500.0}],
        "samples": {
            "t_ms": [0.0, 1000.0, 2000.0, 3000.0, 4000.0],
            "phase": ["active", "active", "active", "active", "completed"],
            "remaining_bytes": [None, 64 * MIB, 8 * MIB, 2 * MIB, 0],
            "ram_wire_bytes": [0, 50 * MIB, 100 * MIB, 110 * MIB, 120 * MIB],
            "tag_wire_bytes": [0, 0, 2 * MIB, 3 * MIB, 3 * MIB],
            "throttle": [0.0, 0.0, 0.2, 0.3, 0.3],
            "dirty_pages_rate": [0.0, 0.0, 500.0, -3.0, 0.0],
        },
    }
    base.update(fields)
    return base


def test_the_title_counts_the_rounds_drawn_and_a_limit_only_precopy_aims_at() -> None:
    assert (
        title(report())
        == "precopy migration: completed, 2 rounds while the guest ran, downtime 12.5 ms (limit 300 ms)"
    )
    postcopy = title(report(mode="postcopy", rounds_detail=[{"round": 1, "start_ms": 0, "duration_ms": 1}]))
    assert (
        postcopy
        == "postcopy migration: completed, 1 round while the guest ran, then postcopy, downtime 12.5 ms"
    )


def test_series_over_time_say_what_the_samples_say() -> None:
    data = plot_data(report())
    assert data.t_s == [0.0, 1.0, 2.0, 3.0, 4.0] and data.end_s == 4.0
    assert math.isnan(data.remaining_mib[0]) and data.remaining_mib[1:] == [64.0, 8.0, 2.0, 0.0], (
        "unknown is a gap"
    )
    # over the half second before each sample: here one sample back
    assert data.pages_mib_s == [0.0, 50.0, 50.0, 10.0, 10.0]
    assert data.tags_mib_s == [0.0, 0.0, 2.0, 1.0, 0.0]
    assert data.throttle_pct == [0.0, 0.0, 20.0, 30.0, 30.0]
    dirty = data.dirty_pages_s
    # nothing was measured during round 1; never below zero; nothing outside precopy rounds
    assert (
        math.isnan(dirty[0]) and math.isnan(dirty[1]) and dirty[2:4] == [500.0, 0.0] and math.isnan(dirty[4])
    )
    kinds = [(b.kind, b.label, b.start_s, b.end_s) for b in data.bands]
    assert kinds == [
        ("round", "1", 0.0, 2.0),
        ("round", "2", 2.0, 3.5),
        ("downtime", "downtime", 3.5, 3.5125),
    ]


def test_rates_are_taken_over_half_a_second_not_between_bursts() -> None:
    t_ms = [100.0 * i for i in range(11)]
    burst = [0, 8, 8, 8, 8, 8, 16, 16, 16, 16, 16]  # MiB: 8 MiB every half second
    data = plot_data(report(samples={**report()["samples"], "t_ms": t_ms, "phase": ["active"] * 11,
                                     "remaining_bytes": [0] * 11, "ram_wire_bytes": [m * MIB for m in burst],
                                     "tag_wire_bytes": [0] * 11, "throttle": [0.0] * 11,
                                     "dirty_pages_rate": [0.0] * 11}))  # fmt: skip
    assert data.pages_mib_s[5:] == pytest.approx([16.0] * 6), "a rate, not a saw"


def test_a_link_down_is_drawn_from_the_start_of_its_silence_to_its_recovery() -> None:
    samples = {
        **report()["samples"],
        "phase": ["postcopy", "postcopy-paused", "postcopy-paused", "postcopy", "completed"],
    }
    data = plot_data(
        report(
            mode="postcopy",
            samples=samples,
            timeline=[
                {"event": "guest stopped", "at_ms": 100.0},
                {"event": "postcopy started", "at_ms": 100.0},
                {"event": "link lost, reconnecting (epoch 2; silent for 3.000 s)", "at_ms": 3500.0},
                {"event": "link restored (epoch 2)", "at_ms": 3600.0},
            ],
        )
    )
    paused = [(b.start_s, b.end_s) for b in data.bands if b.kind == "paused"]
    # the phase said paused from 1 s to 3 s; the silence began at 0.5 s; one band for both
    assert paused == [(0.5, 3.6)]
    assert [(b.start_s, b.end_s) for b in data.bands if b.kind == "postcopy"] == [(0.1, 4.0)]


def test_the_destinations_waits_are_placed_in_time() -> None:
    dest = {"postcopy": {"fault_latencies_ms": [0.8, 1.2, 9.0], "fault_latency_at_ms": [150.0, 160.0, 900.0]}}
    data = plot_data(report(mode="postcopy"), dest)
    assert data.latency_t_s == [0.15, 0.16, 0.9] and data.latency_ms == [0.8, 1.2, 9.0]
    assert plot_data(report(mode="postcopy"), {"postcopy": {"fault_latencies_ms": [1.0]}}).latency_ms == [], (
        "an older report without times: no scatter rather than a wrong one"
    )


def test_samples_stay_bounded_and_spread_over_the_whole_migration() -> None:
    class Session:
        t_start = 0.0
        phase = type("P", (), {"value": "active"})()
        stats = type("S", (), {"ram_bytes": 0, "tag_bytes": 0})()
        throttle = 0.0
        precopy = type("Q", (), {"dirty_pages_rate": 0.0})()

    samples = Samples(interval_s=0.1, limit=100)
    now = 0.0
    while now < 1000.0:  # a migration of 1000 s, asked every 10 ms
        if samples.due(now):
            samples.add(now, Session(), 1)  # type: ignore[arg-type]
        now += 0.01
    t_ms = samples.as_report()["t_ms"]
    assert len(t_ms) < 100 and t_ms == sorted(t_ms)
    assert t_ms[0] == 0.0 and t_ms[-1] > 900_000.0, "from the start to near the end"


def test_a_real_migrations_samples_match_its_report() -> None:
    from tests.test_operator import report_of_a_busy_migration

    source = report_of_a_busy_migration()
    data = plot_data(source)
    assert len(data.t_s) >= 3 and data.t_s == sorted(data.t_s)  # every 0.1 s of a 0.3 s migration
    assert data.t_s[-1] <= data.end_s
    assert all(v >= 0 for v in data.pages_mib_s + data.tags_mib_s), "bytes on the wire only grow"
    assert sum(1 for b in data.bands if b.kind == "round") == len(source["rounds_detail"])
    known = [r for r in data.remaining_mib if not math.isnan(r)]
    assert known and min(known) >= 0
