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
    return [framing.decode(f) for f in src.take_outgoing()]


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
    assert ack.envelope.ack.acked_seq == 1


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
