"""Postcopy's page messages, encoded for what each is: the same schema as any PostcopyPages
(`codec.decode_postcopy_pages` reads them all), written the cheapest way for its size.

- An answer names one page or a few: the batch encoder's array work (samples, masks, offsets)
  costs about 0.25 ms whatever the batch holds, more than the page itself. `encode_answer`
  writes it with plain byte operations per page: zero pages and untagged pages cost no payload,
  uniform tags one byte, and lz4 is kept where it shrinks a page.
- A background batch is thousands of pages: `encode_background` copies their data once, into
  the buffer that goes on the wire with the tags after it (the batch encoder copied the data,
  then joined it with the tags: a second pass over 8 MiB a message).
"""

from __future__ import annotations

import struct

import lz4.block
import numpy as np
import numpy.typing as npt

from common.constants import PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE, TAG_MASK
from common.indices import contiguous
from common.wire import mte_migration_pb2 as pb
from common.wire.codec import (
    encode_postcopy_pages,
    encode_tag_sections,
    lz4_pays,
    nonzero_pages,
    packed_fields,
)
from common.wire.framing import Buffer

U8 = npt.NDArray[np.uint8]
Indices = npt.NDArray[np.int64]

_ZERO_PAGE = bytes(PAGE_SIZE)
_UNTAGGED = bytes(PACKED_TAG_BYTES_PER_PAGE)


def encode_answer(
    pages: U8, tag_rows: U8, indices: Indices, *, use_lz4: bool
) -> tuple[pb.PostcopyPages, bytes]:
    """One PostcopyPages answering `indices` (pages: the guest's (page_count, 4096) view;
    tag_rows: the packed tags of each index, in order); returns (body, payload)."""
    numbers = indices.tolist()
    data_codes, data_lengths, data_parts = bytearray(), [], []
    tag_codes, tag_lengths, tag_parts = bytearray(), [], []
    for row, page in enumerate(numbers):
        data = pages[page].tobytes()
        if data == _ZERO_PAGE:
            data_codes.append(pb.PAGE_ZERO)
            data_lengths.append(0)
        else:
            packed = lz4.block.compress(data, store_size=False) if use_lz4 else data
            if len(packed) < PAGE_SIZE:
                data_codes.append(pb.PAGE_LZ4)
                data = packed
            else:
                data_codes.append(pb.PAGE_RAW)
            data_lengths.append(len(data))
            data_parts.append(data)
        tags = tag_rows[row].tobytes()
        first = tags[0]
        if tags == _UNTAGGED:
            tag_codes.append(pb.TAG_UNTAGGED)
            tag_lengths.append(0)
        elif first & TAG_MASK == first >> 4 and tags == bytes((first,)) * PACKED_TAG_BYTES_PER_PAGE:
            tag_codes.append(pb.TAG_UNIFORM)
            tag_lengths.append(1)
            tag_parts.append(bytes((first & TAG_MASK,)))
        else:
            tag_codes.append(pb.TAG_RAW)
            tag_lengths.append(PACKED_TAG_BYTES_PER_PAGE)
            tag_parts.append(tags)
    count = len(numbers)
    page_numbers = struct.pack(f"<{count}I", *numbers)
    data_payload = b"".join(data_parts)
    body = pb.PostcopyPages(
        data=pb.RamPages(
            pages=page_numbers, encodings=bytes(data_codes), lengths=struct.pack(f"<{count}H", *data_lengths)
        ),
        tags=pb.TagSections(
            pages=page_numbers, encodings=bytes(tag_codes), lengths=struct.pack(f"<{count}H", *tag_lengths)
        ),
        data_bytes=len(data_payload),
        requested=True,
    )
    return body, data_payload + b"".join(tag_parts)


# Past this many pages an answer is a batch like any other: the array work pays for itself.
PAGE_BY_PAGE_MAX = 32


def encode_requested(
    pages: U8, tag_rows: U8, indices: Indices, *, use_lz4: bool
) -> tuple[pb.PostcopyPages, bytes]:
    """An answer of any size, page by page when it is small."""
    if indices.size <= PAGE_BY_PAGE_MAX:
        return encode_answer(pages, tag_rows, indices, use_lz4=use_lz4)
    body, payload, _ = encode_postcopy_pages(pages, tag_rows, indices, use_lz4=use_lz4, requested=True)
    return body, payload


def encode_background(
    pages: U8, tag_rows: U8, indices: Indices, *, use_lz4: bool
) -> tuple[pb.PostcopyPages, Buffer]:
    """One background PostcopyPages for `indices` (a batch), its data copied once; returns
    (body, payload). Data that lz4 shrinks goes through the batch encoder, which packs it."""
    nonzero = nonzero_pages(pages, indices)
    content = indices if nonzero.all() else indices[nonzero]
    if use_lz4 and content.size and lz4_pays(pages, content):
        body, payload, _ = encode_postcopy_pages(pages, tag_rows, indices, use_lz4=True, requested=False)
        return body, payload
    tags, tag_payload, _ = encode_tag_sections(None, indices, use_lz4=use_lz4, digests=False, rows=tag_rows)
    data_bytes = int(content.size) * PAGE_SIZE
    tag_view = memoryview(tag_payload).cast("B")
    out = np.empty(data_bytes + tag_view.nbytes, dtype=np.uint8)
    rows = out[:data_bytes].reshape(-1, PAGE_SIZE)
    if contiguous(content):
        rows[:] = pages[int(content[0]) : int(content[0]) + content.size]
    elif content.size:
        np.take(pages, content, axis=0, out=rows)
    out[data_bytes:] = np.frombuffer(tag_view, dtype=np.uint8)
    encodings = np.where(nonzero, pb.PAGE_RAW, pb.PAGE_ZERO)
    lengths = np.where(nonzero, PAGE_SIZE, 0)
    body = pb.PostcopyPages(
        data=pb.RamPages(**packed_fields(indices, encodings, lengths)),
        tags=tags,
        data_bytes=data_bytes,
        requested=False,
    )
    return body, memoryview(out)
