"""The vCPU runner's pacing and throttle, on a fake clock: auto-converge must really hold the
guest back, since the protocol tests' harness and the daemons both rely on this code."""

from __future__ import annotations

import pytest

from common.guest.runner import GuestRunner


class CostlyWorkload:
    """Every step costs 1 ms of fake time, as a CPU-bound guest's steps cost real time."""

    def __init__(self, clock: list[float], steps_per_second: float = 0.0) -> None:
        self.clock = clock
        self.steps_per_second = steps_per_second
        self.step_count = 0

    def step(self) -> None:
        self.step_count += 1
        self.clock[0] += 0.001


def steps_in(seconds: float, throttle: float, steps_per_second: float = 0.0) -> int:
    clock = [0.0]
    workload = CostlyWorkload(clock, steps_per_second)
    runner = GuestRunner(workload, clock=lambda: clock[0])
    runner.start()
    runner.throttle = throttle
    while clock[0] < seconds:
        wait = runner.seconds_until_due(clock[0])
        if wait:
            clock[0] += wait
        if not runner.run_slice():
            clock[0] += 0.0001  # the loop's own work between slices
    return workload.step_count


@pytest.mark.parametrize("throttle", [0.2, 0.5, 0.9, 0.99])
def test_throttle_gives_the_guest_its_share_of_time(throttle: float) -> None:
    full = steps_in(2.0, 0.0)
    held = steps_in(2.0, throttle)
    assert full >= 1900
    assert held / full == pytest.approx(1.0 - throttle, abs=0.03)


def test_a_paced_guest_runs_at_its_pace() -> None:
    assert steps_in(2.0, 0.0, steps_per_second=100) == pytest.approx(200, abs=2)


def test_a_paused_guest_does_not_step_and_resumes_where_it_was() -> None:
    clock = [0.0]
    workload = CostlyWorkload(clock)
    runner = GuestRunner(workload, stop_at_step=50, clock=lambda: clock[0])
    runner.start()
    runner.pause()
    assert runner.run_slice() == 0 and runner.seconds_until_due(0.0) is None
    runner.resume()
    while not runner.finished:
        runner.run_slice()
    assert workload.step_count == 50 and not runner.running
