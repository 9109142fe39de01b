"""Runs a guest's workload in time slices on the daemon's own thread.

An emulated vCPU in Python is CPU-bound bytecode: on a thread of its own it holds the GIL and
every socket call of the migration waits up to a switch interval to get it back (measured:
2.4 MB/s instead of hundreds). So the vCPU runs cooperatively, as QEMU's single-threaded TCG
does: the daemon's loop gives it a slice, then does migration work, then another slice.
Pausing (switchover) is simply not giving it the next slice, so a pause never interrupts a
step halfway. Throttling (auto-converge) shortens the slices.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

# Long enough to amortise the loop, short enough that acks and control requests are not kept
# waiting behind the guest.
DEFAULT_SLICE_S = 0.002


class Steppable(Protocol):
    """What the runner drives: a workload, or in protocol tests one that also costs fake time."""

    steps_per_second: float

    @property
    def step_count(self) -> int: ...

    def step(self) -> None: ...


class Inert:
    """What the runner drives for a guest that does not execute here (one imported from QEMU,
    which only QEMU runs): no step ever runs. A runner stopped at step 0 reports it stopped."""

    steps_per_second = 0.0
    step_count = 0
    blocked = True

    def step(self) -> None:
        return None


class GuestRunner:
    """`clock` is injectable so that the protocol tests' fake-time harness throttles and paces
    a guest with this very code, not a model of it."""

    def __init__(
        self,
        workload: Steppable,
        stop_at_step: int | None = None,
        slice_s: float = DEFAULT_SLICE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workload = workload
        self.clock = clock
        self.stop_at_step = stop_at_step
        self.slice_s = slice_s
        self.throttle = 0.0  # share of its slice the vCPU is held off, 0 .. 0.99
        self._running = False
        self._next_due = 0.0
        self._held_until = 0.0  # auto-converge: no slice before this time
        # Why the guest stopped on its own: a step its memory made impossible (a pointer out of
        # RAM, say), as a real vCPU takes an abort. The guest stops; the daemon lives on.
        self.error: str | None = None

    @property
    def _interval(self) -> float:
        # read each time: a postcopy destination learns the pace only once the page holding it arrived
        rate = self.workload.steps_per_second
        return 1.0 / rate if rate > 0 else 0.0

    @property
    def blocked(self) -> bool:
        """Postcopy: the vCPU waits for a page; the loop runs no slice until it is placed."""
        return bool(getattr(self.workload, "blocked", False))

    @property
    def step(self) -> int:
        return self.workload.step_count

    @property
    def finished(self) -> bool:
        return self.stop_at_step is not None and self.step >= self.stop_at_step

    @property
    def running(self) -> bool:
        return self._running and not self.finished and self.error is None

    @property
    def stopped_for_good(self) -> bool:
        """It will run no further step: at --stop-at-step, or stopped by an error of its own."""
        return self.finished or self.error is not None

    @property
    def waiting_for_page(self) -> bool:
        return self.running and self.blocked

    def start(self) -> None:
        self._running = True
        self._next_due = self.clock()

    def pause(self) -> None:
        self._running = False

    def resume(self) -> None:
        if not self._running:
            self._running = True
            self._next_due = max(self._next_due, self.clock())

    def seconds_until_due(self, now: float) -> float | None:
        """How long the loop may sleep before the vCPU wants its next slice (None: never)."""
        if not self.running or self.blocked:
            return None
        due = max(self._next_due, self._held_until) if self._interval else self._held_until
        return max(0.0, due - now)

    def run_slice(self) -> int:
        """Run the steps that are due, for at most one slice; return how many ran."""
        began = self.clock()
        if not self.running or began < self._held_until:
            return 0
        budget = self.slice_s
        ran = 0
        interval = self._interval
        while not self.finished and not self.blocked:
            t = self.clock()
            if t - began >= budget and ran:
                break
            if interval:
                if t < self._next_due:
                    break
                self._next_due += interval
                if self._next_due < t - 1.0:  # far behind (a long pause): do not sprint
                    self._next_due = t
            try:
                self.workload.step()
            except Exception as exc:  # whatever guest memory holds, the daemon's loop goes on
                self.error = f"the guest stopped at step {self.step}: {exc}"
                break
            ran += 1
        if self.throttle:
            # hold the vCPU off so that it runs (1 - throttle) of the time
            spent = self.clock() - began
            self._held_until = self.clock() + spent * self.throttle / (1.0 - self.throttle)
        return ran

    def run_until_finished(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """The reference run: slices back to back (or paced) until --stop-at-step."""
        self.start()
        while not self.stopped_for_good and not should_stop():
            wait = self.seconds_until_due(self.clock())
            if wait:
                time.sleep(min(wait, 0.05))
            self.run_slice()
