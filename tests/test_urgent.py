"""The postcopy urgent connection: answers encoded a page at a time, the answerer its thread
runs, the thread itself on real sockets, the destination placing answers ahead of the stream,
and the sessions falling back to the sequenced connection when the urgent one loses a request."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from common.constants import MAX_PAGES_PER_MESSAGE, PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE
from common.guest.guest import Guest
from common.guest.workload import Fill
from common.protocol.urgent import UrgentAnswerer
from common.urgent_server import UrgentServer
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.codec import decode_postcopy_pages
from common.wire.postcopy_pages import PAGE_BY_PAGE_MAX, encode_answer, encode_background, encode_requested
from dest_node.reading import Reader
from dest_node.refusals import RefusalLog
from tests.protocol_harness import Faults, busy_guest
from tests.test_postcopy import assert_equals_unmigrated, postcopy_pair, run_to_end

SESSION = b"S" * 16

# a page's data: zero, one byte repeated (lz4 shrinks it), or random (it does not)
page_kinds = st.sampled_from(["zero", "repeat", "random"])
# a page's packed tags: untagged, uniform (one tag everywhere), uniform bytes whose nibbles
# differ (not a uniform tag), or random
tag_kinds = st.sampled_from(["untagged", "uniform", "mixed-nibbles", "random"])


def memory_with(kinds: Sequence[tuple[str, str]], seed: int) -> Guest:
    guest = Guest.create(max(len(kinds) * PAGE_SIZE, 1 << 20), 1)
    mem, rng = guest.memory, np.random.default_rng(seed)
    for page, (data, tags) in enumerate(kinds):
        if data == "repeat":
            mem.pages[page] = 0x5A
        elif data == "random":
            mem.pages[page] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
        if tags == "uniform":
            mem.page_tags[page] = 0x77
        elif tags == "mixed-nibbles":
            mem.page_tags[page] = 0x73
        elif tags == "random":
            mem.page_tags[page] = rng.integers(0, 256, PACKED_TAG_BYTES_PER_PAGE, dtype=np.uint8)
    return guest


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(page_kinds, tag_kinds), min_size=1, max_size=40), st.booleans(), st.integers(0, 9))
def test_answers_and_background_batches_decode_to_the_pages_and_their_tags(
    kinds: list[tuple[str, str]], use_lz4: bool, seed: int
) -> None:
    mem = memory_with(kinds, seed).memory
    pages = np.arange(len(kinds), dtype=np.int64)[::-1].copy()  # any order: the answer keeps it
    tags = mem.tag_ioctl.read_pages(pages)
    for encode in (encode_answer, encode_requested, encode_background):
        body, payload = encode(mem.pages, tags, pages, use_lz4=use_lz4)
        assert body.requested is (encode is not encode_background)
        batch = decode_postcopy_pages(body, payload, mem.page_count)
        assert batch.indices.tolist() == pages.tolist()
        assert np.array_equal(batch.data, mem.pages[pages]) and np.array_equal(batch.tags, tags)
    zero_cost = [i for i, (d, t) in enumerate(kinds) if d == "zero" and t == "untagged"]
    if len(zero_cost) == len(kinds):
        body, payload = encode_answer(mem.pages, tags, pages, use_lz4=use_lz4)
        assert payload == b"", "zero, untagged pages cost no payload"


def request(pages: list[int], session: bytes = SESSION, epoch: int = 1) -> list[bytes]:
    env = framing.envelope(session, 0, page_request=pb.PageRequest(page_index=pages))
    env.epoch = epoch
    return [bytes(f) for f in framing.encode(env)]


def answerer(pages: int = 64) -> UrgentAnswerer:
    guest = memory_with([("random", "random")] * pages, seed=1)
    return UrgentAnswerer(SESSION, 1, guest.memory, use_lz4=True, clock=time.perf_counter)


def test_the_answerer_answers_its_sessions_requests_and_drops_the_rest() -> None:
    urgent = answerer()
    got = urgent.answer(request([9, 3, 9, urgent.mem.page_count, 1 << 40]))
    assert got is not None
    frames, answered = got
    assert answered.pages.tolist() == [3, 9], "in range, each once, in order"
    assert answered.wire_bytes == sum(len(f) for f in frames)
    message = framing.decode(frames)
    assert message.kind == "postcopy_pages" and message.envelope.seq == 0 and message.envelope.epoch == 1
    batch = decode_postcopy_pages(message.envelope.postcopy_pages, message.payload, urgent.mem.page_count)
    assert np.array_equal(batch.data, urgent.mem.pages[[3, 9]])
    count = urgent.mem.page_count
    for foreign in (
        request([1], session=b"T" * 16),  # another session's
        request([count, count + 1]),  # nothing in range
        [b"\x00" * 12],  # malformed
        [bytes(f) for f in framing.encode(framing.envelope(SESSION, 0, heartbeat=pb.Heartbeat()))],
    ):
        assert urgent.answer(foreign) is None
    assert urgent.dropped == 4
    many = urgent.answer(request(list(range(64)) * 40))
    assert many is not None and many[1].pages.tolist() == list(range(64))
    capped = answerer(MAX_PAGES_PER_MESSAGE + 8).requested_pages(
        request(list(range(MAX_PAGES_PER_MESSAGE + 8)))
    )
    assert capped is not None and capped.size <= MAX_PAGES_PER_MESSAGE
    assert PAGE_BY_PAGE_MAX < MAX_PAGES_PER_MESSAGE


def test_the_thread_says_it_is_ready_answers_on_its_connection_and_sends_the_loops_answers() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dest = ctx.socket(zmq.ROUTER)
    dest.bind("inproc://dest")
    before = sys.getswitchinterval()

    def connect() -> zmq.Socket[bytes]:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, SESSION + b"\x00\x00\x00\x01U")
        sock.connect("inproc://dest")
        return sock

    server = UrgentServer(ctx, connect, answerer())
    try:
        assert dest.poll(5000)
        peer, *ready = dest.recv_multipart()
        assert peer.endswith(b"U") and framing.decode(ready).kind == "urgent_ready"
        assert sys.getswitchinterval() < before, "a short switch interval while it serves"
        dest.send_multipart([peer, *request([5, 2])])
        assert dest.poll(5000)
        _, *frames = dest.recv_multipart()
        message = framing.decode(frames)
        assert message.kind == "postcopy_pages"
        assert decode_postcopy_pages(
            message.envelope.postcopy_pages, message.payload, 64
        ).indices.tolist() == [2, 5]
        deadline = time.monotonic() + 5
        answered = []
        while not answered and time.monotonic() < deadline:
            answered = server.take_answered()
        assert [a.pages.tolist() for a in answered] == [[2, 5]]
        server.send([b"from the loop"])
        assert dest.poll(5000)
        assert dest.recv_multipart()[1:] == [b"from the loop"]
    finally:
        server.stop()
        dest.close(linger=0)
        ctx.term()
    assert sys.getswitchinterval() == before, "the interpreter's own interval once it stopped"


class Recorder:
    """What a DestSession is to the reader: it records what it was handed, in order."""

    session_id = SESSION

    def __init__(self) -> None:
        self.handled: list[bytes] = []

    def receive(self, peer: bytes, frames: list[memoryview], now: float, peer_key: bytes = b"") -> None:
        self.handled.append(bytes(frames[0]))

    def refuse(self, peer: bytes, code: int, reason: str, now: float) -> None:
        self.handled.append(b"refused")


def test_the_destination_places_an_answer_ahead_of_background_batches_that_came_before_it() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://reader")
    main, urgent = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    epoch = (1).to_bytes(4, "big")
    for sock, suffix in ((main, b""), (urgent, b"U")):
        sock.setsockopt(zmq.ROUTING_ID, SESSION + epoch + suffix)
        sock.connect("inproc://reader")
    try:
        for i in range(5):
            main.send(b"background %d" % i)
        time.sleep(0.1)
        urgent.send(b"answer")
        time.sleep(0.1)
        session = Recorder()
        reader = Reader(router, RefusalLog(None), keyed=False)
        reader.drain(session)  # type: ignore[arg-type]
        assert session.handled == [b"answer", b"background 0"], "the answer first, then one batch a turn"
        while reader.held:
            reader.drain(session)  # type: ignore[arg-type]
        assert session.handled[1:] == [b"background %d" % i for i in range(5)], "the rest in order"
    finally:
        for sock in (main, urgent, router):
            sock.close(linger=0)
        ctx.term()


def test_requests_go_on_the_urgent_connection_and_fall_back_to_the_sequenced_one() -> None:
    def guest() -> Guest:
        return busy_guest(seed=3, ram=16 << 20, working_set=12 << 20, dirty_pages_per_step=16)

    pair = run_to_end(postcopy_pair(guest=guest(), dest_steps=300, to_dest=Faults(bandwidth=50e6)))
    assert_equals_unmigrated(pair, guest())
    dst, src = pair.dst.report(pair.now)["postcopy"], pair.src.report(pair.now)["postcopy"]
    assert dst["requests_on_urgent_connection"] >= 50
    assert src["answered_by_urgent_thread"] >= 50
    # every request on the urgent connection lost: each is asked again, sequenced, and answered
    lossy = postcopy_pair(guest=guest(), dest_steps=300, to_dest=Faults(bandwidth=1e6))  # re-asks come first
    lossy.urgent_up.faults = Faults(drop=1.0, seed=4)
    lossy.urgent_up.rng.seed(4)
    pair = run_to_end(lossy)
    assert_equals_unmigrated(pair, guest())
    dst, src = pair.dst.report(pair.now)["postcopy"], pair.src.report(pair.now)["postcopy"]
    assert dst["requests_on_urgent_connection"] > 0 and src["answered_by_urgent_thread"] == 0
    assert pair.dst.postcopy is not None and pair.dst.postcopy.retried_requests > 0


def test_damage_anywhere_in_a_postcopy_payload_is_never_placed() -> None:
    """The frame checksum covers a PostcopyPages header only: each page is checked against the
    manifest instead, so a damaged page is rejected and asked for again, never shown."""

    def guest() -> Guest:
        return busy_guest(seed=6, ram=8 << 20, working_set=6 << 20, fill=Fill.RANDOM)

    pair = run_to_end(postcopy_pair(guest=guest(), dest_steps=300, to_dest=Faults(corrupt=0.3, seed=3)))
    assert_equals_unmigrated(pair, guest())
    dst = pair.dst
    assert dst.postcopy is not None
    assert dst.postcopy.rejected_pages > 0, "damaged pages reached the destination and were refused"


def test_a_thread_that_fails_says_why_and_stops() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dest = ctx.socket(zmq.ROUTER)
    dest.bind("inproc://failing")

    def connect() -> zmq.Socket[bytes]:
        sock = ctx.socket(zmq.DEALER)
        sock.connect("inproc://failing")
        return sock

    broken = answerer()
    broken.answer = lambda frames: 1 / 0  # type: ignore[assignment,method-assign,misc,return-value]
    server = UrgentServer(ctx, connect, broken)
    try:
        assert dest.poll(5000)
        peer, *_ = dest.recv_multipart()
        dest.send_multipart([peer, *request([1])])
        deadline = time.monotonic() + 5
        while server.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not server.alive and server.error is not None and "ZeroDivisionError" in server.error
    finally:
        server.stop()
        dest.close(linger=0)
        ctx.term()


def test_only_the_sources_own_urgent_connection_is_taken_for_one() -> None:
    pair = postcopy_pair(to_dest=Faults(bandwidth=5e6))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.postcopy_side.urgent_peer is not None)
    side, epoch = pair.dst.postcopy_side, pair.dst.link.epoch
    own = pair.src.session_id + epoch.to_bytes(4, "big") + b"U"
    assert side.urgent_peer == own
    ready = framing.decode(
        UrgentAnswerer(
            pair.src.session_id, epoch + 5, pair.src.mem, use_lz4=False, clock=time.perf_counter
        ).ready()
    )
    far = pair.src.session_id + (epoch + 5).to_bytes(4, "big") + b"U"
    side.on_urgent(far, ready, pair.now)
    assert side.urgent_peer == own, "an epoch far ahead of the session's is not the source's"
    ready = framing.decode(
        UrgentAnswerer(
            pair.src.session_id, epoch, pair.src.mem, use_lz4=False, clock=time.perf_counter
        ).ready()
    )
    side.on_urgent(b"someone else", ready, pair.now)
    assert side.urgent_peer == own, "nor is a connection of another routing id"
    side.unreachable(own)
    assert side.urgent_peer is None, "a connection that is gone is not asked again"


def test_an_answer_is_read_at_once_behind_a_full_window_of_batches() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://full")
    urgent = ctx.socket(zmq.DEALER)
    urgent.setsockopt(zmq.ROUTING_ID, SESSION + (1).to_bytes(4, "big") + b"U")
    urgent.connect("inproc://full")
    try:
        window = 64  # a window as large as a turn's reads: all of it read and held
        reader = Reader(router, RefusalLog(None), keyed=False, hold=4 * window + 64)  # as dest-node sizes it
        reader.held.extend((SESSION, []) for _ in range(window))
        urgent.send(b"answer")
        time.sleep(0.1)
        session = Recorder()
        reader.drain(session)  # type: ignore[arg-type]
        assert session.handled[0] == b"answer", "read and placed although a window of batches waits"
    finally:
        for sock in (urgent, router):
            sock.close(linger=0)
        ctx.term()
