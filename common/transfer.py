"""Guest <-> wire: batching pages and tags into messages, and placing decoded batches.

Shared by both daemons and by the in-process snapshot, so that what the tests prove about a
snapshot holds for a migration.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from common.constants import PAGES_PER_BATCH, TAG_SECTIONS_PER_BATCH
from common.guest.guest import Guest
from common.guest.memory import GuestMemory
from common.guest.vcpu import VcpuState
from common.wire import mte_migration_pb2 as pb
from common.wire.codec import (
    BatchStats,
    DecodedBatch,
    decode_ram_pages,
    decode_tag_sections,
    encode_ram_pages,
    encode_tag_sections,
)
from common.wire.framing import Buffer, WireError

Indices = npt.NDArray[np.int64]


def batches(indices: Indices, size: int = PAGES_PER_BATCH) -> Iterator[Indices]:
    for start in range(0, indices.size, size):
        yield indices[start : start + size]


def ram_batches(
    mem: GuestMemory, indices: Indices, *, use_lz4: bool, round_no: int
) -> Iterator[tuple[pb.RamPages, Buffer, BatchStats]]:
    for chunk in batches(indices):
        yield encode_ram_pages(mem.pages, chunk, use_lz4=use_lz4, round_no=round_no)


def tag_batches(
    mem: GuestMemory, indices: Indices, *, use_lz4: bool, round_no: int
) -> Iterator[tuple[pb.TagSections, Buffer, BatchStats]]:
    for chunk in batches(indices, TAG_SECTIONS_PER_BATCH):
        yield encode_tag_sections(mem.page_tags, chunk, use_lz4=use_lz4, round_no=round_no)


def apply_ram_pages(mem: GuestMemory, msg: pb.RamPages, payload: Buffer) -> DecodedBatch:
    """Check a batch of pages from a peer, then place it; returns what was placed."""
    decoded = decode_ram_pages(msg, payload, mem.page_count)
    with mem.lock:
        mem.place_pages(decoded.indices, decoded.rows)
        mem.place_zero_pages(decoded.zero)
    return decoded


def apply_tag_sections(mem: GuestMemory, msg: pb.TagSections, payload: Buffer) -> DecodedBatch:
    """Check a batch of tag sections from a peer, then place it; returns what was placed."""
    decoded = decode_tag_sections(msg, payload, mem.page_count)
    with mem.lock:
        mem.place_tags(decoded.indices, decoded.rows)
        mem.page_tags[decoded.zero] = 0
    return decoded


def device_state(guest: Guest) -> pb.DeviceState:
    return pb.DeviceState(vcpus=[v.to_proto() for v in guest.vcpus])


def apply_device_state(guest: Guest, msg: pb.DeviceState) -> None:
    if len(msg.vcpus) != len(guest.vcpus):
        raise WireError(
            pb.ERROR_GEOMETRY_MISMATCH,
            f"device state has {len(msg.vcpus)} vCPUs, the guest has {len(guest.vcpus)}",
        )
    try:
        vcpus = [VcpuState.from_proto(v) for v in msg.vcpus]
    except ValueError as exc:
        raise WireError(pb.ERROR_BAD_MESSAGE, str(exc)) from None
    if sorted(v.index for v in vcpus) != list(range(len(vcpus))):
        raise WireError(pb.ERROR_BAD_MESSAGE, "device state vCPU indices are not 0..n-1")
    guest.vcpus[:] = sorted(vcpus, key=lambda v: v.index)
