"""Turning an Envelope (plus an optional raw payload) into ZeroMQ frames and back.

Frame 0 is an 8-byte xxh3-64 checksum followed by the Envelope; frame 1, when present, is the
raw payload. Pure functions: no sockets here, so framing is tested without a network.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash
from google.protobuf.message import DecodeError

from common.constants import MAX_FRAME_BYTES, MAX_FRAMES_PER_MESSAGE, PROTOCOL_VERSION
from common.wire import mte_migration_pb2 as pb

_CHECKSUM = struct.Struct("<Q")
# Bodies whose every page is checked against a digest the receiver holds (in the body itself,
# or in postcopy's manifest): the frame checksum covers their header only, so that each page
# is hashed once (see the schema).
PAGE_DIGESTED = frozenset({"ram_pages", "postcopy_pages"})
# Bodies that carry pages or tags in a payload: the batches that parallel channels spread.
BATCH_KINDS = frozenset({"ram_pages", "tag_sections", "postcopy_pages"})
Buffer = bytes | bytearray | memoryview


class WireError(Exception):
    """A message that cannot be accepted, with the error code to report to the peer."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Message:
    envelope: pb.Envelope
    payload: Buffer = b""

    @property
    def kind(self) -> str:
        return self.envelope.WhichOneof("body") or ""


def envelope(session_id: bytes, seq: int, **body: object) -> pb.Envelope:
    return pb.Envelope(protocol_version=PROTOCOL_VERSION, session_id=session_id, seq=seq, **body)  # type: ignore[arg-type]


def _checksum(header: Buffer, payload: Buffer) -> int:
    h = xxhash.xxh3_64()
    h.update(header)
    h.update(payload)
    return h.intdigest()


def encode(env: pb.Envelope, payload: Buffer = b"") -> list[Buffer]:
    header = env.SerializeToString()
    covered = b"" if env.WhichOneof("body") in PAGE_DIGESTED else payload
    frames: list[Buffer] = [_CHECKSUM.pack(_checksum(header, covered)) + header]
    if len(payload):
        frames.append(payload)
    return frames


def decode(frames: Sequence[Buffer]) -> Message:
    """Parse frames from an untrusted peer; raise WireError saying what is wrong."""
    if not 1 <= len(frames) <= MAX_FRAMES_PER_MESSAGE:
        raise WireError(
            pb.ERROR_BAD_MESSAGE, f"message has {len(frames)} frames, expected 1 to {MAX_FRAMES_PER_MESSAGE}"
        )
    first = memoryview(frames[0])
    payload = memoryview(frames[1]) if len(frames) == 2 else memoryview(b"")
    if len(first) < _CHECKSUM.size:
        raise WireError(pb.ERROR_BAD_MESSAGE, f"header frame of {len(first)} bytes is too short")
    if len(first) + len(payload) > MAX_FRAME_BYTES:
        raise WireError(
            pb.ERROR_BAD_MESSAGE,
            f"message of {len(first) + len(payload)} bytes exceeds {MAX_FRAME_BYTES}",
        )
    header = first[_CHECKSUM.size :]
    (expected,) = _CHECKSUM.unpack(first[: _CHECKSUM.size])
    # Parsed before it is checked, to know what the checksum covers; a header that does not
    # parse is judged by the whole-message checksum.
    env: pb.Envelope | None = pb.Envelope()
    problem = ""
    try:
        env.ParseFromString(header)  # type: ignore[union-attr]
    except DecodeError as exc:
        env, problem = None, str(exc)
    covered = b"" if env is not None and env.WhichOneof("body") in PAGE_DIGESTED else payload
    if _checksum(header, covered) != expected:
        raise WireError(pb.ERROR_CHECKSUM, "checksum mismatch: the message was corrupted in transit")
    if env is None:
        raise WireError(pb.ERROR_BAD_MESSAGE, f"header is not a valid Envelope: {problem}")
    if env.WhichOneof("body") is None:
        raise WireError(pb.ERROR_BAD_MESSAGE, "envelope carries no message body")
    return Message(env, payload)
