"""One rule for every timer of a session: `poll` acts on exactly the deadlines `next_deadline`
returns, because both read one list, made afresh from the session's state (as aioquic computes
its next timer from the state its timer handler acts on).

A session lists its armed timers, each a deadline and the action that is due then. An action
must disarm its own timer or move it past the time it ran at: a deadline that `poll(now)` has
acted on is never returned again, so a daemon that sleeps until the next deadline never spins
on one already past. A work timer is the exception that proves the rule: it stands at `now`
while there is work and room for it (pages to send under the window and the cap), is acted on
once per poll, so the daemon reads its sockets between two turns of work, and is gone when the
work or the room is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

# A session that lists no timer still gets a turn this often (the daemon caps it anyway).
IDLE_S = 3600.0
# Passes one poll may make over the list: every action disarms or defers its timer, so more
# would be a timer that never does; poll stops there rather than spin, and the property test
# in tests/test_timers.py catches such a timer by the past deadline it leaves behind.
MAX_PASSES = 64


@dataclass(frozen=True)
class Timer:
    name: str
    at: float
    act: Callable[[float], None]
    work: bool = False  # due at `now` while work waits; the rest are deadlines of the clock


def next_deadline(timers: Iterable[Timer], now: float) -> float:
    return min((timer.at for timer in timers), default=now + IDLE_S)


def run_due(timers: Callable[[float], list[Timer]], now: float) -> list[str]:
    """Act once on every timer due at `now`, in the order listed, reading the list again after
    each action (an action may arm, disarm or end everything: a broken link arms its first
    resume at once). Returns the names acted on."""
    acted: list[str] = []
    for _ in range(MAX_PASSES):
        due = next((t for t in timers(now) if t.at <= now and t.name not in acted), None)
        if due is None:
            break
        due.act(now)
        acted.append(due.name)
    return acted
