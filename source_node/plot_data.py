"""The numbers `source-node plot` draws, taken from the reports alone and checked by tests
(tests/test_plot_data.py): a migration over time, from the source's samples and timeline, and
the destination's postcopy request latencies."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20
RATE_WINDOW_S = 0.5
_SILENT = re.compile(r"silent for ([0-9.]+) s")
# The phase in which postcopy's link is down and both sides wait for it.
_PAUSED = ("postcopy-paused",)


@dataclass(frozen=True)
class Band:
    start_s: float
    end_s: float
    label: str
    kind: str  # round, downtime, postcopy, paused


@dataclass
class PlotData:
    title: str
    t_s: list[float] = field(default_factory=list)
    remaining_mib: list[float] = field(default_factory=list)
    pages_mib_s: list[float] = field(default_factory=list)
    tags_mib_s: list[float] = field(default_factory=list)
    throttle_pct: list[float] = field(default_factory=list)
    dirty_pages_s: list[float] = field(default_factory=list)  # nan outside precopy rounds
    bands: list[Band] = field(default_factory=list)
    latency_t_s: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    end_s: float = 0.0


def title(source: dict[str, Any]) -> str:
    rounds = len(source.get("rounds_detail") or [])
    mode = source.get("mode")
    # the rounds drawn: those the guest ran through (the report's `rounds` also counts the
    # pass after the stop)
    ran = f"{rounds} round{'' if rounds == 1 else 's'} while the guest ran"
    if mode == "postcopy":
        ran += ", then postcopy"
    downtime = source.get("downtime_ms")
    text = f"{mode} migration: {source.get('status')}, {ran}"
    if downtime is not None:
        text += f", downtime {downtime:.1f} ms"
        if mode == "precopy" and source.get("downtime_limit_ms"):
            # a precopy aims at its limit; a postcopy's downtime is not held to it
            text += f" (limit {source['downtime_limit_ms']:g} ms)"
    return text


def _rates(t_s: list[float], values: list[int], window_s: float = RATE_WINDOW_S) -> list[float]:
    """MiB/s over the `window_s` before each sample (the first: 0): batches go out in bursts
    of megabytes, and a rate between two samples 0.1 s apart would be a saw, not a rate."""
    if not values:
        return []
    out = [0.0]
    j = 0
    for i in range(1, len(values)):
        while j < i - 1 and t_s[i] - t_s[j + 1] >= window_s - 1e-9:
            j += 1
        dt = t_s[i] - t_s[j]
        out.append((values[i] - values[j]) / MIB / dt if dt > 0 else 0.0)
    return out


def _spans(t_s: list[float], inside: list[bool], end_s: float) -> list[tuple[float, float]]:
    spans: list[tuple[float, float]] = []
    start: float | None = None
    for t, now_in in zip(t_s, inside, strict=True):
        if now_in and start is None:
            start = t
        elif not now_in and start is not None:
            spans.append((start, t))
            start = None
    if start is not None:
        spans.append((start, end_s))
    return spans


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def plot_data(source: dict[str, Any], dest: dict[str, Any] | None = None) -> PlotData:
    data = PlotData(title=title(source))
    data.end_s = (source.get("total_time_ms") or 0.0) / 1000.0
    samples = source.get("samples") or {}
    t_s = [t / 1000.0 for t in samples.get("t_ms") or []]
    phases = samples.get("phase") or []
    data.t_s = t_s
    data.remaining_mib = [math.nan if r is None else r / MIB for r in samples.get("remaining_bytes") or []]
    data.pages_mib_s = _rates(t_s, samples.get("ram_wire_bytes") or [])
    data.tags_mib_s = _rates(t_s, samples.get("tag_wire_bytes") or [])
    data.throttle_pct = [100.0 * x for x in samples.get("throttle") or []]
    # measured at each round's end: nothing is known during round 1
    first_end = min(
        (r["start_ms"] + r["duration_ms"]) / 1000.0
        for r in source.get("rounds_detail") or [{"start_ms": 0, "duration_ms": 0}]
    )
    data.dirty_pages_s = [
        max(0.0, rate) if phase == "active" and t >= first_end else math.nan
        for rate, phase, t in zip(samples.get("dirty_pages_rate") or [], phases, t_s, strict=True)
    ]
    for r in source.get("rounds_detail") or []:
        start = r["start_ms"] / 1000.0
        data.bands.append(Band(start, start + r["duration_ms"] / 1000.0, str(r["round"]), "round"))
    events = {e["event"]: e["at_ms"] / 1000.0 for e in source.get("timeline") or []}
    stopped = events.get("guest stopped")
    if stopped is not None and source.get("downtime_ms") is not None:
        data.bands.append(Band(stopped, stopped + source["downtime_ms"] / 1000.0, "downtime", "downtime"))
    started = events.get("postcopy started")
    if started is not None:
        data.bands.append(Band(started, data.end_s, "postcopy", "postcopy"))
    # the paused phase begins when the silence was noticed; the timeline says when it began
    outages = _spans(t_s, [p in _PAUSED for p in phases], data.end_s)
    # a precopy's reconnects keep its phase: the timeline has them (from when the silence was
    # noticed, a peer timeout after it began, to the link restored)
    lost: float | None = None
    for entry in source.get("timeline") or []:
        if entry["event"].startswith("link lost"):
            silent = _SILENT.search(entry["event"])
            began = entry["at_ms"] / 1000.0 - (float(silent.group(1)) if silent else 0.0)
            lost = began if lost is None else lost
        elif entry["event"].startswith("link restored") and lost is not None:
            outages.append((lost, entry["at_ms"] / 1000.0))
            lost = None
    if lost is not None:
        outages.append((lost, data.end_s))
    for start, end in _merged(outages):
        data.bands.append(Band(start, end, "link down", "paused"))
    latencies = ((dest or {}).get("postcopy") or {}).get("fault_latencies_ms") or []
    at = ((dest or {}).get("postcopy") or {}).get("fault_latency_at_ms") or []
    if latencies and len(at) == len(latencies):
        # the destination's clock starts at its hello; the source's at its migrate: close enough
        data.latency_t_s = [t / 1000.0 for t in at]
        data.latency_ms = list(latencies)
    return data
