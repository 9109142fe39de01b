"""The destination session on its own: fed messages by hand, with the time, so that each of its
rules (silence, heartbeats, resumes, refusals, resends) is seen doing its job."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from common.guest.memory import GuestMemory
from common.guest.pagehash import row_digests
from common.protocol import events as ev
from common.protocol.dest import DestParameters, DestSession
from common.protocol.events import LinkRestored
from common.protocol.phases import DestPhase
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.bitmap import encode_bitmap
from common.wire.codec import encode_postcopy_pages, encode_ram_pages, encode_tag_sections
from tests.protocol_harness import FakeDestHost, good_hello

SESSION = b"s" * 8
PEER = b"peer-1"


def frames(
    seq: int, epoch: int = 1, received: int = 0, session: bytes = SESSION, payload: bytes = b"", **body: Any
) -> list[Any]:
    env = framing.envelope(session, seq, **body)
    env.epoch = epoch
    env.received = received
    return framing.encode(env, payload)


def replies(dst: DestSession) -> list[tuple[bytes, framing.Message]]:
    return [(peer, framing.decode(f)) for peer, f in dst.take_outgoing()]


def receiving(params: DestParameters | None = None, **hello_changes: Any) -> tuple[DestSession, FakeDestHost]:
    host = FakeDestHost()
    dst = DestSession(host, params or DestParameters(), 0.0)
    dst.receive(PEER, frames(1, hello=good_hello(**hello_changes)), 0.0)
    assert dst.phase is DestPhase.RECEIVING
    [(_, ack)] = replies(dst)
    assert ack.kind == "hello_ack" and ack.envelope.seq == 1
    return dst, host


def test_a_silent_source_is_given_its_reconnect_timeout_then_discarded() -> None:
    dst, host = receiving(DestParameters(peer_timeout_s=1.0), reconnect_timeout_ms=4000)
    assert dst.keep_for_s == 4.0
    dst.poll(3.9)
    assert dst.phase is DestPhase.RECEIVING
    dst.poll(4.1)
    assert dst.phase is DestPhase.FAILED and host.discarded == 1
    assert dst.failure is not None and dst.failure.code == pb.ERROR_TIMEOUT
    assert "source silent for 4.1 s (it had 4.0 s to reconnect)" in dst.failure.reason


def test_without_a_reconnect_timeout_the_peer_timeout_holds() -> None:
    dst, _ = receiving(DestParameters(peer_timeout_s=1.5))
    assert dst.keep_for_s == 1.5
    dst.poll(1.6)
    assert dst.phase is DestPhase.FAILED


def test_a_quiet_destination_sends_heartbeats_and_sleeps_until_the_next() -> None:
    dst, _ = receiving(DestParameters(heartbeat_interval_s=0.5, peer_timeout_s=10.0))
    assert dst.next_deadline(0.1) == 0.5  # the first heartbeat is due half a second after the hello_ack
    dst.poll(0.4)
    assert replies(dst) == []
    dst.poll(0.5)
    [(peer, beat)] = replies(dst)
    assert peer == PEER and beat.kind == "heartbeat" and beat.envelope.seq == 0
    assert dst.next_deadline(0.6) == 1.0


def test_a_waiting_destination_has_nothing_to_do() -> None:
    dst = DestSession(FakeDestHost(), DestParameters(), 0.0)
    assert dst.next_deadline(5.0) >= 5.0 + 3600
    dst.poll(100.0)
    assert dst.phase is DestPhase.WAITING and replies(dst) == []


def test_a_hello_must_open_its_session() -> None:
    dst = DestSession(FakeDestHost(), DestParameters(), 0.0)
    dst.receive(PEER, frames(2, hello=good_hello()), 0.0)
    [(_, ack)] = replies(dst)
    assert not ack.envelope.hello_ack.accepted and "must be message 1" in ack.envelope.hello_ack.reason
    assert dst.refused_messages == 1 and dst.guest is None


def test_the_populated_hint_is_prefaulted() -> None:
    hint = np.zeros(256, dtype=np.bool_)
    hint[[3, 7, 200]] = True
    _, host = receiving(populated_hint_lz4=encode_bitmap(hint))
    assert host.prefault_hint.tolist() == [3, 7, 200]  # type: ignore[attr-defined]


def test_the_epoch_of_the_hello_is_the_sessions() -> None:
    host = FakeDestHost()
    dst = DestSession(host, DestParameters(), 0.0)
    dst.receive(PEER, frames(1, epoch=3, hello=good_hello()), 0.0)
    assert dst.link.epoch == 3
    dst.receive(PEER, frames(2, epoch=2, heartbeat=pb.Heartbeat()), 0.0)
    assert dst.link.received == 1, "a message of an older epoch is stale"


def test_a_resume_moves_the_session_to_the_new_connection_and_resends_what_is_missing() -> None:
    dst, _ = receiving()
    dst.receive(PEER, frames(2, end_of_round=pb.EndOfRound(round=1, final=True)), 0.1)
    replies(dst)
    dst.receive(b"peer-2", frames(0, epoch=2, resume=pb.Resume(epoch=2, last_received=0)), 0.2)
    out = replies(dst)
    assert [(p, m.kind) for p, m in out] == [(b"peer-2", "resume_ack"), (b"peer-2", "hello_ack")]
    ack = out[0][1].envelope.resume_ack
    assert ack.epoch == 2 and ack.last_received == 2 and not ack.guest_running
    assert dst.peer == b"peer-2" and dst.link.epoch == 2 and dst.link.stats.resumes == 1
    assert any(isinstance(e, LinkRestored) and e.epoch == 2 for e in dst.take_events())
    # the old connection is left behind: what still comes on it changes nothing
    dst.receive(PEER, frames(3, epoch=1, end_of_round=pb.EndOfRound(round=9)), 0.3)
    assert dst.link.received == 2 and dst.rounds == 1
    assert [(p, m.kind) for p, m in replies(dst)] == [(PEER, "abort")]
    # the same resume again (a retry) moves nothing and counts no second resume
    dst.receive(b"peer-2", frames(0, epoch=2, resume=pb.Resume(epoch=2, last_received=1)), 0.3)
    assert dst.link.stats.resumes == 1
    assert [m.kind for _, m in replies(dst)] == ["resume_ack"]


def test_a_resume_that_claims_too_much_or_comes_late_is_refused() -> None:
    dst, _ = receiving()
    dst.receive(b"peer-2", frames(0, epoch=2, resume=pb.Resume(epoch=2, last_received=5)), 0.1)
    [(peer, refusal)] = replies(dst)
    assert peer == b"peer-2" and refusal.kind == "abort" and "never sent" in refusal.envelope.abort.reason
    assert dst.peer == PEER and dst.link.epoch == 1
    dst.cancel(0.2)
    replies(dst)
    dst.receive(b"peer-2", frames(0, epoch=2, resume=pb.Resume(epoch=2, last_received=1)), 0.3)
    [(_, late)] = replies(dst)
    assert late.envelope.abort.code == pb.ERROR_WRONG_SESSION and "discarded" in late.envelope.abort.reason


def test_a_running_destination_says_so_when_its_source_resumes() -> None:
    dst, host = receiving()
    dst.receive(PEER, frames(2, end_of_round=pb.EndOfRound(round=1, final=True)), 0.1)
    dst.phase  # noqa: B018 - the machine moves only through the protocol below
    dst.machine.move(DestPhase.AWAIT_COMMIT)
    dst.receive(PEER, frames(3, commit=pb.Commit()), 0.2)
    assert dst.phase is DestPhase.RUNNING and host.started is not None
    replies(dst)
    dst.receive(b"peer-2", frames(0, epoch=2, resume=pb.Resume(epoch=2, last_received=1)), 0.3)
    out = replies(dst)
    assert out[0][1].envelope.resume_ack.guest_running is True
    assert [m.kind for _, m in out[1:]] == ["started"], "the Started it lost is sent again"


def test_link_messages_must_be_unsequenced_ones() -> None:
    dst, _ = receiving()
    dst.receive(PEER, frames(0, resume_ack=pb.ResumeAck(epoch=1)), 0.1)
    assert dst.phase is DestPhase.FAILED and "resume_ack without a sequence number" in dst.failure.reason  # type: ignore[union-attr]
    dst2, _ = receiving()
    dst2.receive(PEER, frames(0, commit=pb.Commit()), 0.1)
    assert dst2.phase is DestPhase.FAILED and "commit without a sequence number" in dst2.failure.reason  # type: ignore[union-attr]


def test_the_source_asks_for_a_resend() -> None:
    dst, _ = receiving()
    dst.receive(PEER, frames(0, ack=pb.Ack(resend_from=1)), 0.1)
    assert [m.kind for _, m in replies(dst)] == ["hello_ack"] and dst.link.stats.resent == 1
    dst.receive(PEER, frames(0, ack=pb.Ack(resend_from=9)), 0.2)
    assert dst.phase is DestPhase.FAILED and "asked for message 9, never sent" in dst.failure.reason  # type: ignore[union-attr]


def test_an_ack_of_a_reply_never_sent_fails_the_session() -> None:
    dst, _ = receiving()
    dst.receive(PEER, frames(2, received=5, end_of_round=pb.EndOfRound(round=1)), 0.1)
    assert dst.phase is DestPhase.FAILED and "acknowledged message 5, never sent" in dst.failure.reason  # type: ignore[union-attr]


def test_damage_from_our_source_is_asked_for_again_and_from_a_stranger_refused() -> None:
    dst, _ = receiving()
    good = frames(2, end_of_round=pb.EndOfRound(round=1))
    damaged = [bytes(good[0][:-1]) + bytes([good[0][-1] ^ 1])]
    dst.receive(PEER, damaged, 0.1)
    [(peer, ask)] = replies(dst)
    assert peer == PEER and ask.envelope.ack.resend_from == 2 and dst.link.stats.corrupt == 1
    assert dst.phase is DestPhase.RECEIVING and dst.refused_messages == 0
    dst.receive(b"stranger", damaged, 0.2)
    [(peer, refusal)] = replies(dst)
    assert peer == b"stranger" and refusal.envelope.abort.code == pb.ERROR_CHECKSUM
    assert dst.refused_messages == 1


def test_the_stop_marker_is_taken_once() -> None:
    dst, _ = receiving()
    dst.receive(PEER, frames(2, end_of_round=pb.EndOfRound(round=1)), 0.1)
    assert not dst.source_stopped and dst.rounds == 1
    dst.receive(PEER, frames(3, end_of_round=pb.EndOfRound(round=2, final=True)), 0.2)
    assert dst.source_stopped and dst.t_stop_seen == 0.2 and dst.rounds == 2
    dst.receive(PEER, frames(4, end_of_round=pb.EndOfRound(round=3, final=True)), 0.3)
    assert dst.t_stop_seen == 0.2


def test_an_abort_from_the_source_is_not_answered_and_a_cancel_is() -> None:
    dst, host = receiving()
    dst.receive(PEER, frames(2, abort=pb.Abort(code=pb.ERROR_CANCELLED, reason="bye")), 0.1)
    assert dst.phase is DestPhase.FAILED and host.discarded == 1 and dst.t_end == 0.1
    assert [m.kind for _, m in replies(dst)] == []
    assert dst.report(0.2)["status"] == "cancelled" and dst.report(0.2)["error"] == "source aborted: bye"
    dst2, _ = receiving()
    dst2.cancel(0.1, "operator says no")
    [(_, abort)] = replies(dst2)
    assert abort.envelope.abort.reason == "operator says no" and abort.envelope.seq == 2


# -- each rule at its edge ------------------------------------------------------------------------
def batch(seq: int, kind: str, pages: list[int], zero: list[int] = ()) -> list[Any]:  # type: ignore[assignment]
    """Pages (or tag sections) with a marked byte, and zero (or untagged) ones, from our source
    after its hello_ack arrived."""
    if kind == "ram_pages":
        table, column, value, encode = np.zeros((256, 4096), np.uint8), 7, 1, encode_ram_pages
    else:
        table, column, value, encode = np.zeros((256, 128), np.uint8), 3, 0x21, encode_tag_sections
    table[pages, column] = value
    body, payload, _ = encode(table, np.asarray(sorted([*pages, *zero]), dtype=np.int64), use_lz4=False)
    return frames(seq, received=1, payload=bytes(payload), **{kind: body})


def test_a_fresh_destination_reports_nothing_yet() -> None:
    dst = DestSession(FakeDestHost(), DestParameters(), 5.0)
    report = dst.report(7.0)
    assert report["status"] == "none" and report["phase"] == "waiting" and report["rounds"] == 0
    assert report["total_time_ms"] == 2000.0 and report["setup_time_ms"] is None
    assert report["downtime_ms"] is None and report["refused_messages"] == 0
    assert report["verification"]["ok"] is None and report["ram"]["guest_bytes"] == 0
    with pytest.raises(RuntimeError, match="no incoming migration to cancel"):
        dst.cancel(7.0)


def test_placed_pages_and_tags_are_counted_acknowledged_and_hashed() -> None:
    dst, _ = receiving()
    dst.receive(PEER, batch(2, "ram_pages", [3, 4], zero=[9]), 0.5)
    [(_, ack)] = replies(dst)
    assert ack.kind == "ack" and ack.envelope.received == 2
    assert dst.t_first_data == 0.5
    dst.receive(PEER, batch(3, "tag_sections", [3], zero=[5, 6]), 0.7)
    [(_, ack)] = replies(dst)
    assert ack.envelope.received == 3
    assert dst.t_first_data == 0.5, "the first batch sets it, once"
    assert (dst.stats.pages, dst.stats.zero_pages) == (3, 1)
    assert (dst.stats.tag_sections, dst.stats.untagged_pages) == (3, 2)
    assert dst.guest is not None and dst.guest.memory.pages[3, 7] == 1
    # the digests checked on arrival are the verification's leaves: nothing left to hash
    assert dst.digests is not None and dst.digests.stale_pages == 0
    assert dst.digests.ram.of(3, 2).tolist() == row_digests(dst.guest.memory.pages[3:5]).tolist()
    assert dst.digests.tags.of(3, 1)[0] == row_digests(dst.guest.memory.page_tags[3:4])[0]
    report = dst.report(1.0)
    assert report["setup_time_ms"] == 500.0 and report["total_time_ms"] == 1000.0


def test_a_repeated_message_is_acknowledged_again_and_not_placed_twice() -> None:
    dst, _ = receiving()
    dst.receive(PEER, batch(2, "ram_pages", [3]), 0.5)
    replies(dst)
    dst.receive(PEER, batch(2, "ram_pages", [3]), 0.6)
    [(_, ack)] = replies(dst)
    assert ack.kind == "ack" and ack.envelope.received == 2
    assert dst.stats.pages == 1


def test_a_page_damaged_in_transit_is_not_placed_and_its_batch_is_asked_for_again() -> None:
    dst, _ = receiving()
    good = batch(2, "ram_pages", [3, 4, 5])
    damaged = bytearray(good[1])
    damaged[4096 + 7] ^= 0x40  # page 4's marked byte: the header and its checksum are intact
    dst.receive(PEER, [good[0], bytes(damaged)], 0.5)
    [(_, ask)] = replies(dst)
    assert ask.kind == "ack" and ask.envelope.ack.resend_from == 2, "not delivered: send it again"
    assert dst.phase is DestPhase.RECEIVING and dst.link.stats.corrupt == 1
    mem = dst.guest.memory if dst.guest is not None else None
    assert mem is not None and mem.pages[4, 7] != 1, "what landed is the damaged copy ..."
    # ... hashed again (as every page from it on) unless the resend places it first; the page
    # before it landed as its digest says and has its leaf
    assert mem.pages[3, 7] == 1 and dst.digests is not None
    assert dst.digests.ram.of(3, 1)[0] == row_digests(mem.pages[3:4])[0]
    assert dst.digests.ram.stale[[4, 5]].all() and not dst.digests.ram.stale[3]
    assert dst.stats.pages == 0 and dst.link.received == 1
    dst.receive(PEER, good, 0.6)  # the resend
    [(_, ack)] = replies(dst)
    assert ack.envelope.received == 2 and mem.pages[4, 7] == 1 and mem.pages[5, 7] == 1
    assert dst.digests.stale_pages == 0 and dst.digests.ram.of(4, 1)[0] == row_digests(mem.pages[4:5])[0]


def test_the_hello_sets_the_epoch_and_the_compression_it_offered() -> None:
    host = FakeDestHost()
    dst = DestSession(host, DestParameters(), 0.0)
    env = framing.envelope(SESSION, 1, hello=good_hello(features=[pb.FEATURE_MTE, pb.FEATURE_VERIFY]))
    env.epoch = 0
    dst.receive(PEER, framing.encode(env), 0.25)
    [(_, ack)] = replies(dst)
    assert dst.link.epoch == 1 and dst.t_hello == 0.25
    assert pb.FEATURE_LZ4 not in ack.envelope.hello_ack.features
    lz4, _ = receiving(features=[pb.FEATURE_MTE, pb.FEATURE_VERIFY, pb.FEATURE_LZ4])
    assert lz4.use_lz4


def test_our_source_saying_hello_again_gets_its_answer_again_and_a_stranger_a_busy_refusal() -> None:
    dst, _ = receiving()
    dst.receive(PEER, frames(1, hello=good_hello()), 0.5)
    [(peer, again)] = replies(dst)
    assert peer == PEER and again.kind == "hello_ack" and again.envelope.hello_ack.accepted
    dst.receive(b"other", frames(1, session=b"t" * 8, hello=good_hello()), 0.6)
    [(peer, busy)] = replies(dst)
    assert peer == b"other" and not busy.envelope.hello_ack.accepted
    assert busy.envelope.hello_ack.code == pb.ERROR_BUSY and dst.refused_messages == 1
    dst.receive(b"other", frames(1, hello=good_hello()), 0.7)  # our session id, another peer
    [(peer, busy)] = replies(dst)
    assert peer == b"other" and busy.envelope.hello_ack.code == pb.ERROR_BUSY and dst.refused_messages == 2


def test_our_peer_with_another_session_is_refused_and_changes_nothing() -> None:
    dst, _ = receiving()
    dst.receive(PEER, batch(2, "ram_pages", [3]), 0.5)
    replies(dst)
    dst.take_events()
    dst.receive(PEER, frames(3, session=b"t" * 8, end_of_round=pb.EndOfRound(round=1)), 0.6)
    # refused and counted, but not answered: under our source's connection name, an answer
    # would reach our source as this side's verdict (a stranger posing as it could end it)
    assert replies(dst) == []
    [refused] = [e for e in dst.take_events() if isinstance(e, ev.Refused)]
    assert refused.peer == PEER and "no migration session of yours" in refused.reason and not refused.hello
    assert dst.rounds == 0 and dst.phase is DestPhase.RECEIVING and dst.refused_messages == 1


def test_a_message_out_of_place_fails_the_session_and_says_why() -> None:
    dst, host = receiving()
    dst.receive(PEER, frames(2, commit=pb.Commit()), 0.5)
    assert dst.phase is DestPhase.FAILED and host.discarded == 1
    assert "unexpected commit from the source in phase receiving" in dst.failure.reason  # type: ignore[union-attr]
    events = dst.take_events()
    assert [e.status for e in events if hasattr(e, "status")] == ["failed"]
    dst2, _ = receiving()
    dst2.receive(PEER, frames(2, verify_request=pb.VerifyRequest(attempt=1)), 0.5)
    assert "verify_request before the source stopped its guest" in dst2.failure.reason  # type: ignore[union-attr]


def test_our_answers_are_sent_again_until_acknowledged() -> None:
    dst, _ = receiving(DestParameters(retransmit_after_s=1.0, heartbeat_interval_s=5.0, peer_timeout_s=20.0))
    assert dst.next_deadline(0.1) == 1.0, "the hello_ack waits for its ack"
    dst.poll(0.9)
    assert replies(dst) == []
    dst.poll(1.01)
    [(_, again)] = replies(dst)
    assert again.kind == "hello_ack" and again.envelope.seq == 1
    assert dst.link.t_last_sent == 1.01
    dst.poll(1.5)
    assert replies(dst) == [], "the clock restarted with the resend"
    dst.receive(PEER, frames(2, received=1, end_of_round=pb.EndOfRound(round=1)), 1.6)
    replies(dst)
    assert not dst.link.unacked and dst.next_deadline(1.7) == 6.6


def test_silence_short_of_the_limit_is_tolerated() -> None:
    dst, _ = receiving(DestParameters(peer_timeout_s=2.0))
    dst.poll(1.999)
    assert dst.phase is DestPhase.RECEIVING
    dst.poll(2.0)
    assert dst.phase is DestPhase.FAILED, "a deadline reached is acted on"


def test_a_cancel_tells_the_source_and_reports_cancelled() -> None:
    dst, _ = receiving()
    dst.cancel(0.5, "enough")
    [(_, abort)] = replies(dst)
    assert abort.kind == "abort" and abort.envelope.abort.code == pb.ERROR_CANCELLED
    finished = [e for e in dst.take_events() if hasattr(e, "status")]
    assert [(e.status, e.reason) for e in finished] == [("cancelled", "enough")]
    assert dst.report(0.6)["status"] == "cancelled"
    with pytest.raises(RuntimeError):
        dst.cancel(0.7)


def test_a_test_build_corrupts_exactly_one_byte_of_its_page_once() -> None:
    dst, _ = receiving(DestParameters(corrupt_page=4))
    dst.receive(PEER, batch(2, "ram_pages", [3, 4]), 0.5)
    mem = dst.guest.memory  # type: ignore[union-attr]
    assert mem.pages[4, 100] == 0xFF and mem.pages[4, 7] == 1 and mem.pages[3, 100] == 0
    dst.receive(PEER, batch(3, "ram_pages", [4]), 0.6)
    assert mem.pages[4, 100] == 0, "only once: the resend repairs it"


def test_every_phase_change_is_an_event() -> None:
    dst, _ = receiving()
    phases = [e.phase for e in dst.take_events() if hasattr(e, "phase")]
    assert phases == ["receiving"]


def test_control_bytes_are_counted() -> None:
    dst, _ = receiving()
    sent = dst.stats.other_bytes
    assert sent > 0
    dst.poll(0.6)  # a heartbeat
    assert dst.stats.other_bytes > sent


# -- postcopy, message by message -----------------------------------------------------------------
def postcopy_running(recover_ms: int = 3000) -> tuple[DestSession, GuestMemory, int]:
    """A postcopy destination whose guest runs, missing pages 3 and 4 (the source wrote them);
    returns the session, the source's memory and the next sequence number."""
    from common.guest.digest import page_manifest

    dst, _ = receiving(
        DestParameters(peer_timeout_s=1.0),
        mode=pb.MODE_POSTCOPY,
        features=[pb.FEATURE_MTE, pb.FEATURE_VERIFY, pb.FEATURE_POSTCOPY],
        postcopy_recover_timeout_ms=recover_ms,
    )
    src = GuestMemory(1 << 20)
    src.pages[[3, 4], 9] = 0x5A
    src.page_tags[[3, 4], 0] = 0x21
    src.data_populated[[3, 4]] = src.tags_populated[[3, 4]] = True
    ram, tags = page_manifest(src)
    manifest = pb.PageDigests(first_page=0, ram_digests=ram.tobytes(), tag_digests=tags.tobytes())
    dst.receive(PEER, frames(2, received=1, page_manifest=manifest), 0.1)
    dst.receive(PEER, frames(3, received=1, end_of_round=pb.EndOfRound(round=1, final=True)), 0.1)
    dst.receive(PEER, frames(4, received=1, postcopy_start=pb.PostcopyStart(page_count=256)), 0.1)
    assert dst.phase is DestPhase.POSTCOPY and dst.postcopy is not None
    assert dst.postcopy.missing() == 2
    return dst, src, 5


