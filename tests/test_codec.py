"""Framing and page/tag codecs: round trips for every message type, and hostile input."""

from __future__ import annotations

import lz4.block
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.constants import MAX_PAGES_PER_MESSAGE, PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE
from common.guest.memory import GuestMemory
from common.transfer import DamagedBatch, apply_ram_pages
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.codec import (
    batch_arrays,
    decode_ram_pages,
    decode_tag_sections,
    encode_ram_pages,
    encode_tag_sections,
    packed_fields,
)
from common.wire.framing import WireError

SESSION = b"s" * 8
TOO_MANY = MAX_PAGES_PER_MESSAGE + 1


def encodings_of(msg: pb.RamPages | pb.TagSections) -> list[int]:
    return batch_arrays("", msg)[1].tolist()


def lengths_of(msg: pb.RamPages | pb.TagSections) -> list[int]:
    return batch_arrays("", msg)[2].tolist()


def guest_with_content(kind: str, pages: int = 64) -> GuestMemory:
    mem = GuestMemory(1 << 20)
    rng = np.random.default_rng(3)
    if kind in ("random", "mixed"):
        mem.pages[:pages] = rng.integers(0, 256, (pages, PAGE_SIZE), dtype=np.uint8)
        mem.page_tags[:pages] = rng.integers(0, 256, (pages, PACKED_TAG_BYTES_PER_PAGE), dtype=np.uint8)
    if kind == "mixed":
        mem.pages[0:pages:4] = 0
        mem.pages[1:pages:4] = np.frombuffer((b"compressible text " * 300)[:PAGE_SIZE], dtype=np.uint8)
        mem.page_tags[0:pages:3] = 0
        mem.page_tags[1:pages:3] = 0x77
    return mem


@pytest.mark.parametrize("kind", ["zero", "random", "mixed"])
@pytest.mark.parametrize("use_lz4", [False, True])
def test_pages_and_tags_round_trip(kind: str, use_lz4: bool) -> None:
    src = guest_with_content(kind)
    idx = np.arange(64, dtype=np.int64)
    msg, payload, stats = encode_ram_pages(src.pages, idx, use_lz4=use_lz4)
    frames = framing.encode(framing.envelope(SESSION, 1, ram_pages=msg), payload)
    got = framing.decode([bytes(f) for f in frames])
    decoded = decode_ram_pages(got.envelope.ram_pages, got.payload, src.page_count)
    dst = GuestMemory(1 << 20)
    dst.place_pages(decoded.indices, decoded.rows)
    dst.place_zero_pages(decoded.zero)
    assert np.array_equal(dst.pages[:64], src.pages[:64])
    tmsg, tpayload, tstats = encode_tag_sections(src.page_tags, idx, use_lz4=use_lz4)
    tdec = decode_tag_sections(tmsg, tpayload, src.page_count)
    dst.place_tags(tdec.indices, tdec.rows)
    assert np.array_equal(dst.page_tags[:64], src.page_tags[:64])
    if kind == "zero":
        assert len(payload) == 0 and len(tpayload) == 0 and stats.zero == 64 and tstats.zero == 64
    if kind == "random":
        assert len(payload) == 64 * PAGE_SIZE  # incompressible: sent raw, never inflated
        assert stats.lz4 == 0
    if kind == "mixed" and use_lz4:
        assert stats.lz4 > 0 and len(payload) < 48 * PAGE_SIZE


def test_uniform_and_untagged_sections_are_tiny() -> None:
    mem = GuestMemory(1 << 20)
    mem.set_tags(PAGE_SIZE, PAGE_SIZE, 9)
    msg, payload, stats = encode_tag_sections(mem.page_tags, np.array([0, 1], dtype=np.int64), use_lz4=True)
    assert encodings_of(msg) == [pb.TAG_UNTAGGED, pb.TAG_UNIFORM]
    assert bytes(payload) == b"\x09" and stats.uniform == 1 and stats.zero == 1


def wire_bytes(mem: GuestMemory, pages: list[int]) -> int:
    msg, payload, _ = encode_tag_sections(mem.page_tags, np.array(pages, dtype=np.int64), use_lz4=True)
    frames = framing.encode(framing.envelope(SESSION, 123456, tag_sections=msg), payload)
    return sum(len(f) for f in frames)


