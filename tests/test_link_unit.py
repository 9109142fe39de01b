"""The link's bookkeeping, one rule at a time, on a hand-driven clock."""

from __future__ import annotations

import pytest

from common.constants import MAX_RAM_BYTES, MAX_VCPUS, MIN_RAM_BYTES, PROTOCOL_VERSION
from common.protocol.handshake import check_hello, source_hello
from common.protocol.link import Arrival, Link, Reconnector
from common.protocol.params import MigrationParameters
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import busy_guest


def test_every_message_carries_its_number_the_epoch_and_what_was_received() -> None:
    link = Link(b"s", 0.0, rto_s=1.0)
    link.arrive(1)
    link.arrive(2)
    link.epoch = 3
    first = framing.decode(link.sequenced(0.0, commit=pb.Commit())).envelope
    second = framing.decode(link.sequenced(0.0, commit=pb.Commit())).envelope
    beat = framing.decode(link.unsequenced(0.0, heartbeat=pb.Heartbeat())).envelope
    assert (first.seq, second.seq, beat.seq) == (1, 2, 0)
    assert first.received == second.received == beat.received == 2
    assert first.epoch == beat.epoch == 3 and first.session_id == b"s"
    assert [e.seq for e in link.unacked] == [1, 2] and link.next_seq == 3


def test_the_retransmission_clock_starts_with_the_first_unacknowledged_message() -> None:
    link = Link(b"s", 0.0, rto_s=1.0)
    assert link.retransmit_at() is None, "nothing unacknowledged, nothing to resend"
    link.sequenced(5.0, commit=pb.Commit())
    link.sequenced(5.8, commit=pb.Commit())  # a second one does not restart the clock
    assert link.retransmit_at() == 6.0
    link.restart_retransmit_clock(6.01)
    assert link.retransmit_at() == 7.01


def test_an_acknowledgement_releases_what_it_covers_and_restarts_the_clock() -> None:
    link = Link(b"s", 0.0, rto_s=1.0)
    for t in (1.0, 1.1, 1.2):
        link.sequenced(t, commit=pb.Commit())
    released = link.acknowledged(2, 1.5)
    assert [e.seq for e in released] == [1, 2] and [e.seq for e in link.unacked] == [3]
    assert link.peer_received == 2 and link.t_progress == 1.5
    assert link.acknowledged(1, 1.6) == [] and link.peer_received == 2 and link.t_progress == 1.5
    with pytest.raises(ValueError, match="acknowledged message 4, never sent"):
        link.acknowledged(4, 1.7)
    link.acknowledged(3, 1.8)
    assert not link.unacked


def test_resends_are_everything_unacknowledged_past_a_point_and_are_counted() -> None:
    link = Link(b"s", 0.0, rto_s=1.0)
    for _ in range(4):
        link.sequenced(0.0, commit=pb.Commit())
    assert [e.seq for e in link.to_resend(2)] == [3, 4] and link.stats.resent == 2
    assert [e.seq for e in link.to_resend(0)] == [1, 2, 3, 4] and link.stats.resent == 6
    entry = link.unacked[2]
    again = framing.decode(link.again(entry)).envelope
    assert again.seq == 3 and again.WhichOneof("body") == "commit"


def test_a_loss_is_asked_for_once_until_a_timeout_passes() -> None:
    link = Link(b"s", 0.0, rto_s=1.0)
    link.arrive(1)
    assert link.arrive(3) is Arrival.AHEAD
    assert link.should_ask_resend(10.0)
    assert link.should_ask_resend(10.5) is False
    assert link.should_ask_resend(11.0), "asked again once the first request may have been lost"
    assert link.stats.resend_requests == 2
    assert link.arrive(2) is Arrival.NEXT
    assert link.arrive(4) is Arrival.AHEAD
    assert link.should_ask_resend(11.02), "a new loss is asked for at once"


def test_a_lost_first_message_is_asked_for_at_once_even_early_on() -> None:
    link = Link(b"s", 0.0, rto_s=1.0)
    assert link.arrive(2) is Arrival.AHEAD
    assert link.should_ask_resend(0.5), "nothing was asked before: no timeout to wait for"
    assert not link.should_ask_resend(0.6)


