"""QEMU's migration stream of a stopped guest: read into RAM blocks, written back for -incoming.

The layout (QEMU 7.2, `migrate "exec:cat > FILE"`): the magic `QEVM` and version 3; a
configuration section (the machine type and its subsections); the iterable `ram` section, first
listing every RAM block by name and length, then pages, each a big-endian address word with
flags in its low 12 bits (0x02 a zero page and its fill byte, 0x08 a whole page, 0x20 the same
block as the last record, else the block's name follows; 0x10 ends a part; 0x04 only on the
block list's first word); each section closed by a footer (0x7e and the section id); then the
devices' sections, EOF, and a JSON description. The device sections are not self-describing:
in a stream of a stopped guest they all follow the ram section's end, so they travel as one
opaque tail, verified as bytes.

Every length, name and flag of a file is hostile input: anything this reader does not know is
refused with a `StreamError` that says what (and where in the file, for the stream's own
bytes). A block is allocated only once its size passed --max-ram, the block count and the
bound on all blocks together.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from common.constants import PAGE_SIZE

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
SECTION_START, SECTION_PART, SECTION_END, SECTION_FULL = 0x01, 0x02, 0x03, 0x04
SUBSECTION, CONFIGURATION, COMMAND, FOOTER, EOF = 0x05, 0x07, 0x08, 0x7E, 0x00
FLAG_ZERO, FLAG_MEM_SIZE, FLAG_PAGE, FLAG_EOS, FLAG_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
FLAG_XBZRLE, FLAG_COMPRESS = 0x40, 0x100
FLAG_BITS = PAGE_SIZE - 1
# The configuration's subsections this reader knows, and the payload each carries.
TARGET_PAGE_BITS = "configuration/target-page-bits"
CAPABILITIES = "configuration/capabilities"
# Capabilities that change the ram section's layout (a page size or an address per block).
UNSUPPORTED_CAPABILITIES = {"postcopy-ram", "x-ignore-shared", "multifd", "mapped-ram"}
# Bounds on what a stream may make a reader allocate beside the guest's RAM (virt has 8 blocks:
# RAM, its tags, two 64 MiB flash devices and a few ROMs).
MAX_BLOCKS = 64
MAX_OTHER_BYTES = 1 << 30  # every block but the RAM and its tags, together

U8 = npt.NDArray[np.uint8]


class StreamError(ValueError):
    """A stream this reader refuses, with the reason and the byte offset."""


@dataclass
class RamBlock:
    name: str
    data: U8  # its whole content, `length` bytes

    @property
    def length(self) -> int:
        return int(self.data.size)


@dataclass
class QemuStream:
    configuration: bytes  # the configuration section, verbatim
    ram_section: tuple[int, int, int]  # its section id, instance id and version
    blocks: list[RamBlock] = field(default_factory=list)  # in the stream's order
    device_tail: bytes = b""  # every section after the ram section's end, EOF and the JSON

    def block(self, name: str) -> RamBlock:
        for block in self.blocks:
            if block.name == name:
                return block
        raise StreamError(
            f"the stream has no RAM block {name!r} (it has {', '.join(b.name for b in self.blocks)})"
        )


class _Reader:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.at = 0

    def take(self, count: int, what: str) -> memoryview:
        if self.at + count > len(self.data):
            raise StreamError(f"the stream ends at byte {len(self.data)} inside {what} (at byte {self.at})")
        out = self.data[self.at : self.at + count]
        self.at += count
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def be32(self, what: str) -> int:
        return int(struct.unpack(">I", self.take(4, what))[0])

    def be64(self, what: str) -> int:
        return int(struct.unpack(">Q", self.take(8, what))[0])

    def name(self, what: str) -> str:
        raw = bytes(self.take(self.u8(what), what))
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise StreamError(f"{what} at byte {self.at - len(raw)} is not ASCII") from None
        if not text.isprintable():
            raise StreamError(f"{what} at byte {self.at - len(raw)} holds unprintable characters")
        return text


def read_stream(data: bytes | memoryview, max_block_bytes: int) -> QemuStream:
    """Parse a whole stream. `max_block_bytes`: the largest RAM block accepted (--max-ram)."""
    r = _Reader(data)
    if r.be32("the magic") != MAGIC:
        raise StreamError("not a QEMU migration stream: the magic is not QEVM")
    version = r.be32("the version")
    if version != VERSION:
        raise StreamError(f"stream version {version}; only version {VERSION} (QEMU 2.x and later) is read")
    configuration = _configuration(r)
    stream: QemuStream | None = None
    blocks: dict[str, RamBlock] = {}
    ended = False  # the ram section's END came: devices may follow
    last: RamBlock | None = None  # a page record may continue the block of the part before
    while True:
        start = r.at
        kind = r.u8("a section header")
        if kind in (SECTION_FULL, EOF):
            if stream is None:
                raise StreamError(f"device sections at byte {start} before any ram section")
            if not ended:
                raise StreamError(f"device sections at byte {start} before the ram section's end")
            stream.device_tail = bytes(r.data[start:])
            return stream
        if kind == SECTION_START:
            section_id = r.be32("a section id")
            name = r.name("a section name")
            instance, version_id = r.be32("an instance id"), r.be32("a section version")
            if name != "ram":
                raise StreamError(
                    f"iterable section {name!r} at byte {start}: only RAM is read (no block migration)"
                )
            if stream is not None:
                raise StreamError(f"a second ram section at byte {start}")
            stream = QemuStream(configuration, (section_id, instance, version_id))
            for block in _block_list(r, max_block_bytes):
                blocks[block.name] = block
                stream.blocks.append(block)
        elif kind in (SECTION_PART, SECTION_END):
            section_id = r.be32("a section id")
            if stream is None or section_id != stream.ram_section[0]:
                raise StreamError(f"section {section_id} at byte {start} continues no ram section")
            last = _pages(r, blocks, last)
            ended = kind == SECTION_END
        elif kind == COMMAND:
            raise StreamError(f"a postcopy command at byte {start}: save the guest stopped, with precopy")
        else:
            raise StreamError(f"unknown section type {kind:#x} at byte {start}")
        _footer(r, stream.ram_section[0])


def _configuration(r: _Reader) -> bytes:
    start = r.at
    if r.u8("the configuration section") != CONFIGURATION:
        raise StreamError(f"no configuration section at byte {start} (QEMU 2.4 and later send one)")
    machine = bytes(r.take(r.be32("the machine type's length"), "the machine type"))
    if len(machine) > 255:
        raise StreamError("a machine type name longer than 255 bytes")
    while r.at < len(r.data) and r.data[r.at] == SUBSECTION:
        r.take(1, "a subsection")
        name = r.name("a configuration subsection")
        r.be32("its version")
        if name == TARGET_PAGE_BITS:
            bits = r.be32("the target page bits")
            if bits != PAGE_SIZE.bit_length() - 1:
                raise StreamError(f"target pages of 2^{bits} bytes; this pipeline moves 4 KiB pages")
        elif name == CAPABILITIES:
            for _ in range(r.be32("the capability count")):
                capability = r.name("a capability")
                if capability in UNSUPPORTED_CAPABILITIES:
                    raise StreamError(
                        f"the stream was saved with capability {capability!r}, which changes its layout"
                    )
        else:
            raise StreamError(f"unknown configuration subsection {name!r}")
    return bytes(r.data[start : r.at])


def total_limit(max_block_bytes: int) -> int:
    """The most RAM-block bytes a stream may announce: the guest's RAM, its tags, the rest."""
    return max_block_bytes + max_block_bytes // 32 + MAX_OTHER_BYTES