def test_tag_only_change_costs_about_160_bytes_on_the_wire() -> None:
    mem = guest_with_content("random")
    assert wire_bytes(mem, [5]) <= 170  # a lone section, envelope and checksum included
    batch = list(range(0, 64))
    assert wire_bytes(mem, batch) / len(batch) <= 140  # the usual case: sections batched


ALL_BODIES = {
    "hello": pb.Hello(
        protocol_version=1,
        page_size=4096,
        granule_size=16,
        ram_bytes=1 << 30,
        features=[pb.FEATURE_MTE, pb.FEATURE_LZ4],
        mode=pb.MODE_PRECOPY,
        vcpu_count=1,
        node_name="a",
        auth_token=b"t",
        populated_hint_lz4=b"\x01\x00\x00\x00\x10\x01",
        reconnect_timeout_ms=30000,
    ),
    "hello_ack": pb.HelloAck(accepted=True, protocol_version=1, features=[pb.FEATURE_MTE], initial_credit=16),
    "ram_pages": pb.RamPages(round=2, **packed_fields([1, 2], [pb.PAGE_ZERO, pb.PAGE_ZERO], [0, 0])),
    "tag_sections": pb.TagSections(round=2, **packed_fields([3], [pb.TAG_UNTAGGED], [0])),
    "end_of_round": pb.EndOfRound(round=3, final=True),
    "device_state": pb.DeviceState(
        vcpus=[
            pb.VcpuState(
                index=0,
                x=list(range(31)),
                sctlr_el1=1 << 40,
                gcr_el1=1,
                rgsr_el1=0x1200,
                tfsr_el1=1,
                tfsre0_el1=2,
            )
        ]
    ),
    "page_request": pb.PageRequest(page_index=[5, 6]),
    "postcopy_pages": pb.PostcopyPages(
        data=pb.RamPages(**packed_fields([4], [pb.PAGE_RAW], [4096])),
        tags=pb.TagSections(**packed_fields([4], [pb.TAG_RAW], [128])),
        data_bytes=4096,
        requested=True,
    ),
    "received_bitmap": pb.ReceivedBitmap(page_count=8, bitmap_lz4=b"\x01", complete=True),
    "page_manifest": pb.PageDigests(first_page=0, ram_digests=b"\x02" * 8, tag_digests=b"\x03" * 8),
    "postcopy_start": pb.PostcopyStart(page_count=256),
    "verify_request": pb.VerifyRequest(
        source=pb.GuestDigests(
            ram_digest=b"r" * 16, tag_digest=b"t" * 16, vcpu_digest=b"v" * 16, ram_block_digests=b"\x00" * 8
        ),
        attempt=1,
    ),
    "verify_result": pb.VerifyResult(
        ok=False,
        page_digests=[pb.PageDigests(first_page=512, ram_digests=b"\x01" * 8)],
        attempt=1,
    ),
    "commit": pb.Commit(),
    "started": pb.Started(step=77),
    "ack": pb.Ack(resend_from=7),
    "heartbeat": pb.Heartbeat(),
    "abort": pb.Abort(code=pb.ERROR_CANCELLED, reason="operator cancelled"),
    "resume": pb.Resume(epoch=2, last_received=17),
    "resume_ack": pb.ResumeAck(epoch=2, last_received=9, guest_running=True),
    "link_timeouts": pb.LinkTimeouts(reconnect_timeout_ms=40_000, postcopy_recover_timeout_ms=60_000),
    "urgent_ready": pb.UrgentReady(),
}


def test_every_body_in_the_schema_is_covered() -> None:
    oneof = pb.Envelope.DESCRIPTOR.oneofs_by_name["body"]
    assert {f.name for f in oneof.fields} == set(ALL_BODIES)


@pytest.mark.parametrize("kind", sorted(ALL_BODIES))
def test_every_message_type_round_trips(kind: str) -> None:
    body = ALL_BODIES[kind]
    env = framing.envelope(SESSION, 42, **{kind: body})
    payload = b"payload-bytes" if kind in ("ram_pages", "postcopy_pages") else b""
    got = framing.decode(framing.encode(env, payload))
    assert got.kind == kind
    assert getattr(got.envelope, kind) == body
    assert got.envelope.seq == 42 and got.envelope.session_id == SESSION
    assert bytes(got.payload) == payload


# -- hostile input ----------------------------------------------------------------------
def valid_frames() -> tuple[GuestMemory, list[bytes]]:
    src = guest_with_content("mixed")
    msg, payload, _ = encode_ram_pages(src.pages, np.arange(8, dtype=np.int64), use_lz4=True)
    frames = [bytes(f) for f in framing.encode(framing.envelope(SESSION, 1, ram_pages=msg), payload)]
    return src, frames


