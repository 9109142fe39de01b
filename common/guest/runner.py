"""Runs a guest's workload on a thread of its own, as a VMM's vCPU thread would.

Pausing is how a migration stops the guest at switchover and how it throttles a guest that
dirties faster than the link (auto-converge): the runner sleeps a share of each interval.
"""

from __future__ import annotations

import threading
import time

from common.guest.workload import Workload


class GuestRunner:
    def __init__(self, workload: Workload, stop_at_step: int | None = None) -> None:
        self.workload = workload
        self.stop_at_step = stop_at_step
        self.throttle = 0.0  # share of time the vCPU is held off, 0 .. 0.99
        self._run = threading.Event()
        self._quit = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._loop, name="vcpu", daemon=True)
        self.started_at: float | None = None

    @property
    def step(self) -> int:
        return self.workload.step_count

    @property
    def finished(self) -> bool:
        return self.stop_at_step is not None and self.step >= self.stop_at_step

    @property
    def running(self) -> bool:
        return self._run.is_set() and not self.finished

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._run.set()
        if not self._thread.is_alive():
            self._thread.start()

    def pause(self) -> None:
        """Stop the vCPU and wait until no step is in flight."""
        self._run.clear()
        self._idle.wait()

    def resume(self) -> None:
        self._run.set()

    def shutdown(self) -> None:
        self._quit.set()
        self._run.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def wait_finished(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def _loop(self) -> None:
        rate = self.workload.steps_per_second
        interval = 1.0 / rate if rate > 0 else 0.0
        next_due = time.monotonic()
        while not self._quit.is_set():
            if not self._run.is_set() or self.finished:
                self._idle.set()
                self._run.wait(0.05)
                next_due = time.monotonic()
                continue
            self._idle.clear()
            if not self._run.is_set():  # paused between the check and the clear
                self._idle.set()
                continue
            began = time.monotonic()
            self.workload.step()
            spent = time.monotonic() - began
            self._idle.set()
            delay = 0.0
            if interval:
                next_due += interval
                delay = next_due - time.monotonic()
            if self.throttle > 0:
                delay = max(delay, spent * self.throttle / (1.0 - self.throttle))
            if delay > 0:
                self._quit.wait(delay)