def check_configuration(data: bytes) -> None:
    """A configuration section from elsewhere (a peer): exactly one well-formed section."""
    r = _Reader(data)
    _configuration(r)
    if r.at != len(data):
        raise StreamError(f"the configuration section has {len(data) - r.at} bytes after its end")


def _block_list(r: _Reader, max_block_bytes: int) -> list[RamBlock]:
    word = r.be64("the RAM size word")
    if word & FLAG_BITS != FLAG_MEM_SIZE:
        raise StreamError(f"the ram section starts with flags {word & FLAG_BITS:#x}, not the block list")
    total, listed = word & ~FLAG_BITS, 0
    limit = total_limit(max_block_bytes)
    if total > limit:
        raise StreamError(
            f"the stream announces {total} bytes of RAM blocks, more than {limit} for --max-ram {max_block_bytes}"
        )
    out: list[RamBlock] = []
    while listed < total:
        at = r.at
        name = r.name("a RAM block name")
        length = r.be64(f"block {name!r}'s length")
        if length % PAGE_SIZE or length == 0:
            raise StreamError(
                f"RAM block {name!r} at byte {at} of {length} bytes is not a whole number of pages"
            )
        if length > max_block_bytes:
            raise StreamError(
                f"RAM block {name!r} at byte {at} of {length} bytes is larger than --max-ram ({max_block_bytes})"
            )
        if any(block.name == name for block in out):
            raise StreamError(f"RAM block {name!r} listed twice (at byte {at})")
        if len(out) == MAX_BLOCKS:
            raise StreamError(f"more than {MAX_BLOCKS} RAM blocks (at byte {at})")
        listed += length
        if listed > total:
            raise StreamError(
                f"the RAM blocks add up to more than the {total} bytes announced (at byte {at})"
            )
        out.append(RamBlock(name, np.zeros(length, dtype=np.uint8)))  # checked first: then allocated
    if r.be64("the block list's end") != FLAG_EOS:
        raise StreamError(f"the block list does not end at byte {r.at - 8}")
    return out