@settings(max_examples=200)
@given(data=st.data())
def test_a_flipped_bit_is_caught_or_changes_nothing_that_lands(data: st.DataObject) -> None:
    """In the header by the frame checksum; in a page batch's payload by its pages' digests.
    An lz4 stream can carry one page two ways (a match offset of 18 or 36 in text that repeats
    every 18 bytes): such a flip is no damage, and the test asks exactly that of it."""
    src, frames = valid_frames()
    which = data.draw(st.integers(0, len(frames) - 1))
    pos = data.draw(st.integers(0, len(frames[which]) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(frames[which])
    damaged[pos] ^= 1 << bit
    frames[which] = bytes(damaged)
    dst = GuestMemory(256 * PAGE_SIZE)
    try:
        message = framing.decode(frames)
        apply_ram_pages(dst, message.envelope.ram_pages, message.payload)
    except WireError as error:
        assert error.code == pb.ERROR_CHECKSUM
        return
    assert which == 1, "a damaged header was accepted"
    assert np.array_equal(dst.pages[:8], src.pages[:8])


def test_an_lz4_flip_that_changes_a_page_is_caught() -> None:
    """The hypothesis test above may pass on harmless flips alone: this one changes a page."""
    _, frames = valid_frames()
    payload = bytearray(frames[1])
    payload[-1] ^= 0x01  # the last page is random and stored raw: its bytes are the page's
    frames[1] = bytes(payload)
    message = framing.decode(frames)
    with pytest.raises(WireError) as info:
        apply_ram_pages(GuestMemory(256 * PAGE_SIZE), message.envelope.ram_pages, message.payload)
    assert info.value.code == pb.ERROR_CHECKSUM


@pytest.mark.parametrize(
    "frames, message",
    [
        ([], "0 frames"),
        ([b"a", b"b", b"c"], "3 frames"),
        ([b"abc"], "too short"),
        ([b"\x00" * 8 + b"\xff\xff\xff"], "checksum"),
    ],
)
def test_malformed_frames_are_refused(frames: list[bytes], message: str) -> None:
    with pytest.raises(WireError, match=message):
        framing.decode(frames)


def test_garbage_with_valid_checksum_is_refused() -> None:
    import struct

    import xxhash

    garbage = b"\xff\xff\xff\xff"
    frame = struct.pack("<Q", xxhash.xxh3_64_intdigest(garbage)) + garbage
    with pytest.raises(WireError, match="not a valid Envelope"):
        framing.decode([frame])
    empty = struct.pack("<Q", xxhash.xxh3_64_intdigest(b"")) + b""
    with pytest.raises(WireError, match="no message body"):
        framing.decode([empty])


def ram(indices: list[int], encodings: list[int], lengths: list[int]) -> pb.RamPages:
    return pb.RamPages(**packed_fields(indices, encodings, lengths))


@pytest.mark.parametrize(
    "msg, payload, message",
    [
        (ram([1, 2], [pb.PAGE_ZERO], [0]), b"", "differ"),
        (ram([256], [pb.PAGE_ZERO], [0]), b"", "out of range"),
        (ram([3, 3], [pb.PAGE_ZERO] * 2, [0, 0]), b"", "twice"),
        (ram([1], [pb.PAGE_RAW], [4096]), b"x" * 100, "payload has 100"),
        (ram([1], [pb.PAGE_RAW], [100]), b"x" * 100, "does not fit"),
        (ram([1], [pb.PAGE_ZERO], [1]), b"x", "does not fit"),
        (ram([1], [7], [0]), b"", "unknown page encoding"),
        (ram([1], [pb.PAGE_LZ4], [5]), b"\xff" * 5, "not valid lz4"),
        (
            ram([1], [pb.PAGE_LZ4], [6]),
            lz4.block.compress(b"short", store_size=False),
            "decompresses to 5 bytes",
        ),
        (ram(list(range(TOO_MANY)), [pb.PAGE_ZERO] * TOO_MANY, [0] * TOO_MANY), b"", "limit"),
    ],
)
def test_hostile_ram_pages_are_refused(msg: pb.RamPages, payload: bytes, message: str) -> None:
    # the checks of structure, as for the pages inside PostcopyPages (no digests)
    with pytest.raises(WireError, match=message) as info:
        decode_ram_pages(msg, payload, page_count=256, digested=False)
    assert info.value.code == pb.ERROR_BAD_MESSAGE


def tags(indices: list[int], encodings: list[int], lengths: list[int]) -> pb.TagSections:
    return pb.TagSections(**packed_fields(indices, encodings, lengths))


@pytest.mark.parametrize(
    "msg, payload, message",
    [
        (tags([999], [pb.TAG_UNTAGGED], [0]), b"", "out of range"),
        (tags([1], [pb.TAG_UNIFORM], [1]), b"\x10", "wider than 4 bits"),
        (tags([1], [pb.TAG_RAW], [127]), b"x" * 127, "does not fit"),
        (tags([1], [9], [0]), b"", "unknown tag encoding"),
        (tags([1], [pb.TAG_LZ4], [4]), b"\xff" * 4, "not valid lz4"),
        (tags([1, 2], [pb.TAG_UNIFORM, pb.TAG_UNIFORM], [1, 1]), b"\x01", "payload has 1"),
    ],
)
def test_hostile_tag_sections_are_refused(msg: pb.TagSections, payload: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_tag_sections(msg, payload, page_count=256)


# -- what the encoders put on the wire ------------------------------------------------------------
TEXT = np.frombuffer((b"compressible text " * 300)[:PAGE_SIZE], dtype=np.uint8)


def page_of(kind: str, rng: np.random.Generator) -> np.ndarray:
    page = np.zeros(PAGE_SIZE, dtype=np.uint8)
    if kind == "random":
        page[:] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    elif kind == "text":
        page[:] = TEXT
    elif kind == "one byte":  # a page whose only content is where a sparse scan may not look
        page[int(rng.integers(1, PAGE_SIZE))] = 1 + int(rng.integers(0, 255))
    return page


PAGE_KINDS = ["zero", "random", "text", "one byte"]


def through_the_wire(msg: pb.RamPages | pb.TagSections, payload: object) -> framing.Message:
    kind = "ram_pages" if isinstance(msg, pb.RamPages) else "tag_sections"
    frames = framing.encode(framing.envelope(SESSION, 1, **{kind: msg}), payload)  # type: ignore[arg-type]
    return framing.decode([bytes(f) for f in frames])


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(PAGE_KINDS), min_size=1, max_size=12),
    order=st.randoms(use_true_random=False),
    use_lz4=st.booleans(),
)
def test_any_batch_of_pages_arrives_intact(kinds: list[str], order, use_lz4: bool) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(len(kinds))
    src = GuestMemory(1 << 20)
    pages = order.sample(range(src.page_count), len(kinds))  # distinct, in any order
    for page, kind in zip(pages, kinds, strict=True):
        src.pages[page] = page_of(kind, rng)
    idx = np.array(pages, dtype=np.int64)
    msg, payload, stats = encode_ram_pages(src.pages, idx, use_lz4=use_lz4, round_no=7)
    got = through_the_wire(msg, payload)
    assert got.envelope.ram_pages.round == 7
    decoded = decode_ram_pages(got.envelope.ram_pages, got.payload, src.page_count)
    dst = GuestMemory(1 << 20)
    dst.pages[:] = 0xEE  # the destination held something else: zero pages must clear it
    dst.data_populated[:] = True
    dst.place_pages(decoded.indices, decoded.rows)
    dst.place_zero_pages(decoded.zero)
    assert np.array_equal(dst.pages[idx], src.pages[idx])
    zero = [k == "zero" for k in kinds]
    assert [e == pb.PAGE_ZERO for e in encodings_of(msg)] == zero
    assert use_lz4 or pb.PAGE_LZ4 not in encodings_of(msg)
    assert (stats.pages, stats.zero) == (len(kinds), sum(zero))
    assert stats.raw == encodings_of(msg).count(pb.PAGE_RAW)
    assert stats.lz4 == encodings_of(msg).count(pb.PAGE_LZ4)
    assert stats.payload_bytes == len(payload) == sum(lengths_of(msg))


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(PAGE_KINDS), min_size=1, max_size=12),
    first=st.integers(0, 200),
    borrow=st.booleans(),
    use_lz4=st.booleans(),
)
def test_a_borrowed_run_is_sent_from_guest_memory_and_arrives_intact(
    kinds: list[str], first: int, borrow: bool, use_lz4: bool
) -> None:
    rng = np.random.default_rng(first)
    src = GuestMemory(1 << 20)
    idx = np.arange(first, first + len(kinds), dtype=np.int64)
    for page, kind in zip(idx.tolist(), kinds, strict=True):
        src.pages[page] = page_of(kind, rng)
    msg, payload, stats = encode_ram_pages(src.pages, idx, use_lz4=use_lz4, borrow=borrow)
    shared = len(payload) > 0 and np.shares_memory(np.frombuffer(payload, dtype=np.uint8), src.pages)
    content = [i for i, kind in enumerate(kinds) if kind != "zero"]
    one_run = bool(content) and content == list(range(content[0], content[-1] + 1))
    assert shared == (borrow and one_run and stats.lz4 == 0 and isinstance(payload, memoryview))
    if borrow and one_run and not use_lz4:
        assert shared, "a run of pages that nothing writes is sent from where it is"
    got = through_the_wire(msg, payload)
    dst = GuestMemory(1 << 20)
    apply_ram_pages(dst, got.envelope.ram_pages, got.payload)  # every page checked as it lands
    assert np.array_equal(dst.pages[idx], src.pages[idx])


