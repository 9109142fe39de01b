"""Counters a migration keeps, and the report sections built from them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TransferStats:
    ram_bytes: int = 0  # wire bytes of RamPages messages (header, checksum, payload)
    pages_sent: int = 0
    zero_pages: int = 0
    precopy_bytes: int = 0  # all wire bytes before the source guest stopped
    downtime_bytes: int = 0  # all wire bytes after it stopped
    tag_bytes: int = 0
    tag_sections: int = 0
    untagged_pages: int = 0
    other_bytes: int = 0  # control messages
    postcopy_bytes: int = 0  # wire bytes of postcopy pages (data and tags) after the switchover

    @property
    def total_bytes(self) -> int:
        return self.ram_bytes + self.tag_bytes + self.other_bytes

    def ram_section(self, guest_ram_bytes: int) -> dict[str, int]:
        return {
            "total_bytes": guest_ram_bytes,
            "transferred_bytes": self.ram_bytes,
            "pages_sent": self.pages_sent,
            "zero_pages": self.zero_pages,
            "precopy_bytes": self.precopy_bytes,
            "downtime_bytes": self.downtime_bytes,
            "postcopy_bytes": self.postcopy_bytes,
        }

    def tags_section(self) -> dict[str, int]:
        return {
            "transferred_bytes": self.tag_bytes,
            "sections_sent": self.tag_sections,
            "untagged_pages": self.untagged_pages,
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