def answer(src: GuestMemory, pages: list[int], seq: int, requested: bool) -> list[Any]:
    body, payload, _ = encode_postcopy_pages(
        src.pages, src.page_tags[pages], np.asarray(pages, dtype=np.int64), use_lz4=False, requested=requested
    )
    return frames(seq, received=1, payload=payload, postcopy_pages=body)


def test_after_the_stop_a_postcopy_destination_waits_as_long_as_the_source_may_recover() -> None:
    dst, _, _ = postcopy_running(recover_ms=3000)
    assert dst.keep_for_s == 3.0, "the source's postcopy recovery timeout, in seconds"


def test_an_urgent_answer_is_placed_unacknowledged_and_a_stream_batch_acknowledged() -> None:
    dst, src, seq = postcopy_running()
    replies(dst)
    before = dst.stats.ram_bytes
    urgent = answer(src, [3], 0, requested=True)
    dst.receive(PEER, urgent, 0.2)
    assert replies(dst) == [], "urgent answers are unsequenced: nothing to acknowledge"
    assert dst.postcopy is not None and dst.postcopy.present[3] and dst.postcopy.requested_pages == 1
    size = sum(len(bytes(f)) for f in urgent)  # the whole message, as the source counts it
    assert dst.stats.ram_bytes - before == size and dst.stats.postcopy_bytes == size
    dst.receive(PEER, answer(src, [4], seq, requested=False), 0.3)
    kinds = [m.kind for _, m in replies(dst)]
    assert kinds[0] == "ack", "a stream batch is acknowledged with the flow control"
    assert "received_bitmap" in kinds, "every page present: the destination says it is complete"
    assert dst.postcopy.complete and dst.guest is not None and dst.guest.memory.gate is None


