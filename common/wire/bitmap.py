"""Page bitmaps on the wire: one bit per page, page k in bit k%8 of byte k//8, lz4 block."""

from __future__ import annotations

import lz4.block
import numpy as np
import numpy.typing as npt

from common.wire import mte_migration_pb2 as pb
from common.wire.framing import WireError


def encode_bitmap(bits: npt.NDArray[np.bool_]) -> bytes:
    return bytes(lz4.block.compress(np.packbits(bits, bitorder="little").tobytes(), store_size=True))


def decode_bitmap(blob: bytes, page_count: int, what: str) -> npt.NDArray[np.bool_]:
    """The bitmap as booleans; hostile input (wrong size, bad lz4) raises WireError."""
    expected = (page_count + 7) // 8
    # The stored size is checked before decompressing: trusting it would let a hostile peer
    # make us allocate whatever it claims.
    if len(blob) < 4:
        raise WireError(pb.ERROR_BAD_MESSAGE, f"{what} of {len(blob)} bytes is too short")
    claimed = int.from_bytes(blob[:4], "little")
    if claimed != expected:
        raise WireError(
            pb.ERROR_BAD_MESSAGE, f"{what} claims {claimed} bytes, expected {expected} for {page_count} pages"
        )
    try:
        raw = lz4.block.decompress(blob[4:], uncompressed_size=expected)
    except (lz4.block.LZ4BlockError, ValueError) as exc:
        raise WireError(pb.ERROR_BAD_MESSAGE, f"{what} is not a valid lz4 bitmap ({exc})") from None
    if len(raw) != expected:
        raise WireError(
            pb.ERROR_BAD_MESSAGE, f"{what} has {len(raw)} bytes, expected {expected} for {page_count} pages"
        )
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:page_count]
    return bits.astype(np.bool_)
