"""Encoders and decoders for batches of RAM pages and tag sections.

Zero pages and untagged pages carry no payload bytes; a page whose granules all share one tag
carries one byte; lz4 is used only when a sample of the batch says it pays, since on random
data it costs time and saves nothing. Decoders treat their input as hostile: every count,
index, encoding and length is checked before anything is returned for placement.

Each page with content carries its xxh3-64 in the body: the destination hashes every page
where it lands and compares (a damaged page is ERROR_CHECKSUM: hashed again later unless the
batch, asked for again, replaces it first) and keeps it as the page's verification leaf, so no
page is hashed twice on either side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lz4.block
import numpy as np
import numpy.typing as npt

from common.constants import (
    LZ4_SAMPLE_PAGES,
    LZ4_WORTH_RATIO,
    MAX_PAGES_PER_MESSAGE,
    MAX_TAG_SECTIONS_PER_MESSAGE,
    PACKED_TAG_BYTES_PER_PAGE,
    PAGE_SIZE,
    TAG_MASK,
)
from common.guest.pagehash import gather_content, row_digests
from common.indices import contiguous, has_repeats
from common.wire import mte_migration_pb2 as pb
from common.wire.framing import Buffer, WireError

U8 = npt.NDArray[np.uint8]
U64 = npt.NDArray[np.uint64]
Indices = npt.NDArray[np.int64]
_NO_PAGES = np.zeros(0, dtype=np.int64)
_NO_DIGESTS = np.zeros(0, dtype=np.uint64)
_TAG_COLUMNS = np.arange(PACKED_TAG_BYTES_PER_PAGE)  # a raw section's bytes, from its offset


@dataclass
class BatchStats:
    pages: int = 0
    zero: int = 0  # data: zero pages; tags: untagged pages
    uniform: int = 0
    raw: int = 0
    lz4: int = 0
    payload_bytes: int = 0
    content: Indices = field(default_factory=lambda: _NO_PAGES)  # pages that carry bytes ...
    digests: U64 = field(default_factory=lambda: _NO_DIGESTS)  # ... and their digests, as sent
    empty: Indices = field(default_factory=lambda: _NO_PAGES)  # the zero (or untagged) pages


def _digest_bytes(digests: U64) -> bytes:
    return digests.astype("<u8", copy=False).tobytes()


def packed_fields(indices: Indices, encodings: npt.NDArray[np.integer], lengths: Indices) -> dict[str, bytes]:
    """A batch's parallel arrays as the schema packs them (pages, encodings, lengths)."""
    return {
        "pages": np.asarray(indices, dtype=np.uint64).astype("<u4").tobytes(),
        "encodings": np.asarray(encodings).astype(np.uint8).tobytes(),
        "lengths": np.asarray(lengths).astype("<u2").tobytes(),
    }


def batch_arrays(
    what: str, msg: pb.RamPages | pb.TagSections
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64], Indices]:
    """A peer's (pages, encodings, lengths), refused unless the three have one entry per page."""
    if len(msg.pages) % 4 or len(msg.lengths) % 2:
        raise WireError(
            pb.ERROR_BAD_MESSAGE,
            f"{what}: {len(msg.pages)} bytes of pages and {len(msg.lengths)} of lengths are not "
            "whole 4- and 2-byte numbers",
        )
    return (
        np.frombuffer(msg.pages, dtype="<u4").astype(np.uint64),
        np.frombuffer(msg.encodings, dtype=np.uint8).astype(np.int64),
        np.frombuffer(msg.lengths, dtype="<u2").astype(np.int64),
    )


def batch_pages(msg: pb.RamPages | pb.TagSections) -> npt.NDArray[np.uint64]:
    """The page numbers a batch names, unchecked (a trailing partial number is left out)."""
    whole = len(msg.pages) // 4 * 4
    return np.frombuffer(msg.pages[:whole], dtype="<u4").astype(np.uint64)


