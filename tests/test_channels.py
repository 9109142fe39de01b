"""Parallel channels in the pure core: batches spread over several connections arrive out of
order, and the destination still delivers everything in sequence order, so an end of round
never overtakes its round's batches and nothing is lost or placed twice."""

from __future__ import annotations

from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from common.constants import MAX_CHANNELS, MAX_FRAME_BYTES, REORDER_WAIT_S
from common.guest.guest import Guest
from common.guest.workload import Fill
from common.outgoing import least_loaded, unacknowledged
from common.protocol.handshake import granted_channels
from common.protocol.link import Reorder
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import Faults, Pair, busy_guest, good_hello
from tests.test_protocol import assert_handed_over


def random_guest(seed: int = 3) -> Guest:
    """64 MiB of random, tagged memory: 8 RAM batches and a tag batch, enough to reorder."""
    return busy_guest(seed=seed, ram=64 << 20, fill=Fill.RANDOM, working_set=4 << 20)


# -- the hold ----------------------------------------------------------------------------------
@given(st.permutations(list(range(2, 12))))
def test_held_messages_come_out_in_sequence_order_whatever_order_they_came_in(order: list[int]) -> None:
    hold = Reorder(limit=16)
    delivered = [1]
    for seq in order:
        assert hold.hold(seq, f"m{seq}", 0.0, batch=seq % 3 > 0)
    while (item := hold.take(delivered[-1] + 1, 0.0)) is not None:
        assert item == f"m{delivered[-1] + 1}"
        delivered.append(delivered[-1] + 1)
    assert delivered == list(range(1, 12)) and not hold.held and hold.t_gap is None


def test_a_full_hold_refuses_and_a_gap_is_timed_from_its_first_message() -> None:
    hold = Reorder(limit=2)
    assert hold.hold(5, "a", 10.0, batch=True) and hold.hold(6, "b", 10.5, batch=True)
    assert hold.hold(7, "c", 11.0, batch=True) is False, "a window of batches waiting means a loss"
    assert hold.hold(6, "b again", 11.0, batch=True), "a resent copy replaces the held one"
    assert hold.waited(11.0) == 1.0
    hold.restart(11.5)
    assert hold.waited(12.0) == 0.5, "asked for again: the wait starts afresh"
    hold.drop_upto(5)
    assert list(hold.held) == [6] and hold.batches == 1
    assert hold.waited(12.0) == 0.5, "a message still waits: its gap goes on"
    hold.drop_upto(6)
    assert hold.waited(12.0) == 0.0 and hold.batches == 0


def test_control_messages_behind_a_full_window_of_batches_are_held_too() -> None:
    """At a switchover an end of round, the vCPU state and a verification request follow a
    window of batches: they wait with them, within a bound of their own."""
    hold = Reorder(limit=2)
    assert hold.hold(2, "batch", 0.0, batch=True) and hold.hold(3, "batch", 0.0, batch=True)
    for seq in range(4, 4 + hold.control_limit):
        assert hold.hold(seq, "control", 0.0, batch=False)
    assert hold.hold(4 + hold.control_limit, "one too many", 0.0, batch=False) is False
    assert not hold.hold(99, "a third batch", 0.0, batch=True)


def test_one_number_sent_as_a_control_message_then_as_a_batch_changes_no_count() -> None:
    """A hostile source repeats a number under another kind: the replaced copy is uncounted,
    so the batch count cannot drift below zero and let more than the window be held."""
    hold = Reorder(limit=16)
    for r in range(0, 300, 3):
        assert hold.hold(r + 2, "control", 0.0, batch=False)
        assert hold.hold(r + 2, "empty ram batch", 0.0, batch=True)
        hold.drop_upto(r + 2)
        assert hold.batches == 0 and not hold.held
    for seq in range(1000, 1100):
        hold.hold(seq, "batch", 0.0, batch=True)
    assert hold.batches == 16 == len(hold.held), "no more than the window of batches"


def test_the_control_bound_is_four_windows_and_room_for_a_switchover() -> None:
    """An end of round per round in flight, plus the few messages of a switchover."""
    assert Reorder(limit=2).control_limit == 72 and Reorder(limit=16).control_limit == 128


