"""Edges of the two sessions that the mutation run found unwatched: each test pins one behaviour
that a wrong comparison or a dropped statement in common/protocol would change, and says why
the behaviour matters to a user."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from common.constants import MAX_CHANNELS, REFUSAL_ANSWERS_PER_S
from common.protocol import phases
from common.protocol.dest import DestParameters, DestSession
from common.protocol.dest_admission import REMEMBERED_HANDOVERS, HandedOver
from common.protocol.handshake import check_hello, source_hello
from common.protocol.params import SETTABLE, MigrationParameters, describe_parameters
from common.protocol.phases import DestPhase, SourcePhase
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import (
    FakeDestHost,
    Faults,
    Pair,
    bulk_numbering,
    busy_guest,
    capped_precopy,
)


def test_only_a_finished_or_operator_bound_source_phase_has_ended() -> None:
    """`ended` decides whether a daemon may exit while an onward migration runs: a phase that
    still talks to its destination has not ended."""
    ended = {phase for phase in SourcePhase if phase.ended}
    assert ended == {phase for phase in SourcePhase if phase.terminal} | {SourcePhase.UNSETTLED}
    assert SourcePhase.COMPLETED.ended is True and SourcePhase.ACTIVE.ended is False


def test_each_batch_is_counted_on_the_channel_it_came_over_and_nothing_else_is() -> None:
    seen = Faults(tamper=lambda message: None)  # the link reads every message's kind
    pair = Pair(busy_guest(seed=3), to_dest=seen).run()
    assert pair.src.phase is SourcePhase.COMPLETED
    batches = sum(kind in framing.BATCH_KINDS for kind in pair.down.kinds)
    assert batches > 0 and pair.dst.channel_batches == [batches]


def test_one_batch_always_fits_the_bandwidth_cap() -> None:
    """A cap below 20 MiB/s makes a window of the rate smaller than a batch: the bucket still
    holds one whole batch, or the first batch of every window would wait."""
    pair = Pair(busy_guest(), MigrationParameters(max_bandwidth=1 << 20))
    assert pair.src.bucket.burst == 1 << 20


def test_changing_only_the_bandwidth_tells_the_destination_no_new_timeouts() -> None:
    """The destination is told the reconnect timeouts again only when they change, and only
    while the migration still talks to it."""
    seen = Faults(tamper=lambda message: None)
    guest = busy_guest(seed=3, working_set=4 << 20)
    pair = Pair(guest, MigrationParameters(max_bandwidth=1 << 20), to_dest=seen)
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase is DestPhase.RECEIVING)
    pair.src.set_parameters(replace(pair.src.params, max_bandwidth=2 << 20), pair.now)
    pair.run_until(lambda: False, 0.2)
    assert "link_timeouts" not in pair.down.kinds
    pair.src.set_parameters(replace(pair.src.params, reconnect_timeout_s=33.0), pair.now)
    pair.run_until(lambda: False, 0.2)
    assert pair.down.kinds.count("link_timeouts") == 1
    pair.run_until(pair.settled)
    assert pair.src.phase is SourcePhase.COMPLETED
    pair.src.set_parameters(replace(pair.src.params, reconnect_timeout_s=44.0), pair.now)
    assert pair.src.take_outgoing() == [], "after the end nobody is listening"


class FailingStop(Exception):
    pass


def test_a_host_error_at_the_switchover_fails_the_migration_and_the_guest_runs_here() -> None:
    pair = Pair(busy_guest(seed=3))

    def stop_fails() -> None:
        raise FailingStop("the vCPU thread did not stop")

    pair.src_host.stop_guest = stop_fails  # type: ignore[method-assign]
    pair.run()
    failure = pair.src.failure
    assert pair.src.phase is SourcePhase.FAILED and failure is not None
    assert failure.code == pb.ERROR_INTERNAL and "the source failed handling" in failure.reason
    assert "the vCPU thread did not stop" in failure.reason
    assert pair.src_host.running, "the guest never left this side"
    dst_failure = pair.dst.failure
    assert pair.dst.phase is DestPhase.FAILED and dst_failure is not None
    assert "the vCPU thread did not stop" in dst_failure.reason, "the destination heard why, not a timeout"


def test_both_sides_count_the_same_tag_traffic() -> None:
    guest = busy_guest(seed=3)
    guest.memory.write_tags_packed(2000, np.zeros((16, 128), np.uint8))  # tagged once, now untagged
    guest.memory.write(2040 * 4096, bytes(8 * 4096))  # written, and zero
    pair = Pair(guest).run()
    src, dst = pair.src.report(pair.now)["tags"], pair.dst.report(pair.now)["tags"]
    assert src["untagged_pages"] == dst["untagged_pages"] >= 16
    assert src["sections"] == dst["sections"] and src["wire_bytes"] == dst["wire_bytes"]
    assert pair.src.stats.other_bytes > 0 and pair.dst.stats.other_bytes > 0, (
        "control messages cost bytes too"
    )
    ram_src, ram_dst = pair.src.report(pair.now)["ram"], pair.dst.report(pair.now)["ram"]
    assert ram_src["wire_bytes"] == ram_dst["wire_bytes"] > 0 and ram_src["pages"] == ram_dst["pages"]
    assert ram_src["zero_pages"] == ram_dst["zero_pages"] >= 8
    assert pair.elapsed < 1.0 and pair.dst.report(pair.now)["throughput_bytes_per_s"] > 0, (
        "short, yet measured"
    )


def test_the_control_round_trip_is_measured_for_the_downtime_estimate() -> None:
    """The switchover's handshakes cost at least a round trip each: the estimate needs one."""
    pair = Pair(
        busy_guest(seed=3), to_dest=Faults(latency_s=0.004), to_source=Faults(latency_s=0.004, seed=1)
    )
    pair.run()
    assert 0.008 <= pair.src.precopy.round_trip_s < 0.05


