"""The limits a peer cannot push past, each on its own: answers to refusals per second, the
destination's intake per loop turn (its source first), frames per message, the RAM a hello
may claim, the protocol version of every message after the hello."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq
from structlog.testing import capture_logs

from common.constants import (
    MAX_FRAME_BYTES,
    MAX_FRAMES_PER_MESSAGE,
    PROTOCOL_VERSION,
    READS_PER_TURN,
    REFUSAL_ANSWERS_PER_S,
    REFUSAL_LOG_LINES_PER_S,
    STRANGER_MESSAGES_PER_TURN,
)
from common.control import request
from common.protocol import events as ev
from common.protocol.dest import DestParameters, DestSession
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from dest_node.daemon import DestDaemon, DestOptions
from dest_node.reading import receive_one
from tests.e2e import SMALL_GUEST, Dest, run_source
from tests.protocol_harness import Faults, Pair, altered, busy_guest, good_hello


def test_a_flood_of_bad_messages_gets_a_bounded_number_of_answers() -> None:
    pair = Pair(busy_guest(seed=2))
    dst = pair.dst
    dst.take_outgoing()
    for i in range(10 * REFUSAL_ANSWERS_PER_S):
        dst.receive(b"stranger", [b"not a message %d" % i], pair.now)
    assert dst.refused_messages == 10 * REFUSAL_ANSWERS_PER_S, "every one is counted"
    assert len(dst.take_outgoing()) == REFUSAL_ANSWERS_PER_S, "but only so many are answered each second"
    dst.receive(b"stranger", [b"one more"], pair.now + 1.0)
    assert len(dst.take_outgoing()) == 1, "a second later, answers again"


def test_bad_hellos_too_get_a_bounded_number_of_answers() -> None:
    pair = Pair(busy_guest(seed=2))
    dst = pair.dst
    for i in range(3 * REFUSAL_ANSWERS_PER_S):
        env = framing.envelope(b"s%07d" % i, 1, hello=good_hello(page_size=8192))
        dst.receive(b"stranger-%d" % i, framing.encode(env), pair.now)
    assert dst.refused_messages == 3 * REFUSAL_ANSWERS_PER_S
    assert len(dst.take_outgoing()) == REFUSAL_ANSWERS_PER_S


def test_the_ram_a_hello_may_claim_is_the_destinations_choice() -> None:
    pair = Pair(busy_guest(seed=2), dest_params=DestParameters(max_ram_bytes=4 << 20))
    pair.run(max_seconds=5)
    assert pair.dst.guest is None, "nothing allocated"
    assert pair.src.failure is not None
    assert "exceeds this destination's limit of 4 MiB (dest-node --max-ram)" in pair.src.failure.reason


def receiving() -> tuple[Pair, DestSession]:
    """A pair whose destination has just opened the session (its stream capped, so that the
    migration is still under way whatever the harness's turns)."""
    pair = Pair(busy_guest(seed=2), MigrationParameters(max_bandwidth=1 << 20))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.session_id != b"", max_seconds=5)
    return pair, pair.dst


def test_every_message_after_the_hello_must_speak_our_version() -> None:
    pair, dst = receiving()
    before = dst.refused_messages
    env = framing.envelope(dst.session_id, 0, heartbeat=pb.Heartbeat())
    env.protocol_version = PROTOCOL_VERSION + 1
    dst.receive(dst.peer or b"", framing.encode(env), pair.now)
    assert dst.refused_messages == before + 1
    reasons = [e.reason for e in dst.take_events() if isinstance(e, ev.Refused)]
    assert reasons and f"protocol version {PROTOCOL_VERSION + 1} is not supported" in reasons[-1]