def test_a_borrowed_page_written_before_it_left_is_caught_as_damaged() -> None:
    """The guest must not run while a borrowed batch waits in the socket; were it to, the
    destination would refuse the page it changed, not place it as the sender hashed it."""
    src = GuestMemory(1 << 20)
    src.pages[:8] = np.random.default_rng(1).integers(0, 256, (8, PAGE_SIZE), dtype=np.uint8)
    msg, payload, _ = encode_ram_pages(src.pages, np.arange(8, dtype=np.int64), use_lz4=False, borrow=True)
    src.pages[5, 100] ^= 0xFF  # a write after the hashing, before the socket copied it
    with pytest.raises(DamagedBatch) as info:
        apply_ram_pages(GuestMemory(1 << 20), msg, bytes(payload))
    assert info.value.code == pb.ERROR_CHECKSUM and info.value.placed_pages.tolist() == [0, 1, 2, 3, 4]


def test_uncompressed_pages_are_sent_in_header_order() -> None:
    mem = GuestMemory(1 << 20)
    for page in (9, 4, 12):
        mem.pages[page] = page
    msg, payload, _ = encode_ram_pages(mem.pages, np.array([9, 3, 4, 12], dtype=np.int64), use_lz4=False)
    assert encodings_of(msg) == [pb.PAGE_RAW, pb.PAGE_ZERO, pb.PAGE_RAW, pb.PAGE_RAW]
    assert bytes(payload) == bytes([9]) * PAGE_SIZE + bytes([4]) * PAGE_SIZE + bytes([12]) * PAGE_SIZE
    contiguous, cpayload, _ = encode_ram_pages(mem.pages, np.array([4, 5], dtype=np.int64), use_lz4=False)
    assert (
        encodings_of(contiguous) == [pb.PAGE_RAW, pb.PAGE_ZERO] and bytes(cpayload) == bytes([4]) * PAGE_SIZE
    )


