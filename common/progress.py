"""Live progress of a migration: on a terminal one line rewritten in place; elsewhere (a log
file, a pipe, systemd) a progress event in the log every few seconds, so that a long round is
never silent."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from common.constants import PROGRESS_LINE_INTERVAL_S, PROGRESS_LOG_INTERVAL_S
from common.units import format_duration, format_rate, format_size

_shown: list[Progress] = []  # the live line on screen, if any: a log line must clear it first


def clear_live_line() -> None:
    """Called before any log line is written: the live line is wiped so the log line starts
    at the left margin, and drawn again at the next update."""
    for progress in _shown:
        progress.clear()


def _percent_text(report: dict[str, Any]) -> str:
    percent = report.get("progress_percent")
    return f"[{percent:5.1f} %]" if percent is not None else "[  ?   %]"


def _left_text(report: dict[str, Any]) -> str:
    remaining = report.get("remaining_bytes")
    if remaining is None:
        return ""
    eta = report.get("eta_s")
    return (
        f" {format_size(remaining)} left" + (f", ~{format_duration(eta)}" if eta is not None else "") + " |"
    )


def progress_line(report: dict[str, Any]) -> str:
    """One line a person reads at a glance: where, how far, how fast, what it will cost."""
    # while it runs, the rate of the last second (the one the ETA uses); at the end the average
    rate = format_rate(report.get("rate_bytes_per_s") or report.get("throughput_bytes_per_s") or 0)
    status = report.get("status", "active")
    if status != "active":
        ending = f"{status}" + (f": {report['error']}" if report.get("error") else "")
        return f"[{report.get('mode', '?')}] {_percent_text(report)} {ending} | {rate}"
    postcopy = report.get("postcopy")
    if postcopy is not None:
        missing = postcopy.get("pages_missing_at_destination")
        return (
            f"[postcopy] {_percent_text(report)} {report.get('phase', '?')} |{_left_text(report)} "
            f"{'?' if missing is None else missing} pages missing there | "
            f"{postcopy['requests']} requests ({postcopy.get('requests_per_s', 0.0):.1f}/s) | {rate}"
        )
    expected = report.get("expected_downtime_ms")
    expected_text = f"{expected:.1f} ms" if expected is not None else "?"
    return (
        f"[{report.get('mode', '?')}] {_percent_text(report)} {report.get('phase', '?')} round "
        f"{report.get('rounds', 0)} |{_left_text(report)} {rate} | expected downtime {expected_text} | "
        f"throttle {report.get('throttle', 0.0):.0%}"
    )


def fit(line: str, columns: int) -> str:
    """At most columns - 1 characters (the last column would wrap on some terminals); a
    terminal that does not say its width (0) gets the whole line."""
    if columns <= 0:
        return line
    room = max(columns - 1, 8)
    return line if len(line) <= room else line[: room - 1] + "~"


def progress_fields(report: dict[str, Any]) -> dict[str, Any]:
    """The same figures as the live line, as fields of a log event."""
    fields = {
        "phase": report.get("phase"),
        "round": report.get("rounds"),
        "progress_percent": report.get("progress_percent"),
        "remaining_bytes": report.get("remaining_bytes"),
        "eta_s": report.get("eta_s"),
        "throughput_bytes_per_s": report.get("throughput_bytes_per_s"),
        "expected_downtime_ms": report.get("expected_downtime_ms"),
        "throttle": report.get("throttle"),
    }
    postcopy = report.get("postcopy")
    if postcopy is not None:
        fields["pages_missing_at_destination"] = postcopy.get("pages_missing_at_destination")
        fields["requests"] = postcopy.get("requests")
    return fields


class Progress:
    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        line_interval_s: float = PROGRESS_LINE_INTERVAL_S,
        log_interval_s: float = PROGRESS_LOG_INTERVAL_S,
        log: Any = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.on_terminal = self.stream.isatty()
        self.line_interval_s = line_interval_s
        self.log_interval_s = log_interval_s
        self.log = log
        self._last_line = 0.0
        self._last_log: float | None = None
        self._shown = False

    def wanted(self, now: float | None = None) -> bool:
        """Whether an update would show anything now: callers skip building a report otherwise."""
        now = time.monotonic() if now is None else now
        if self.on_terminal:
            return now - self._last_line >= self.line_interval_s
        return self.log is not None and (
            self._last_log is None or now - self._last_log >= self.log_interval_s
        )

    def update(self, report: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if not force and not self.wanted(now):
            return
        if self.on_terminal:
            self._last_line = now
            # one line, cut to the terminal's width: a wrapped line is never rewritten in place
            self.stream.write("\r" + fit(progress_line(report), self._columns()) + "\x1b[K")
            self.stream.flush()
            if not self._shown:
                self._shown = True
                _shown.append(self)
        elif self.log is not None and not force:  # the end is logged as its own event
            if self._last_log is None:
                self._last_log = now  # the first event comes one interval in: starting is logged anyway
                return
            self._last_log = now
            self.log.info("migration progress", **progress_fields(report))

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            return 0

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._hide()

    def finish(self) -> None:
        """Leave the last line on screen and move below it."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._hide()

    def _hide(self) -> None:
        self._shown = False
        if self in _shown:
            _shown.remove(self)
        self._last_line = 0.0  # drawn again at the next update
