"""An allowed but hostile (or broken) source: whatever it asks for, the destination's own bounds
hold, a host error refuses it without changing anything, and the daemon lives."""

from __future__ import annotations

from dataclasses import replace

import pytest

from common.constants import MAX_SOURCE_WAIT_S
from common.guest.guest import Guest
from common.protocol.dest import DestParameters, DestSession
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from common.protocol.verify import MAX_VERIFY_ATTEMPTS
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import FakeDestHost, Pair, busy_guest, good_hello, pageless_postcopy
from tests.test_dest_session import PEER, frames, receiving, replies


@pytest.mark.parametrize("asked_ms", [2**32 - 1, 10_000_000])
def test_a_hello_cannot_hold_the_destination_past_its_operators_bound(asked_ms: int) -> None:
    """A uint32 of milliseconds is 49 days: one hello held a destination busy for that long, every
    other source refused."""
    dst, _ = receiving(
        DestParameters(max_source_wait_s=30.0),
        reconnect_timeout_ms=asked_ms,
        postcopy_recover_timeout_ms=asked_ms,
    )
    assert dst.keep_for_s == 30.0 and dst.postcopy_keep_s == 30.0
    dst.poll(29.9)
    assert dst.phase is DestPhase.RECEIVING
    dst.poll(30.0)
    assert dst.phase is DestPhase.FAILED and dst.failure is not None
    assert "source silent for 30.0 s" in dst.failure.reason


def test_a_hello_may_shorten_the_wait_but_not_below_the_peer_timeout() -> None:
    dst, _ = receiving(DestParameters(peer_timeout_s=2.0), reconnect_timeout_ms=5000)
    assert dst.keep_for_s == 5.0
    dst, _ = receiving(DestParameters(peer_timeout_s=2.0), reconnect_timeout_ms=1)
    assert dst.keep_for_s == 2.0
    assert DestParameters().max_source_wait_s == MAX_SOURCE_WAIT_S


class FailingHost(FakeDestHost):
    def create_guest(self, ram_bytes: int, vcpu_count: int) -> Guest:
        raise MemoryError("cannot allocate memory (strict overcommit)")


def test_a_failed_allocation_refuses_the_source_and_changes_nothing() -> None:
    """The session's peer, id and link were set before the allocation, and its exception
    escaped to the daemon's loop, which died."""
    host = FailingHost()
    dst = DestSession(host, DestParameters(), 0.0)
    dst.receive(PEER, frames(1, hello=good_hello()), 0.0)
    [(peer, answer)] = replies(dst)
    assert peer == PEER and answer.kind == "hello_ack"
    ack = answer.envelope.hello_ack
    assert not ack.accepted and ack.code == pb.ERROR_INTERNAL
    assert "cannot hold a guest of 1048576 bytes: cannot allocate memory" in ack.reason
    assert dst.phase is DestPhase.WAITING
    assert dst.peer is None and dst.session_id == b"" and dst.guest is None
    # the next source, on a host that can hold it, gets in
    dst.host = FakeDestHost()
    dst.receive(b"peer-2", frames(1, session=b"t" * 8, hello=good_hello()), 0.1)
    assert dst.phase is DestPhase.RECEIVING and dst.peer == b"peer-2"


def test_a_host_error_inside_a_handler_fails_the_session_not_the_node() -> None:
    class BrokenStart(FakeDestHost):
        def start_guest(self, guest: Guest, gate: object = None) -> None:
            raise OSError("the vCPU thread cannot start")

    dst, _ = receiving()
    dst.host = BrokenStart()
    dst.source_stopped = True
    dst.machine.phase = DestPhase.AWAIT_COMMIT
    dst.receive(PEER, frames(2, received=1, commit=pb.Commit()), 0.1)
    assert dst.phase is DestPhase.FAILED and dst.failure is not None
    assert dst.failure.code == pb.ERROR_INTERNAL and "the vCPU thread cannot start" in dst.failure.reason