def test_a_session_belongs_to_the_key_that_opened_it() -> None:
    pair, dst = receiving()
    before = dst.refused_messages
    env = framing.envelope(dst.session_id, 0, heartbeat=pb.Heartbeat())
    dst.receive(dst.peer or b"", framing.encode(env), pair.now, peer_key=b"K" * 40)
    assert dst.refused_messages == before + 1, "the same connection name, another key: refused"
    reasons = [e.reason for e in dst.take_events() if isinstance(e, ev.Refused)]
    assert reasons[-1] == "this session belongs to another source's key"
    assert dst.phase.value == "receiving", "the session itself carries on"


def daemon(tmp_path: Path) -> DestDaemon:
    return DestDaemon(DestOptions(listen=f"ipc://{tmp_path}/dest.sock", params=DestParameters()))


def drain_once(dest: DestDaemon) -> None:
    dest.reader.drain(dest.session)


def queued(dest: DestDaemon, count: int) -> None:
    deadline = time.monotonic() + 5
    while not dest.sock.poll(10) and time.monotonic() < deadline:
        pass
    time.sleep(0.2)  # all `count` queued at the destination


def test_a_turn_reads_its_sources_message_first_and_only_a_few_of_strangers(tmp_path: Path) -> None:
    dest = daemon(tmp_path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    strangers = [ctx.socket(zmq.DEALER) for _ in range(3)]
    source = ctx.socket(zmq.DEALER)
    try:
        # before any session everyone is a stranger: a turn reads them all (up to its cap)
        for sock in strangers:
            sock.connect(dest.address)
            for i in range(10):
                sock.send(b"garbage %d" % i)
        queued(dest, 30)
        drain_once(dest)
        assert dest.session.refused_messages == 30
        # with a session, a turn reads a few of the strangers' messages and drops the rest unread
        dest.session.session_id = b"sess0001"
        for sock in strangers:
            for i in range(30):
                sock.send(b"garbage %d" % i)
        queued(dest, 90)
        before = dest.session.refused_messages
        drain_once(dest)
        assert dest.session.refused_messages - before == STRANGER_MESSAGES_PER_TURN
        assert dest.refusals.dropped_unlogged == READS_PER_TURN - STRANGER_MESSAGES_PER_TURN
        # and the source's own message is read in the next turn, behind whatever strangers queue
        source.setsockopt(zmq.ROUTING_ID, b"sess0001" + (1).to_bytes(4, "big"))
        source.connect(dest.address)
        source.send(b"our source's message")
        time.sleep(0.3)
        dest.session.take_events()
        before = dest.session.refused_messages
        drain_once(dest)
        refused = [e.peer for e in dest.session.take_events() if isinstance(e, ev.Refused)]
        assert refused and refused[-1].startswith(b"sess0001"), "the source's message was read this turn"
        assert dest.session.refused_messages - before <= STRANGER_MESSAGES_PER_TURN + 1
    finally:
        for sock in [*strangers, source]:
            sock.close(linger=0)
        ctx.term()
        dest.sock.close(linger=0)
        dest.ctx.term()


def test_a_message_of_too_many_frames_is_refused_unread(tmp_path: Path) -> None:
    dest = daemon(tmp_path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stranger = ctx.socket(zmq.DEALER)
    try:
        stranger.connect(dest.address)
        stranger.send_multipart([b"x"] * 10_000)
        dest.sock.poll(5000)
        _, frames = receive_one(dest.sock) or (b"", [])
        assert len(frames) == MAX_FRAMES_PER_MESSAGE + 1, (
            "frames past the limit are read and dropped, not kept"
        )
        stranger.send_multipart([b"x"] * 10_000)
        dest.sock.poll(5000)
        drain_once(dest)
        assert dest.session.refused_messages == 1
        events = dest.session.take_events()
        assert any(f"more than {MAX_FRAMES_PER_MESSAGE} frames" in getattr(e, "reason", "") for e in events)
    finally:
        stranger.close(linger=0)
        ctx.term()
        dest.sock.close(linger=0)
        dest.ctx.term()


def says_ok(env: pb.Envelope) -> None:
    """A destination that answers 'ok' whatever it holds: its digests are not the source's."""
    env.verify_result.ok = True
    env.verify_result.destination.ram_digest = b"\x00" * len(
        env.verify_result.destination.ram_digest or b"x" * 16
    )


lying_ok = altered("verify_result", says_ok)


def test_the_source_checks_the_digests_itself_before_committing() -> None:
    pair = Pair(busy_guest(seed=3), to_source=Faults(tamper=lying_ok)).run(max_seconds=20)
    assert pair.src.phase is SourcePhase.FAILED
    assert pair.src.failure is not None and "its digests differ from ours" in pair.src.failure.reason
    assert pair.src.report(pair.now)["verification"]["ok"] is False
    assert pair.src_host.resumes >= 1 and pair.dst.phase is not DestPhase.RUNNING, "the guest stays here"


def test_a_postcopy_destination_claiming_a_match_it_lacks_is_never_called_completed() -> None:
    pair = Pair(
        busy_guest(seed=3),
        params=MigrationParameters(postcopy=True, postcopy_after_rounds=0),
        to_source=Faults(tamper=lying_ok),
    )
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase.ended, max_seconds=20)
    assert pair.src.phase is SourcePhase.UNSETTLED, pair.src.phase
    assert pair.src.failure is not None and "differs from ours" in pair.src.failure.reason
    assert pair.src_host.resumes == 0, "postcopy never resumes the source's guest"
    assert pair.src.report(pair.now)["verification"]["ok"] is False, "its word is not taken for a match"
    assert "'ctl recover' if the destination lives on" in pair.src.failure.reason, "a postcopy's advice"


def test_refused_hellos_are_logged_a_few_a_second_then_counted(tmp_path: Path) -> None:
    dest = daemon(tmp_path)
    try:
        with capture_logs() as logs:
            for i in range(30):
                dest.refusals.refused(ev.Refused(b"p%d" % i, f"bad hello {i}", hello=True))
            dest.refusals.flush(final=True)
    finally:
        dest.sock.close(linger=0)
        dest.ctx.term()
    lines = [entry for entry in logs if entry["event"] == "source refused"]
    assert [entry["reason"] for entry in lines] == [f"bad hello {i}" for i in range(REFUSAL_LOG_LINES_PER_S)]
    counted = [entry for entry in logs if entry["event"] == "messages refused"]
    assert sum(entry["count"] for entry in counted) == 30 - REFUSAL_LOG_LINES_PER_S and len(counted) <= 2


def test_a_message_past_the_sockets_size_limit_never_reaches_the_daemon(tmp_path: Path) -> None:
    """libzmq drops the connection of a peer whose frame passes MAXMSGSIZE, before the daemon
    holds any of it; the next peer is read as usual."""
    dest = daemon(tmp_path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    big, small = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        big.connect(dest.address)
        big.send(bytes(MAX_FRAME_BYTES + 1))
        time.sleep(0.5)
        assert receive_one(dest.sock) is None, "the oversized frame was never delivered"
        small.connect(dest.address)
        small.send(b"x" * 100)
        assert dest.sock.poll(5000)
        received = receive_one(dest.sock)
        assert received is not None and bytes(received[1][0].buffer) == b"x" * 100
    finally:
        big.close(linger=0)
        small.close(linger=0)
        ctx.term()
        dest.sock.close(linger=0)
        dest.ctx.term()


@pytest.mark.slow
def test_dest_node_max_ram_bounds_what_a_hello_may_claim(tmp_path: Path) -> None:
    dest = Dest(tmp_path, "--stop-at-step", "0", "--max-ram", "8MiB")
    try:
        src = run_source(tmp_path, *SMALL_GUEST, "--stop-at-step", "0", "--migrate-to", dest.uri, timeout=60)
        status = request(dest.control, "status")["result"]
    finally:
        dest.kill()
    assert src.code == 1 and src.report["guest"]["here"] is True
    assert "exceeds this destination's limit of 8 MiB (dest-node --max-ram)" in src.report["error"]
    assert status["phase"] == "waiting" and status["guest"] is None
