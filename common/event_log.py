"""What `ctl events` streams, in the role of QMP's MIGRATION and MIGRATION_PASS events.

A daemon keeps its latest events, numbered; `ctl events` asks for those after the last number
it saw, so it loses none between two asks and needs no socket of its own (the control
endpoint's keys and allow-list cover it). A reader slower than `EVENT_LOG_KEEP` events is told
how many it missed instead of being sent a silent gap.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from common.constants import EVENT_LOG_KEEP
from common.protocol import events as ev


def event_fields(event: ev.Event) -> dict[str, Any] | None:
    """The JSON shape of a session event; None for what is not an operator's event."""
    if isinstance(event, ev.PhaseChanged):
        return {"event": "MIGRATION", "phase": event.phase}
    if isinstance(event, ev.RoundStarted):
        return {
            "event": "MIGRATION_PASS",
            "round": event.round,
            "data_pages": event.data_pages,
            "tag_pages": event.tag_pages,
        }
    if isinstance(event, ev.PostcopyStarted):
        return {"event": "POSTCOPY_STARTED", "missing_pages": event.missing_pages}
    if isinstance(event, ev.Finished):
        return {"event": "MIGRATION_FINISHED", "status": event.status, "reason": event.reason}
    if isinstance(event, ev.Reconnect):
        return {"event": "LINK_LOST", "epoch": event.epoch, "silent_for_s": round(event.silent_for_s, 3)}
    if isinstance(event, ev.LinkRestored):
        return {"event": "LINK_RESTORED", "epoch": event.epoch, "resent_messages": event.resent}
    if isinstance(event, ev.Refused):
        return {"event": "REFUSED", "reason": event.reason, "hello": event.hello}
    return None


class EventLog:
    def __init__(self, keep: int = EVENT_LOG_KEEP, clock: Any = time.time) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=keep)
        self._next = 1
        self._clock = clock

    def record(self, direction: str, session_id: bytes, event: ev.Event) -> None:
        """`direction`: incoming (a guest arriving) or outgoing (a guest leaving)."""
        fields = event_fields(event)
        if fields is None:
            return
        self.add(direction, session_id, fields)

    def add(self, direction: str, session_id: bytes, fields: dict[str, Any]) -> None:
        self._events.append(
            {
                "seq": self._next,
                "time": round(self._clock(), 3),
                "direction": direction,
                "session": session_id.hex() or None,
                **fields,
            }
        )
        self._next += 1

    def after(self, seq: Any) -> dict[str, Any]:
        """The events numbered above `seq` (0: all that are kept), and the number to ask after
        next time; `missed`: how many were dropped before this reader saw them."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError('events needs "after": a whole number of 0 or more (the last "seq" seen)')
        kept = [e for e in self._events if e["seq"] > seq]
        oldest = self._events[0]["seq"] if self._events else self._next
        missed = max(0, oldest - seq - 1) if seq < self._next - 1 else 0
        return {"events": kept, "next": self._next - 1, "missed": missed if seq > 0 else 0}