def test_a_quiet_postcopy_destination_says_again_what_it_holds_after_the_retransmit_time() -> None:
    dst, _, _ = postcopy_running()
    replies(dst)
    dst.receive(PEER, frames(0, received=5, ack=pb.Ack()), 0.1)  # bitmap acked
    rto = dst.link.rto_s
    dst.poll(0.1 + rto / 2)
    assert "received_bitmap" not in [m.kind for _, m in replies(dst)]
    dst.poll(0.1 + rto * 1.5)
    assert "received_bitmap" in [m.kind for _, m in replies(dst)]


def test_a_running_destination_resends_started_once_per_retransmit_time() -> None:
    dst, _ = receiving(DestParameters(retransmit_after_s=1.0, heartbeat_interval_s=5.0, peer_timeout_s=20.0))
    dst.receive(PEER, frames(2, received=1, end_of_round=pb.EndOfRound(round=1, final=True)), 0.1)
    dst.machine.move(DestPhase.AWAIT_COMMIT)  # the verification is another test's
    dst.receive(PEER, frames(3, received=1, commit=pb.Commit()), 0.2)
    assert dst.phase is DestPhase.RUNNING
    replies(dst)
    assert dst.next_deadline(0.3) == 1.2, "Started waits for its acknowledgement"
    dst.poll(1.25)
    assert [m.kind for _, m in replies(dst)] == ["started"]
    dst.poll(1.3)
    assert replies(dst) == [], "the clock restarted with the resend"
    assert dst.next_deadline(1.3) == 2.25


