"""A QEMU guest in and out of the pipeline: its stream as a Guest, and a Guest as a stream again.

The guest's RAM (`mach-virt.ram`) becomes the migration's pages and QEMU TCG's tag block
(`mach-virt.tag`: RAM / 32 bytes, two tags a byte, the even granule in the low nibble, this
project's own layout) its tag sections, placed through the KVM_ARM_MTE_COPY_TAGS edge. The
rest (the configuration, the other blocks' non-zero pages, the device sections) is a
QemuState (proto/) carried whole in the device-state message and covered by the verification.
On the way back every field of that state is checked as hostile input: it came from a peer.
"""

from __future__ import annotations

import numpy as np
from google.protobuf.message import DecodeError

from common.constants import MAX_FOREIGN_STATE_BYTES, MAX_RAM_BYTES, PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE
from common.guest.digest import READ_CHUNK_PAGES
from common.guest.guest import Guest
from common.guest.memory import check_ram_size
from common.qemu.stream import (
    MAX_BLOCKS,
    MAX_OTHER_BYTES,
    QemuStream,
    RamBlock,
    StreamError,
    check_configuration,
)
from common.units import format_size
from common.wire import mte_migration_pb2 as pb

RAM_BLOCK = "mach-virt.ram"
TAG_BLOCK = "mach-virt.tag"
TAG_RATIO = PAGE_SIZE // PACKED_TAG_BYTES_PER_PAGE  # 32 bytes of RAM per byte of tags


def import_guest(stream: QemuStream) -> Guest:
    """The guest a stream holds: its RAM and tags in guest memory, the rest as its foreign state."""
    ram, tags = stream.block(RAM_BLOCK), stream.block(TAG_BLOCK)
    try:
        check_ram_size(ram.length)
    except ValueError as exc:
        raise StreamError(f"block {RAM_BLOCK}: {exc}") from None
    if tags.length != ram.length // TAG_RATIO:
        raise StreamError(
            f"block {TAG_BLOCK} holds {tags.length} bytes; a guest of {format_size(ram.length)} has "
            f"{ram.length // TAG_RATIO} (is it a virt,mte=on guest?)"
        )
    guest = Guest.create(ram.length)
    mem = guest.memory
    pages = ram.data.reshape(-1, PAGE_SIZE)
    written = np.flatnonzero(pages.any(axis=1))
    mem.place_pages(written, pages[written])
    rows = tags.data.reshape(-1, PACKED_TAG_BYTES_PER_PAGE)
    tagged = np.flatnonzero(rows.any(axis=1))
    mem.tag_ioctl.write_pages(tagged, rows[tagged])
    state = pb.QemuState(
        configuration=stream.configuration,
        ram_section_id=stream.ram_section[0],
        ram_instance_id=stream.ram_section[1],
        ram_version_id=stream.ram_section[2],
        device_tail=stream.device_tail,
    )
    for block in stream.blocks:
        role = {RAM_BLOCK: pb.QEMU_BLOCK_GUEST_RAM, TAG_BLOCK: pb.QEMU_BLOCK_GUEST_TAGS}.get(
            block.name, pb.QEMU_BLOCK_OTHER
        )
        entry = state.blocks.add(name=block.name, length=block.length, role=role)
        if role == pb.QEMU_BLOCK_OTHER:
            content = block.data.reshape(-1, PAGE_SIZE)
            numbers = np.flatnonzero(content.any(axis=1))
            entry.page_numbers = numbers.astype("<u4").tobytes()
            entry.pages = content[numbers].tobytes()
    guest.foreign = state.SerializeToString()
    if len(guest.foreign) > MAX_FOREIGN_STATE_BYTES:
        raise StreamError(
            f"the guest's state beside its RAM and tags is {format_size(len(guest.foreign))} "
            f"(firmware, ROMs, devices); this pipeline carries at most {format_size(MAX_FOREIGN_STATE_BYTES)}"
        )
    return guest