def test_any_message_sent_counts_as_a_sign_of_life() -> None:
    link = Link(b"s", 0.0, rto_s=1.0)
    assert link.t_last_sent == 0.0
    link.sequenced(2.0, commit=pb.Commit())
    assert link.t_last_sent == 2.0, "no heartbeat is due while data flows"
    link.unsequenced(3.0, heartbeat=pb.Heartbeat())
    assert link.t_last_sent == 3.0


def test_stale_is_an_older_epoch_only() -> None:
    link = Link(b"s", 0.0, rto_s=1.0)
    link.epoch = 2
    env = pb.Envelope(epoch=1)
    assert link.stale(env)
    env.epoch = 2
    assert not link.stale(env)
    env.epoch = 3
    assert not link.stale(env)
    assert link.new_epoch() == 3 and link.stats.resumes == 1


def test_silence_and_data_in_flight() -> None:
    link = Link(b"s", 2.0, rto_s=1.0)
    assert link.silence(5.0) == 3.0
    link.sequenced(2.0, b"x", data=("indices", 1), ram_pages=pb.RamPages())
    link.sequenced(2.0, commit=pb.Commit())
    assert link.data_in_flight() == 1
    assert link.unacked[0].body is None and link.unacked[1].body == pb.Commit()


def test_reconnect_attempts_back_off_to_a_cap() -> None:
    r = Reconnector(0.1, 1.0)
    assert r.connected and not r.resume_due(0.0)
    r.broken(10.0)
    assert not r.connected
    times = [t / 1000 for t in range(10000, 15000) if r.resume_due(t / 1000)]
    assert times[:5] == pytest.approx([10.0, 10.1, 10.3, 10.7, 11.5], abs=0.006)
    assert times[5] - times[4] == pytest.approx(1.0, abs=0.006) and times[6] - times[5] == pytest.approx(
        1.0, abs=0.011
    )
    r.restored()
    assert r.connected and not r.resume_due(100.0)
    r.broken(200.0)
    assert r.resume_due(200.0) and r.attempts == 1, "a new break starts the backoff again"
    r.restored()
    r.broken(200.01)  # broken again before the old backoff's next attempt was due
    assert r.resume_due(200.01), "a new break resumes at once"


def test_the_hello_carries_the_reconnect_timeout_in_milliseconds() -> None:
    hello = source_hello(busy_guest(), MigrationParameters(reconnect_timeout_s=7.5), "n")
    assert hello.reconnect_timeout_ms == 7500 and hello.node_name == "n"
    assert hello.protocol_version == PROTOCOL_VERSION
    assert set(hello.features) == {pb.FEATURE_MTE, pb.FEATURE_LZ4, pb.FEATURE_VERIFY}
    plain = source_hello(busy_guest(), MigrationParameters(use_lz4=False), "n")
    assert pb.FEATURE_LZ4 not in plain.features


@pytest.mark.parametrize("ram", [MIN_RAM_BYTES, MAX_RAM_BYTES])
@pytest.mark.parametrize("vcpus", [1, MAX_VCPUS])
def test_a_hello_at_every_limit_is_accepted(ram: int, vcpus: int) -> None:
    hello = pb.Hello(
        protocol_version=PROTOCOL_VERSION,
        page_size=4096,
        granule_size=16,
        ram_bytes=ram,
        features=[pb.FEATURE_MTE, pb.FEATURE_VERIFY],
        mode=pb.MODE_PRECOPY,
        vcpu_count=vcpus,
    )
    assert check_hello(hello, b"") is None
    hello.auth_token = b"right"
    assert check_hello(hello, b"right") is None
    assert check_hello(hello, b"wrong")[0] == pb.ERROR_UNAUTHORIZED  # type: ignore[index]


def test_a_retransmission_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="retransmission timeout must be positive"):
        MigrationParameters(retransmit_after_s=0).check()
    assert MigrationParameters(retransmit_after_s=0.01).check().retransmit_after_s == 0.01
    assert MigrationParameters(peer_timeout_s=3, reconnect_timeout_s=3).check().reconnect_timeout_s == 3
