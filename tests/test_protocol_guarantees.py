"""Each guarantee of the protocol core, with a test that fails when that guarantee alone breaks.

The in-memory pair drives both sessions as the daemons do; faults are aimed at one message
kind or one sequence number, so that each test reaches exactly the clause it defends.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from common.constants import PAGE_SIZE, PROTOCOL_VERSION
from common.guest.digest import DigestCache
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.bitmap import encode_bitmap
from common.wire.codec import batch_pages
from tests.protocol_harness import PEER, Faults, Pair, busy_guest, good_hello
from tests.test_protocol import assert_handed_over, assert_stayed_on_source

QUICK = MigrationParameters(peer_timeout_s=0.5, heartbeat_interval_s=0.1)


# -- one place --------------------------------------------------------------------------------
def silence_after_commit(pair: Pair) -> None:
    """From the moment the commit is sent, nothing the destination sends gets through."""
    pair.up.cut_when = lambda: pair.src.phase in (SourcePhase.COMMITTING, SourcePhase.UNSETTLED)


def test_a_commit_whose_answer_never_comes_keeps_the_guest_stopped_until_settled() -> None:
    params = MigrationParameters(peer_timeout_s=0.5, heartbeat_interval_s=0.1, reconnect_timeout_s=2.0)
    pair = Pair(busy_guest(), params=params, guest_speed=1000)
    silence_after_commit(pair)
    pair.run()
    assert pair.dst.phase is DestPhase.RUNNING and pair.dst_host.started is not None
    assert pair.src.phase is SourcePhase.UNSETTLED
    assert pair.src_host.resumes == 0 and not pair.src_host.running and not pair.src.guest_runs_here
    report = pair.src.report(pair.now)
    assert report["status"] == "unsettled" and "may be running there" in report["error"]
    assert "ctl settle" in report["error"]
    # the source keeps its copy intact: it equals what the destination runs
    assert pair.dst_host.started.digests() == pair.guest.digests()
    pair.src.settle(runs_here=False, now=pair.now)
    assert pair.src.phase is SourcePhase.COMPLETED and pair.src_host.resumes == 0


def test_a_protocol_error_after_the_commit_never_resumes_the_source() -> None:
    pair = Pair(busy_guest(), params=QUICK, guest_speed=1000)
    silence_after_commit(pair)
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase is DestPhase.RUNNING)
    assert pair.src.phase is SourcePhase.COMMITTING
    # a garbled peer speaks out of turn: the migration fails, but the guest may run there
    to_source(pair, verify_result=pb.VerifyResult(ok=True, attempt=9))
    assert pair.src.phase is SourcePhase.UNSETTLED
    assert pair.src_host.resumes == 0 and not pair.src_host.running
    assert "verify_result" in (pair.src.failure.reason if pair.src.failure else "")


def test_an_operator_may_settle_an_unanswered_commit_for_the_source() -> None:
    params = MigrationParameters(peer_timeout_s=0.5, heartbeat_interval_s=0.1, reconnect_timeout_s=2.0)
    pair = Pair(busy_guest(), params=params, guest_speed=1000)
    silence_after_commit(pair)
    pair.run()
    assert pair.src.phase is SourcePhase.UNSETTLED
    pair.src.settle(runs_here=True, now=pair.now)
    assert pair.src.phase is SourcePhase.CANCELLED and pair.src_host.resumes == 1 and pair.src_host.running


def test_the_source_acknowledges_started_so_a_destination_may_leave() -> None:
    """A --once destination exits only once its Started is acknowledged (or the source's
    reconnect time passed): a Started lost on the way is sent again, not lost with the process."""
    pair = Pair(busy_guest(), params=QUICK, guest_speed=1000).run()
    assert_handed_over(pair)
    assert not [e for e in pair.dst.link.unacked if e.kind == "started"], "Started acknowledged"


def test_a_completed_source_acknowledges_a_started_sent_again() -> None:
    """Its first ack was lost: the destination, waiting to exit, sends Started again."""
    pair = Pair(busy_guest(), params=QUICK, guest_speed=1000).run()
    assert_handed_over(pair)
    pair.src.take_outgoing()
    again = framing.encode(pair.dst.link.envelope(pair.dst.link.next_seq - 1, started=pb.Started(step=1)))
    pair.src.receive(again, pair.now)
    [ack] = [framing.decode(o.frames) for o in pair.src.take_outgoing()]
    assert ack.kind == "ack" and ack.envelope.received == pair.dst.link.next_seq - 1


def test_lost_started_replies_are_settled_by_the_ack_of_the_commit() -> None:
    pair = Pair(
        busy_guest(), params=QUICK, to_source=Faults(drop_kinds=frozenset({"started"})), guest_speed=1000
    )
    pair.run()
    assert_handed_over(pair)
    assert pair.src_host.resumes == 0
    assert "destination acknowledged the commit" in [
        e["event"] for e in pair.src.report(pair.now)["timeline"]
    ]


def test_a_link_broken_after_the_commit_is_settled_by_the_resume() -> None:
    params = MigrationParameters(peer_timeout_s=0.8, heartbeat_interval_s=0.1, reconnect_timeout_s=5.0)
    pair = Pair(busy_guest(), params=params, guest_speed=1000)
    broken: list[float] = []

    def broken_for_a_second() -> bool:
        if pair.src.phase is SourcePhase.COMMITTING and not broken:
            broken.append(pair.now)
        return bool(broken) and pair.now < broken[0] + 1.0

    pair.up.cut_when = broken_for_a_second
    pair.down.cut_when = broken_for_a_second
    pair.run()
    assert_handed_over(pair)
    assert pair.src.link.epoch >= 2, "it reconnected and asked"
    assert pair.src_host.resumes == 0


# -- the source's own view of the link -----------------------------------------------------------
def test_the_source_never_acts_on_a_message_that_overtook_a_lost_one() -> None:
    pair = verifying_pair()
    first = pair.src.link.received + 1
    result = pb.VerifyResult(ok=True, attempt=1)
    to_source(pair, seq=first + 1, verify_result=result)  # message `first` was lost
    assert pair.src.phase is SourcePhase.VERIFYING, "a message past a gap is not handled"
    asked = [framing.decode(o.frames) for o in pair.src.take_outgoing()]
    assert [m.envelope.ack.resend_from for m in asked if m.kind == "ack"] == [first]
    to_source(pair, seq=first + 1, verify_result=result)  # again: asked once per loss, not per message
    assert not [
        m
        for m in (framing.decode(o.frames) for o in pair.src.take_outgoing())
        if m.kind == "ack" and m.envelope.ack.resend_from
    ]


# -- the stop gate, clause by clause ---------------------------------------------------------------
def test_guest_stops_only_when_nothing_is_in_flight() -> None:
    # an idle guest leaves nothing dirty, so only the in-flight clause can hold the stop back;
    # a slow link keeps the last batches unacknowledged for a while
    slow = Faults(latency_s=0.02)
    pair = Pair(busy_guest(ram=32 << 20), to_dest=slow, to_source=Faults(latency_s=0.02, seed=1)).run()
    assert_handed_over(pair)
    assert pair.src_host.at_stop["in_flight"] == 0


# -- vCPU verification ------------------------------------------------------------------------------
def test_a_vcpu_state_damaged_in_flight_is_named_and_sent_again() -> None:
    damaged = []

    def damage_first_vcpu_state(message: framing.Message) -> framing.Message | None:
        if message.kind != "device_state" or damaged:
            return None
        env = pb.Envelope()
        env.CopyFrom(message.envelope)
        env.device_state.vcpus[0].x[5] ^= 1
        damaged.append(True)
        return framing.Message(env, message.payload)

    pair = Pair(busy_guest(seed=4), to_dest=Faults(tamper=damage_first_vcpu_state), guest_speed=1000).run()
    assert_handed_over(pair)
    assert pair.src.verify_attempt == 2
    assert pair.down.kinds.count("device_state") == 2
    assert pair.dst_host.started is not None
    assert pair.dst_host.started.vcpus[0].x == pair.guest.vcpus[0].x


# -- pages that become zero ----------------------------------------------------------------------
def test_a_page_zeroed_after_it_was_sent_is_zeroed_on_the_destination() -> None:
    guest = busy_guest(seed=6)
    written = np.flatnonzero(guest.memory.data_populated)
    page = int(next(p for p in written if guest.memory.pages[p].any()))
    pair = Pair(guest, MigrationParameters(max_bandwidth=2 << 20))  # still under way when it is zeroed
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.stats.pages > np.searchsorted(written, page))
    assert pair.src.phase is SourcePhase.ACTIVE and pair.dst.guest is not None
    assert pair.dst.guest.memory.pages[page].any(), "the page arrived with its content"
    guest.memory.write(page * PAGE_SIZE, bytes(PAGE_SIZE))
    pair.run_until(pair.settled)
    assert_handed_over(pair)
    assert pair.dst_host.started is not None and not pair.dst_host.started.memory.pages[page].any()


# -- hostile input the sessions refuse ----------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, code, words",
    [
        ({"page_size": 16384}, pb.ERROR_GEOMETRY_MISMATCH, "page size 16384"),
        ({"granule_size": 32}, pb.ERROR_GEOMETRY_MISMATCH, "granule 32"),
        ({"ram_bytes": 1 << 19}, pb.ERROR_GEOMETRY_MISMATCH, "guest RAM of 524288 bytes"),
        ({"ram_bytes": (16 << 30) + 4096}, pb.ERROR_GEOMETRY_MISMATCH, "guest RAM"),
        ({"ram_bytes": (1 << 20) + 100}, pb.ERROR_GEOMETRY_MISMATCH, "not whole pages"),
        ({"vcpu_count": 0}, pb.ERROR_GEOMETRY_MISMATCH, "0 vCPUs"),
        ({"vcpu_count": 65}, pb.ERROR_GEOMETRY_MISMATCH, "65 vCPUs"),
        ({"features": [pb.FEATURE_VERIFY]}, pb.ERROR_FEATURE_MISMATCH, "FEATURE_MTE"),
        ({"features": [pb.FEATURE_MTE]}, pb.ERROR_FEATURE_MISMATCH, "FEATURE_VERIFY"),
        ({"mode": pb.MODE_POSTCOPY}, pb.ERROR_FEATURE_MISMATCH, "postcopy mode without the postcopy feature"),
        ({"mode": 7}, pb.ERROR_FEATURE_MISMATCH, "is not supported by this destination"),
        (
            {"populated_hint_lz4": encode_bitmap(np.ones(512, dtype=np.bool_))},
            pb.ERROR_BAD_MESSAGE,
            "populated-pages hint claims 64 bytes, expected 32 for 256 pages",
        ),
    ],
)
def test_a_bad_hello_is_refused_and_allocates_nothing(changes: dict[str, Any], code: int, words: str) -> None:
    pair = Pair(busy_guest())
    pair.dst.receive(PEER, framing.encode(framing.envelope(b"s" * 8, 1, hello=good_hello(**changes))), 0.0)
    [(peer, frames)] = pair.dst.take_outgoing()
    ack = framing.decode(frames).envelope.hello_ack
    assert peer == PEER and not ack.accepted
    assert ack.code == code and words in ack.reason, ack.reason
    assert pair.dst.phase is DestPhase.WAITING and pair.dst.guest is None


def test_a_good_hello_is_accepted() -> None:
    """The other side of the table above: the same hello, unchanged, gets in."""
    pair = Pair(busy_guest())
    pair.dst.receive(PEER, framing.encode(framing.envelope(b"s" * 8, 1, hello=good_hello())), 0.0)
    [(_, frames)] = pair.dst.take_outgoing()
    assert framing.decode(frames).envelope.hello_ack.accepted
    assert pair.dst.phase is DestPhase.RECEIVING and pair.dst.guest is not None


def receiving_pair() -> Pair:
    pair = Pair(busy_guest(), params=MigrationParameters(max_bandwidth=1 << 20))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase is DestPhase.RECEIVING and pair.src.phase is SourcePhase.ACTIVE)
    return pair


def in_session(pair: Pair, seq: int, received: int = 0, **body: Any) -> list[Any]:
    env = framing.envelope(pair.src.session_id, seq, **body)
    env.epoch = pair.src.link.epoch
    env.received = received
    return framing.encode(env)


def to_destination(pair: Pair, **body: Any) -> None:
    """A message in the source's session with the next sequence number the destination expects."""
    pair.dst.receive(pair.peer, in_session(pair, pair.dst.link.received + 1, **body), pair.now)