def test_verification_is_asked_for_at_most_as_often_as_a_source_ever_asks() -> None:
    """The source stops after its last repair; the destination answered forever."""
    dst, _ = receiving()
    dst.receive(PEER, frames(2, received=1, end_of_round=pb.EndOfRound(round=1, final=True)), 0.1)
    seq = 3
    for attempt in range(1, MAX_VERIFY_ATTEMPTS + 2):
        digests = pb.GuestDigests(ram_digest=b"x" * 8, ram_block_digests=bytes(8), tag_block_digests=bytes(8))
        request = pb.VerifyRequest(attempt=attempt, source=digests)  # a mismatch: "repair and ask again"
        dst.receive(PEER, frames(seq, received=1, verify_request=request), 0.2)
        seq += 1
        if attempt <= MAX_VERIFY_ATTEMPTS:
            assert dst.phase is DestPhase.RECEIVING, dst.failure
    assert dst.phase is DestPhase.FAILED and dst.failure is not None
    assert f"verification asked for {MAX_VERIFY_ATTEMPTS + 1} times" in dst.failure.reason


def test_a_changed_reconnect_timeout_reaches_the_destination_within_its_bound() -> None:
    """set-parameters reconnect_timeout_s changed the source only: the destination discarded
    the session after the hello's value while the source went on reconnecting."""
    pair = Pair(busy_guest(seed=3), MigrationParameters(max_bandwidth=1 << 20, reconnect_timeout_s=5.0))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase is DestPhase.RECEIVING and pair.src.phase is SourcePhase.ACTIVE)
    assert pair.dst.keep_for_s == 5.0
    pair.src.set_parameters(replace(pair.src.params, reconnect_timeout_s=40.0), pair.now)
    pair.run_until(lambda: pair.dst.keep_for_s != 5.0, 2.0)
    assert pair.dst.keep_for_s == 40.0
    pair.src.set_parameters(replace(pair.src.params, reconnect_timeout_s=1e6), pair.now)
    pair.run_until(lambda: pair.dst.keep_for_s != 40.0, 2.0)
    assert pair.dst.keep_for_s == MAX_SOURCE_WAIT_S, "within the destination's own bound"
    pair.run_until(pair.settled, 60.0)
    assert pair.src.phase is SourcePhase.COMPLETED, pair.src.failure


def test_a_source_that_starts_postcopy_and_sends_no_page_cannot_hold_the_destination() -> None:
    """Manifest and PostcopyStart, then heartbeats and nothing else: a postcopy guest is never
    discarded, so the destination was held for good and could not be cancelled."""
    pair = pageless_postcopy(
        5, DestParameters(max_source_wait_s=5.0), peer_timeout_s=3.0, reconnect_timeout_s=10.0
    )
    dst = pair.dst
    assert dst.phase is DestPhase.POSTCOPY and dst.postcopy is not None and dst.postcopy.missing() > 0
    now, started = pair.now, pair.now
    dst.take_outgoing()
    while dst.phase is DestPhase.POSTCOPY and now < started + 10.0:
        heartbeat = framing.envelope(dst.session_id, 0, heartbeat=pb.Heartbeat())
        heartbeat.epoch = dst.link.epoch
        dst.receive(pair.peer, framing.encode(heartbeat), now, peer_key=pair.source_key)
        dst.poll(now)
        now += 0.25
    assert dst.phase is DestPhase.FAILED and 5.0 <= now - started <= 5.5
    assert dst.failure is not None and "postcopy stalled: no page arrived for 5" in dst.failure.reason
    assert pair.dst_host.discarded == 1
    told = [framing.decode(f) for _, f in dst.take_outgoing()]
    assert any(m.kind == "abort" and "postcopy stalled" in m.envelope.abort.reason for m in told)


def test_a_silent_postcopy_source_is_still_waited_for_past_that_bound() -> None:
    """Silence is a broken link, which a source recovers from: only a source that is heard and
    sends nothing is a stall."""
    pair = pageless_postcopy(
        5, DestParameters(max_source_wait_s=5.0), peer_timeout_s=3.0, reconnect_timeout_s=10.0
    )
    for later in range(1, 40):
        pair.dst.poll(pair.now + later * 0.5)
    assert pair.dst.phase is DestPhase.POSTCOPY and pair.dst_host.discarded == 0