def test_zero_channels_is_refused() -> None:
    with pytest.raises(ValueError, match="channels 0 is outside 1"):
        MigrationParameters(channels=0).check()
    assert MigrationParameters(channels=1).check().channels == 1
    with pytest.raises(ValueError, match=f"channels {MAX_CHANNELS + 1} is outside 1 .. {MAX_CHANNELS}"):
        MigrationParameters(channels=MAX_CHANNELS + 1).check()


def test_a_source_refused_mid_migration_sends_no_abort_back() -> None:
    """A refusal ends the migration here; answering it with an abort would start a ping-pong
    with a node that already said it holds no session of ours."""
    pair = capped_precopy(
        lambda pair: pair.src.phase is SourcePhase.ACTIVE and pair.dst.phase is DestPhase.RECEIVING
    )
    pair.src.take_outgoing()
    refusal = framing.envelope(b"", 0, abort=pb.Abort(code=pb.ERROR_INTERNAL, reason="out of memory"))
    pair.src.receive(framing.encode(refusal), pair.now)
    assert pair.src.phase is SourcePhase.FAILED and "destination refused: out of memory" in str(
        pair.src.failure
    )
    assert [m for m in pair.src.take_outgoing() if framing.decode(m.frames).kind == "abort"] == []
    assert pair.src_host.running


def test_one_channel_asks_again_for_a_gap_instead_of_holding_what_is_ahead() -> None:
    """Reordering is expected only across parallel channels; on one connection a message ahead
    means one was lost: ask for it at once."""
    pair = capped_precopy(lambda pair: pair.dst.phase is DestPhase.RECEIVING)
    dst = pair.dst
    ahead = framing.envelope(dst.session_id, dst.link.received + 2, heartbeat=pb.Heartbeat())
    ahead.epoch = dst.link.epoch
    dst.take_outgoing()
    dst.receive(pair.peer, framing.encode(ahead), pair.now)
    assert not dst.reorder.held
    [(_, frames)] = dst.take_outgoing()
    answer = framing.decode(frames)
    assert answer.kind == "ack" and answer.envelope.ack.resend_from == dst.link.received + 1
    assert dst.link.stats.out_of_order == 1


@pytest.mark.parametrize("seq", [1, 2, -1])
def test_a_finished_source_acknowledges_a_repeat_from_the_very_first_message_on(seq: int) -> None:
    """Its ack lost, the destination sends a message again and waits; the source, done, still
    answers every repeat (the first numbered message included) and nothing else."""
    pair = Pair(busy_guest(seed=3)).run()
    src = pair.src
    assert src.phase is SourcePhase.COMPLETED and src.link.received >= 2
    src.take_outgoing()
    seq = src.link.received if seq == -1 else seq  # -1: the last one it received
    repeat = framing.envelope(src.session_id, seq, heartbeat=pb.Heartbeat())
    repeat.epoch = src.link.epoch
    src.receive(framing.encode(repeat), pair.now)
    assert [framing.decode(m.frames).kind for m in src.take_outgoing()] == ["ack"]
    ahead = framing.envelope(src.session_id, src.link.received + 1, heartbeat=pb.Heartbeat())
    ahead.epoch = src.link.epoch
    src.receive(framing.encode(ahead), pair.now)
    assert src.take_outgoing() == [], "not a repeat: nothing to answer"
    unnumbered = framing.envelope(src.session_id, 0, heartbeat=pb.Heartbeat())
    unnumbered.epoch = src.link.epoch
    src.receive(framing.encode(unnumbered), pair.now)
    assert src.take_outgoing() == [], "an unnumbered message is never acknowledged"


