"""Framing and page/tag codecs: round trips for every message type, and hostile input."""

from __future__ import annotations

import lz4.block
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.constants import PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE
from common.guest.memory import GuestMemory
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.codec import (
    decode_ram_pages,
    decode_tag_sections,
    encode_ram_pages,
    encode_tag_sections,
)
from common.wire.framing import WireError

SESSION = b"s" * 8


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
    assert list(msg.encoding) == [pb.TAG_UNTAGGED, pb.TAG_UNIFORM]
    assert bytes(payload) == b"\x09" and stats.uniform == 1 and stats.zero == 1


def wire_bytes(mem: GuestMemory, pages: list[int]) -> int:
    msg, payload, _ = encode_tag_sections(mem.page_tags, np.array(pages, dtype=np.int64), use_lz4=True)
    frames = framing.encode(framing.envelope(SESSION, 123456, tag_sections=msg), payload)
    return sum(len(f) for f in frames)


def test_tag_only_change_costs_about_160_bytes_on_the_wire() -> None:
    mem = guest_with_content("random")
    assert wire_bytes(mem, [5]) <= 165  # a lone section, envelope and checksum included
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
    ),
    "hello_ack": pb.HelloAck(accepted=True, protocol_version=1, features=[pb.FEATURE_MTE], initial_credit=16),
    "ram_pages": pb.RamPages(
        round=2, page_index=[1, 2], encoding=[pb.PAGE_ZERO, pb.PAGE_ZERO], length=[0, 0]
    ),
    "tag_sections": pb.TagSections(round=2, page_index=[3], encoding=[pb.TAG_UNTAGGED], length=[0]),
    "end_of_round": pb.EndOfRound(
        round=3, pages_sent=10, tag_sections_sent=4, remaining_dirty_pages=7, final=True
    ),
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
    "postcopy_page": pb.PostcopyPage(
        page_index=4,
        data_encoding=pb.PAGE_RAW,
        data_length=4096,
        tag_encoding=pb.TAG_RAW,
        tag_length=128,
        requested=True,
    ),
    "received_bitmap": pb.ReceivedBitmap(page_count=8, bitmap_lz4=b"\x01"),
    "verify_request": pb.VerifyRequest(
        source=pb.GuestDigests(
            ram_digest=b"r" * 16, tag_digest=b"t" * 16, vcpu_digest=b"v" * 16, ram_block_digests=b"\x00" * 8
        ),
        attempt=1,
    ),
    "verify_result": pb.VerifyResult(
        ok=False,
        mismatched_blocks=[2],
        page_digests=[pb.PageDigests(first_page=512, ram_digests=b"\x01" * 8)],
        attempt=1,
    ),
    "commit": pb.Commit(),
    "started": pb.Started(step=77),
    "ack": pb.Ack(acked_seq=9, credit=4),
    "heartbeat": pb.Heartbeat(),
    "abort": pb.Abort(code=pb.ERROR_CANCELLED, reason="operator cancelled"),
}


def test_every_body_in_the_schema_is_covered() -> None:
    oneof = pb.Envelope.DESCRIPTOR.oneofs_by_name["body"]
    assert {f.name for f in oneof.fields} == set(ALL_BODIES)


@pytest.mark.parametrize("kind", sorted(ALL_BODIES))
def test_every_message_type_round_trips(kind: str) -> None:
    body = ALL_BODIES[kind]
    env = framing.envelope(SESSION, 42, **{kind: body})
    payload = b"payload-bytes" if kind in ("ram_pages", "postcopy_page") else b""
    got = framing.decode(framing.encode(env, payload))
    assert got.kind == kind
    assert getattr(got.envelope, kind) == body
    assert got.envelope.seq == 42 and got.envelope.session_id == SESSION
    assert bytes(got.payload) == payload


# -- hostile input ----------------------------------------------------------------------
def valid_frames() -> list[bytes]:
    src = guest_with_content("mixed")
    msg, payload, _ = encode_ram_pages(src.pages, np.arange(8, dtype=np.int64), use_lz4=True)
    return [bytes(f) for f in framing.encode(framing.envelope(SESSION, 1, ram_pages=msg), payload)]


@settings(max_examples=200)
@given(data=st.data())
def test_any_flipped_bit_is_caught_by_the_checksum(data: st.DataObject) -> None:
    frames = valid_frames()
    which = data.draw(st.integers(0, len(frames) - 1))
    pos = data.draw(st.integers(0, len(frames[which]) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(frames[which])
    damaged[pos] ^= 1 << bit
    frames[which] = bytes(damaged)
    with pytest.raises(WireError) as info:
        framing.decode(frames)
    assert info.value.code in (pb.ERROR_CHECKSUM, pb.ERROR_BAD_MESSAGE)


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
    return pb.RamPages(page_index=indices, encoding=encodings, length=lengths)


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
        (ram(list(range(1025)), [pb.PAGE_ZERO] * 1025, [0] * 1025), b"", "limit"),
    ],
)
def test_hostile_ram_pages_are_refused(msg: pb.RamPages, payload: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message) as info:
        decode_ram_pages(msg, payload, page_count=256)
    assert info.value.code == pb.ERROR_BAD_MESSAGE


def tags(indices: list[int], encodings: list[int], lengths: list[int]) -> pb.TagSections:
    return pb.TagSections(page_index=indices, encoding=encodings, length=lengths)


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