def partly_random(share: float, rng: np.random.Generator) -> np.ndarray:
    page = np.zeros(PAGE_SIZE, dtype=np.uint8)
    k = int(PAGE_SIZE * share)
    page[:k] = rng.integers(0, 256, k, dtype=np.uint8)
    return page


@pytest.mark.parametrize("pages", [1, 4, 9])
def test_lz4_is_used_only_when_the_sample_shrinks_below_80_percent(pages: int) -> None:
    rng = np.random.default_rng(5)
    idx = np.arange(pages, dtype=np.int64)
    for share, expected in ((0.9, pb.PAGE_RAW), (0.7, pb.PAGE_LZ4)):
        mem = GuestMemory(1 << 20)
        for page in range(pages):
            mem.pages[page] = partly_random(share, rng)
        ratio = len(lz4.block.compress(mem.pages[0].tobytes(), store_size=False)) / PAGE_SIZE
        assert abs(ratio - share) < 0.05  # the premise: lz4 shrinks such a page to about `share`
        msg, payload, stats = encode_ram_pages(mem.pages, idx, use_lz4=True)
        assert encodings_of(msg) == [expected] * pages
        if expected == pb.PAGE_RAW:
            assert bytes(payload) == mem.pages[:pages].tobytes() and stats.lz4 == 0


