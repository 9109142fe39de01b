"""Guarantees that a break-one-at-a-time read found no test watching: each test here fails when
its guarantee alone is broken (postcopy paths a fallback hid, epochs, verification's repair of
tags alone, the vCPU digest in the postcopy verdict)."""

from __future__ import annotations

import numpy as np

from common.constants import PAGE_SIZE, TCF_SYNC
from common.guest.memory import GuestMemory
from common.guest.mte import make_pointer
from common.guest.workload import Fill, Workload, WorkloadConfig, boot
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from common.protocol.postcopy import SourcePostcopy
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.bitmap import encode_bitmap
from common.wire.codec import PostcopyBatch, encode_postcopy_pages
from tests.protocol_harness import Faults, Pair, busy_guest, pageless_postcopy
from tests.test_dest_session import PEER, frames, receiving, replies
from tests.test_postcopy_unit import guest_with_content, started
from tests.test_protocol import assert_handed_over
from tests.test_source_session import active, from_dest


# -- postcopy ----------------------------------------------------------------------------------------
def test_a_postcopy_page_with_the_right_data_and_the_wrong_tags_is_never_shown() -> None:
    src = guest_with_content()
    dst = GuestMemory(2 << 20)
    dest = started(src, dst)
    tags = src.page_tags[[7]].copy()
    tags[0, 3] ^= 0x10  # one granule's tag
    placed = dest.place(
        dst, PostcopyBatch(np.array([7]), src.pages[[7]].copy(), tags), requested=True, now=1.0
    )
    assert placed.pages.size == 0 and placed.rejected.tolist() == [7]
    assert not dest.present[7] and not dst.tags_populated[7], "data alone right is not the page"


def postcopy_destination() -> tuple[Pair, GuestMemory]:
    """A destination in postcopy with nothing of the source's pages yet (all dropped)."""
    # (the parameters' own link timeouts: these tests act at once, on a link that is up)
    pair = pageless_postcopy(5, peer_timeout_s=3.0, heartbeat_interval_s=0.5, reconnect_timeout_s=10.0)
    return pair, pair.guest.memory


def test_a_copy_that_fails_the_manifest_is_asked_for_again_at_once() -> None:
    pair, mem = postcopy_destination()
    dst = pair.dst
    assert dst.postcopy is not None
    page = int(np.flatnonzero(~dst.postcopy.present)[0])
    data = mem.pages[[page]].copy()
    data[0, 9] ^= 0xFF
    damaged = mem.pages.copy()
    damaged[page] = data[0]
    body, payload, _ = encode_postcopy_pages(
        damaged, mem.page_tags[[page]], np.array([page]), use_lz4=False, requested=True
    )
    dst.take_outgoing()
    envelope = framing.envelope(dst.session_id, 0, postcopy_pages=body)
    envelope.epoch = dst.link.epoch
    dst.receive(pair.peer + b"-urgent", framing.encode(envelope, payload), pair.now, peer_key=pair.source_key)
    assert not dst.postcopy.present[page]
    asked = [
        m for _, m in ((p, framing.decode(f)) for p, f in dst.take_outgoing()) if m.kind == "page_request"
    ]
    assert asked and page in asked[0].envelope.page_request.page_index, "asked for again, not left to chance"


def test_after_a_resume_the_destination_says_again_what_it_holds() -> None:
    pair, _ = postcopy_destination()
    dst = pair.dst
    dst.take_outgoing()
    resume = framing.envelope(dst.session_id, 0, resume=pb.Resume(epoch=dst.link.epoch + 1))
    resume.epoch = dst.link.epoch + 1
    dst.receive(pair.peer + b"-2", framing.encode(resume), pair.now, peer_key=pair.source_key)
    kinds = [framing.decode(f).kind for _, f in dst.take_outgoing()]
    assert kinds[0] == "resume_ack" and "received_bitmap" in kinds, kinds


def test_the_source_sends_only_what_the_destinations_latest_bitmap_lacks() -> None:
    """After a recovery the source is told afresh what arrived before the break: what it holds
    is never sent again (bulk a recovery would otherwise repeat)."""
    pc = SourcePostcopy(256)
    pc.holds(np.zeros(256, dtype=bool))
    pc.next_background()  # 128 pages sent before the break...
    present = np.zeros(256, dtype=bool)
    present[:100] = True  # ...of which 100 arrived
    pc.holds(present)
    rest: list[int] = []
    while (batch := pc.next_background()) is not None:
        rest.extend(batch.tolist())
    assert sorted(rest) == list(range(100, 256))