def test_the_byte_bound_admits_a_window_of_the_largest_batches_and_a_control_message() -> None:
    hold = Reorder(limit=2)
    assert hold.hold(2, "batch", 0.0, batch=True, size=MAX_FRAME_BYTES)
    assert hold.hold(3, "batch", 0.0, batch=True, size=MAX_FRAME_BYTES)
    assert hold.hold(4, "device state", 0.0, batch=False, size=MAX_FRAME_BYTES)
    assert hold.hold(5, "one more", 0.0, batch=False, size=1) is False


def test_the_hold_is_bounded_in_bytes_whatever_the_kinds() -> None:
    hold = Reorder(limit=16, max_bytes=1000)
    assert hold.hold(2, "a", 0.0, batch=True, size=600)
    assert hold.hold(3, "b", 0.0, batch=False, size=500) is False, "past the byte bound: a loss"
    assert hold.hold(2, "a again, smaller", 0.0, batch=True, size=100), "the replaced copy's bytes are freed"
    assert hold.hold(3, "b", 0.0, batch=False, size=500) and hold.bytes == 600


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["hold", "take", "drop", "clear"]),
            st.integers(1, 24),
            st.booleans(),
            st.integers(0, 400),
        ),
        max_size=80,
    )
)
def test_the_holds_counts_always_match_what_it_holds(ops: list[tuple[str, int, bool, int]]) -> None:
    hold = Reorder(limit=4, max_bytes=2000)
    for op, seq, batch, size in ops:
        if op == "hold":
            hold.hold(seq, seq, 0.0, batch=batch, size=size)
        elif op == "take":
            hold.take(seq, 0.0)
        elif op == "clear":
            hold.clear()
            assert hold.take(seq, 0.0) is None and hold.waited(5.0) == 0.0
        else:
            hold.drop_upto(seq)
        assert hold.batches == sum(1 for _, b, _ in hold.held.values() if b) <= hold.limit
        assert hold.bytes == sum(n for _, _, n in hold.held.values()) <= hold.max_bytes


def test_a_batch_goes_to_the_channel_with_the_least_in_flight() -> None:
    assert least_loaded([0, 0, 0], turn=0) == 0
    assert least_loaded([0, 0, 0], turn=2) == 2, "in turn among equals"
    assert least_loaded([3, 1, 2], turn=0) == 1
    sent = deque([4, 9, 3, 12])  # 3: a resend, numbered below what the channel carried before
    assert unacknowledged(sent, acked=8) == 2 and list(sent) == [9, 12]
    assert unacknowledged(sent, acked=20) == 0


def test_the_destination_grants_what_was_asked_up_to_its_maximum() -> None:
    assert granted_channels(good_hello()) == 1
    asked = good_hello(features=[*good_hello().features, pb.FEATURE_MULTI_CHANNEL], channels=3)
    assert granted_channels(asked) == 3
    asked.channels = 200
    assert granted_channels(asked) == MAX_CHANNELS
    asked.channels = 1
    assert granted_channels(asked) == 1
    assert granted_channels(good_hello(channels=4)) == 1, "a count without the feature is ignored"


# -- whole migrations over the in-memory link ----------------------------------------------------
def test_batches_over_three_channels_arrive_out_of_order_and_the_guest_arrives_whole() -> None:
    # the second channel is slower than the first and the third faster: batches overtake
    lanes = [Faults(latency_s=0.004, seed=2), Faults(latency_s=0.00002, seed=3)]
    pair = Pair(random_guest(), MigrationParameters(channels=3), lanes=lanes).run()
    assert_handed_over(pair)
    assert pair.src.channels == 3 and pair.dst.channels == 3
    assert all(lane.carried > 0 for lane in pair.lanes), "every channel carried batches"
    assert pair.dst.link.stats.reordered > 0, "batches overtook each other and waited their turn"
    assert pair.dst.link.stats.resend_requests == 0, "reordering is not loss: nothing asked again"


def test_a_busy_guest_over_channels_is_the_guest_that_stayed_at_home() -> None:
    lanes = [Faults(latency_s=0.003, seed=2)]
    guest = busy_guest(seed=5, ram=16 << 20, working_set=2 << 20, dirty_pages_per_step=8)
    pair = Pair(guest, MigrationParameters(channels=2), guest_speed=3000, lanes=lanes).run()
    assert_handed_over(pair)
    assert pair.src.round >= 2 and pair.dst.link.stats.reordered > 0


