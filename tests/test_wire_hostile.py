"""Every check of the wire decoders, one test each: a peer's bad message is refused with the
right error code and a reason that names what is wrong, and a message just inside each limit is
accepted (so that a check moved by one, or dropped, fails here)."""

from __future__ import annotations

import struct
from functools import partial

import lz4.block
import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from common.constants import (
    MAX_FRAME_BYTES,
    MAX_PAGES_PER_MESSAGE,
    MAX_TAG_SECTIONS_PER_MESSAGE,
    PACKED_TAG_BYTES_PER_PAGE,
    PAGE_SIZE,
    PROTOCOL_VERSION,
)
from common.guest.memory import GuestMemory
from common.transfer import apply_ram_pages
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.bitmap import decode_bitmap, encode_bitmap
from common.wire.codec import (
    decode_ram_pages,
    decode_tag_sections,
    encode_ram_pages,
    encode_tag_sections,
    packed_fields,
)
from common.wire.framing import WireError

SESSION = b"s" * 8
PAGES = 256  # the guest the decoders are asked about


def check(info: pytest.ExceptionInfo[WireError], code: int, *words: str) -> None:
    assert info.value.code == code, info.value.reason
    for word in words:
        assert word in info.value.reason, (word, info.value.reason)


def frame_with_checksum(header: bytes, payload: bytes = b"") -> list[bytes]:
    """A frame 0 as the wire spec says, built without common.wire: xxh3-64 of header and
    payload, little-endian, then the header."""
    first = struct.pack("<Q", xxhash.xxh3_64_intdigest(header + payload)) + header
    return [first, payload] if payload else [first]