def to_source(pair: Pair, seq: int | None = None, received: int = 0, **body: Any) -> None:
    """From the destination: the next sequenced message by default, seq=0 for link traffic."""
    seq = pair.src.link.received + 1 if seq is None else seq
    pair.src.receive(in_session(pair, seq, received, **body), pair.now)


def vcpu(index: int, registers: int = 31) -> pb.VcpuState:
    return pb.VcpuState(index=index, x=[0] * registers)


@pytest.mark.parametrize(
    "state, code, words",
    [
        (pb.DeviceState(vcpus=[vcpu(0), vcpu(1)]), pb.ERROR_GEOMETRY_MISMATCH, "device state has 2 vCPUs"),
        (pb.DeviceState(vcpus=[]), pb.ERROR_GEOMETRY_MISMATCH, "device state has 0 vCPUs"),
        (pb.DeviceState(vcpus=[vcpu(3)]), pb.ERROR_BAD_MESSAGE, "indices are not 0..n-1"),
        (pb.DeviceState(vcpus=[vcpu(0, registers=30)]), pb.ERROR_BAD_MESSAGE, "30 general registers"),
    ],
)
def test_bad_device_state_fails_the_migration_and_changes_no_register(
    state: pb.DeviceState, code: int, words: str
) -> None:
    pair = receiving_pair()
    assert pair.dst.guest is not None
    before = [v.to_bytes() for v in pair.dst.guest.vcpus]
    to_destination(pair, device_state=state)
    assert pair.dst.phase is DestPhase.FAILED
    assert pair.dst.failure is not None and pair.dst.failure.code == code
    assert words in pair.dst.failure.reason
    assert [v.to_bytes() for v in pair.dst.guest.vcpus] == before
    pair.run_until(pair.settled)
    assert_stayed_on_source(pair)


