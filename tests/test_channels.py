"""Parallel channels in the pure core: batches spread over several connections arrive out of
order, and the destination still delivers everything in sequence order, so an end of round
never overtakes its round's batches and nothing is lost or placed twice."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from common.constants import MAX_CHANNELS
from common.guest.guest import Guest
from common.guest.workload import Fill
from common.protocol.dest import DestParameters
from common.protocol.handshake import granted_channels
from common.protocol.link import Reorder
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import Faults, Pair, busy_guest, good_hello
from tests.test_protocol import assert_handed_over


def random_guest(seed: int = 3) -> Guest:
    """32 MiB of random, tagged memory: 8 RAM batches and their tag sections, enough to reorder."""
    return busy_guest(seed=seed, ram=32 << 20, fill=Fill.RANDOM, working_set=4 << 20)


# -- the hold ----------------------------------------------------------------------------------
@given(st.permutations(list(range(2, 12))))
def test_held_messages_come_out_in_sequence_order_whatever_order_they_came_in(order: list[int]) -> None:
    hold = Reorder(limit=16)
    delivered = [1]
    for seq in order:
        assert hold.hold(seq, f"m{seq}", 0.0)
    while (item := hold.take(delivered[-1] + 1, 0.0)) is not None:
        assert item == f"m{delivered[-1] + 1}"
        delivered.append(delivered[-1] + 1)
    assert delivered == list(range(1, 12)) and not hold.held and hold.t_gap is None


def test_a_full_hold_refuses_and_a_gap_is_timed_from_its_first_message() -> None:
    hold = Reorder(limit=2)
    assert hold.hold(5, "a", 10.0) and hold.hold(6, "b", 10.5)
    assert not hold.hold(7, "c", 11.0), "a full hold means a loss: the caller asks for a resend"
    assert hold.hold(6, "b again", 11.0), "a resent copy replaces the held one"
    assert hold.waited(11.0) == 1.0
    hold.drop_upto(5)
    assert list(hold.held) == [6] and hold.waited(12.0) == 2.0
    hold.drop_upto(6)
    assert hold.waited(12.0) == 0.0


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
    lanes = [Faults(drop=0.3, seed=4), Faults(corrupt=0.2, seed=5)]
    pair = Pair(random_guest(), MigrationParameters(channels=3), lanes=lanes).run()
    assert_handed_over(pair)
    assert pair.dst.link.stats.resend_requests > 0 and pair.src.link.stats.resent > 0


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


def test_dest_parameters_bound_the_hold_by_the_window() -> None:
    pair = Pair(random_guest(), MigrationParameters(channels=2), DestParameters(window=4), lanes=[Faults()])
    assert pair.dst.reorder.limit == 4