def test_pages_lz4_does_not_shrink_stay_raw_in_an_lz4_batch() -> None:
    rng = np.random.default_rng(8)
    mem = GuestMemory(1 << 20)
    mem.pages[0:3] = TEXT
    mem.pages[3] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    msg, payload, stats = encode_ram_pages(mem.pages, np.arange(4, dtype=np.int64), use_lz4=True)
    assert encodings_of(msg) == [pb.PAGE_LZ4] * 3 + [pb.PAGE_RAW]
    assert lengths_of(msg)[3] == PAGE_SIZE and bytes(payload)[-PAGE_SIZE:] == mem.pages[3].tobytes()
    assert (stats.lz4, stats.raw) == (3, 1)


@pytest.mark.parametrize("first", ["text", "random"])
def test_a_small_batch_is_judged_on_all_its_pages(first: str) -> None:
    """With no more pages than the sample holds, every page counts: one compressible page among
    two is enough for lz4 to pay (it shrinks the pair to about 51%), in either position."""
    rng = np.random.default_rng(2)
    mem = GuestMemory(1 << 20)
    kinds = [first, "random" if first == "text" else "text"]
    for page, kind in enumerate(kinds):
        mem.pages[page] = page_of(kind, rng)
    msg, _, _ = encode_ram_pages(mem.pages, np.arange(2, dtype=np.int64), use_lz4=True)
    assert encodings_of(msg) == [pb.PAGE_LZ4 if k == "text" else pb.PAGE_RAW for k in kinds]


def compressing_to_exactly(packed_size: int, size: int | None = None) -> np.ndarray:
    """size (default packed_size) random-ish bytes whose lz4 block is exactly packed_size bytes
    long with the lz4 installed; skips the test when this lz4 makes none from these rows."""
    size = size or packed_size
    rng = np.random.default_rng(11)
    base = rng.integers(0, 256, size, dtype=np.uint8)

    def packed(row: np.ndarray) -> int:
        return len(lz4.block.compress(row.tobytes(), store_size=False))

    for k in range(size, 0, -1):  # a zero tail of growing length
        row = base.copy()
        row[k:] = 0
        if packed(row) == packed_size:
            return row
        if packed(row) < packed_size:
            break
    for length in range(4, 12):  # one short repeat
        for pos in range(length, size - length - 12):
            row = base.copy()
            row[pos : pos + length] = row[:length]
            if packed(row) == packed_size:
                return row
    pytest.skip(f"this lz4 makes no {packed_size}-byte block of {size} bytes from these rows")


@pytest.mark.parametrize("packed_size, expected", [(3276, pb.PAGE_LZ4), (3277, pb.PAGE_RAW)])
def test_the_80_percent_threshold_is_exact(packed_size: int, expected: int) -> None:
    """80% of a page is 3276.8 bytes: a page lz4 shrinks to 3276 bytes is sent compressed, one
    it shrinks to 3277 is not."""
    mem = GuestMemory(1 << 20)
    mem.pages[7] = compressing_to_exactly(packed_size, PAGE_SIZE)
    msg, payload, _ = encode_ram_pages(mem.pages, np.array([7], dtype=np.int64), use_lz4=True)
    assert encodings_of(msg) == [expected]
    assert len(payload) == (packed_size if expected == pb.PAGE_LZ4 else PAGE_SIZE)


def test_page_whose_lz4_is_a_whole_page_is_sent_raw() -> None:
    """Such a page as lz4 would carry PAGE_SIZE bytes, which the decoder rightly refuses."""
    mem = GuestMemory(1 << 20)
    mem.pages[0:3] = TEXT
    mem.pages[3] = compressing_to_exactly(PAGE_SIZE)
    msg, payload, _ = encode_ram_pages(mem.pages, np.arange(4, dtype=np.int64), use_lz4=True)
    assert encodings_of(msg) == [pb.PAGE_LZ4] * 3 + [pb.PAGE_RAW]
    decoded = decode_ram_pages(msg, payload, mem.page_count)
    assert np.array_equal(decoded.rows, mem.pages[:4])


TAG_KINDS = ["untagged", "uniform", "two tags per byte", "uniform first byte", "random", "pattern"]


