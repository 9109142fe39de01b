"""Guest <-> wire: batching pages and tags into messages, and placing decoded batches.

Shared by both daemons and by the in-process snapshot, so that what the tests prove about a
snapshot holds for a migration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.constants import (
    MAX_FOREIGN_STATE_BYTES,
    PACKED_TAG_BYTES_PER_PAGE,
    PAGE_SIZE,
    PAGES_PER_BATCH,
    TAG_SECTIONS_PER_BATCH,
)
from common.guest.guest import Guest
from common.guest.memory import GuestMemory
from common.guest.vcpu import GENERAL_REGISTERS, SCALARS, VcpuState
from common.wire import mte_migration_pb2 as pb
from common.wire.codec import (
    BatchStats,
    DecodedBatch,
    damaged,
    decode_ram_pages,
    decode_tag_sections,
    encode_ram_pages,
    encode_tag_sections,
)
from common.wire.framing import Buffer, WireError

Indices = npt.NDArray[np.int64]


@dataclass(frozen=True)
class OutgoingBatch:
    """One encoded message of a pass: its body (RamPages or TagSections), payload and counts."""

    kind: str  # "ram_pages" or "tag_sections"
    pages: Indices  # the pages it carries, as the body lists them
    body: pb.RamPages | pb.TagSections
    payload: Buffer
    stats: BatchStats


@dataclass
class PagePass:
    """The pages one round (or one switchover pass) still has to send: data batches first,
    then tag sections (in precopy, tags may trail their pages within a pass). Every sender
    takes its messages from here, so a snapshot proves what a migration sends."""

    data: Indices
    tags: Indices
    data_at: int = 0
    tags_at: int = 0

    @property
    def done(self) -> bool:
        return self.data_at >= self.data.size and self.tags_at >= self.tags.size

    @property
    def remaining_bytes(self) -> int:
        return (self.data.size - self.data_at) * PAGE_SIZE + (
            self.tags.size - self.tags_at
        ) * PACKED_TAG_BYTES_PER_PAGE

    def next_chunks(self, count: int) -> list[tuple[str, Indices]]:
        """Up to `count` batches' worth of pages, in order, without encoding them: each is
        `encode_batch`'s to encode, in whichever thread (parallel channels encode side by side)."""
        chunks: list[tuple[str, Indices]] = []
        while len(chunks) < count:
            if self.data_at < self.data.size:
                chunk = self.data[self.data_at : self.data_at + PAGES_PER_BATCH]
                self.data_at += chunk.size
                chunks.append(("ram_pages", chunk))
            elif self.tags_at < self.tags.size:
                chunk = self.tags[self.tags_at : self.tags_at + TAG_SECTIONS_PER_BATCH]
                self.tags_at += chunk.size
                chunks.append(("tag_sections", chunk))
            else:
                break
        return chunks


def encode_batch(
    mem: GuestMemory,
    kind: str,
    pages: Indices,
    *,
    use_lz4: bool,
    round_no: int,
    borrow: bool = False,
    tag_rows: npt.NDArray[np.uint8] | None = None,
) -> OutgoingBatch:
    """One batch of a pass, encoded from guest memory as it is now. Reads memory and builds new
    objects only, so batches encode in parallel threads (the heavy parts release the GIL).
    `borrow`: nothing writes guest memory before the batch has left (encode_ram_pages).
    `tag_rows`: the pages' tags as already read (the kvm comparison's), else read here."""
    if kind == "ram_pages":
        body, payload, stats = encode_ram_pages(
            mem.pages, pages, use_lz4=use_lz4, round_no=round_no, borrow=borrow
        )
        return OutgoingBatch(kind, pages, body, payload, stats)
    tbody, tpayload, tstats = encode_tag_sections(
        None,
        pages,
        use_lz4=use_lz4,
        round_no=round_no,
        rows=mem.tag_ioctl.read_pages(pages) if tag_rows is None else tag_rows,
    )
    return OutgoingBatch(kind, pages, tbody, tpayload, tstats)


