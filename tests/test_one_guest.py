"""The guest runs in exactly one place, whatever the order in which a partition, an onward hop
and an operator's word arrive."""

from __future__ import annotations

import pytest

from common.protocol.dest import DestParameters, DestSession
from common.protocol.events import Finished
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import FakeDestHost, Pair, busy_guest, pageless_postcopy, running_postcopy


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
    assert answer.envelope.received == record.received, "what it holds of that session, for the resend"
    assert answer.envelope.epoch == 2 and answer.envelope.session_id == pair.src.session_id
    heartbeat = framing.encode(framing.envelope(pair.src.session_id, 0, heartbeat=pb.Heartbeat()))
    fresh.receive(b"the source", heartbeat, pair.now)
    assert not fresh.take_outgoing(), "never refused: a refusal would say the commit did not take"


def paused_postcopy(dest_params: DestParameters | None = None) -> tuple[Pair, list[bool]]:
    """A postcopy whose link broke for good while the destination still lacked pages: the
    source gave up reconnecting and is unsettled, its guest stopped as at the switchover."""
    pair = running_postcopy(dest_params=dest_params, postcopy_recover_timeout_s=2.0)
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
    lacked = pair.src.dest_missing
    lacks = "an unknown number of" if lacked is None else str(lacked)
    with pytest.raises(
        RuntimeError, match=f"the destination last said it lacked {lacks} pages, held only here"
    ):
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


def test_a_postcopy_source_back_from_a_long_outage_finds_its_guest_still_running_there() -> None:
    """The stall bound counted the outage: on the source's return, past --max-source-wait since
    the last page, the destination stopped the guest it ran, just as the pages came."""
    pair, gone = paused_postcopy(DestParameters(max_source_wait_s=5.0))  # unsettled: it gave up
    dst = pair.dst
    outage_ends = pair.now + 3 * dst.params.max_source_wait_s
    while pair.now < outage_ends:  # both sides wait, the destination's guest on what it holds
        pair.turn()
    gone.clear()
    pair.up.cut_when = pair.down.cut_when = None
    pair.src.recover(pair.now)
    pair.run_until(lambda: pair.src.phase is SourcePhase.COMPLETED, 60.0)
    assert pair.src.phase is SourcePhase.COMPLETED and pair.dst.verified is True
    assert pair.dst_host.discarded == 0, "the copy there ran on and was never stopped"


def test_a_verdict_lost_with_the_link_is_learnt_from_the_resume_answer() -> None:
    """The destination's verdict matched and its guest runs (perhaps moved on since), but the
    verdict never reached the source: the answer to its resume says so, instead of a loop of
    resends that nobody handles and that keeps the source from an operator's settle."""
    pair, _ = paused_postcopy()
    src = pair.src
    src.recover(pair.now)
    src.poll(pair.now)
    src.take_outgoing()
    answer = framing.envelope(
        src.session_id, 0, resume_ack=pb.ResumeAck(epoch=src.link.epoch, guest_running=True)
    )
    answer.epoch = src.link.epoch
    src.receive(framing.encode(answer), pair.now)
    assert src.phase is SourcePhase.COMPLETED and src.verified is True
    assert pair.src_host.resumes == 0


def test_only_a_session_whose_guest_runs_there_unbroken_is_remembered_as_handed_over() -> None:
    pair, _ = paused_postcopy()
    dst = pair.dst
    dst.take_outgoing()
    dst.admission.taken_back("the operator settled here", pair.now)
    assert dst.phase is DestPhase.FAILED
    assert dst.take_outgoing() == [], "the source said it runs the guest: nothing to tell it back"
    assert pair.src.session_id not in dst.handed_over_sessions(), "its copy stopped: never 'runs there'"


@pytest.mark.parametrize("mode", ["precopy", "postcopy"])
def test_a_guest_taken_back_upstream_is_stopped_on_the_node_it_was_sent_on_to(mode: str) -> None:
    """B sends on to C the guest it got from A; A's operator takes it back: B stops its copy and
    withdraws the onward migration, and C stops (or never starts) its copy too."""
    if mode == "postcopy":
        pair = pageless_postcopy()
    else:
        pair = Pair(busy_guest(seed=4), MigrationParameters(max_bandwidth=1 << 20))
        pair.src.start(pair.now)
        pair.run_until(lambda: pair.dst.phase is DestPhase.RECEIVING and pair.src.phase is SourcePhase.ACTIVE)
    pair.src.withdraw(pair.now, "the guest was taken back by the node it came from")
    assert pair.src.phase is SourcePhase.CANCELLED
    pair.run_until(lambda: pair.dst.phase is DestPhase.FAILED, 5.0)
    assert pair.dst.phase is DestPhase.FAILED and pair.dst_host.discarded == 1
    assert pair.dst.failure is not None and "the source took the guest back" in pair.dst.failure.reason


def test_an_answer_that_comes_after_the_source_gave_up_still_settles_the_handover() -> None:
    """Committed, then unsettled (nothing came back in its reconnect window); the destination's
    answer to its last resume, that the guest runs there, arrives late: it settles the handover
    instead of leaving it to an operator."""
    params = MigrationParameters(peer_timeout_s=0.4, heartbeat_interval_s=0.1, reconnect_timeout_s=1.0)
    pair = Pair(busy_guest(seed=4), params)
    pair.up.cut_when = lambda: pair.dst.phase is DestPhase.RUNNING
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase is SourcePhase.UNSETTLED, 30.0)
    src = pair.src
    assert src.phase is SourcePhase.UNSETTLED and pair.dst.phase is DestPhase.RUNNING
    assert (
        src.failure is not None
        and src.failure.code == pb.ERROR_TIMEOUT
        and "ctl settle" in src.failure.reason
    )
    assert [e.status for e in pair.events if isinstance(e, Finished)] == ["unsettled"], "the daemon hears it"
    total = src.report(pair.now)["total_time_ms"]
    assert src.report(pair.now + 60.0)["total_time_ms"] == total, "the clock stopped when it gave up"
    late = framing.envelope(
        src.session_id, 0, resume_ack=pb.ResumeAck(epoch=src.link.epoch, guest_running=True)
    )
    late.epoch = src.link.epoch
    src.receive(framing.encode(late), pair.now)
    assert src.phase is SourcePhase.COMPLETED and pair.src_host.resumes == 0
    report = src.report(pair.now)
    assert report["status"] == "completed" and report["error"] is None, "the trouble is history now"