def tag_row_of(kind: str, rng: np.random.Generator) -> np.ndarray:
    row = np.zeros(PACKED_TAG_BYTES_PER_PAGE, dtype=np.uint8)
    if kind == "uniform":
        tag = int(rng.integers(1, 16))
        row[:] = tag | tag << 4
    elif kind == "two tags per byte":  # every byte equal, but granules 2k and 2k+1 differ
        row[:] = 0x12
    elif kind == "uniform first byte":
        row[:] = rng.integers(0, 256, row.size, dtype=np.uint8)
        row[0] = 0x33
        row[1] = 0x34
    elif kind == "random":
        row[:] = rng.integers(0, 256, row.size, dtype=np.uint8)
    elif kind == "pattern":
        row[:] = np.resize(np.array([0x21, 0x43, 0x65], dtype=np.uint8), row.size)
    return row


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(TAG_KINDS), min_size=1, max_size=12),
    order=st.randoms(use_true_random=False),
    use_lz4=st.booleans(),
)
def test_any_batch_of_tag_sections_arrives_intact(kinds: list[str], order, use_lz4: bool) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(len(kinds))
    src = GuestMemory(1 << 20)
    pages = order.sample(range(src.page_count), len(kinds))
    for page, kind in zip(pages, kinds, strict=True):
        src.page_tags[page] = tag_row_of(kind, rng)
    idx = np.array(pages, dtype=np.int64)
    msg, payload, stats = encode_tag_sections(src.page_tags, idx, use_lz4=use_lz4, round_no=3)
    got = through_the_wire(msg, payload)
    assert got.envelope.tag_sections.round == 3
    decoded = decode_tag_sections(got.envelope.tag_sections, got.payload, src.page_count)
    dst = GuestMemory(1 << 20)
    dst.page_tags[:] = 0xEE
    dst.place_tags(decoded.indices, decoded.rows)
    dst.page_tags[decoded.zero] = 0
    assert np.array_equal(dst.page_tags[idx], src.page_tags[idx])
    expected = {"untagged": [pb.TAG_UNTAGGED], "uniform": [pb.TAG_UNIFORM]}
    for kind, code in zip(kinds, encodings_of(msg), strict=True):
        assert code in expected.get(kind, [pb.TAG_RAW, pb.TAG_LZ4] if use_lz4 else [pb.TAG_RAW]), kind
    assert (stats.pages, stats.zero, stats.uniform) == (
        len(kinds),
        kinds.count("untagged"),
        kinds.count("uniform"),
    )
    assert stats.raw == encodings_of(msg).count(pb.TAG_RAW)
    assert stats.lz4 == encodings_of(msg).count(pb.TAG_LZ4)
    assert stats.payload_bytes == len(payload) == sum(lengths_of(msg))


def test_tag_sections_payload_layout() -> None:
    """Untagged: nothing; uniform: the tag in one byte; varied: the 128 packed bytes."""
    mem = GuestMemory(1 << 20)
    mem.set_tags(2 * PAGE_SIZE, PAGE_SIZE, 0xC)
    mem.page_tags[5] = 0x12
    msg, payload, _ = encode_tag_sections(mem.page_tags, np.array([5, 0, 2], dtype=np.int64), use_lz4=False)
    assert encodings_of(msg) == [pb.TAG_RAW, pb.TAG_UNTAGGED, pb.TAG_UNIFORM]
    assert lengths_of(msg) == [PACKED_TAG_BYTES_PER_PAGE, 0, 1]
    assert bytes(payload) == b"\x12" * PACKED_TAG_BYTES_PER_PAGE + b"\x0c"
    alone, apayload, _ = encode_tag_sections(mem.page_tags, np.array([5, 6], dtype=np.int64), use_lz4=False)
    assert encodings_of(alone) == [pb.TAG_RAW, pb.TAG_UNTAGGED]
    assert bytes(apayload) == b"\x12" * PACKED_TAG_BYTES_PER_PAGE


def test_section_whose_lz4_is_a_whole_section_is_sent_raw() -> None:
    mem = GuestMemory(1 << 20)
    pattern = tag_row_of("pattern", np.random.default_rng(0))
    mem.page_tags[0:3] = pattern
    mem.page_tags[3] = compressing_to_exactly(PACKED_TAG_BYTES_PER_PAGE)
    msg, payload, _ = encode_tag_sections(mem.page_tags, np.arange(4, dtype=np.int64), use_lz4=True)
    assert encodings_of(msg) == [pb.TAG_LZ4] * 3 + [pb.TAG_RAW]
    assert np.array_equal(decode_tag_sections(msg, payload, mem.page_count).rows, mem.page_tags[:4])