def _pages(r: _Reader, blocks: dict[str, RamBlock], block: RamBlock | None) -> RamBlock | None:
    """The page records of one part, up to its end marker; returns the last block named."""
    while True:
        at = r.at
        word = r.be64("a page record")
        flags, addr = word & FLAG_BITS, word & ~FLAG_BITS
        if flags == FLAG_EOS:
            return block
        if flags & (FLAG_XBZRLE | FLAG_COMPRESS):
            raise StreamError(f"a compressed page at byte {at}: save without xbzrle or compression")
        if flags & FLAG_CONTINUE:
            if block is None:
                raise StreamError(f"a page at byte {at} continues no block")
        else:
            name = r.name("a page's block name")
            if name not in blocks:
                raise StreamError(f"a page at byte {at} names block {name!r}, which the block list lacks")
            block = blocks[name]
        kind = flags & ~FLAG_CONTINUE
        if addr + PAGE_SIZE > block.length:
            raise StreamError(
                f"a page at byte {at} lies at {addr:#x}, outside block {block.name!r} of {block.length:#x} bytes"
            )
        if kind == FLAG_ZERO:
            block.data[addr : addr + PAGE_SIZE] = r.u8("a zero page's fill byte")
        elif kind == FLAG_PAGE:
            block.data[addr : addr + PAGE_SIZE] = np.frombuffer(r.take(PAGE_SIZE, "a page"), dtype=np.uint8)
        else:
            raise StreamError(f"page record flags {flags:#x} at byte {at} are not a zero page or a page")


def _footer(r: _Reader, section_id: int) -> None:
    at = r.at
    if r.u8("a section footer") != FOOTER or r.be32("a section footer") != section_id:
        raise StreamError(f"section {section_id} is not closed by its footer at byte {at}")


# -- writing ------------------------------------------------------------------------------------


def write_stream(out: BinaryIO, stream: QemuStream) -> int:
    """Write a stream that QEMU loads with -incoming: the configuration and the device tail as
    they came, and every page of every block (zero pages as zero records). Returns the bytes."""
    total = 0
    for chunk in _chunks(stream):
        out.write(chunk)
        total += len(chunk)
    return total


def _chunks(stream: QemuStream) -> Iterator[bytes]:
    section_id, instance, version_id = stream.ram_section
    yield struct.pack(">II", MAGIC, VERSION) + stream.configuration
    head = bytearray(struct.pack(">BI", SECTION_START, section_id) + _name("ram"))
    head += struct.pack(">IIQ", instance, version_id, sum(b.length for b in stream.blocks) | FLAG_MEM_SIZE)
    for block in stream.blocks:
        head += _name(block.name) + struct.pack(">Q", block.length)
    head += struct.pack(">Q", FLAG_EOS) + struct.pack(">BI", FOOTER, section_id)
    yield bytes(head)
    yield struct.pack(">BI", SECTION_END, section_id)
    for block in stream.blocks:
        pages = block.data.reshape(-1, PAGE_SIZE)
        nonzero = pages.any(axis=1)
        for number in range(pages.shape[0]):
            cont = FLAG_CONTINUE if number else 0
            name = b"" if number else _name(block.name)
            if nonzero[number]:
                yield (
                    struct.pack(">Q", number * PAGE_SIZE | FLAG_PAGE | cont) + name + pages[number].tobytes()
                )
            else:
                yield struct.pack(">Q", number * PAGE_SIZE | FLAG_ZERO | cont) + name + b"\0"
    yield struct.pack(">Q", FLAG_EOS) + struct.pack(">BI", FOOTER, section_id)
    yield stream.device_tail


def _name(name: str) -> bytes:
    raw = name.encode("ascii")
    if len(raw) > 255:
        raise StreamError(f"a name of {len(raw)} bytes does not fit a stream")
    return bytes([len(raw)]) + raw
