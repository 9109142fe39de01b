"""One rule for every timer: poll acts on exactly the deadlines next_deadline returns, so a
deadline that poll has run at is never returned again and no daemon spins on a past one."""

from __future__ import annotations

import random
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.protocol.dest import DestSession
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from common.protocol.source import SourceSession
from common.protocol.timers import Timer, next_deadline, run_due
from tests.protocol_harness import Faults, Pair, busy_guest, running_postcopy

Session = SourceSession | DestSession


def past_deadlines(session: Session, now: float) -> list[Timer]:
    """Clock timers still due after a poll at `now` (work timers stand at `now` by design)."""
    return [timer for timer in session.timers(now) if not timer.work and timer.at <= now]


def hold_to_the_rule(session: Session, seen: list[str]) -> None:
    """Check the rule after every poll the harness makes, as the daemons make them."""
    poll: Callable[[float], None] = session.poll

    def checked(now: float) -> None:
        poll(now)
        stale = past_deadlines(session, now)
        assert not stale, f"{type(session).__name__} in {session.phase.value}: {stale} after poll({now})"
        assert session.next_deadline(now) > now or any(t.work for t in session.timers(now))
        seen.append(session.phase.value)

    session.poll = checked  # type: ignore[method-assign]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    postcopy=st.booleans(),
    drop=st.sampled_from([0.0, 0.03]),
    corrupt=st.sampled_from([0.0, 0.03]),
    outage_at=st.one_of(st.none(), st.floats(0.0, 1.0)),
    outage_s=st.sampled_from([0.3, 1.5, 4.0]),
    cap=st.sampled_from([0, 4 << 20]),
    seed=st.integers(0, 1000),
)
def test_a_deadline_poll_has_acted_on_is_never_returned_again(
    postcopy: bool, drop: float, corrupt: float, outage_at: float | None, outage_s: float, cap: int, seed: int
) -> None:
    params = MigrationParameters(
        postcopy=postcopy,
        max_bandwidth=cap,
        peer_timeout_s=0.6,
        heartbeat_interval_s=0.1,
        retransmit_after_s=0.2,
        reconnect_timeout_s=1.0,
        postcopy_recover_timeout_s=2.0,
    )
    outage = None if outage_at is None else (outage_at, outage_at + outage_s)
    pair = Pair(
        busy_guest(seed=seed % 5 + 1),
        params,
        to_dest=Faults(drop=drop, corrupt=corrupt, outage=outage, seed=seed),
        to_source=Faults(drop=drop, outage=outage, seed=seed + 1),
        guest_speed=2000,
        dest_steps=300 if postcopy else None,
    )
    seen: list[str] = []
    hold_to_the_rule(pair.src, seen)
    hold_to_the_rule(pair.dst, seen)
    clock = random.Random(seed)
    pair.src.start(pair.now)
    end = pair.now + 15.0
    while pair.now < end and not pair.settled():
        pair.turn()
        if clock.random() < 0.2:
            pair.now += clock.uniform(0.0, 0.3)  # a daemon that overslept: every clock lands anywhere
    assert seen, "the sessions were polled"


def test_timers_are_acted_on_once_each_in_order_and_read_afresh() -> None:
    acted: list[str] = []
    armed = {"a": 1.0, "b": 2.0}

    def timers(now: float) -> list[Timer]:
        def act(name: str) -> Callable[[float], None]:
            def run(at: float) -> None:
                acted.append(name)
                armed.pop(name)
                if name == "a":
                    armed["c"] = at  # an action may arm another at once: it is acted on too

            return run

        return [Timer(name, at, act(name)) for name, at in armed.items()]

    assert next_deadline(timers(0.0), 0.0) == 1.0
    assert run_due(timers, 1.5) == ["a", "c"] and acted == ["a", "c"]
    assert next_deadline(timers(1.5), 1.5) == 2.0
    assert next_deadline([], 5.0) > 5.0 + 60


def test_a_work_timer_gets_one_turn_per_poll() -> None:
    turns: list[float] = []
    work = Timer("send", 0.0, turns.append, work=True)
    assert run_due(lambda now: [work], 3.0) == ["send"] and turns == [3.0]


def test_a_postcopy_destination_whose_source_is_silent_sleeps() -> None:
    """Bug: past keep_for_s the destination's next deadline stood in the past for good (it never
    fails in postcopy), and its loop spun at 100 % CPU."""
    pair = running_postcopy(to_dest=Faults(bandwidth=5e6), postcopy_recover_timeout_s=2.0)
    silent: list[float] = []

    def cut() -> bool:
        if pair.dst.phase is DestPhase.POSTCOPY and not silent:
            silent.append(pair.now)
        return bool(silent)

    pair.up.cut_when = cut
    pair.down.cut_when = cut
    pair.src.start(pair.now)
    pair.run_until(lambda: bool(silent) and pair.now > silent[0] + 3 * pair.dst.keep_for_s, 30.0)
    dst = pair.dst
    assert dst.phase is DestPhase.POSTCOPY and dst.link.silence(pair.now) > dst.keep_for_s
    for later in (0.0, 0.05, 1.0):
        now = pair.now + later
        dst.poll(now)
        assert dst.next_deadline(now) > now, [(t.name, t.at) for t in dst.timers(now)]


def test_a_paused_postcopy_source_sleeps_between_its_reconnect_and_recover_timeouts() -> None:
    """Bug: paused, a source waited on its 10 s reconnect limit while it gave up at 60 s: in
    between, its next deadline stood in the past and it spun."""
    pair = running_postcopy(to_dest=Faults(bandwidth=5e6), postcopy_recover_timeout_s=6.0)
    params = pair.src.params
    pair.up.cut_when = lambda: pair.dst.phase is DestPhase.POSTCOPY
    pair.down.cut_when = pair.up.cut_when
    pair.src.start(pair.now)
    src = pair.src
    pair.run_until(
        lambda: src.phase is SourcePhase.POSTCOPY_PAUSED and src.link.silence(pair.now) > 2.0, 30.0
    )
    assert src.phase is SourcePhase.POSTCOPY_PAUSED
    assert params.reconnect_timeout_s < src.link.silence(pair.now) < params.postcopy_recover_timeout_s
    src.poll(pair.now)
    assert src.next_deadline(pair.now) > pair.now, [(t.name, t.at) for t in src.timers(pair.now)]
    assert src.next_deadline(pair.now) <= src.reconnector.next_at, "it wakes for its next resume"
