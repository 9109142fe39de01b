"""The guest runs in exactly one place, whatever the order in which a partition, an onward hop
and an operator's word arrive."""

from __future__ import annotations

import pytest

from common.protocol.dest import DestSession
from common.protocol.phases import DestPhase, SourcePhase
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import FakeDestHost, Pair, busy_guest, running_postcopy


def test_a_source_whose_guest_moved_on_from_its_destination_hears_that_it_ran_there() -> None:
    """A commits to B; B starts the guest, but its word of it is lost in a partition; B's
    operator sends the guest on to C, and B opens a fresh session. A's resume, still inside its
    reconnect window, must learn that the guest ran at B, not "wrong session": A read that as
    "B does not run it" and resumed the guest, which then ran on A and on C."""
    pair = Pair(busy_guest(seed=4))
    partitioned = [False]

    def partition() -> bool:
        if pair.dst.phase is DestPhase.RUNNING:
            partitioned[0] = True
        return partitioned[0]

    pair.up.cut_when = partition
    pair.down.cut_when = partition
    pair.src.start(pair.now)
    pair.run_until(lambda: partitioned[0] and not pair.src.connected, 30.0)
    assert pair.src.phase is SourcePhase.COMMITTING and pair.dst_host.started is not None
    # the guest left B for C (not modelled here); B's daemon opens its next session
    pair.dst = DestSession(FakeDestHost(), pair.dst.params, pair.now, pair.dst.handed_over_sessions())
    partitioned[0] = False
    pair.up.cut_when = pair.down.cut_when = None
    pair.run_until(lambda: pair.src.phase.ended, 30.0)
    assert pair.src.phase is SourcePhase.COMPLETED, pair.src.failure
    assert pair.src_host.resumes == 0 and not pair.src_host.running, "the guest never runs here again"
    assert pair.dst.phase is DestPhase.WAITING, "B's new session is untouched"


def test_only_the_key_that_opened_a_handed_over_session_hears_about_it() -> None:
    pair = Pair(busy_guest(seed=4))
    pair.run()
    assert pair.src.phase is SourcePhase.COMPLETED
    record = pair.dst.handed_over_sessions()[pair.src.session_id]
    assert record.key == b"" and record.received >= 1
    fresh = DestSession(FakeDestHost(), pair.dst.params, pair.now, pair.dst.handed_over_sessions())
    resume = framing.encode(framing.envelope(pair.src.session_id, 0, resume=pb.Resume(epoch=2)))
    fresh.receive(b"stranger", resume, pair.now, peer_key=b"K" * 40)
    [(peer, frames)] = fresh.take_outgoing()
    answer = framing.decode(frames)
    assert peer == b"stranger" and answer.kind == "abort" and fresh.refused_messages == 1
    assert answer.envelope.abort.code == pb.ERROR_UNAUTHORIZED
    fresh.receive(b"the source", resume, pair.now)
    [(peer, frames)] = fresh.take_outgoing()
    answer = framing.decode(frames)
    assert answer.kind == "resume_ack" and answer.envelope.resume_ack.guest_running
    assert answer.envelope.epoch == 2 and answer.envelope.session_id == pair.src.session_id
    heartbeat = framing.encode(framing.envelope(pair.src.session_id, 0, heartbeat=pb.Heartbeat()))
    fresh.receive(b"the source", heartbeat, pair.now)
    assert not fresh.take_outgoing(), "never refused: a refusal would say the commit did not take"


def paused_postcopy() -> tuple[Pair, list[bool]]:
    """A postcopy whose link broke for good while the destination still lacked pages: the
    source gave up reconnecting and is unsettled, its guest stopped as at the switchover."""
    pair = running_postcopy(postcopy_recover_timeout_s=2.0)
    gone: list[bool] = []

    def cut() -> bool:
        if not gone and pair.dst.postcopy is not None and pair.dst.postcopy.started:
            gone.append(pair.dst.postcopy.missing() > 100)
        return bool(gone)

    pair.up.cut_when = pair.down.cut_when = cut
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase is SourcePhase.UNSETTLED, 30.0)
    assert pair.src.phase is SourcePhase.UNSETTLED and gone == [True]
    assert pair.dst.phase is DestPhase.POSTCOPY and pair.dst.postcopy is not None
    assert pair.dst.postcopy.missing() > 100
    return pair, gone


def test_settling_there_is_refused_while_pages_exist_only_here() -> None:
    """'settle there' with most pages not yet sent printed 'postcopy completed', exited 0 and
    wrote "status": "completed" with verification null: the pages held only here were lost."""
    pair, _ = paused_postcopy()
    with pytest.raises(RuntimeError, match="postcopy is not verified: the destination last said it lacked"):
        pair.src.settle(False, pair.now)
    assert pair.src.phase is SourcePhase.UNSETTLED, "nothing changed: recover or settle here remain"
    assert pair.src_host.resumes == 0


def test_settling_here_stops_the_destinations_copy_when_the_link_returns() -> None:
    """'settle here' resumed the guest on the source; the destination, back later, went on
    running its copy (pages missing), two guests at once."""
    pair, gone = paused_postcopy()
    pair.src.settle(True, pair.now)
    assert pair.src.phase is SourcePhase.CANCELLED and pair.src_host.running
    told = pair.src.take_outgoing()  # queued on the source's connection, as ZeroMQ keeps them
    assert [framing.decode(m.frames).envelope.abort.code for m in told] == [pb.ERROR_GUEST_TAKEN_BACK]
    report = pair.src.report(pair.now)
    assert report["status"] == "cancelled" and "runs here again" in report["error"]
    # the link returns: the destination hears it and stops its copy
    gone.clear()
    pair.up.cut_when = pair.down.cut_when = None
    pair.run_until(lambda: False, 0.2)
    assert pair.dst.phase is DestPhase.POSTCOPY, "the abort itself was lost in the partition"
    for message in told:
        pair.dst.receive(pair.peer, message.frames, pair.now, peer_key=pair.source_key)
    assert pair.dst.phase is DestPhase.FAILED and pair.dst_host.discarded == 1
    assert pair.dst.failure is not None and "the source took the guest back" in pair.dst.failure.reason
    # and whatever the destination says afterwards, the source tells it again
    heartbeat = framing.envelope(pair.src.session_id, 0, heartbeat=pb.Heartbeat())
    heartbeat.epoch = pair.src.link.epoch
    pair.src.receive(framing.encode(heartbeat), pair.now)
    [again] = pair.src.take_outgoing()
    assert framing.decode(again.frames).envelope.abort.code == pb.ERROR_GUEST_TAKEN_BACK
