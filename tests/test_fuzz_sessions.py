"""Hostile input, fuzzed through the sessions (tests/fuzz_messages.py makes the messages): a
stranger at the destination's door, a stranger in the middle of a migration (precopy and
postcopy), and a destination that lies to its source. Whatever arrives, nothing escapes as
an exception, nothing rejected touches a guest, the migration that was running still ends as
the unmigrated run does, and the guest never runs on two sides."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.guest.workload import Workload
from common.protocol.dest import DestParameters, DestSession
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from tests.fuzz_messages import Draw, hostile_frames, hostile_messages
from tests.protocol_harness import FakeDestHost, Pair, busy_guest
from tests.test_protocol import assert_handed_over

STRANGER = b"stranger"
STRANGER_KEY = b"S" * 40
SOURCE_KEY = b"K" * 40
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(hostile_messages(b"12345678", 1, 4096), min_size=1, max_size=30))
def test_a_stranger_at_the_door_gets_refusals_and_no_guest(messages: list[list[bytes]]) -> None:
    session = DestSession(FakeDestHost(), DestParameters(), 1000.0)
    for i, frames in enumerate(messages):
        session.receive(STRANGER + bytes([i]), frames, 1000.0 + i * 0.01, peer_key=STRANGER_KEY)
    if session.guest is None:
        assert session.phase is DestPhase.WAITING
        assert session.refused_messages == len(messages), "each one refused and counted"
    else:
        # a hello that happens to be valid opens a session, as it should, for that key alone
        assert session.peer_key == STRANGER_KEY and session.phase is DestPhase.RECEIVING
    # answers are bounded whatever came in
    assert len(session.take_outgoing()) <= len(messages) + 2


def inject_strangers(pair: Pair, seed: int, every: int, per_turn: int) -> list[int]:
    """Each `every` turns, `per_turn` hostile messages from a stranger with its own key, naming
    the real session and plausible sequence numbers: the worst a stranger can guess."""
    rng = random.Random(seed)
    draw = Draw.of_random(rng)
    sent = [0]
    page_count = pair.guest.memory.page_count

    def act() -> None:
        if pair.turns % every or pair.dst.session_id == b"":
            return
        for _ in range(per_turn):
            frames = hostile_frames(draw, pair.dst.session_id, pair.dst.link.received + 1, page_count)
            peer = rng.choice([STRANGER, pair.peer, pair.peer + b"-urgent"])
            pair.dst.receive(peer, frames, pair.now, peer_key=STRANGER_KEY)
            sent[0] += 1

    pair.stranger = act  # type: ignore[attr-defined]
    return sent


def run_with_strangers(pair: Pair, seed: int, max_seconds: float = 60.0) -> int:
    sent = inject_strangers(pair, seed, every=2, per_turn=4)

    def done() -> bool:
        pair.stranger()  # type: ignore[attr-defined]
        runner = pair.dst_host.runner
        return pair.settled() and (runner is None or runner.finished)

    pair.src.start(pair.now)
    pair.run_until(done, max_seconds)
    return sent[0]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_stranger_inside_a_precopy_changes_nothing(seed: int) -> None:
    pair = Pair(busy_guest(seed=seed), guest_speed=2000)
    pair.source_key = SOURCE_KEY
    sent = run_with_strangers(pair, seed)
    assert sent > 20
    assert_handed_over(pair)
    assert pair.dst.refused_messages > 0
    assert pair.dst.guest is not None and pair.dst.guest.digests() == pair.guest.digests()


@pytest.mark.parametrize("seed", [4, 5])
def test_a_stranger_inside_a_postcopy_changes_nothing(seed: int) -> None:
    pair = Pair(
        busy_guest(seed=seed),
        params=MigrationParameters(postcopy=True, postcopy_after_rounds=0),
        guest_speed=2000,
        dest_steps=400,
    )
    pair.source_key = SOURCE_KEY
    sent = run_with_strangers(pair, seed)
    assert sent > 20
    assert pair.src.phase is SourcePhase.COMPLETED, pair.src.failure
    assert pair.dst.phase is DestPhase.RUNNING and pair.dst.verified is True
    runner = pair.dst_host.runner
    assert runner is not None and runner.finished
    expected = busy_guest(seed=seed)
    Workload(expected).run(runner.step)
    assert pair.dst.guest is not None and pair.dst.guest.digests() == expected.digests()


@pytest.mark.parametrize("seed", range(6, 14))
def test_a_broken_source_with_the_right_key_never_gets_a_wrong_guest_run(seed: int) -> None:
    """Hostile messages under the session's own connection and key, at plausible sequence
    numbers (some are taken for the real thing): the destination refuses, asks again or fails
    with a reason; it runs a guest only when that guest is the source's, and what it keeps for
    its source stays bounded."""
    pair = Pair(busy_guest(seed=seed), guest_speed=2000)
    pair.source_key = SOURCE_KEY
    rng = random.Random(seed)
    draw = Draw.of_random(rng)
    page_count = pair.guest.memory.page_count
    most_kept = [0]

    def broken_source() -> None:
        dst = pair.dst
        if pair.turns % 2 or dst.session_id == b"" or dst.phase.terminal:
            return
        for _ in range(3):
            frames = hostile_frames(draw, dst.session_id, dst.link.received + 1, page_count)
            dst.receive(pair.peer, frames, pair.now, peer_key=SOURCE_KEY)
        most_kept[0] = max(most_kept[0], len(dst.link.unacked))

    def done() -> bool:
        broken_source()
        return pair.settled()

    pair.src.start(pair.now)
    pair.run_until(done, max_seconds=60)
    dest_runs = pair.dst.phase in (DestPhase.RUNNING, DestPhase.POSTCOPY)
    assert not (pair.src.guest_runs_here and dest_runs)
    if pair.dst.phase is DestPhase.RUNNING:
        assert pair.dst.guest is not None and pair.dst.guest.digests() == pair.guest.digests()
    else:
        assert pair.dst.failure is not None and pair.dst.failure.reason
        assert pair.dst_host.discarded >= 1 or pair.dst.guest is None
    assert most_kept[0] <= 4 * DestParameters().window + 16, "what waits for acknowledgement stays bounded"


@SETTINGS
@given(st.data())
def test_a_lying_destination_never_gets_the_guest_run_twice(data: st.DataObject) -> None:
    """The source hears hostile messages as if from its destination, mid-precopy: it fails or
    carries on, and it hands the guest over only to a destination that runs it."""
    pair = Pair(busy_guest(seed=7), guest_speed=2000, params=MigrationParameters(max_bandwidth=8 << 20))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.round >= 1 and pair.src.phase is SourcePhase.ACTIVE, max_seconds=5)
    lies = data.draw(
        st.lists(
            hostile_messages(pair.src.session_id, pair.src.link.received + 1, pair.guest.memory.page_count),
            min_size=1,
            max_size=20,
        )
    )
    before = pair.guest.digests()
    for frames in lies:
        pair.src.receive(frames, pair.now)
    assert pair.guest.digests() == before, "nothing received changes the source's guest"
    pair.run_until(pair.settled, max_seconds=60)
    dest_runs = pair.dst.phase in (DestPhase.RUNNING, DestPhase.POSTCOPY)
    assert not (pair.src.guest_runs_here and dest_runs), "the guest runs on one side at most"
    if pair.src.phase is SourcePhase.COMPLETED:
        assert dest_runs and pair.dst.guest is not None
        assert pair.dst.guest.digests() == pair.guest.digests()
    elif pair.src.phase is SourcePhase.FAILED:
        assert pair.src.guest_runs_here and pair.src.failure is not None and pair.src.failure.reason


@SETTINGS
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=3), st.integers(0, 5))
def test_bytes_that_are_not_even_messages(frames: list[bytes], phase_turns: int) -> None:
    pair = Pair(busy_guest(seed=2))
    pair.src.start(pair.now)
    for _ in range(phase_turns):
        pair.turn()
    pair.dst.receive(STRANGER, frames, pair.now, peer_key=STRANGER_KEY)
    pair.src.receive(frames, pair.now)
    pair.run_until(pair.settled, max_seconds=30)
    dest_runs = pair.dst.phase in (DestPhase.RUNNING, DestPhase.POSTCOPY)
    assert not (pair.src.guest_runs_here and dest_runs)
    assert np.array_equal(pair.guest.memory.data_populated, busy_guest(seed=2).memory.data_populated)


@pytest.mark.parametrize("seed", [111, 147, 177, 201, 237, 240, 100, 101])
def test_hostile_messages_at_both_ends_never_run_the_guest_twice(seed: int) -> None:
    """Precopy and postcopy, hostile messages to the destination (under the source's names and
    key, and a stranger's) and to the source at once. The first six seeds once made a source
    resume its guest in postcopy on a forged refusal while the destination ran it."""
    postcopy = seed % 3 == 0
    params = MigrationParameters(postcopy=True, postcopy_after_rounds=0) if postcopy else None
    pair = Pair(
        busy_guest(seed=seed % 20 + 1), guest_speed=2000, params=params, dest_steps=200 if postcopy else None
    )
    pair.source_key = SOURCE_KEY
    rng = random.Random(seed)
    draw = Draw.of_random(rng)
    pages = pair.guest.memory.page_count

    def both_ends() -> bool:
        dst = pair.dst
        if not (pair.turns % 2 or dst.session_id == b"" or dst.phase.terminal):
            for _ in range(3):
                peer, key = rng.choice(
                    [(pair.peer, SOURCE_KEY), (pair.peer + b"-urgent", SOURCE_KEY), (STRANGER, b"")]
                )
                dst.receive(
                    peer,
                    hostile_frames(draw, dst.session_id, dst.link.received + 1, pages),
                    pair.now,
                    peer_key=key,
                )
            if rng.random() < 0.5:
                lie = hostile_frames(draw, pair.src.session_id, pair.src.link.received + 1, pages)
                pair.src.receive(lie, pair.now)
        return pair.settled()

    pair.src.start(pair.now)
    pair.run_until(both_ends, max_seconds=60)
    dest_runs = pair.dst.phase in (DestPhase.RUNNING, DestPhase.POSTCOPY)
    assert not (pair.src.guest_runs_here and dest_runs), (pair.src.failure, pair.dst.phase)
    if pair.dst.phase is DestPhase.RUNNING and not postcopy:
        assert pair.dst.guest is not None and pair.dst.guest.digests() == pair.guest.digests()
