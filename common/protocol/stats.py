"""Counters a migration keeps, and the report sections built from them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from common.samples import Samples


@dataclass
class Downtime:
    """The one downtime both sides report (docs/report.md, Downtime): the source's part, from
    stopping its guest to sending the message that lets the destination start it (Commit, or
    PostcopyStart), and the destination's part, from that message's arrival to its guest
    running. Each side measures its own part and tells the other, so both report the same
    sum. The message's one-way trip is in neither: two clocks cannot measure it (on
    loopback it is about 0.1 ms)."""

    source_s: float | None = None
    destination_s: float | None = None

    def total_ms(self) -> float | None:
        if self.source_s is None or self.destination_s is None:
            return None
        return ms(self.source_s + self.destination_s)

    def parts_ms(self) -> dict[str, float | None]:
        return {"source": ms(self.source_s), "destination": ms(self.destination_s)}

    @staticmethod
    def from_us(value: int) -> float:
        return value / 1e6

    @staticmethod
    def to_us(seconds: float) -> int:
        return max(0, round(seconds * 1e6))


@dataclass
class TransferStats:
    """What crossed the wire, counted the same way on both sides (docs/report.md)."""

    ram_bytes: int = 0  # wire bytes of page messages (header, checksum, payload)
    pages: int = 0  # pages in page messages, zero ones included
    zero_pages: int = 0  # of those, sent as a zero mark without contents
    skipped_pages: int = 0  # never written: zero at both ends, never sent (only the source knows)
    precopy_bytes: int = 0  # all wire bytes before the source guest stopped
    downtime_bytes: int = 0  # all wire bytes after it stopped
    tag_bytes: int = 0
    tag_sections: int = 0  # pages' tags in tag messages, untagged ones included
    untagged_pages: int = 0  # of those, sent as an untagged mark
    skipped_tag_pages: int = 0  # never tagged: untagged at both ends, never sent
    other_bytes: int = 0  # control messages
    postcopy_bytes: int = 0  # wire bytes of postcopy pages (data and tags) after the switchover
    downtime: Downtime = field(default_factory=Downtime)
    samples: Samples = field(default_factory=Samples)  # the source's, over time (the plot)

    @property
    def total_bytes(self) -> int:
        return self.ram_bytes + self.tag_bytes + self.other_bytes

    def ram_section(self, guest_ram_bytes: int, *, source: bool) -> dict[str, int | None]:
        """`source`: the sending side, which alone knows what it skipped and when it stopped."""
        return {
            "guest_bytes": guest_ram_bytes,
            "wire_bytes": self.ram_bytes,
            "pages": self.pages,
            "zero_pages": self.zero_pages,
            "skipped_pages": self.skipped_pages if source else None,
            "precopy_bytes": self.precopy_bytes if source else None,
            "downtime_bytes": self.downtime_bytes if source else None,
            "postcopy_bytes": self.postcopy_bytes,
        }

    def tags_section(self, *, source: bool) -> dict[str, int | None]:
        return {
            "wire_bytes": self.tag_bytes,
            "sections": self.tag_sections,
            "untagged_pages": self.untagged_pages,
            "skipped_pages": self.skipped_tag_pages if source else None,
        }


@dataclass
class RoundRecord:
    """One precopy round as the report and the plot show it."""

    round: int
    t_start: float
    start: TransferStats  # the counters when it began
    throttle: float
    t_end: float | None = None
    end: TransferStats | None = None
    dirty_pages_rate: float | None = None  # measured at its end
    expected_downtime_s: float | None = None

    def section(self, t0: float, now: float, current: TransferStats) -> dict[str, Any]:
        end = self.end or current
        t_end = self.t_end if self.t_end is not None else now
        seconds = t_end - self.t_start
        data = end.ram_bytes - self.start.ram_bytes
        tags = end.tag_bytes - self.start.tag_bytes
        return {
            "round": self.round,
            "start_ms": ms(self.t_start - t0),
            "duration_ms": ms(seconds),
            "ram_wire_bytes": data,
            "tag_wire_bytes": tags,
            "pages": end.pages - self.start.pages,
            "tag_sections": end.tag_sections - self.start.tag_sections,
            "throughput_bytes_per_s": round((data + tags) / seconds) if seconds > 0 else None,
            "dirty_pages_rate": None if self.dirty_pages_rate is None else round(self.dirty_pages_rate, 1),
            "expected_downtime_ms": ms(self.expected_downtime_s),
            "throttle": round(self.throttle, 3),
        }


@dataclass
class BandwidthMeter:
    """Bytes acknowledged over a sliding window of time: what the link really carries."""

    window_s: float = 1.0
    _samples: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def add(self, now: float, nbytes: int) -> None:
        self.total += nbytes
        self._samples.append((now, self.total))
        while len(self._samples) > 2 and now - self._samples[1][0] > self.window_s:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Bytes per second, or None before there is anything to measure."""
        if len(self._samples) < 2:
            return None
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 1e-3:
            return None
        return (b1 - b0) / (t1 - t0)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def verification_section(
    ok: bool | None, digests: dict[str, str] | None, mismatched_pages: list[int]
) -> dict[str, Any]:
    digests = digests or {}
    return {
        "ok": ok,
        "ram_digest": digests.get("ram"),
        "tag_digest": digests.get("tags"),
        "vcpu_digest": digests.get("vcpu"),
        "mismatched_pages": mismatched_pages,
    }