def test_an_ack_of_a_message_never_sent_fails_the_source_cleanly() -> None:
    pair = receiving_pair()
    never_sent = pair.src.link.next_seq
    to_source(pair, seq=0, received=never_sent, ack=pb.Ack())
    assert pair.src.failure is not None and pair.src.failure.code == pb.ERROR_BAD_MESSAGE
    assert f"acknowledged message {never_sent}, never sent" in pair.src.failure.reason
    pair.run_until(pair.settled)
    assert_stayed_on_source(pair)


def test_an_ack_of_the_last_message_sent_is_fine() -> None:
    pair = receiving_pair()
    last = pair.src.link.next_seq - 1
    to_source(pair, seq=0, received=last, ack=pb.Ack())
    assert pair.src.failure is None and pair.src.phase is SourcePhase.ACTIVE


@pytest.mark.parametrize("credit, fine", [(0, False), (1, True), (1024, True), (1025, False)])
def test_the_granted_window_must_be_sane(credit: int, fine: bool) -> None:
    pair = Pair(busy_guest())
    pair.src.start(0.0)
    ack = pb.HelloAck(
        accepted=True, protocol_version=PROTOCOL_VERSION, initial_credit=credit, features=[pb.FEATURE_MTE]
    )
    pair.src.receive(in_session(pair, 1, hello_ack=ack), 0.0)
    if fine:
        assert pair.src.phase is SourcePhase.ACTIVE and pair.src.params.window == min(16, credit)
    else:
        assert pair.src.phase is SourcePhase.FAILED
        assert pair.src.failure is not None and f"window of {credit}" in pair.src.failure.reason