class DamagedBatch(WireError):
    """A page of the batch did not land as its digest says: the pages before it did; it and the
    rest hold unknown content (hashed again before any verification); the batch is to be sent
    again."""

    def __init__(self, decoded: DecodedBatch, placed: int) -> None:
        error = damaged("RAM pages", int(decoded.indices[placed]))
        super().__init__(error.code, error.reason)
        self.placed_pages = decoded.indices[:placed]
        self.placed_digests = decoded.digests[:placed]
        self.unknown_pages = decoded.indices[placed:]


def apply_ram_pages(mem: GuestMemory, msg: pb.RamPages, payload: Buffer) -> DecodedBatch:
    """Check a batch of pages from a peer and place it, each page checked against its digest
    as it is placed (one read of it); returns what was placed, or raises DamagedBatch."""
    decoded = decode_ram_pages(msg, payload, mem.page_count)
    with mem.lock:
        placed = mem.place_checked_pages(decoded.indices, decoded.rows, decoded.digests)
        if placed < decoded.indices.size:
            raise DamagedBatch(decoded, placed)
        mem.place_zero_pages(decoded.zero)
    return decoded


def apply_tag_sections(mem: GuestMemory, msg: pb.TagSections, payload: Buffer) -> DecodedBatch:
    """Check a batch of tag sections from a peer, then place it; returns what was placed."""
    decoded = decode_tag_sections(msg, payload, mem.page_count)
    with mem.lock:
        place_peer_tags(mem, decoded.indices, decoded.rows, decoded.zero)
    return decoded


def place_peer_tags(mem: GuestMemory, pages: Indices, rows: npt.NDArray[np.uint8], untagged: Indices) -> None:
    """Tags a peer sent, placed through the KVM_ARM_MTE_COPY_TAGS edge: `rows` into `pages`,
    zeros into the `untagged` pages that may hold tags (a page never tagged holds zeros)."""
    mem.tag_ioctl.write_pages(pages, rows)
    retagged = untagged[mem.tags_populated[untagged]]
    if retagged.size:
        mem.tag_ioctl.write_pages(retagged, np.zeros((retagged.size, PACKED_TAG_BYTES_PER_PAGE), np.uint8))


def vcpu_to_proto(vcpu: VcpuState) -> pb.VcpuState:
    return pb.VcpuState(index=vcpu.index, x=vcpu.x, **{name: getattr(vcpu, name) for name in SCALARS})


def vcpu_from_proto(msg: pb.VcpuState) -> VcpuState:
    """A peer's vCPU state, refused unless it has every general register."""
    if len(msg.x) != GENERAL_REGISTERS:
        raise WireError(
            pb.ERROR_BAD_MESSAGE,
            f"vCPU {msg.index} state has {len(msg.x)} general registers, expected {GENERAL_REGISTERS}",
        )
    return VcpuState(index=msg.index, x=list(msg.x), **{name: getattr(msg, name) for name in SCALARS})


def device_state(guest: Guest) -> pb.DeviceState:
    return pb.DeviceState(vcpus=[vcpu_to_proto(v) for v in guest.vcpus], qemu_state=guest.foreign)


def apply_device_state(guest: Guest, msg: pb.DeviceState) -> None:
    if len(msg.qemu_state) > MAX_FOREIGN_STATE_BYTES:
        raise WireError(
            pb.ERROR_BAD_MESSAGE,
            f"device state carries {len(msg.qemu_state)} bytes of QEMU state, more than {MAX_FOREIGN_STATE_BYTES}",
        )
    if len(msg.vcpus) != len(guest.vcpus):
        raise WireError(
            pb.ERROR_GEOMETRY_MISMATCH,
            f"device state has {len(msg.vcpus)} vCPUs, the guest has {len(guest.vcpus)}",
        )
    vcpus = [vcpu_from_proto(v) for v in msg.vcpus]
    if sorted(v.index for v in vcpus) != list(range(len(vcpus))):
        raise WireError(pb.ERROR_BAD_MESSAGE, "device state vCPU indices are not 0..n-1")
    guest.vcpus[:] = sorted(vcpus, key=lambda v: v.index)
    guest.foreign = msg.qemu_state