# -- lz4 blocks built by hand (the block format is fixed; a compressor's output is not) ------
def _length_bytes(n: int) -> bytes:
    """The extension bytes of a length whose 4-bit field says 15."""
    n -= 15
    return b"\xff" * (n // 255) + bytes((n % 255,))


def lz4_block(first: bytes, offset: int, match_len: int, last: bytes) -> bytes:
    """One sequence (literals `first`, then a match of match_len bytes offset back), then the
    final literals `last`."""
    m = match_len - 4
    block = bytes((min(len(first), 15) << 4 | min(m, 15),))
    block += _length_bytes(len(first)) if len(first) >= 15 else b""
    block += first + offset.to_bytes(2, "little")
    block += _length_bytes(m) if m >= 15 else b""
    block += bytes((min(len(last), 15) << 4,))
    block += _length_bytes(len(last)) if len(last) >= 15 else b""
    return block + last


def lz4_of_size(out_size: int, block_size: int) -> tuple[bytes, bytes]:
    """(block, what it decompresses to): block_size bytes of lz4 that give out_size bytes."""
    rng = np.random.default_rng(block_size)
    first = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    for last_len in range(5, out_size):
        match_len = out_size - 16 - last_len
        if match_len < 4:
            break
        last = rng.integers(0, 256, last_len, dtype=np.uint8).tobytes()
        block = lz4_block(first, 16, match_len, last)
        if len(block) == block_size:
            data = lz4.block.decompress(block, uncompressed_size=out_size)
            assert len(data) == out_size
            return block, data
    raise AssertionError(f"no {block_size}-byte block for {out_size} bytes")


# -- framing -----------------------------------------------------------------------------------
def heartbeat_header() -> bytes:
    return framing.envelope(SESSION, 7, heartbeat=pb.Heartbeat()).SerializeToString()


@pytest.mark.parametrize("count", [0, 3, 4])
def test_wrong_frame_count_is_refused(count: int) -> None:
    frames = (frame_with_checksum(heartbeat_header()) * 4)[:count]
    with pytest.raises(WireError) as info:
        framing.decode(frames)
    check(info, pb.ERROR_BAD_MESSAGE, f"{count} frames")


def test_one_and_two_frames_are_accepted() -> None:
    header = heartbeat_header()
    assert framing.decode(frame_with_checksum(header)).kind == "heartbeat"
    two = framing.decode(frame_with_checksum(header, b"raw"))
    assert two.kind == "heartbeat" and bytes(two.payload) == b"raw"


def test_header_frame_shorter_than_its_checksum_is_refused() -> None:
    with pytest.raises(WireError) as info:
        framing.decode([b"\x00" * 7])
    check(info, pb.ERROR_BAD_MESSAGE, "7 bytes", "too short")
    # exactly a checksum and nothing else is long enough: what is wrong then is the body
    with pytest.raises(WireError) as info:
        framing.decode(frame_with_checksum(b""))
    check(info, pb.ERROR_BAD_MESSAGE, "no message body")


def test_message_over_the_size_limit_is_refused_before_anything_else() -> None:
    header = heartbeat_header()
    room = MAX_FRAME_BYTES - 8 - len(header)
    at_limit = frame_with_checksum(header, bytes(room))
    assert sum(map(len, at_limit)) == MAX_FRAME_BYTES
    assert len(framing.decode(at_limit).payload) == room
    over = frame_with_checksum(header, bytes(room + 1))
    with pytest.raises(WireError) as info:
        framing.decode(over)
    check(info, pb.ERROR_BAD_MESSAGE, f"{MAX_FRAME_BYTES + 1} bytes", "exceeds")
    # the limit counts both frames: a huge header alone is refused too, and before its
    # (wrong) checksum is even computed
    with pytest.raises(WireError) as info:
        framing.decode([bytes(MAX_FRAME_BYTES + 1)])
    check(info, pb.ERROR_BAD_MESSAGE, "exceeds")


@settings(max_examples=150)
@given(data=st.data())
def test_any_flipped_bit_is_a_checksum_error(data: st.DataObject) -> None:
    header = framing.envelope(SESSION, 3, started=pb.Started(step=12)).SerializeToString()
    frames = frame_with_checksum(header, b"some payload bytes")
    which = data.draw(st.integers(0, 1), label="frame")
    pos = data.draw(st.integers(0, len(frames[which]) - 1), label="byte")
    damaged = bytearray(frames[which])
    damaged[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    frames[which] = bytes(damaged)
    with pytest.raises(WireError) as info:
        framing.decode(frames)
    check(info, pb.ERROR_CHECKSUM, "checksum")


def test_checksum_covers_the_header_and_the_payload() -> None:
    """A peer that hashes only one of the two is not speaking our wire."""
    header = heartbeat_header()
    for first in (
        struct.pack("<Q", xxhash.xxh3_64_intdigest(header)) + header,
        struct.pack("<Q", xxhash.xxh3_64_intdigest(b"payload")) + header,
    ):
        with pytest.raises(WireError) as info:
            framing.decode([first, b"payload"])
        check(info, pb.ERROR_CHECKSUM)


def test_encoder_writes_the_documented_frame_layout() -> None:
    env = framing.envelope(SESSION, 9, heartbeat=pb.Heartbeat())
    assert env.protocol_version == PROTOCOL_VERSION and env.session_id == SESSION and env.seq == 9
    header = env.SerializeToString()
    assert [bytes(f) for f in framing.encode(env, b"data")] == frame_with_checksum(header, b"data")
    assert [bytes(f) for f in framing.encode(env)] == frame_with_checksum(header)  # no empty frame 1


def test_header_that_is_not_an_envelope_is_refused() -> None:
    with pytest.raises(WireError) as info:
        framing.decode(frame_with_checksum(b"\xff\xff\xff\xff"))
    check(info, pb.ERROR_BAD_MESSAGE, "not a valid Envelope")


def test_envelope_without_a_body_is_refused() -> None:
    header = pb.Envelope(protocol_version=1, session_id=SESSION, seq=1).SerializeToString()
    with pytest.raises(WireError) as info:
        framing.decode(frame_with_checksum(header, b"payload"))
    check(info, pb.ERROR_BAD_MESSAGE, "no message body")


def test_kind_of_a_message_is_its_body() -> None:
    assert framing.Message(pb.Envelope(seq=1)).kind == ""
    assert framing.Message(framing.envelope(SESSION, 1, commit=pb.Commit())).kind == "commit"


# -- page bitmaps ------------------------------------------------------------------------------
@settings(max_examples=100)
@given(st.lists(st.booleans(), min_size=1, max_size=200))
def test_bitmap_round_trips_for_any_page_count(bits: list[bool]) -> None:
    blob = encode_bitmap(np.array(bits, dtype=np.bool_))
    got = decode_bitmap(blob, len(bits), "hint")
    assert got.dtype == np.bool_ and got.tolist() == bits


def test_bitmap_wire_layout() -> None:
    """Page k is bit k%8 of byte k//8, lz4 block with its 4-byte little-endian size first."""
    bits = np.zeros(10, dtype=np.bool_)
    bits[[0, 3, 9]] = True
    blob = encode_bitmap(bits)
    assert blob[:4] == (2).to_bytes(4, "little")
    assert lz4.block.decompress(blob) == bytes((0b0000_1001, 0b0000_0010))
    # and a bitmap written by hand in that layout decodes to those pages
    hand = lz4.block.compress(bytes((0b1000_0001, 0b0000_0100)), store_size=True)
    assert np.flatnonzero(decode_bitmap(hand, 11, "hint")).tolist() == [0, 7, 10]


def test_bitmap_shorter_than_its_size_field_is_refused() -> None:
    with pytest.raises(WireError) as info:
        decode_bitmap(b"\x01\x00\x00", 8, "populated hint")
    check(info, pb.ERROR_BAD_MESSAGE, "populated hint", "3 bytes", "too short")
    # a size field alone is not too short; it is not lz4
    with pytest.raises(WireError) as info:
        decode_bitmap((1).to_bytes(4, "little"), 8, "populated hint")
    check(info, pb.ERROR_BAD_MESSAGE, "populated hint", "lz4")


@pytest.mark.parametrize("pages, right", [(1, 1), (8, 1), (9, 2), (16, 2), (17, 3), (4096, 512)])
def test_bitmap_claiming_the_wrong_size_is_refused_before_decompressing(pages: int, right: int) -> None:
    body = lz4.block.compress(bytes(right), store_size=False)
    assert len(decode_bitmap(right.to_bytes(4, "little") + body, pages, "hint")) == pages
    for claimed in (right - 1, right + 1, 0x7FFF_FFFF):
        with pytest.raises(WireError) as info:
            decode_bitmap(claimed.to_bytes(4, "little") + body, pages, "hint")
        check(info, pb.ERROR_BAD_MESSAGE, f"claims {claimed} bytes", f"expected {right}", f"{pages} pages")


def test_bitmap_that_is_not_lz4_is_refused() -> None:
    with pytest.raises(WireError) as info:
        decode_bitmap((2).to_bytes(4, "little") + b"\xff\xff\xff", 16, "hint")
    check(info, pb.ERROR_BAD_MESSAGE, "not a valid lz4 bitmap")


def test_bitmap_decompressing_short_is_refused() -> None:
    short = (4).to_bytes(4, "little") + lz4.block.compress(b"\x01\x02", store_size=False)
    with pytest.raises(WireError) as info:
        decode_bitmap(short, 32, "hint")
    check(info, pb.ERROR_BAD_MESSAGE, "has 2 bytes", "expected 4")


# -- batch headers (shared by RAM pages and tag sections) --------------------------------------
def ram(indices: list[int], encodings: list[int], lengths: list[int]) -> pb.RamPages:
    return pb.RamPages(**packed_fields(indices, encodings, lengths))


def tags(indices: list[int], encodings: list[int], lengths: list[int]) -> pb.TagSections:
    return pb.TagSections(**packed_fields(indices, encodings, lengths))


DECODERS = {
    "RAM pages": (partial(decode_ram_pages, digested=False), ram, pb.PAGE_ZERO),
    "tag sections": (partial(decode_tag_sections, digested=False), tags, pb.TAG_UNTAGGED),
}
LIMITS = {"RAM pages": MAX_PAGES_PER_MESSAGE, "tag sections": MAX_TAG_SECTIONS_PER_MESSAGE}


@pytest.mark.parametrize("what", list(DECODERS))
@pytest.mark.parametrize(
    "n_idx, n_enc, n_len", [(2, 1, 1), (1, 2, 2), (2, 2, 1), (1, 1, 2), (1, 2, 1), (0, 1, 1)]
)
def test_parallel_arrays_of_different_lengths_are_refused(
    what: str, n_idx: int, n_enc: int, n_len: int
) -> None:
    decode, build, empty_code = DECODERS[what]
    with pytest.raises(WireError) as info:
        decode(build(list(range(n_idx)), [empty_code] * n_enc, [0] * n_len), b"", PAGES)
    check(info, pb.ERROR_BAD_MESSAGE, what, f"{n_idx} page indices", f"{n_enc} encodings", f"{n_len} lengths")


@pytest.mark.parametrize("what", list(DECODERS))
def test_batch_size_limit(what: str) -> None:
    decode, build, empty_code = DECODERS[what]
    n = LIMITS[what]
    ok = decode(build(list(range(n)), [empty_code] * n, [0] * n), b"", 4 * n)
    assert ok.zero.tolist() == list(range(n))
    with pytest.raises(WireError) as info:
        decode(build(list(range(n + 1)), [empty_code] * (n + 1), [0] * (n + 1)), b"", 4 * n)
    check(info, pb.ERROR_BAD_MESSAGE, what, f"{n + 1} pages", "limit")


@pytest.mark.parametrize("what", list(DECODERS))
def test_packed_arrays_of_partial_numbers_are_refused(what: str) -> None:
    decode, build, empty_code = DECODERS[what]
    msg = build([1, 2], [empty_code] * 2, [0, 0])
    for field, cut in (("pages", 1), ("lengths", 1)):
        broken = type(msg)()
        broken.CopyFrom(msg)
        setattr(broken, field, getattr(msg, field)[:-cut])
        with pytest.raises(WireError) as info:
            decode(broken, b"", PAGES)
        check(info, pb.ERROR_BAD_MESSAGE, what, "not", "whole 4- and 2-byte numbers")


@pytest.mark.parametrize("what", list(DECODERS))
@pytest.mark.parametrize("bad", [PAGES, PAGES + 1, 2**31, 2**32 - 1])
def test_page_index_out_of_range_is_refused(what: str, bad: int) -> None:
    decode, build, empty_code = DECODERS[what]
    last = decode(build([0, PAGES - 1], [empty_code] * 2, [0, 0]), b"", PAGES)
    assert last.zero.tolist() == [0, PAGES - 1]
    with pytest.raises(WireError) as info:
        decode(build([3, bad, 4], [empty_code] * 3, [0] * 3), b"", PAGES)
    check(info, pb.ERROR_BAD_MESSAGE, what, f"page {bad}", "out of range", f"{PAGES} pages")


@pytest.mark.parametrize("what", list(DECODERS))
def test_a_page_twice_in_one_batch_is_refused(what: str) -> None:
    decode, build, empty_code = DECODERS[what]
    with pytest.raises(WireError) as info:
        decode(build([5, 9, 5], [empty_code] * 3, [0] * 3), b"", PAGES)
    check(info, pb.ERROR_BAD_MESSAGE, what, "twice")


@pytest.mark.parametrize("what", list(DECODERS))
def test_empty_batch_places_nothing(what: str) -> None:
    decode, build, _ = DECODERS[what]
    got = decode(build([], [], []), b"", PAGES)
    assert got.indices.size == 0 and got.rows.shape[0] == 0 and got.zero.size == 0


def test_lengths_must_add_up_to_the_payload() -> None:
    for payload in (b"x" * (PAGE_SIZE - 1), b"x" * (PAGE_SIZE + 1)):
        with pytest.raises(WireError) as info:
            decode_ram_pages(ram([1], [pb.PAGE_RAW], [PAGE_SIZE]), payload, PAGES, digested=False)
        check(
            info, pb.ERROR_BAD_MESSAGE, "RAM pages", f"add up to {PAGE_SIZE}", f"payload has {len(payload)}"
        )
    with pytest.raises(WireError) as info:
        decode_tag_sections(
            tags([1, 2], [pb.TAG_UNIFORM] * 2, [1, 1]), b"\x01\x02\x03", PAGES, digested=False
        )
    check(info, pb.ERROR_BAD_MESSAGE, "tag sections", "add up to 2", "payload has 3")


# -- RAM pages -----------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [0, 4, 7, 255])
def test_unknown_page_encoding_is_refused(code: int) -> None:
    with pytest.raises(WireError) as info:
        decode_ram_pages(ram([1, 2], [pb.PAGE_ZERO, code], [0, 0]), b"", PAGES, digested=False)
    check(info, pb.ERROR_BAD_MESSAGE, f"unknown page encoding {code}")


@pytest.mark.parametrize(
    "encoding, length",
    [
        (pb.PAGE_ZERO, 1),
        (pb.PAGE_ZERO, PAGE_SIZE),
        (pb.PAGE_RAW, PAGE_SIZE - 1),
        (pb.PAGE_RAW, PAGE_SIZE + 1),
        (pb.PAGE_RAW, 0),
        (pb.PAGE_LZ4, 0),
        (pb.PAGE_LZ4, PAGE_SIZE),  # an lz4 page no smaller than raw is never sent
        (pb.PAGE_LZ4, PAGE_SIZE + 100),
    ],
)
def test_page_length_that_does_not_fit_its_encoding_is_refused(encoding: int, length: int) -> None:
    msg = ram([1, 2], [pb.PAGE_ZERO, encoding], [0, length])
    with pytest.raises(WireError) as info:
        decode_ram_pages(msg, b"\x01" * length, PAGES, digested=False)
    check(info, pb.ERROR_BAD_MESSAGE, "RAM pages", "length does not fit")


def test_lz4_page_lengths_inside_the_bounds_are_decompressed() -> None:
    block, data = lz4_of_size(PAGE_SIZE, PAGE_SIZE - 1)
    got = decode_ram_pages(ram([4], [pb.PAGE_LZ4], [len(block)]), block, PAGES, digested=False)
    assert got.indices.tolist() == [4] and got.rows.tobytes() == data
    # one byte is a legal length; what is wrong with it is its content
    with pytest.raises(WireError) as info:
        decode_ram_pages(ram([4], [pb.PAGE_LZ4], [1]), b"\x00", PAGES, digested=False)
    check(info, pb.ERROR_BAD_MESSAGE, "page 4", "decompresses to 0 bytes")


def test_page_that_is_not_lz4_is_refused() -> None:
    with pytest.raises(WireError) as info:
        decode_ram_pages(ram([1, 6], [pb.PAGE_ZERO, pb.PAGE_LZ4], [0, 5]), b"\xff" * 5, PAGES, digested=False)
    check(info, pb.ERROR_BAD_MESSAGE, "RAM pages", "page 6", "not valid lz4")


def test_lz4_page_decompressing_short_is_refused() -> None:
    short = lz4.block.compress(b"short page", store_size=False)
    with pytest.raises(WireError) as info:
        decode_ram_pages(ram([9], [pb.PAGE_LZ4], [len(short)]), short, PAGES, digested=False)
    check(info, pb.ERROR_BAD_MESSAGE, "page 9", "decompresses to 10 bytes", f"not {PAGE_SIZE}")


def test_decoded_pages_land_where_their_indices_say() -> None:
    """Rows follow the header order, zero pages have no row, lz4 and raw pages interleave."""
    block, data = lz4_of_size(PAGE_SIZE, 200)
    raw_a, raw_b = b"\xaa" * PAGE_SIZE, b"\xbb" * PAGE_SIZE
    msg = ram(
        [30, 2, 17, 5, 8],
        [pb.PAGE_RAW, pb.PAGE_ZERO, pb.PAGE_LZ4, pb.PAGE_ZERO, pb.PAGE_RAW],
        [PAGE_SIZE, 0, len(block), 0, PAGE_SIZE],
    )
    got = decode_ram_pages(msg, raw_a + block + raw_b, PAGES, digested=False)
    assert got.indices.tolist() == [30, 17, 8] and got.zero.tolist() == [2, 5]
    assert [r.tobytes() for r in got.rows] == [raw_a, data, raw_b]
    plain = decode_ram_pages(
        ram([3, 1], [pb.PAGE_RAW] * 2, [PAGE_SIZE] * 2), raw_b + raw_a, PAGES, digested=False
    )
    assert plain.indices.tolist() == [3, 1] and [r.tobytes() for r in plain.rows] == [raw_b, raw_a]


# -- tag sections ----------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [0, 5, 9, 253])
def test_unknown_tag_encoding_is_refused(code: int) -> None:
    with pytest.raises(WireError) as info:
        decode_tag_sections(tags([1, 2], [pb.TAG_UNTAGGED, code], [0, 0]), b"", PAGES, digested=False)
    check(info, pb.ERROR_BAD_MESSAGE, f"unknown tag encoding {code}")


TAG_LENGTH_BOUNDS = {
    pb.TAG_UNTAGGED: (0, 0),
    pb.TAG_UNIFORM: (1, 1),
    pb.TAG_RAW: (PACKED_TAG_BYTES_PER_PAGE, PACKED_TAG_BYTES_PER_PAGE),
    pb.TAG_LZ4: (1, PACKED_TAG_BYTES_PER_PAGE - 1),
}


OUTSIDE_TAG_LENGTH_BOUNDS = [
    (encoding, length)
    for encoding, (lo, hi) in TAG_LENGTH_BOUNDS.items()
    for length in (lo - 1, hi + 1)
    if length >= 0  # lengths are unsigned on the wire
]


@pytest.mark.parametrize("encoding, length", OUTSIDE_TAG_LENGTH_BOUNDS)
def test_section_length_outside_its_encoding_bounds_is_refused(encoding: int, length: int) -> None:
    msg = tags([1, 2], [pb.TAG_UNTAGGED, encoding], [0, length])
    with pytest.raises(WireError) as info:
        decode_tag_sections(msg, b"\x01" * length, PAGES, digested=False)
    check(info, pb.ERROR_BAD_MESSAGE, "tag sections", "length does not fit")


def test_section_lengths_at_their_bounds_are_accepted() -> None:
    block, data = lz4_of_size(PACKED_TAG_BYTES_PER_PAGE, PACKED_TAG_BYTES_PER_PAGE - 1)
    raw = bytes(range(PACKED_TAG_BYTES_PER_PAGE))
    msg = tags(
        [7, 3, 9, 4],
        [pb.TAG_UNTAGGED, pb.TAG_UNIFORM, pb.TAG_RAW, pb.TAG_LZ4],
        [0, 1, PACKED_TAG_BYTES_PER_PAGE, len(block)],
    )
    got = decode_tag_sections(msg, b"\x0f" + raw + block, PAGES, digested=False)
    assert got.zero.tolist() == [7] and got.indices.tolist() == [3, 9, 4]
    assert [r.tobytes() for r in got.rows] == [b"\xff" * PACKED_TAG_BYTES_PER_PAGE, raw, data]
    # a one-byte lz4 section is a legal length; what is wrong with it is its content
    with pytest.raises(WireError) as info:
        decode_tag_sections(tags([4], [pb.TAG_LZ4], [1]), b"\x00", PAGES, digested=False)
    check(info, pb.ERROR_BAD_MESSAGE, "tag sections", "page 4", "decompresses to 0 bytes")


@pytest.mark.parametrize("tag", [0x10, 0x1F, 0xFF])
def test_uniform_tag_wider_than_4_bits_is_refused(tag: int) -> None:
    msg = tags([2, 6], [pb.TAG_UNIFORM] * 2, [1, 1])
    with pytest.raises(WireError) as info:
        decode_tag_sections(msg, bytes((0x3, tag)), PAGES, digested=False)
    check(info, pb.ERROR_BAD_MESSAGE, f"uniform tag {tag}", "page 6", "wider than 4 bits")


@pytest.mark.parametrize("tag", range(16))
def test_uniform_tag_fills_every_granule(tag: int) -> None:
    got = decode_tag_sections(tags([6], [pb.TAG_UNIFORM], [1]), bytes((tag,)), PAGES, digested=False)
    assert got.rows.tobytes() == bytes((tag | tag << 4,)) * PACKED_TAG_BYTES_PER_PAGE


def test_section_that_is_not_lz4_is_refused() -> None:
    with pytest.raises(WireError) as info:
        decode_tag_sections(
            tags([1, 2], [pb.TAG_UNIFORM, pb.TAG_LZ4], [1, 4]), b"\x01" + b"\xff" * 4, PAGES, digested=False
        )
    check(info, pb.ERROR_BAD_MESSAGE, "tag sections", "page 2", "not valid lz4")


def test_lz4_section_decompressing_short_is_refused() -> None:
    short = lz4.block.compress(b"\x12" * 40, store_size=False)
    with pytest.raises(WireError) as info:
        decode_tag_sections(tags([3], [pb.TAG_LZ4], [len(short)]), short, PAGES, digested=False)
    check(
        info, pb.ERROR_BAD_MESSAGE, "page 3", "decompresses to 40 bytes", f"not {PACKED_TAG_BYTES_PER_PAGE}"
    )


def test_raw_sections_alone_land_where_their_indices_say() -> None:
    a, b = bytes(range(128)), bytes(range(128, 256))
    got = decode_tag_sections(tags([8, 1], [pb.TAG_RAW] * 2, [128, 128]), a + b, PAGES, digested=False)
    assert got.indices.tolist() == [8, 1] and [r.tobytes() for r in got.rows] == [a, b]
    only_uniform = decode_tag_sections(
        tags([8, 1, 2], [pb.TAG_UNIFORM] * 3, [1, 1, 1]), b"\x01\x02\x03", PAGES, digested=False
    )
    assert [r[0] for r in only_uniform.rows] == [0x11, 0x22, 0x33]


# -- per-page digests: the transit check of page batches, and the verification's leaves ----------
def _guest_tables() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    pages = rng.integers(0, 256, (PAGES, PAGE_SIZE), dtype=np.uint8)
    pages[[3, 7]] = 0  # zero pages carry no bytes and no digest
    page_tags = rng.integers(0, 256, (PAGES, PACKED_TAG_BYTES_PER_PAGE), dtype=np.uint8)
    page_tags[4] = 0  # untagged
    page_tags[5] = 0x99  # uniform
    return pages, page_tags


def test_page_batch_checksum_covers_the_header_and_digests_cover_each_page() -> None:
    pages, _ = _guest_tables()
    body, payload, _ = encode_ram_pages(pages, np.arange(2, 10), use_lz4=False)
    assert len(body.digests) == 8 * 6, "a digest per page with content, none for zero pages"
    header = framing.envelope(SESSION, 4, ram_pages=body).SerializeToString()
    # the documented layout: the frame checksum covers the header alone for page batches
    frames = [struct.pack("<Q", xxhash.xxh3_64_intdigest(header)) + header, bytes(payload)]
    message = framing.decode(frames)
    got = decode_ram_pages(message.envelope.ram_pages, message.payload, PAGES)
    assert got.indices.tolist() == [2, 4, 5, 6, 8, 9] and got.zero.tolist() == [3, 7]
    assert got.digests.tolist() == [xxhash.xxh3_64_intdigest(pages[i].tobytes()) for i in got.indices]
    with pytest.raises(WireError) as info:  # a checksum over header and payload is not ours
        framing.decode([struct.pack("<Q", xxhash.xxh3_64_intdigest(header + frames[1])) + header, frames[1]])
    check(info, pb.ERROR_CHECKSUM)


@settings(max_examples=60)
@given(data=st.data())
def test_any_damaged_page_byte_is_a_checksum_error_naming_its_page(data: st.DataObject) -> None:
    pages, _ = _guest_tables()
    body, payload, _ = encode_ram_pages(pages, np.arange(1, 9), use_lz4=data.draw(st.booleans()))
    damaged = bytearray(bytes(payload))
    pos = data.draw(st.integers(0, len(damaged) - 1), label="byte")
    damaged[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    with pytest.raises(WireError) as info:  # checked as the pages land, as a destination does
        apply_ram_pages(GuestMemory(PAGES * PAGE_SIZE), body, bytes(damaged))
    check(info, pb.ERROR_CHECKSUM, "RAM pages")
    if "damaged in transit" in info.value.reason:
        content = [i for i in range(1, 9) if pages[i].any()]
        assert f"page {content[pos // PAGE_SIZE]}" in info.value.reason, "the page the damage is in"


def test_tag_sections_stay_covered_by_the_frame_checksum_and_carry_no_digests() -> None:
    _, page_tags = _guest_tables()
    body, payload, stats = encode_tag_sections(page_tags, np.arange(2, 8), use_lz4=False)
    assert "digests" not in pb.TagSections.DESCRIPTOR.fields_by_name, "8 bytes beside 128 would matter"
    assert stats.content.tolist() == [2, 3, 5, 6, 7] and stats.empty.tolist() == [4]
    got = decode_tag_sections(body, payload, PAGES)
    assert got.digests.tolist() == stats.digests.tolist(), "both sides' leaves for the same tags"
    frames = framing.encode(framing.envelope(SESSION, 2, tag_sections=body), payload)
    damaged = bytearray(frames[1])
    damaged[3] ^= 0x10
    with pytest.raises(WireError) as info:
        framing.decode([frames[0], bytes(damaged)])
    check(info, pb.ERROR_CHECKSUM, "checksum")


def test_a_page_batch_without_its_digests_is_refused() -> None:
    pages, _ = _guest_tables()
    body, payload, _ = encode_ram_pages(pages, np.arange(8), use_lz4=False)
    body.digests = body.digests[:-8]
    with pytest.raises(WireError) as info:
        decode_ram_pages(body, payload, PAGES)
    check(info, pb.ERROR_BAD_MESSAGE, "RAM pages", "40 bytes of digests for 6 pages")


def test_a_payload_shorter_than_an_intact_header_says_is_damage_in_transit() -> None:
    pages, _ = _guest_tables()
    body, payload, _ = encode_ram_pages(pages, np.arange(8, 10), use_lz4=False)
    with pytest.raises(WireError) as info:
        decode_ram_pages(body, bytes(payload)[:-1], PAGES)
    check(info, pb.ERROR_CHECKSUM, "payload has")