def verifying_pair() -> Pair:
    """A source waiting for the verdict (which the destination gave, and the link lost)."""
    pair = Pair(busy_guest(), to_source=Faults(drop_kinds=frozenset({"verify_result"})))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase is SourcePhase.VERIFYING and pair.dst.verified is not None)
    assert pair.src.phase is SourcePhase.VERIFYING
    return pair


def page_digests(first: int, count: int, **changes: Any) -> pb.PageDigests:
    block = pb.PageDigests(first_page=first, ram_digests=bytes(8 * count), tag_digests=bytes(8 * count))
    for name, value in changes.items():
        setattr(block, name, value)
    return block


@pytest.mark.parametrize(
    "result, words",
    [
        (pb.VerifyResult(ok=True, attempt=2), "verify_result (attempt 2)"),
        (pb.VerifyResult(ok=False, attempt=1, page_digests=[page_digests(3, 1)]), "at page 3 are malformed"),
        (pb.VerifyResult(ok=False, attempt=1, page_digests=[page_digests(4096, 1)]), "at page 4096"),
        (
            pb.VerifyResult(ok=False, attempt=1, page_digests=[page_digests(0, 2, tag_digests=bytes(8))]),
            "malformed",
        ),
        (
            pb.VerifyResult(ok=False, attempt=1, page_digests=[page_digests(0, 1, ram_digests=bytes(9))]),
            "malformed",
        ),
        (pb.VerifyResult(ok=False, attempt=1, page_digests=[page_digests(0, 257)]), "malformed"),
        (
            pb.VerifyResult(ok=False, attempt=1, page_digests=[page_digests(0, 1)] * 9),
            "names more blocks than the guest has",
        ),
    ],
)
def test_a_malformed_verify_result_fails_before_the_commit(result: pb.VerifyResult, words: str) -> None:
    pair = verifying_pair()
    to_source(pair, verify_result=result)
    assert pair.src.phase is SourcePhase.FAILED
    assert pair.src.failure is not None and words in pair.src.failure.reason, pair.src.failure.reason
    assert pair.src_host.running, "the guest runs on at the source"


def test_a_mismatch_named_in_a_well_formed_result_is_resent() -> None:
    """The counterpart of the table above: a well-formed result naming one page gets that page
    sent again, and a new verification request."""
    pair = verifying_pair()
    digests = DigestCache(pair.guest.memory)
    digests.mark(np.arange(256), np.arange(256))
    ram, tags = digests.page_digests(0, 256)
    ram = ram.copy()
    ram[7] ^= 1
    block = pb.PageDigests(
        first_page=0, ram_digests=ram.astype("<u8").tobytes(), tag_digests=tags.astype("<u8").tobytes()
    )
    to_source(pair, verify_result=pb.VerifyResult(ok=False, attempt=1, page_digests=[block]))
    assert pair.src.phase is SourcePhase.SWITCHOVER and pair.src.mismatched_pages == [7]
    pair.src.poll(pair.now)
    resent = [framing.decode(o.frames) for o in pair.src.take_outgoing()]
    pages = [m for m in resent if m.kind == "ram_pages"]
    assert len(pages) == 1 and batch_pages(pages[0].envelope.ram_pages).tolist() == [7]
    assert [m.kind for m in resent][-1] == "verify_request"
