"""Live progress of a migration on a terminal: one line, rewritten in place."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def progress_line(report: dict[str, Any]) -> str:
    postcopy = report.get("postcopy")
    if postcopy is not None:
        mbps = report.get("throughput_mbps") or 0.0
        return (
            f"[postcopy] {report.get('phase', '?'):<16} | {postcopy['pages_missing_at_destination'] or 0:>8} pages "
            f"still missing there | {postcopy.get('requests_per_s', 0.0):7.1f} requests/s | "
            f"{postcopy['requests']:>6} requests | {mbps / 8:8.1f} MB/s"
        )
    expected = report.get("expected_downtime_ms")
    expected_text = f"{expected:.1f} ms" if expected is not None else "?"
    mbps = report.get("throughput_mbps") or 0.0
    return (
        f"[{report.get('mode', '?')}] {report.get('phase', '?'):<10} round {report.get('rounds', 0):>3} | "
        f"{report.get('pages_remaining', 0):>8} pages left | {mbps / 8:8.1f} MB/s | "
        f"expected downtime {expected_text:>9} | throttle {report.get('throttle', 0.0):.0%}"
    )


class Progress:
    def __init__(self, stream: TextIO | None = None, interval_s: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.interval_s = interval_s
        self._last = 0.0
        self._shown = False

    def update(self, report: dict[str, Any], force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        self.stream.write("\r" + progress_line(report) + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
