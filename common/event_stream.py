"""`ctl events`: a daemon's migration events as JSON lines, one per event, as they happen.

It asks the control endpoint for the events after the last one it printed, every
EVENT_POLL_INTERVAL_S: the daemon's loop is never held by a reader, and a reader that falls
behind is told how many it missed.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from common.constants import EVENT_POLL_INTERVAL_S
from common.control import request
from common.keys import KeyPair

# The phases in which a migration has ended: a destination that runs its guest is done.
_ENDED_PHASES = frozenset({"running", "completed", "failed", "cancelled", "unsettled"})


def ends_a_migration(event: dict[str, Any]) -> bool:
    return event.get("event") == "MIGRATION_FINISHED" or (
        event.get("event") == "MIGRATION" and event.get("phase") in _ENDED_PHASES
    )


class FinishWatch:
    """--until-finished: the migration in progress when `ctl events` started, or else the next
    one to start, has ended. Ends seen in the kept history (before the first ask returned)
    belong to migrations that were over already."""

    def __init__(self) -> None:
        self.open: set[tuple[str, str | None]] = set()
        self.armed = False
        self.done = False

    def see(self, event: dict[str, Any]) -> None:
        key = (event.get("direction", ""), event.get("session"))
        if ends_a_migration(event):
            was_open = key in self.open
            self.open.discard(key)
            if self.armed and (was_open or not self.open):
                self.done = True
        elif event.get("event") in ("MIGRATION", "MIGRATION_PASS", "POSTCOPY_STARTED"):
            self.open.add(key)

    def history_seen(self) -> None:
        self.armed = True


def follow_events(
    address: str, timeout_s: float, curve: tuple[KeyPair, bytes] | None, until_finished: bool, prog: str
) -> int:
    after = 0
    watch = FinishWatch()
    try:
        while True:
            reply = request(address, "events", {"after": after}, timeout_s=timeout_s, curve=curve)
            if not reply.get("ok"):
                if after and "no answer" in str(reply.get("error")):
                    print(
                        f"{prog} events: the daemon stopped answering ({reply.get('error')})", file=sys.stderr
                    )
                    return 0 if watch.done or not until_finished else 1
                print(f"{prog} events: {reply.get('error')}", file=sys.stderr)
                return 1
            result = reply["result"]
            if result.get("missed"):
                print(json.dumps({"event": "MISSED", "count": result["missed"]}), flush=True)
            for event in result["events"]:
                print(json.dumps(event, sort_keys=True), flush=True)
                watch.see(event)
            if not watch.armed:
                watch.history_seen()
            after = max(after, int(result["next"]))
            if until_finished and watch.done:
                return 0
            time.sleep(EVENT_POLL_INTERVAL_S)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0