def test_a_source_in_postcopy_takes_the_destinations_bitmap_as_what_it_holds() -> None:
    pair, _ = postcopy_destination()
    src = pair.src
    assert src.postcopy is not None
    present = np.zeros(src.mem.page_count, dtype=bool)
    present[: src.mem.page_count // 2] = True
    bitmap = pb.ReceivedBitmap(page_count=src.mem.page_count, bitmap_lz4=encode_bitmap(present))
    src.receive(from_dest(src, src.link.received + 1, epoch=src.link.epoch, received_bitmap=bitmap), pair.now)
    assert src.dest_missing == src.mem.page_count - src.mem.page_count // 2
    assert src.postcopy.needed is not None and not src.postcopy.needed[present].any()


# -- epochs ------------------------------------------------------------------------------------------
def test_the_source_ignores_what_an_older_connection_still_delivers() -> None:
    src, _ = active()
    src.link.new_epoch()  # reconnected: epoch 2
    src.reconnector.restored()
    src.receive(
        from_dest(src, 2, received=1, epoch=1, abort=pb.Abort(code=pb.ERROR_TIMEOUT, reason="old")), 0.02
    )
    assert src.phase is SourcePhase.ACTIVE and src.failure is None, "a straggler of epoch 1 changes nothing"
    src.receive(
        from_dest(src, 2, received=1, epoch=2, abort=pb.Abort(code=pb.ERROR_TIMEOUT, reason="now")), 0.03
    )
    assert src.phase is SourcePhase.FAILED


def test_the_destination_ignores_a_resume_from_an_older_epoch() -> None:
    dst, _ = receiving()
    newer = framing.envelope(b"s" * 8, 0, resume=pb.Resume(epoch=3))
    newer.epoch = 3
    dst.receive(b"peer-3", framing.encode(newer), 0.1)
    assert dst.link.epoch == 3 and dst.peer == b"peer-3"
    replies(dst)
    older = framing.envelope(b"s" * 8, 0, resume=pb.Resume(epoch=2))
    older.epoch = 2
    dst.receive(b"peer-2", framing.encode(older), 0.2)
    assert dst.peer == b"peer-3" and dst.link.epoch == 3, "the newest connection stays the source's"
    assert replies(dst) == [], "an old attempt gets no answer"


# -- verification ------------------------------------------------------------------------------------
def test_a_page_whose_tags_alone_differ_at_verification_is_repaired() -> None:
    pair = Pair(busy_guest(seed=9))
    pair.src.start(pair.now)
    hit: list[int] = []

    def damage_tags_once() -> bool:
        dst = pair.dst
        if not hit and dst.guest is not None and dst.digests is not None and dst.rounds >= 1:
            mem = dst.guest.memory
            page = int(np.flatnonzero(mem.tags_populated)[-1])  # idle memory: never sent again
            mem.page_tags[page, 0] ^= 0x0F  # as a faulty placement would, after the checks
            dst.digests.mark([], [page])
            hit.append(page)
        return False

    pair.run_until(lambda: damage_tags_once() or pair.settled(), 60.0)
    assert hit, "the tags were damaged before the verification"
    assert_handed_over(pair)
    assert pair.src.verify_attempt == 2 and hit[0] in pair.src.mismatched_pages
    assert hit[0] in pair.dst.mismatched_pages, "the destination lists what it repaired, tags included"


def test_the_postcopy_verdict_compares_the_vcpu_state() -> None:
    dst, _ = receiving(
        mode=pb.MODE_POSTCOPY, features=[pb.FEATURE_MTE, pb.FEATURE_VERIFY, pb.FEATURE_POSTCOPY]
    )
    dst.source_stopped = True
    from common.protocol.postcopy import DestPostcopy

    assert dst.guest is not None
    pc = DestPostcopy(dst.guest.memory.page_count)
    pc.present[:] = True
    pc.started = True
    pc.vcpu_digest = b"v" * 16
    dst.postcopy = pc
    dst.machine.phase = DestPhase.POSTCOPY
    request = pb.VerifyRequest(
        attempt=1, source=pb.GuestDigests(ram_digest=pc.digest(), vcpu_digest=b"w" * 16)
    )
    dst.receive(PEER, frames(2, received=1, verify_request=request), 0.5)
    [result] = [m for _, m in replies(dst) if m.kind == "verify_result"]
    assert result.envelope.verify_result.ok is False and result.envelope.verify_result.vcpu_mismatch
    assert dst.verified is False


# -- batches sent from guest memory ------------------------------------------------------------------
def test_no_batch_sent_straight_from_guest_memory_arrives_damaged() -> None:
    """A run of pages goes out of guest memory unhashed again and uncopied only while nothing
    writes it; frames read on arrival, as ZeroMQ reads a zero-copy frame, would show a write
    that slipped in (the destination counts it as damage and asks again)."""
    pair = Pair(
        busy_guest(seed=3, ram=16 << 20, fill=Fill.RANDOM, working_set=8 << 20, dirty_pages_per_step=64),
        MigrationParameters(downtime_limit_ms=20),
        to_dest=Faults(zero_copy=True, latency_s=0.003, bandwidth=200e6),
        guest_speed=4000,
    )
    pair.run(max_seconds=60)
    assert_handed_over(pair)
    assert pair.dst.link.stats.corrupt == 0 and pair.src.link.stats.resent == 0


def test_a_store_that_faults_synchronously_is_counted_and_writes_nothing() -> None:
    guest = boot(1 << 20, WorkloadConfig(seed=3, working_set_bytes=64 << 10))
    workload = Workload(guest)
    guest.vcpus[0].set_tcf(1, TCF_SYNC)
    address = workload._heap_page * PAGE_SIZE
    guest.memory.set_tags(address, 64, 3)
    before = guest.memory.read(address, 64)
    workload._store(make_pointer(address, 4), b"z" * 64, el=1)
    assert workload.faults == 1 and guest.memory.read(address, 64) == before
