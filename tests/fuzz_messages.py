"""Structure-aware hostile messages, generated from the schema itself: every body kind of the
Envelope, every field filled or left out with values biased to the edges (0, 1, the type's
largest, a page count off by one, empty and oversized bytes), sent with the right or a wrong
session, sequence, epoch and version, and then perhaps damaged on the way (truncated frames,
a flipped byte, extra frames, a payload torn off). Used by the fuzz tests and the fuzz
benchmark, so both speak of the same messages."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from common.constants import PROTOCOL_VERSION
from common.wire import framing
from common.wire import mte_migration_pb2 as pb

BODY_KINDS = [f.name for f in pb.Envelope.DESCRIPTOR.oneofs_by_name["body"].fields]
_INT_LIMITS = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
}
_EDGES = [
    0,
    1,
    2,
    15,
    16,
    127,
    128,
    255,
    256,
    1023,
    1024,
    1025,
    4095,
    4096,
    4097,
    65536,
    2**31 - 1,
    2**32 - 1,
]
_BYTE_EDGES = [b"", b"\x00", b"\xff" * 8, b"\x00" * 128, b"\x11" * 4096, bytes(range(256))]


class Draw:
    """One source of choices for both hypothesis (a `draw`) and the benchmark (a seeded
    random.Random): the generator below is written once against it."""

    def __init__(
        self,
        choose: Callable[[list[Any]], Any],
        integer: Callable[[int, int], int],
        blob: Callable[[int], bytes],
    ):
        self.choose = choose
        self.integer = integer
        self.blob = blob

    @classmethod
    def of_hypothesis(cls, draw: st.DrawFn) -> Draw:
        return cls(
            lambda options: draw(st.sampled_from(options)),
            lambda lo, hi: draw(st.integers(lo, hi)),
            lambda size: draw(st.binary(max_size=size)),
        )

    @classmethod
    def of_random(cls, rng: random.Random) -> Draw:
        return cls(rng.choice, rng.randint, lambda size: rng.randbytes(rng.randint(0, size)))


def _scalar(d: Draw, field: FieldDescriptor, page_count: int) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        return d.choose([True, False])
    if kind == FieldDescriptor.TYPE_BYTES:
        return d.choose([*_BYTE_EDGES, d.blob(64)])
    if kind == FieldDescriptor.TYPE_STRING:
        return d.choose(["", "x", "\u00e9" * 3, "a" * 300])
    lo, hi = _INT_LIMITS.get(kind, (0, 2**31 - 1))
    near_pages = [page_count - 1, page_count, page_count + 1]
    value = d.choose([*_EDGES, *near_pages, lo, hi, d.integer(lo, hi)])
    return min(hi, max(lo, value))


def fill(d: Draw, message: Any, page_count: int, depth: int = 0) -> None:
    """Set a random selection of `message`'s fields, recursively to a bounded depth."""
    descriptor: Descriptor = message.DESCRIPTOR
    for field in descriptor.fields:
        if field.containing_oneof is not None and field.containing_oneof.name == "body":
            continue
        if d.choose([False, True, True]):
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                continue
            if field.is_repeated:
                for _ in range(d.integer(0, 3)):
                    fill(d, getattr(message, field.name).add(), page_count, depth + 1)
            else:
                fill(d, getattr(message, field.name), page_count, depth + 1)
                getattr(message, field.name).SetInParent()
            continue
        if field.is_repeated:
            values = [_scalar(d, field, page_count) for _ in range(d.integer(0, 6))]
            getattr(message, field.name).extend(values)
        else:
            setattr(message, field.name, _scalar(d, field, page_count))


def hostile_frames(d: Draw, session_id: bytes, next_seq: int, page_count: int) -> list[bytes]:
    """One message as a stranger or a broken peer might send it."""
    kind = d.choose(BODY_KINDS)
    env = pb.Envelope(
        protocol_version=d.choose(
            [PROTOCOL_VERSION] * 6 + [0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, 2**32 - 1]
        ),
        session_id=d.choose(
            [session_id, session_id, b"", b"\x00" * len(session_id or b"12345678"), d.blob(16)]
        ),
        seq=d.choose(
            [0, 1, next_seq, next_seq, next_seq + 1, max(0, next_seq - 1), 2**64 - 1, d.integer(0, 2**64 - 1)]
        ),
        received=d.choose([0, next_seq, 2**64 - 1, d.integer(0, 2**64 - 1)]),
        epoch=d.choose([0, 1, 2, 2**32 - 1]),
    )
    getattr(env, kind).SetInParent()
    fill(d, getattr(env, kind), page_count)
    payload = d.choose([b"", b"", d.blob(512), b"\x00" * 4096, d.blob(8192)])
    frames = [bytes(f) for f in framing.encode(env, payload)]
    damage = d.choose(["none", "none", "none", "truncate", "flip", "extra", "tear", "garbage"])
    if damage == "truncate":
        cut = d.integer(0, len(frames[0]))
        frames[0] = frames[0][:cut]
    elif damage == "flip":
        first = bytearray(frames[0])
        first[d.integer(0, len(first) - 1)] ^= 1 << d.integer(0, 7)
        frames[0] = bytes(first)
    elif damage == "extra":
        frames += [d.blob(32) for _ in range(d.integer(1, 5))]
    elif damage == "tear":
        frames = frames[:1]
    elif damage == "garbage":
        frames = [d.blob(256) for _ in range(d.integer(1, 3))]
    return frames


@st.composite
def hostile_messages(draw: st.DrawFn, session_id: bytes, next_seq: int, page_count: int) -> list[bytes]:
    return hostile_frames(Draw.of_hypothesis(draw), session_id, next_seq, page_count)
