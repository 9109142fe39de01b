"""What the destination tells its log about messages it refused or dropped unread, bounded so
that a hostile peer can neither flood the log nor go unseen."""

from __future__ import annotations

import time
from typing import Any

from common.constants import REFUSAL_LOG_LINES_PER_S
from common.protocol import events as ev
from common.protocol.ratelimit import PerSecond


class RefusalLog:
    def __init__(self, log: Any) -> None:
        self.log = log
        self.refusals_unlogged = 0  # refused messages not yet in the log
        self.dropped_unlogged = 0  # strangers' messages dropped unread, not yet in the log
        self._hello_lines = PerSecond(REFUSAL_LOG_LINES_PER_S)
        self._t_logged = float("-inf")
        self._last: ev.Refused | None = None

    def refused(self, event: ev.Refused) -> None:
        """Refused hellos are logged one by one while they are few (an operator needs to see a
        misconfigured source); beyond REFUSAL_LOG_LINES_PER_S, and for every other refused
        message, a count at most once a second."""
        if event.hello and self._hello_lines.take(time.monotonic()):
            self.log.warning("source refused", connection=event.peer.hex(), reason=event.reason)
            return
        self.refusals_unlogged += 1
        self._last = event
        self.flush()

    def dropped(self) -> None:
        self.dropped_unlogged += 1

    def flush(self, *, final: bool = False) -> None:
        now = time.monotonic()
        if not (final or now - self._t_logged >= 1.0):
            return
        event = self._last
        if event is not None and self.refusals_unlogged:
            self.log.warning(
                "messages refused",
                count=self.refusals_unlogged,
                last_reason=event.reason,
                connection=event.peer.hex(),
            )
            self.refusals_unlogged = 0
            self._t_logged = now
        if self.dropped_unlogged:
            self.log.warning("strangers' messages dropped unread", count=self.dropped_unlogged)
            self.dropped_unlogged = 0
            self._t_logged = now