def test_the_phase_table_builder_lists_each_trigger_with_its_next_phases() -> None:
    table = phases._table({SourcePhase.IDLE: {"start": (SourcePhase.SETUP, SourcePhase.FAILED)}})
    assert table == {SourcePhase.IDLE: {"start": frozenset({SourcePhase.SETUP, SourcePhase.FAILED})}}


@pytest.mark.parametrize("channels", [1, 4])
def test_the_window_is_filled_and_never_passed(channels: int) -> None:
    slow = {"latency_s": 0.05}  # acks come late: the window is what holds the sender back
    guest = busy_guest(seed=3, ram=64 << 20)
    guest.memory.write(16 << 20, np.random.default_rng(3).integers(0, 256, 32 << 20, dtype=np.uint8))
    pair = Pair(
        guest,
        MigrationParameters(channels=channels, window=6),
        to_dest=Faults(**slow),
        lanes=[Faults(seed=s, **slow) for s in (2, 3, 4)],
    )
    pair.src.start(pair.now)
    numbered = bulk_numbering(pair)
    most = 0
    while not pair.settled() and pair.elapsed < 30:
        pair.turn()
        most = max(most, pair.src.in_flight)
    assert pair.src.phase is SourcePhase.COMPLETED and pair.src.channels == channels
    assert numbered and all(numbered), "each batch names its own number to the edge"
    assert most == pair.src.params.window, "the window filled, never more"


def test_a_resent_batch_goes_out_as_bulk() -> None:
    pair = Pair(busy_guest(seed=3, working_set=4 << 20), to_dest=Faults(latency_s=0.05))
    pair.src.start(pair.now)
    while not pair.src.in_flight and pair.elapsed < 5:
        pair.turn()
    src = pair.src
    src.take_outgoing()
    unacked = [e for e in src.link.unacked if e.data is not None]
    assert unacked
    src.link_side.resend(unacked, pair.now)
    again = src.take_outgoing()
    assert len(again) == len(unacked) and all(m.bulk for m in again), "resent batches may take any channel"


def test_the_settable_parameters_are_described_with_their_units() -> None:
    text = describe_parameters()
    assert "downtime_limit_ms in milliseconds" in text and "reconnect_timeout_s in seconds" in text
    assert text.count(" in ") == len(SETTABLE)


def test_refusals_are_answered_again_in_the_next_second() -> None:
    dst = DestSession(FakeDestHost(), DestParameters(), 0.0)
    for _ in range(REFUSAL_ANSWERS_PER_S + 5):
        dst.refuse(b"stranger", pb.ERROR_BAD_MESSAGE, "a message of too many frames", 10.0)
    assert len(dst.take_outgoing()) == REFUSAL_ANSWERS_PER_S
    dst.refuse(b"stranger", pb.ERROR_BAD_MESSAGE, "a message of too many frames", 11.5)
    assert len(dst.take_outgoing()) == 1, "a new second, a new budget"


def test_every_finished_round_reports_the_downtime_it_expected() -> None:
    pair = Pair(
        busy_guest(seed=3, working_set=4 << 20), MigrationParameters(max_bandwidth=8 << 20), guest_speed=500
    )
    pair.run()
    rounds = pair.src.report(pair.now)["rounds_detail"]
    assert len(rounds) >= 2
    assert all(
        r["expected_downtime_ms"] is not None and r["dirty_pages_rate"] is not None for r in rounds[:-1]
    )


def test_a_source_whose_hello_answer_is_lost_asks_for_it_once_per_retransmission_time() -> None:
    """Acknowledged but unanswered (the answer lost, every time): the source asks again on the
    retransmission clock, never in a loop."""
    pair = Pair(
        busy_guest(seed=3),
        to_dest=Faults(tamper=lambda message: None),  # the link reads each kind
        to_source=Faults(drop_kinds=frozenset({"hello_ack"}), seed=1),
    )
    pair.src.start(pair.now)
    pair.run_until(lambda: False, 3.0)
    assert pair.src.phase is SourcePhase.SETUP
    assert 1 <= pair.down.kinds.count("ack") <= 3 and pair.turns < 500


