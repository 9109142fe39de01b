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
    frames: list[Buffer] = [_CHECKSUM.pack(_checksum(header, payload)) + header]
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
    if _checksum(header, payload) != expected:
        raise WireError(pb.ERROR_CHECKSUM, "checksum mismatch: the message was corrupted in transit")
    env = pb.Envelope()
    try:
        env.ParseFromString(header)
    except DecodeError as exc:
        raise WireError(pb.ERROR_BAD_MESSAGE, f"header is not a valid Envelope: {exc}") from None
    if env.WhichOneof("body") is None:
        raise WireError(pb.ERROR_BAD_MESSAGE, "envelope carries no message body")
    return Message(env, payload)