def export_stream(guest: Guest) -> QemuStream:
    """The stream QEMU loads to run `guest` again, from its memory and its foreign state."""
    if not guest.foreign:
        raise StreamError("the guest did not come from QEMU: it has no QEMU state to write a stream with")
    try:
        state = pb.QemuState.FromString(guest.foreign)
    except DecodeError as exc:
        raise StreamError(f"the guest's QEMU state does not decode: {exc}") from None
    check_configuration(state.configuration)  # well-formed, or refused here rather than by QEMU
    mem = guest.memory
    blocks: list[RamBlock] = []
    roles: list[int] = []
    if len(state.blocks) > MAX_BLOCKS:
        raise StreamError(f"the QEMU state names {len(state.blocks)} RAM blocks, more than {MAX_BLOCKS}")
    names = [entry.name for entry in state.blocks]
    if len(set(names)) != len(names):
        raise StreamError("the QEMU state names a RAM block twice")
    other = sum(entry.length for entry in state.blocks if entry.role == pb.QEMU_BLOCK_OTHER)
    if other > MAX_OTHER_BYTES:
        raise StreamError(
            f"the QEMU state's firmware and ROM blocks add up to {other} bytes, more than {MAX_OTHER_BYTES}"
        )
    for entry in state.blocks:
        _check_block(entry)
        roles.append(entry.role)
        if entry.role == pb.QEMU_BLOCK_GUEST_RAM:
            if entry.length != mem.ram_bytes:
                raise StreamError(
                    f"block {entry.name!r} of {entry.length} bytes is not the guest's {mem.ram_bytes}"
                )
            blocks.append(RamBlock(entry.name, mem.ram))
        elif entry.role == pb.QEMU_BLOCK_GUEST_TAGS:
            if entry.length != mem.ram_bytes // TAG_RATIO:
                raise StreamError(f"tag block {entry.name!r} of {entry.length} bytes does not fit the guest")
            blocks.append(RamBlock(entry.name, _all_tags(guest)))
        else:
            blocks.append(RamBlock(entry.name, _other_block(entry)))
    if roles.count(pb.QEMU_BLOCK_GUEST_RAM) != 1 or roles.count(pb.QEMU_BLOCK_GUEST_TAGS) != 1:
        raise StreamError("the QEMU state must name exactly one RAM block and one tag block")
    section = (state.ram_section_id, state.ram_instance_id, state.ram_version_id)
    return QemuStream(state.configuration, section, blocks, state.device_tail)


def _check_block(entry: pb.QemuBlock) -> None:
    try:
        raw = entry.name.encode("ascii")
    except UnicodeEncodeError:
        raise StreamError(f"block name {entry.name!r} is not ASCII") from None
    if not raw or len(raw) > 255 or not entry.name.isprintable():
        raise StreamError(f"block name {entry.name!r} cannot be written to a stream")
    if entry.length == 0 or entry.length % PAGE_SIZE or entry.length > MAX_RAM_BYTES:
        raise StreamError(
            f"block {entry.name!r} of {entry.length} bytes is not 1 .. {MAX_RAM_BYTES // PAGE_SIZE} pages"
        )
    if entry.role not in (pb.QEMU_BLOCK_OTHER, pb.QEMU_BLOCK_GUEST_RAM, pb.QEMU_BLOCK_GUEST_TAGS):
        raise StreamError(f"block {entry.name!r} has an unknown role {entry.role}")


def _other_block(entry: pb.QemuBlock) -> np.ndarray:
    if len(entry.page_numbers) % 4:
        raise StreamError(f"block {entry.name!r}: page numbers are not whole u32s")
    numbers = np.frombuffer(entry.page_numbers, dtype="<u4").astype(np.int64)
    if len(entry.pages) != numbers.size * PAGE_SIZE:
        raise StreamError(
            f"block {entry.name!r}: {numbers.size} page numbers but {len(entry.pages)} bytes of pages"
        )
    if numbers.size and int(numbers.max()) >= entry.length // PAGE_SIZE:
        raise StreamError(f"block {entry.name!r}: a page lies outside its {entry.length} bytes")
    data = np.zeros(entry.length, dtype=np.uint8)
    data.reshape(-1, PAGE_SIZE)[numbers] = np.frombuffer(entry.pages, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    return data


def _all_tags(guest: Guest) -> np.ndarray:
    """The guest's whole tag storage as QEMU's tag block, read through the tag edge in chunks."""
    mem = guest.memory
    out = np.empty(mem.page_count * PACKED_TAG_BYTES_PER_PAGE, dtype=np.uint8)
    rows = out.reshape(mem.page_count, PACKED_TAG_BYTES_PER_PAGE)
    for first in range(0, mem.page_count, READ_CHUNK_PAGES):
        pages = np.arange(first, min(first + READ_CHUNK_PAGES, mem.page_count), dtype=np.int64)
        rows[first : first + pages.size] = mem.tag_ioctl.read_pages(pages)
    return out