def test_between_the_last_pass_and_the_end_nothing_remains_to_send() -> None:
    pair = Pair(busy_guest(seed=3), to_dest=Faults(latency_s=0.01), to_source=Faults(latency_s=0.01, seed=1))
    pair.src.start(pair.now)
    seen = []
    while not pair.settled() and pair.elapsed < 30:
        pair.turn()
        if pair.src.precopy.pass_ is None and pair.src.phase in (
            SourcePhase.SWITCHOVER,
            SourcePhase.COMMITTING,
        ):
            seen.append(pair.src.report(pair.now)["remaining_bytes"])
    assert seen and set(seen) == {0}


def test_the_hello_asks_for_parallel_channels_only_when_there_are_several() -> None:
    assert source_hello(busy_guest(), MigrationParameters(channels=1), "n").channels == 0
    assert source_hello(busy_guest(), MigrationParameters(channels=2), "n").channels == 2


def test_an_unsequenced_resume_ack_at_the_destination_ends_the_session() -> None:
    """Only a destination answers a resume: one arriving there is a broken or hostile source."""
    pair = capped_precopy(lambda pair: pair.dst.phase is DestPhase.RECEIVING)
    dst = pair.dst
    odd = framing.envelope(dst.session_id, 0, resume_ack=pb.ResumeAck(epoch=dst.link.epoch))
    odd.epoch = dst.link.epoch
    dst.receive(pair.peer, framing.encode(odd), pair.now)
    assert dst.phase is DestPhase.FAILED and "the source sent resume_ack without a sequence number" in str(
        dst.failure
    )


def test_the_commit_acknowledged_completes_the_handover_even_if_started_is_lost() -> None:
    pair = Pair(busy_guest(seed=3), to_source=Faults(drop_kinds=frozenset({"started"}), seed=1))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase.ended, 30.0)
    assert pair.src.phase is SourcePhase.COMPLETED
    events = [e["event"] for e in pair.src.report(pair.now)["timeline"]]
    assert any("destination acknowledged the commit" in e for e in events), events


def test_a_round_report_carries_its_rate_and_throttle_rounded_for_reading() -> None:
    from common.protocol.stats import RoundRecord, TransferStats

    start, end = TransferStats(), TransferStats(ram_bytes=1000, tag_bytes=24)
    record = RoundRecord(2, 10.0, start, throttle=0.123456, t_end=10.5, end=end, dirty_pages_rate=12.345)
    section = record.section(9.0, 11.0, end)
    assert section["throughput_bytes_per_s"] == 2048, "a round shorter than a second has a rate too"
    assert section["throttle"] == 0.123 and section["dirty_pages_rate"] == 12.3


def test_a_node_remembers_its_latest_handovers_and_forgets_the_oldest() -> None:
    older = {bytes([i]) * 8: HandedOver(b"", 1) for i in range(REMEMBERED_HANDOVERS)}
    pair = Pair(busy_guest(seed=3))
    pair.dst = DestSession(pair.dst_host, pair.dst.params, pair.now, older)
    pair.run()
    remembered = pair.dst.handed_over_sessions()
    assert len(remembered) == REMEMBERED_HANDOVERS and pair.src.session_id in remembered
    assert bytes([0]) * 8 not in remembered and bytes([1]) * 8 in remembered, "the oldest goes first"


def test_a_source_asks_again_for_what_the_destination_sent_before_a_message_ahead() -> None:
    pair = capped_precopy(lambda pair: pair.dst.phase is DestPhase.RECEIVING and pair.src.link.received >= 1)
    src = pair.src
    src.take_outgoing()
    ahead = framing.envelope(src.session_id, src.link.received + 2, heartbeat=pb.Heartbeat())
    ahead.epoch = src.link.epoch
    src.receive(framing.encode(ahead), pair.now + 1.0)
    assert src.link.stats.out_of_order == 1
    asked = [framing.decode(m.frames) for m in src.take_outgoing()]
    assert [m.envelope.ack.resend_from for m in asked if m.kind == "ack"] == [src.link.received + 1]