def test_a_postcopy_resume_on_a_new_connection_says_again_what_is_here() -> None:
    dst, _, _ = postcopy_running()
    replies(dst)
    dst.receive(b"peer-2", frames(0, epoch=2, resume=pb.Resume(epoch=2, last_received=1)), 0.5)
    kinds = [m.kind for _, m in replies(dst)]
    assert kinds[0] == "resume_ack" and "received_bitmap" in kinds, "the source sends the rest"
    dst.receive(b"peer-2", frames(0, epoch=2, resume=pb.Resume(epoch=2, last_received=3)), 0.6)
    assert "received_bitmap" not in [m.kind for _, m in replies(dst)], "the same attempt again: no new bitmap"


def test_a_malformed_stream_batch_in_postcopy_is_refused_acknowledged_and_asked_for_again() -> None:
    dst, src, seq = postcopy_running()
    replies(dst)
    body, payload, _ = encode_postcopy_pages(
        src.pages, src.page_tags[[3]], np.asarray([3], dtype=np.int64), use_lz4=False, requested=False
    )
    dst.receive(PEER, frames(seq, received=1, payload=payload[:-7], postcopy_pages=body), 0.2)
    assert dst.phase is DestPhase.POSTCOPY and dst.refused_messages == 1 and dst.last_refusal
    out = [m for _, m in replies(dst)]
    assert out[0].kind == "ack" and out[0].envelope.received == seq, "the stream goes on"
    [request] = [m for m in out if m.kind == "page_request"]
    assert list(request.envelope.page_request.page_index) == [3]
    assert dst.postcopy is not None and not dst.postcopy.present[3]


