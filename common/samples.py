"""A migration over time, for the plot: what was left, what had crossed the wire (pages and
tags apart), the throttle, the dirty rate and the phase, sampled every SAMPLE_INTERVAL_S.

Bounded: when the buffer is full, every other sample is dropped and the interval doubles, so a
migration of any length keeps at most MAX_SAMPLES, spread over all of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.constants import MAX_SAMPLES, SAMPLE_INTERVAL_S

if TYPE_CHECKING:
    from common.protocol.source import SourceSession

FIELDS = (
    "t_ms",
    "phase",
    "remaining_bytes",
    "ram_wire_bytes",
    "tag_wire_bytes",
    "throttle",
    "dirty_pages_rate",
)


class Samples:
    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S, limit: int = MAX_SAMPLES) -> None:
        self.interval_s = interval_s
        self.limit = limit
        self.rows: list[tuple[Any, ...]] = []
        self._next_at = float("-inf")

    def due(self, now: float) -> bool:
        return now >= self._next_at

    def add(self, now: float, session: SourceSession, remaining: int | None) -> None:
        """One sample of `session` at `now` (call when `due`, and once more at the end)."""
        self.rows.append(
            (
                round((now - session.t_start) * 1000.0, 3),
                session.phase.value,
                remaining,
                session.stats.ram_bytes,
                session.stats.tag_bytes,
                round(session.throttle, 3),
                round(session.precopy.dirty_pages_rate, 1),
            )
        )
        self._next_at = now + self.interval_s
        if len(self.rows) >= self.limit:
            self.rows = self.rows[::2]
            self.interval_s *= 2

    def as_report(self) -> dict[str, Any]:
        """Columns, not rows: a report stays small and a plot reads a column at once."""
        columns = list(zip(*self.rows, strict=True)) if self.rows else [() for _ in FIELDS]
        return {name: list(column) for name, column in zip(FIELDS, columns, strict=True)}