def gather_rows(table: U8, indices: Indices) -> U8:
    """table[indices], a fresh array (a slice's copy where the pages are contiguous)."""
    if contiguous(indices):
        return table[int(indices[0]) : int(indices[-1]) + 1].copy()
    return table[indices]


def nonzero_pages(pages: U8, indices: Indices) -> npt.NDArray[np.bool_]:
    """Which of pages[indices] hold a non-zero byte, read in place. A sample of 8 bytes per page
    (8 cache lines instead of 64) settles almost every page with content; only pages whose
    sample is zero are scanned."""
    if contiguous(indices):
        sample = pages[int(indices[0]) : int(indices[-1]) + 1, :: PAGE_SIZE // 8]
    else:
        sample = pages[indices, :: PAGE_SIZE // 8]
    nonzero = sample.any(axis=1)
    unsure = np.flatnonzero(~nonzero)
    if unsure.size:
        nonzero[unsure] = pages[indices[unsure]].any(axis=1)
    return nonzero


def lz4_pays(rows: U8, candidates: Indices) -> bool:
    """Whether lz4 shrinks a sample of the candidate rows below LZ4_WORTH_RATIO (never, for none)."""
    sample = candidates[
        np.linspace(0, candidates.size - 1, min(LZ4_SAMPLE_PAGES, candidates.size)).astype(np.int64)
    ]
    raw = sum(rows[i].nbytes for i in sample)
    packed = sum(len(lz4.block.compress(rows[i].tobytes(), store_size=False)) for i in sample)
    return packed < raw * LZ4_WORTH_RATIO


def _compress_rows(
    rows: U8,
    raw_rows: Indices,
    lz4_code: int,
    encodings: npt.NDArray[np.int32],
    lengths: npt.NDArray[np.int64],
) -> list[bytes]:
    """lz4 each candidate row, keeping raw bytes (and the raw encoding and length the caller
    set) where lz4 does not shrink it."""
    parts: list[bytes] = []
    row_bytes = rows.shape[1]
    for i in raw_rows.tolist():
        raw = rows[i].tobytes()
        packed = lz4.block.compress(raw, store_size=False)
        if len(packed) < row_bytes:
            encodings[i], lengths[i] = lz4_code, len(packed)
            parts.append(packed)
        else:
            parts.append(raw)
    return parts


def encode_ram_pages(
    pages: U8,
    indices: Indices,
    *,
    use_lz4: bool,
    round_no: int = 0,
    digests: bool = True,
    borrow: bool = False,
) -> tuple[pb.RamPages, Buffer, BatchStats]:
    """Encode pages[indices] (pages is the guest's (page_count, 4096) view), with a digest of
    each page with content unless `digests` is False (postcopy: the manifest checks those).

    The pages with content are copied out of guest memory and hashed in one pass (the digest
    is of the copy), so the payload is the message's own: the socket sends it without copying
    it again, and a guest writing meanwhile cannot tear it. With `borrow` the caller knows that
    nothing writes guest memory until the batch has left (the guest is stopped, or has run its
    last step): consecutive pages are then hashed and sent where they are, without the copy.
    (Were the guest to write one anyway, the destination would find it damaged and ask again.)
    """
    if digests:  # zero pages found, the others hashed (and copied), in one pass
        in_place = borrow and contiguous(indices)
        zero, copied, page_digests = gather_content(pages, indices, copy=not in_place)
        nonzero = ~zero
    else:
        nonzero = nonzero_pages(pages, indices)
    encodings = np.where(nonzero, pb.PAGE_RAW, pb.PAGE_ZERO).astype(np.int32)
    lengths = np.where(nonzero, PAGE_SIZE, 0).astype(np.int64)
    data_rows = np.flatnonzero(nonzero)
    all_content = data_rows.size == indices.size
    stats = BatchStats(
        pages=int(indices.size),
        zero=int(indices.size - data_rows.size),
        content=indices if all_content else indices[data_rows],
        empty=_NO_PAGES if all_content else indices[~nonzero],
    )
    if not digests:
        content = gather_rows(pages, stats.content)
    else:
        stats.digests = page_digests
        if copied is not None:
            content = copied
        elif contiguous(stats.content):  # borrowed: sent from guest memory
            content = pages[int(stats.content[0]) : int(stats.content[-1]) + 1]
        else:  # zero pages split the run: copied now (nothing has written since it was hashed)
            content = pages[stats.content]
    everything = np.arange(data_rows.size)
    if use_lz4 and lz4_pays(content, everything):
        code = np.full(data_rows.size, pb.PAGE_RAW, dtype=np.int32)
        size = np.full(data_rows.size, PAGE_SIZE, dtype=np.int64)
        payload: Buffer = b"".join(_compress_rows(content, everything, pb.PAGE_LZ4, code, size))
        encodings[data_rows], lengths[data_rows] = code, size
        stats.lz4 = int(np.count_nonzero(encodings == pb.PAGE_LZ4))
    else:
        payload = memoryview(content.reshape(-1)) if content.size else b""
    stats.raw = int(np.count_nonzero(encodings == pb.PAGE_RAW))
    stats.payload_bytes = len(payload)
    msg = pb.RamPages(
        round=round_no, digests=_digest_bytes(stats.digests), **packed_fields(indices, encodings, lengths)
    )
    return msg, payload, stats


def encode_tag_sections(
    tag_table: U8 | None,
    indices: Indices,
    *,
    use_lz4: bool,
    round_no: int = 0,
    digests: bool = True,
    rows: U8 | None = None,
) -> tuple[pb.TagSections, Buffer, BatchStats]:
    """Encode the packed tags of pages[indices]: gathered from tag_table (page_count, 128), or
    given as `rows` (one per index) where they were read elsewhere (the daemons read them
    through the KVM_ARM_MTE_COPY_TAGS edge). The digests of the tagged pages' 128 bytes
    (unless `digests` is False) are the sender's verification leaves; they do not travel."""
    if rows is None:
        assert tag_table is not None
        rows = gather_rows(tag_table, indices)
    first = rows[:, 0]
    same = first.astype(np.uint64) * np.uint64(0x0101010101010101)  # compared 8 bytes at a time
    uniform = (rows.view(np.uint64) == same[:, None]).all(axis=1) & ((first & TAG_MASK) == (first >> 4))
    untagged = uniform & (first == 0)
    encodings = np.full(indices.size, pb.TAG_RAW, dtype=np.int32)
    lengths = np.full(indices.size, PACKED_TAG_BYTES_PER_PAGE, dtype=np.int64)
    encodings[uniform] = pb.TAG_UNIFORM
    lengths[uniform] = 1
    encodings[untagged] = pb.TAG_UNTAGGED
    lengths[untagged] = 0
    varied = np.flatnonzero(~uniform)
    stats = BatchStats(
        pages=int(indices.size),
        zero=int(untagged.sum()),
        uniform=int((uniform & ~untagged).sum()),
        content=indices[~untagged],
        empty=indices[untagged],
    )
    if digests:
        stats.digests = row_digests(rows[~untagged])
    compressed = use_lz4 and lz4_pays(rows, varied)
    packed = _compress_rows(rows, varied, pb.TAG_LZ4, encodings, lengths) if compressed else []
    if varied.size == indices.size and not compressed:
        payload: Buffer = rows.tobytes()
    else:
        # each section at its offset: the uniform and raw ones in one step each, lz4 ones in turn
        starts = np.cumsum(lengths) - lengths
        out = np.empty(int(lengths.sum()), dtype=np.uint8)
        one = np.flatnonzero(encodings == pb.TAG_UNIFORM)
        out[starts[one]] = first[one] & TAG_MASK
        raw = np.flatnonzero(encodings == pb.TAG_RAW)
        out[starts[raw, None] + _TAG_COLUMNS] = rows[raw]
        if compressed:  # a part for each varied section: lz4, or raw where lz4 did not shrink it
            for i, part in zip(varied.tolist(), packed, strict=True):
                if encodings[i] == pb.TAG_LZ4:
                    out[starts[i] : starts[i] + len(part)] = np.frombuffer(part, dtype=np.uint8)
        payload = out.tobytes()
    stats.raw = int(np.count_nonzero(encodings == pb.TAG_RAW))
    stats.lz4 = int(np.count_nonzero(encodings == pb.TAG_LZ4))
    stats.payload_bytes = len(payload)
    msg = pb.TagSections(round=round_no, **packed_fields(indices, encodings, lengths))
    return msg, payload, stats


@dataclass(frozen=True)
class DecodedBatch:
    """What a batch places: rows for pages with content, and pages that become all zero."""

    indices: Indices  # pages that get rows
    rows: U8  # (len(indices), row_bytes)
    zero: Indices  # pages that become all zero (data) or untagged (tags)
    digests: U64 = field(default_factory=lambda: _NO_DIGESTS)  # of the rows (or none)


def _validate_header(
    what: str,
    indices: Indices,
    encodings: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    page_count: int,
    payload_len: int,
    damaged: int,
    limit: int,
) -> None:
    """`damaged`: the code for a payload that does not fit an intact header (ERROR_CHECKSUM
    where the header's own checksum passed and only the payload can be at fault); `limit`: the
    most pages a message of this kind may name."""
    n = indices.size
    if not (n == encodings.size == lengths.size):
        raise WireError(
            pb.ERROR_BAD_MESSAGE,
            f"{what}: {n} page indices, {encodings.size} encodings and {lengths.size} lengths differ",
        )
    if n > limit:
        raise WireError(pb.ERROR_BAD_MESSAGE, f"{what}: {n} pages exceed the limit of {limit} per message")
    if n and int(indices.max()) >= page_count:
        raise WireError(
            pb.ERROR_BAD_MESSAGE,
            f"{what}: page {int(indices.max())} is out of range (guest has {page_count} pages)",
        )
    if has_repeats(indices):
        raise WireError(pb.ERROR_BAD_MESSAGE, f"{what}: a page appears twice in one batch")
    total = int(lengths.sum())
    if total != payload_len:
        raise WireError(damaged, f"{what}: lengths add up to {total} bytes but the payload has {payload_len}")


def _decompress(what: str, page: int, data: Buffer, size: int, damaged: int) -> bytes:
    try:
        out = lz4.block.decompress(data, uncompressed_size=size)
    except lz4.block.LZ4BlockError as exc:
        raise WireError(damaged, f"{what}: page {page} is not valid lz4 ({exc})") from None
    if len(out) != size:
        raise WireError(damaged, f"{what}: page {page} decompresses to {len(out)} bytes, not {size}")
    return out


def _expected_digests(what: str, raw: bytes, content: int, digested: bool) -> U64 | None:
    if not digested:
        return None
    if len(raw) != 8 * content:
        raise WireError(
            pb.ERROR_BAD_MESSAGE,
            f"{what}: {len(raw)} bytes of digests for {content} pages with content (8 bytes each)",
        )
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


def damaged(what: str, page: int) -> WireError:
    return WireError(pb.ERROR_CHECKSUM, f"{what}: page {page} damaged in transit (its digest differs)")


def decode_ram_pages(
    msg: pb.RamPages, payload: Buffer, page_count: int, *, digested: bool = True
) -> DecodedBatch:
    """Check a batch of pages; with `digested` (a RamPages message of its own) the result holds
    the digest the sender gave each page, which the placement checks each page against as it
    lands (transfer.apply_ram_pages)."""
    indices, encodings, lengths = batch_arrays("RAM pages", msg)
    damaged = pb.ERROR_CHECKSUM if digested else pb.ERROR_BAD_MESSAGE
    _validate_header(
        "RAM pages", indices, encodings, lengths, page_count, len(payload), damaged, MAX_PAGES_PER_MESSAGE
    )
    idx = indices.astype(np.int64)
    zero = encodings == pb.PAGE_ZERO
    raw = encodings == pb.PAGE_RAW
    packed = encodings == pb.PAGE_LZ4
    bad = ~(zero | raw | packed)
    if bad.any():
        raise WireError(pb.ERROR_BAD_MESSAGE, f"RAM pages: unknown page encoding {int(encodings[bad][0])}")
    if (
        (lengths[zero] != 0).any()
        or (lengths[raw] != PAGE_SIZE).any()
        or ((lengths[packed] < 1) | (lengths[packed] >= PAGE_SIZE)).any()
    ):
        raise WireError(pb.ERROR_BAD_MESSAGE, "RAM pages: a page length does not fit its encoding")
    content = ~zero
    pages = idx[content]
    expected = _expected_digests("RAM pages", msg.digests, pages.size, digested)
    view = memoryview(payload).cast("B")
    if not packed.any():
        rows = np.frombuffer(view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    else:
        rows = np.empty((pages.size, PAGE_SIZE), dtype=np.uint8)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        for row, i in enumerate(np.flatnonzero(content).tolist()):
            chunk = view[offsets[i] : offsets[i + 1]]
            if packed[i]:
                rows[row] = np.frombuffer(
                    _decompress("RAM pages", int(idx[i]), chunk, PAGE_SIZE, damaged), dtype=np.uint8
                )
            else:
                rows[row] = np.frombuffer(chunk, dtype=np.uint8)
    digests = _NO_DIGESTS if expected is None else expected
    return DecodedBatch(indices=pages, rows=rows, zero=idx[zero], digests=digests)


def decode_tag_sections(
    msg: pb.TagSections, payload: Buffer, page_count: int, *, digested: bool = True
) -> DecodedBatch:
    """Check a batch of tag sections (the frame checksum covered their bytes); with `digested`,
    hash each tagged page's 128 bytes for the receiver's verification leaves."""
    indices, encodings, lengths = batch_arrays("tag sections", msg)
    _validate_header(
        "tag sections",
        indices,
        encodings,
        lengths,
        page_count,
        len(payload),
        pb.ERROR_BAD_MESSAGE,
        MAX_TAG_SECTIONS_PER_MESSAGE,
    )
    idx = indices.astype(np.int64)
    expected = {
        pb.TAG_UNTAGGED: (0, 0),
        pb.TAG_UNIFORM: (1, 1),
        pb.TAG_RAW: (PACKED_TAG_BYTES_PER_PAGE,) * 2,
        pb.TAG_LZ4: (1, PACKED_TAG_BYTES_PER_PAGE - 1),
    }
    for code in np.unique(encodings).tolist():
        if code not in expected:
            raise WireError(pb.ERROR_BAD_MESSAGE, f"tag sections: unknown tag encoding {code}")
        lo, hi = expected[code]
        sel = lengths[encodings == code]
        if ((sel < lo) | (sel > hi)).any():
            raise WireError(pb.ERROR_BAD_MESSAGE, "tag sections: a section length does not fit its encoding")
    untagged = encodings == pb.TAG_UNTAGGED
    content = ~untagged
    pages = idx[content]
    view = memoryview(payload).cast("B")
    if (encodings[content] == pb.TAG_RAW).all():
        rows = np.frombuffer(view, dtype=np.uint8).reshape(-1, PACKED_TAG_BYTES_PER_PAGE)
    else:
        # each kind of section in one step (lz4 ones in turn); the lengths were checked above
        data = np.frombuffer(view, dtype=np.uint8)
        starts = np.cumsum(lengths) - lengths
        row_of = np.cumsum(content) - 1  # the row of each page with content
        rows = np.empty((pages.size, PACKED_TAG_BYTES_PER_PAGE), dtype=np.uint8)
        one = np.flatnonzero(encodings == pb.TAG_UNIFORM)
        tag = data[starts[one]]
        wide = np.flatnonzero(tag > TAG_MASK)
        if wide.size:
            i = int(one[wide[0]])
            raise WireError(
                pb.ERROR_BAD_MESSAGE,
                f"tag sections: uniform tag {int(tag[wide[0]])} of page {int(idx[i])} is wider than 4 bits",
            )
        rows[row_of[one]] = (tag | (tag << 4))[:, None]
        raw = np.flatnonzero(encodings == pb.TAG_RAW)
        rows[row_of[raw]] = data[starts[raw, None] + _TAG_COLUMNS]
        for i in np.flatnonzero(encodings == pb.TAG_LZ4).tolist():
            chunk = view[starts[i] : starts[i] + lengths[i]]
            rows[row_of[i]] = np.frombuffer(
                _decompress(
                    "tag sections", int(idx[i]), chunk, PACKED_TAG_BYTES_PER_PAGE, pb.ERROR_BAD_MESSAGE
                ),
                dtype=np.uint8,
            )
    digests = row_digests(rows) if digested else _NO_DIGESTS
    return DecodedBatch(indices=pages, rows=rows, zero=idx[untagged], digests=digests)


# -- postcopy: a page and its tags in one message ----------------------------------------------
@dataclass(frozen=True)
class PostcopyBatch:
    """Pages with their data and tags, full rows in page order: what one atomic placement needs."""

    indices: Indices
    data: U8  # (n, PAGE_SIZE)
    tags: U8  # (n, PACKED_TAG_BYTES_PER_PAGE)


def encode_postcopy_pages(
    pages: U8, tag_rows: U8, indices: Indices, *, use_lz4: bool, requested: bool
) -> tuple[pb.PostcopyPages, bytes, int]:
    """One message for data and tags of the same pages (tag_rows: their packed tags, one row
    per index); returns (body, payload, page count)."""
    data, data_payload, _ = encode_ram_pages(pages, indices, use_lz4=use_lz4, digests=False)
    tags, tag_payload, _ = encode_tag_sections(None, indices, use_lz4=use_lz4, digests=False, rows=tag_rows)
    data_size = memoryview(data_payload).nbytes
    body = pb.PostcopyPages(data=data, tags=tags, data_bytes=data_size, requested=requested)
    return body, b"".join((data_payload, tag_payload)), int(indices.size)  # one copy of each


def decode_postcopy_pages(msg: pb.PostcopyPages, payload: Buffer, page_count: int) -> PostcopyBatch:
    view = memoryview(payload).cast("B")
    if msg.data_bytes > len(view):
        raise WireError(
            pb.ERROR_BAD_MESSAGE,
            f"postcopy pages: data part of {msg.data_bytes} bytes exceeds the payload of {len(view)}",
        )
    if msg.data.pages != msg.tags.pages:
        raise WireError(pb.ERROR_BAD_MESSAGE, "postcopy pages: data and tags name different pages")
    data = decode_ram_pages(msg.data, view[: msg.data_bytes], page_count, digested=False)
    tags = decode_tag_sections(msg.tags, view[msg.data_bytes :], page_count, digested=False)
    order = batch_pages(msg.data).astype(np.int64)
    return PostcopyBatch(
        order, _full_rows(order, data, PAGE_SIZE), _full_rows(order, tags, PACKED_TAG_BYTES_PER_PAGE)
    )


def _full_rows(order: Indices, decoded: DecodedBatch, width: int) -> U8:
    """One row per page in `order`, zero where the batch said zero (or untagged)."""
    if decoded.indices.size == order.size:
        return decoded.rows  # every page had content: the rows are already in order
    rows = np.zeros((order.size, width), dtype=np.uint8)
    if decoded.indices.size:
        # both lists keep the message's order, so content rows fill the non-zero slots in turn
        rows[np.isin(order, decoded.indices, assume_unique=True)] = decoded.rows
    return rows