def test_a_channel_that_loses_batches_is_repaired_by_resends() -> None:
    lanes = [Faults(drop=0.3, seed=4), Faults()]
    pair = Pair(random_guest(), MigrationParameters(channels=3), lanes=lanes).run()
    assert_handed_over(pair)
    assert pair.dst.link.stats.resend_requests > 0 and pair.src.link.stats.resent > 0


def test_a_corrupted_batch_on_a_channel_is_the_source_s_and_asked_for_again() -> None:
    lanes = [Faults(corrupt=0.5, seed=5)]
    pair = Pair(random_guest(), MigrationParameters(channels=2), lanes=lanes).run()
    assert_handed_over(pair)
    assert pair.dst.link.stats.corrupt > 0 and pair.dst.link.stats.resend_requests > 0
    assert pair.dst.refused_messages == 0, "damaged, not a stranger's: nothing refused"


def test_an_outage_on_every_connection_is_resumed_and_the_channels_carry_on() -> None:
    outage = (0.05, 4.5)  # seconds after the start: past the 3 s peer timeout
    lanes = [Faults(latency_s=0.002, outage=outage), Faults(outage=outage)]
    guest = busy_guest(seed=6, ram=64 << 20, fill=Fill.RANDOM, working_set=4 << 20)
    pair = Pair(
        guest,
        MigrationParameters(channels=3, max_bandwidth=32 << 20),
        to_dest=Faults(outage=outage),
        to_source=Faults(outage=outage, seed=1),
        lanes=lanes,
    ).run()
    assert_handed_over(pair)
    assert pair.src.link.stats.resumes >= 1 and pair.dst.link.epoch >= 2
    assert pair.dst.link.stats.reordered > 0 and not pair.dst.reorder.held


def test_a_destination_waiting_on_a_gap_asks_once_and_does_not_spin() -> None:
    lanes = [Faults(latency_s=0.004, seed=2)]
    pair = Pair(random_guest(), MigrationParameters(channels=2), lanes=lanes)
    pair.src.start(pair.now)
    for _ in range(100_000):
        if pair.dst.reorder.held:
            break
        pair.turn()
    assert pair.dst.reorder.held, "a batch overtook another"
    later = pair.now + REORDER_WAIT_S + 0.01  # the overtaken one never comes (the link is quiet)
    asked = pair.dst.link.stats.resend_requests
    pair.dst.poll(later)
    assert pair.dst.link.stats.resend_requests == asked + 1, "a gap that lasts is a loss"
    assert pair.dst.next_deadline(later) > later, "and the next turn waits, rather than spins"


def test_without_the_feature_everything_keeps_to_one_connection() -> None:
    lanes = [Faults(latency_s=0.004)]
    pair = Pair(random_guest(), MigrationParameters(channels=1), lanes=lanes).run()
    assert_handed_over(pair)
    assert pair.src.channels == 1 and pair.dst.channels == 1
    assert pair.lanes[0].carried == 0 and pair.dst.link.stats.reordered == 0


def test_a_channel_number_the_destination_did_not_grant_is_a_stranger() -> None:
    pair = Pair(random_guest(), MigrationParameters(channels=2), lanes=[Faults()])
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase is DestPhase.RECEIVING and pair.src.channels == 2, 5.0)
    before = pair.dst.refused_messages
    frames = framing.encode(pair.src.link.envelope(0, heartbeat=pb.Heartbeat()))
    pair.dst.receive(pair.peer + b"D\x02", [bytes(f) for f in frames], pair.now, peer_key=pair.source_key)
    assert pair.dst.refused_messages == before + 1
    pair.run_until(pair.settled)
    assert_handed_over(pair)


def test_a_destination_granting_more_channels_than_asked_is_refused() -> None:
    def grant_too_many(message: framing.Message) -> framing.Message | None:
        if message.kind != "hello_ack":
            return None
        message.envelope.hello_ack.features.append(pb.FEATURE_MULTI_CHANNEL)
        message.envelope.hello_ack.channels = 5
        return message

    pair = Pair(random_guest(), MigrationParameters(channels=2), to_source=Faults(tamper=grant_too_many))
    pair.run()
    assert pair.src.phase is SourcePhase.FAILED
    assert "granted 5 channels" in str(pair.src.failure)
    assert pair.src_host.running and pair.dst_host.started is None