def test_a_fault_while_the_guest_runs_here_in_postcopy_is_refused_never_a_discard() -> None:
    dst, _, seq = postcopy_running()
    host_discards = dst.host.discarded  # type: ignore[attr-defined]
    dst.receive(PEER, frames(seq, received=1, commit=pb.Commit()), 0.2)
    assert dst.phase is DestPhase.POSTCOPY and dst.refused_messages == 1
    assert dst.last_refusal is not None and dst.last_refusal.endswith(
        "(refused; the guest keeps running here)"
    )
    assert dst.host.discarded == host_discards and dst.failure is None  # type: ignore[attr-defined]


def test_the_postcopy_verdict_ends_the_session_at_that_moment() -> None:
    dst, src, seq = postcopy_running()
    for page in (3, 4):
        dst.receive(PEER, answer(src, [page], 0, requested=True), 0.2)
    pc = dst.postcopy
    assert pc is not None and pc.complete
    request = pb.VerifyRequest(
        attempt=1, source=pb.GuestDigests(ram_digest=pc.digest(), vcpu_digest=pc.vcpu_digest)
    )
    dst.receive(PEER, frames(seq, received=1, verify_request=request), 0.75)
    assert dst.phase is DestPhase.RUNNING and dst.verified is True and dst.t_end == 0.75
    assert dst.report(9.0)["total_time_ms"] == 750.0, "from the hello to the verdict, not to now"