def test_a_stray_refusal_of_a_hello_after_the_setup_changes_nothing() -> None:
    """A hello refusal answers a hello: once the migration runs, one arriving (a duplicate of an
    old answer, or forged) is no word on this migration."""
    pair = capped_precopy(lambda pair: pair.src.phase is SourcePhase.ACTIVE)
    stray = framing.envelope(pair.src.session_id, 0, hello_ack=pb.HelloAck(accepted=False, reason="busy"))
    pair.src.receive(framing.encode(stray), pair.now)
    assert pair.src.phase is SourcePhase.ACTIVE and pair.src.failure is None
    pair.run_until(pair.settled)
    assert pair.src.phase is SourcePhase.COMPLETED


def test_a_connection_refused_by_the_key_check_fails_here_and_tells_nobody() -> None:
    pair = Pair(busy_guest(seed=3))
    pair.src.start(pair.now)
    pair.src.take_outgoing()
    pair.src.refused_by_peer("the destination refused our key", pair.now)
    failure = pair.src.failure
    assert pair.src.phase is SourcePhase.FAILED and failure is not None
    assert failure.code == pb.ERROR_UNAUTHORIZED and failure.reason == "the destination refused our key"
    assert pair.src.take_outgoing() == [] and pair.src_host.running


def test_a_source_counts_the_damaged_messages_it_asked_again_for() -> None:
    pair = Pair(busy_guest(seed=3), to_source=Faults(corrupt=0.2, seed=4)).run()
    assert pair.src.phase is SourcePhase.COMPLETED
    assert pair.src.report(pair.now)["link"]["corrupt_received"] == pair.src.link.stats.corrupt > 0


def test_a_source_asks_at_once_for_a_message_that_arrived_damaged() -> None:
    pair = capped_precopy(lambda pair: pair.src.phase is SourcePhase.ACTIVE and pair.src.link.received >= 1)
    src = pair.src
    src.take_outgoing()
    env = framing.envelope(src.session_id, src.link.received + 1, heartbeat=pb.Heartbeat())
    env.epoch = src.link.epoch
    frames = [bytearray(f) for f in framing.encode(env, b"payload")]
    frames[-1][0] ^= 0xFF  # the body's bytes no longer match its checksum
    src.receive([bytes(f) for f in frames], pair.now + 0.5)
    assert src.link.stats.corrupt == 1
    asked = [framing.decode(m.frames) for m in src.take_outgoing()]
    assert [m.envelope.ack.resend_from for m in asked if m.kind == "ack"] == [src.link.received + 1]


def test_a_refusal_after_the_commit_is_not_answered() -> None:
    pair = Pair(busy_guest(seed=3))
    pair.up.cut_when = lambda: pair.dst.phase is DestPhase.RUNNING
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase is SourcePhase.COMMITTING, 30.0)
    src = pair.src
    src.take_outgoing()
    refusal = framing.envelope(
        b"", 0, abort=pb.Abort(code=pb.ERROR_WRONG_SESSION, reason="no session of yours")
    )
    src.receive(framing.encode(refusal), pair.now)
    assert src.phase is SourcePhase.FAILED and "destination refused after the commit" in str(src.failure)
    assert [m for m in src.take_outgoing() if framing.decode(m.frames).kind == "abort"] == []


def test_a_refused_hello_is_not_answered_with_an_abort() -> None:
    pair = Pair(
        busy_guest(seed=3),
        MigrationParameters(auth_token=b"wrong"),
        DestParameters(auth_token=b"right"),
        to_dest=Faults(tamper=lambda message: None),
    ).run(max_seconds=10)
    assert pair.src.phase is SourcePhase.FAILED and "destination refused the migration" in str(
        pair.src.failure
    )
    assert "abort" not in pair.down.kinds


def test_a_hello_without_the_token_the_destination_requires_is_refused() -> None:
    hello = source_hello(busy_guest(), MigrationParameters(), "n")
    refused = check_hello(hello, b"secret")
    assert (
        refused is not None and refused[0] == pb.ERROR_UNAUTHORIZED and "the source gave none" in refused[1]
    )


def test_a_destination_speaking_another_protocol_version_ends_the_migration_here() -> None:
    pair = capped_precopy(lambda pair: pair.src.phase is SourcePhase.ACTIVE)
    src = pair.src
    env = framing.envelope(src.session_id, src.link.received + 1, heartbeat=pb.Heartbeat())
    env.epoch = src.link.epoch
    env.protocol_version = 99
    src.receive(framing.encode(env), pair.now)
    assert src.phase is SourcePhase.FAILED and "the destination sent protocol version 99" in str(src.failure)
    assert pair.src_host.running
