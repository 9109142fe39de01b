"""Edges of the destination session that the mutation run found unwatched: resumes, the
hello's answer, the first failure, messages out of place; each pins one behaviour a wrong
comparison or a dropped statement in common/protocol would change."""

from __future__ import annotations

import pytest

from common.protocol.dest import DestParameters, DestSession
from common.protocol.phases import DestPhase
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import FakeDestHost, good_hello
from tests.test_dest_session import PEER, frames, receiving, replies


@pytest.mark.parametrize("where", ["resume", "envelope"])
def test_a_resume_releases_what_it_acknowledges_and_counts_as_hearing_the_source(where: str) -> None:
    """Either acknowledgement a resume carries releases the hello's answer; the resume itself
    is the source heard (its silence ends)."""
    dst, _ = receiving()
    assert [e.seq for e in dst.link.unacked] == [1]
    resume = pb.Resume(epoch=2, last_received=1 if where == "resume" else 0)
    env = framing.envelope(dst.session_id, 0, resume=resume)
    env.epoch = 2
    env.received = 1 if where == "envelope" else 0
    dst.receive(PEER + b"-2", framing.encode(env), 5.0)
    assert dst.link.epoch == 2 and not dst.link.unacked, "nothing left to resend"
    assert dst.link.silence(5.0) == 0.0


def test_a_fresh_resume_forgets_what_was_held_for_the_old_connection() -> None:
    dst, _ = receiving()
    dst.reorder.hold(5, "a batch ahead, from the old connection", 0.0, batch=True, size=10)
    env = framing.envelope(dst.session_id, 0, resume=pb.Resume(epoch=2, last_received=1))
    env.epoch = 2
    dst.receive(PEER + b"-2", framing.encode(env), 1.0)
    assert dst.link.epoch == 2 and not dst.reorder.held, "the source sends all of it again"


def test_the_first_failure_stands() -> None:
    dst, host = receiving()
    dst.cancel(1.0, "first reason")
    assert dst.phase is DestPhase.FAILED and host.discarded == 1
    dst._fail(pb.ERROR_TIMEOUT, "a later reason", 2.0)
    assert dst.failure is not None and dst.failure.reason == "first reason" and host.discarded == 1


def test_a_page_manifest_in_a_precopy_migration_ends_it() -> None:
    dst, _ = receiving()
    dst.receive(PEER, frames(2, page_manifest=pb.PageDigests()), 1.0)
    assert dst.phase is DestPhase.FAILED and "page manifest in a precopy migration" in str(dst.failure)


def test_a_taken_back_word_from_an_older_connection_is_ignored() -> None:
    dst, host = receiving()
    env = framing.envelope(dst.session_id, 0, resume=pb.Resume(epoch=3, last_received=1))
    env.epoch = 3
    dst.receive(PEER + b"-3", framing.encode(env), 1.0)
    old = framing.envelope(dst.session_id, 0, abort=pb.Abort(code=pb.ERROR_GUEST_TAKEN_BACK, reason="old"))
    old.epoch = 2
    dst.receive(PEER + b"-2", framing.encode(old), 1.5)
    assert dst.phase is DestPhase.RECEIVING and host.discarded == 0


@pytest.mark.parametrize("mode", [pb.MODE_PRECOPY, pb.MODE_POSTCOPY])
def test_the_hello_answer_grants_postcopy_only_to_a_postcopy_migration(mode: int) -> None:
    host = FakeDestHost()
    dst = DestSession(host, DestParameters(), 0.0)
    features = [pb.FEATURE_MTE, pb.FEATURE_VERIFY, pb.FEATURE_POSTCOPY]
    dst.receive(PEER, frames(1, hello=good_hello(mode=mode, features=features)), 0.0)
    [(_, answer)] = replies(dst)
    granted = pb.FEATURE_POSTCOPY in answer.envelope.hello_ack.features
    assert answer.envelope.hello_ack.accepted and granted == (mode == pb.MODE_POSTCOPY)
    assert answer.envelope.hello_ack.channels == 0, "one connection: no parallel channels granted"


def test_a_resume_claiming_a_message_never_sent_is_refused_and_changes_nothing() -> None:
    dst, host = receiving()
    env = framing.envelope(dst.session_id, 0, resume=pb.Resume(epoch=2, last_received=dst.link.next_seq))
    env.epoch = 2
    dst.receive(PEER + b"-2", framing.encode(env), 1.0)
    [(_, answer)] = replies(dst)
    assert answer.kind == "abort" and "never sent" in answer.envelope.abort.reason
    assert dst.phase is DestPhase.RECEIVING and dst.link.epoch == 1 and host.discarded == 0


def parallel_receiving() -> DestSession:
    dst, _ = receiving(features=[pb.FEATURE_MTE, pb.FEATURE_VERIFY, pb.FEATURE_MULTI_CHANNEL], channels=2)
    assert dst.channels == 2
    return dst


def test_a_batch_ahead_on_parallel_channels_is_held_and_counted_as_a_batch() -> None:
    dst = parallel_receiving()
    dst.receive(PEER + b"D\x01", frames(3, ram_pages=pb.RamPages()), 0.5)
    assert dst.reorder.batches == 1
    dst.receive(PEER, frames(4, end_of_round=pb.EndOfRound(round=1)), 0.5)
    assert sorted(dst.reorder.held) == [3, 4] and dst.reorder.batches == 1


def test_only_the_granted_channels_of_the_source_count_as_its_own() -> None:
    dst = parallel_receiving()
    assert dst.admission.from_source(PEER + b"D\x01")
    assert not dst.admission.from_source(PEER + b"D\x00"), "channel 0 is the connection itself"
    assert not dst.admission.from_source(PEER + b"D\x02"), "only two were granted"
