"""The source session on its own: its verbs, its link rules and its refusals, fed by hand."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from common.constants import PROTOCOL_VERSION, RECONNECT_BACKOFF_S
from common.protocol.events import Reconnect
from common.protocol.params import MigrationParameters
from common.protocol.phases import SourcePhase
from common.protocol.source import SourceSession
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import FakeSourceHost, busy_guest

PARAMS = MigrationParameters(peer_timeout_s=1.0, heartbeat_interval_s=0.25, reconnect_timeout_s=4.0)


def sent(src: SourceSession) -> list[framing.Message]:
    return [framing.decode(o.frames) for o in src.take_outgoing()]


def from_dest(src: SourceSession, seq: int, received: int = 0, epoch: int = 1, **body: Any) -> list[Any]:
    env = framing.envelope(src.session_id, seq, **body)
    env.epoch = epoch
    env.received = received
    return framing.encode(env)


def started(params: MigrationParameters = PARAMS) -> tuple[SourceSession, FakeSourceHost]:
    host = FakeSourceHost()
    src = SourceSession(busy_guest(), host, params, 0.0)
    src.start(0.0)
    [hello] = sent(src)
    assert hello.kind == "hello" and hello.envelope.seq == 1
    return src, host


def active(params: MigrationParameters = PARAMS) -> tuple[SourceSession, FakeSourceHost]:
    src, host = started(params)
    ack = pb.HelloAck(
        accepted=True, protocol_version=PROTOCOL_VERSION, initial_credit=2, features=[pb.FEATURE_LZ4]
    )
    src.receive(from_dest(src, 1, received=1, hello_ack=ack), 0.01)
    assert src.phase is SourcePhase.ACTIVE and src.params.window == 2
    sent(src)
    return src, host


def test_the_verbs_refuse_what_makes_no_sense() -> None:
    src, _ = started()
    with pytest.raises(RuntimeError, match="already started"):
        src.start(0.1)
    with pytest.raises(RuntimeError, match="nothing to settle"):
        src.settle(True, 0.1)
    idle = SourceSession(busy_guest(), FakeSourceHost(), PARAMS, 0.0)
    idle.receive(from_dest(idle, 1, heartbeat=pb.Heartbeat()), 0.0)
    idle.poll(10.0)
    assert idle.phase is SourcePhase.IDLE and sent(idle) == []
    assert idle.next_deadline(1.0) >= 3601.0


def test_setup_resends_the_hello_and_gives_up_after_the_peer_timeout() -> None:
    src, _ = started(MigrationParameters(peer_timeout_s=3.0, retransmit_after_s=1.0))
    src.poll(0.5)
    assert sent(src) == [], "no heartbeat during setup: the hello is the one"
    src.poll(1.1)
    [again] = sent(src)
    assert again.kind == "hello" and again.envelope.seq == 1
    src.poll(3.1)
    assert src.phase is SourcePhase.FAILED
    assert "no answer from the destination within 3.0 s (is dest-node listening there?)" in src.failure.reason  # type: ignore[union-attr]


def test_refusals_during_setup_that_mean_a_lost_hello_are_not_failures() -> None:
    src, _ = started()
    refusal = framing.encode(
        framing.envelope(b"", 0, abort=pb.Abort(code=pb.ERROR_WRONG_SESSION, reason="no session"))
    )
    src.receive(refusal, 0.1)
    assert src.phase is SourcePhase.SETUP
    damaged = framing.encode(framing.envelope(b"", 0, abort=pb.Abort(code=pb.ERROR_CHECKSUM, reason="bad")))
    src.receive(damaged, 0.2)
    assert src.phase is SourcePhase.SETUP and [m.kind for m in sent(src)] == ["hello"]
    busy = framing.encode(framing.envelope(b"", 0, abort=pb.Abort(code=pb.ERROR_BUSY, reason="busy")))
    src.receive(busy, 0.3)
    assert src.phase is SourcePhase.FAILED and src.failure.reason == "destination refused: busy"  # type: ignore[union-attr]


def test_heartbeats_keep_a_quiet_link_alive_and_deadlines_say_when() -> None:
    src, _ = active()
    src.precopy.pass_ = None  # nothing to send: only the link's own traffic remains
    src.digests.refresh()
    assert src.next_deadline(0.02) == pytest.approx(0.01 + 0.25)
    src.poll(0.2)
    assert sent(src) == []
    src.poll(0.27)
    [beat] = sent(src)
    assert beat.kind == "heartbeat" and beat.envelope.seq == 0 and beat.envelope.received == 1


def test_a_silent_destination_is_reconnected_to_with_backoff_then_given_up() -> None:
    src, host = active()
    src.precopy.pass_ = None
    src.poll(1.02)
    [event] = [e for e in src.take_events() if isinstance(e, Reconnect)]
    assert event.epoch == 2 and event.silent_for_s == pytest.approx(1.01)
    resumes = []
    t = 1.02
    while src.phase is not SourcePhase.FAILED and t < 6:
        for m in sent(src):
            if m.kind == "resume":
                resumes.append(round(t, 2))
                assert m.envelope.resume.epoch == 2 and m.envelope.resume.last_received == 1
        t += 0.01
        src.poll(t)
    first, cap = RECONNECT_BACKOFF_S
    gaps = [b - a for a, b in itertools.pairwise(resumes)]
    assert gaps[:4] == pytest.approx([first, 2 * first, 4 * first, 8 * first], abs=0.011)
    assert max(gaps) == pytest.approx(cap, abs=0.011)
    assert src.phase is SourcePhase.FAILED and host.resumes == 0  # the guest never stopped
    assert t == pytest.approx(4.02, abs=0.02), "gives up once silent for the reconnect timeout"
    assert "silent for 4.0 s, reconnecting for 4.0 s did not bring it back" in src.failure.reason  # type: ignore[union-attr]


def test_the_link_rules_of_the_source() -> None:
    src, _ = active()
    src.receive(from_dest(src, 0, received=1, resume=pb.Resume(epoch=2)), 0.02)
    assert src.phase is SourcePhase.FAILED and "only a source resumes" in src.failure.reason  # type: ignore[union-attr]
    src, _ = active()
    src.receive(from_dest(src, 0, received=1, end_of_round=pb.EndOfRound()), 0.02)
    assert "end_of_round without a sequence number" in src.failure.reason  # type: ignore[union-attr]
    src, _ = active()
    src.receive(from_dest(src, 0, received=1, ack=pb.Ack(resend_from=src.link.next_seq + 1)), 0.02)
    assert "asked for message" in src.failure.reason and "never sent" in src.failure.reason  # type: ignore[union-attr]
    src, _ = active()
    other = framing.encode(framing.envelope(b"another!", 2, heartbeat=pb.Heartbeat()))
    src.receive(other, 0.02)
    assert src.failure.code == pb.ERROR_WRONG_SESSION  # type: ignore[union-attr]


def test_a_repeat_is_acknowledged_again_and_not_handled() -> None:
    src, _ = active()
    src.receive(from_dest(src, 1, received=1, hello_ack=pb.HelloAck(accepted=False)), 0.02)
    assert src.phase is SourcePhase.ACTIVE
    [ack] = [m for m in sent(src) if m.kind == "ack"]
    assert ack.envelope.received == 1


def test_new_parameters_take_effect_and_keep_the_granted_window() -> None:
    src, _ = active()
    src.set_parameters(MigrationParameters(max_bandwidth=1 << 20, downtime_limit_ms=42), 0.02)
    assert src.params.window == 2 and src.params.downtime_limit_ms == 42
    assert src.bucket.rate == 1 << 20


def test_cancel_is_refused_after_the_commit() -> None:
    src, host = active()
    src.guest_stopped = True
    src.machine.phase = SourcePhase.COMMITTING
    with pytest.raises(RuntimeError, match="too late to cancel"):
        src.cancel(0.1)
    # the destination says it holds no session of ours: the guest can only be here, so it runs
    refusal = framing.encode(
        framing.envelope(b"", 0, abort=pb.Abort(code=pb.ERROR_WRONG_SESSION, reason="no session"))
    )
    src.receive(refusal, 0.2)
    assert src.phase is SourcePhase.FAILED and host.resumes == 1
    assert "it does not run the guest, so it runs here again" in src.failure.reason  # type: ignore[union-attr]


# -- each rule at its edge ------------------------------------------------------------------------
def test_a_fresh_source_reports_that_nothing_happened_yet() -> None:
    src = SourceSession(busy_guest(), FakeSourceHost(), PARAMS, 3.0)
    report = src.report(4.0)
    assert report["status"] == "active" and report["phase"] == "idle" and report["total_time_ms"] == 1000.0
    assert report["setup_time_ms"] is None and report["downtime_ms"] is None
    assert src.guest_runs_here


def test_the_guest_runs_here_until_it_stops_or_is_handed_over() -> None:
    src, _ = active()
    assert src.guest_runs_here is True
    src.guest_stopped = True
    assert src.guest_runs_here is False
    src.guest_stopped = False
    src.machine.phase = SourcePhase.COMPLETED
    assert src.guest_runs_here is False


def test_silence_short_of_each_limit_is_tolerated() -> None:
    src, _ = started(MigrationParameters(peer_timeout_s=2.0, retransmit_after_s=5.0))
    src.poll(1.999)
    assert src.phase is SourcePhase.SETUP, "just before the limit: not yet"
    src.poll(2.0)
    assert src.phase is SourcePhase.FAILED, "a deadline reached is acted on"
    live, _ = active()
    live.precopy.pass_ = None
    live.poll(1.0099)  # heard at 0.01: just before the peer timeout
    assert live.connected and not [e for e in live.take_events() if isinstance(e, Reconnect)]
    live.poll(1.01)
    assert not live.connected
    assert any(
        event.startswith("link lost, reconnecting (epoch 2; silent for ") for event, _ in live.timeline
    )
    live.poll(4.0099)  # just before the reconnect timeout
    assert live.phase is SourcePhase.ACTIVE
    live.poll(4.01)
    assert live.phase is SourcePhase.FAILED and live.t_end == 4.01
    finished = [e for e in live.take_events() if hasattr(e, "status")]
    assert [f.status for f in finished] == ["failed"]
    assert live.guest_runs_here


def test_a_heartbeat_is_due_exactly_one_interval_after_the_last_message() -> None:
    src, _ = active()
    src.precopy.pass_ = None
    src.digests.refresh()
    src.poll(0.26)  # 0.01 + 0.25: due now
    assert [m.kind for m in sent(src)] == ["heartbeat"]


def test_unacknowledged_messages_wake_the_source_to_resend_them() -> None:
    src, _ = active(
        MigrationParameters(peer_timeout_s=10.0, reconnect_timeout_s=20.0, retransmit_after_s=1.0)
    )
    src.poll(0.02)  # the first batches go out
    assert src.link.unacked
    src.digests.refresh()
    progress = src.link.t_progress
    assert src.next_deadline(0.03) == pytest.approx(min(progress + 1.0, src.link.t_last_sent + 0.5))
    src.poll(progress + 1.01)
    kinds = [m.kind for m in sent(src)]
    assert kinds and kinds[0] in ("ram_pages", "tag_sections"), "sent again"
    src.poll(progress + 1.5)
    assert not [m for m in sent(src) if m.envelope.seq], "the retransmission clock restarted"


def test_the_destinations_resend_requests_are_taken_from_its_acks() -> None:
    src, _ = active()
    src.poll(0.02)
    sent(src)
    top = src.link.next_seq - 1
    src.receive(from_dest(src, 0, received=1, ack=pb.Ack(resend_from=top + 1)), 0.04)
    assert src.phase is SourcePhase.ACTIVE, "asking for the next message is asking for nothing yet"
    src.receive(from_dest(src, 0, received=1, ack=pb.Ack(resend_from=top + 2)), 0.05)
    assert src.phase is SourcePhase.FAILED and "never sent" in src.failure.reason  # type: ignore[union-attr]


def test_lz4_is_used_only_when_both_sides_want_it() -> None:
    for offered, wanted, used in ((True, True, True), (False, True, False), (True, False, False)):
        host = FakeSourceHost()
        src = SourceSession(busy_guest(), host, MigrationParameters(use_lz4=wanted), 0.0)
        src.start(0.0)
        sent(src)
        features = [pb.FEATURE_LZ4] if offered else []
        ack = pb.HelloAck(
            accepted=True, protocol_version=PROTOCOL_VERSION, initial_credit=4, features=features
        )
        src.receive(from_dest(src, 1, received=1, hello_ack=ack), 0.01)
        assert src._use_lz4 is used


def test_a_refused_hello_fails_with_the_destinations_reason_and_no_abort() -> None:
    src, _ = started()
    ack = pb.HelloAck(accepted=False, code=pb.ERROR_UNAUTHORIZED, reason="bad token")
    src.receive(from_dest(src, 1, received=1, hello_ack=ack), 0.01)
    assert src.phase is SourcePhase.FAILED and src.failure.code == pb.ERROR_UNAUTHORIZED  # type: ignore[union-attr]
    assert src.failure.reason == "destination refused the migration: bad token"  # type: ignore[union-attr]
    plain, _ = started()
    plain.receive(from_dest(plain, 1, received=1, hello_ack=pb.HelloAck(accepted=False, reason="no")), 0.01)
    assert plain.failure.code == pb.ERROR_FEATURE_MISMATCH  # type: ignore[union-attr]


def test_an_abort_from_the_destination_is_not_answered_and_resumes_the_guest() -> None:
    src, _ = active()
    src.poll(0.02)
    sent(src)
    src.receive(
        from_dest(src, 2, received=1, abort=pb.Abort(code=pb.ERROR_INTERNAL, reason="disk full")), 0.05
    )
    assert src.phase is SourcePhase.FAILED and src.failure.reason == "destination aborted: disk full"  # type: ignore[union-attr]
    assert [m.kind for m in sent(src) if m.kind == "abort"] == []
    assert src.t_end == 0.05 and src.guest_runs_here


def test_a_failure_after_the_guest_stopped_resumes_it_once() -> None:
    src, host = active()
    src.host.stop_guest()
    src.guest_stopped = True
    src.cancel(0.1, "enough")
    assert host.resumes == 1 and src.guest_stopped is False and src.guest_runs_here
    assert src.phase is SourcePhase.CANCELLED and src.t_end == 0.1
    assert [(e.status, e.reason) for e in src.take_events() if hasattr(e, "status")] == [
        ("cancelled", "enough")
    ]
    assert [m.kind for m in sent(src)][-1] == "abort"


def test_a_resume_answer_for_the_current_attempt_restores_the_link() -> None:
    src, _ = active(
        MigrationParameters(peer_timeout_s=1.0, heartbeat_interval_s=0.25, reconnect_timeout_s=4.0)
    )
    src.poll(0.02)
    sent(src)
    src.poll(1.1)
    assert not src.connected and src.link.epoch == 2
    stale = from_dest(src, 0, epoch=2, resume_ack=pb.ResumeAck(epoch=1, last_received=1))
    src.receive(stale, 1.2)
    assert not src.connected, "an answer to an earlier attempt"
    good = from_dest(src, 0, epoch=2, resume_ack=pb.ResumeAck(epoch=2, last_received=0))
    src.receive(good, 1.3)
    assert src.connected
    assert any(event == "link restored (epoch 2)" for event, _ in src.timeline)
    again = [m for m in sent(src) if m.envelope.seq]
    assert again and again[0].envelope.seq == 2, "everything after what it holds, again"
    assert src.link.t_progress == 1.3
    src.receive(good, 1.4)
    assert [m for m in sent(src) if m.envelope.seq] == [], "a repeated answer changes nothing"


def test_every_phase_change_is_an_event_and_rounds_say_how_many_pages() -> None:
    src, _ = active()
    events = src.take_events()
    assert [e.phase for e in events if hasattr(e, "phase")] == ["setup", "active"]
    first = [e for e in events if hasattr(e, "data_pages")]
    mem = src.mem
    assert (first[0].data_pages, first[0].tag_pages) == (
        int(mem.data_populated.sum()),
        int((mem.data_populated | mem.tags_populated).sum()),  # kvm: every backed page's tags
    )


def test_zero_pages_and_untagged_pages_add_up_over_the_first_round() -> None:
    src, _ = active()
    # never-written pages are skipped, not sent as zero marks: both sides count only the wire
    assert src.stats.skipped_pages == src.mem.page_count - int(src.mem.data_populated.sum())
    assert src.stats.skipped_tag_pages == src.mem.page_count - int(
        (src.mem.data_populated | src.mem.tags_populated).sum()
    )
    before_zero, before_untagged = src.stats.zero_pages, src.stats.untagged_pages
    assert before_zero == 0 and before_untagged == 0
    while src.precopy.pass_ is not None:
        src.poll(0.02)
        for m in sent(src):
            if m.envelope.seq:
                src.receive(from_dest(src, 0, received=1, ack=pb.Ack()), 0.02)
        src.link.acknowledged(src.link.next_seq - 1, 0.02)
    assert src.stats.zero_pages >= before_zero and src.stats.untagged_pages >= before_untagged
