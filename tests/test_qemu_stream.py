"""QEMU's migration stream: read, written, and refused when hostile; a QEMU guest in and out."""

from __future__ import annotations

import contextlib
import io
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.constants import MAX_FOREIGN_STATE_BYTES, PAGE_SIZE
from common.guest.guest import Guest
from common.guest.vcpu import vcpus_digest
from common.qemu.guest_io import RAM_BLOCK, TAG_BLOCK, export_stream, import_guest
from common.qemu.stream import (
    FLAG_CONTINUE,
    FLAG_EOS,
    FLAG_MEM_SIZE,
    FLAG_PAGE,
    FLAG_ZERO,
    FOOTER,
    QemuStream,
    RamBlock,
    StreamError,
    check_configuration,
    read_stream,
    write_stream,
)
from common.transfer import apply_device_state, device_state
from common.wire import mte_migration_pb2 as pb
from common.wire.framing import WireError
from tests.e2e import SOURCE

MIB = 1 << 20
# As QEMU 7.2 writes it for virt: the machine type, then the target page bits (12)
CONFIG = b"\x07" + struct.pack(">I", 8) + b"virt-7.2" + b"\x05\x1e" + b"configuration/target-page-bits"
CONFIG += struct.pack(">II", 1, 12)
# Device sections are opaque to the reader: a FULL section, EOF and a JSON description
TAIL = (
    b"\x04\x00\x00\x00\x05\x05timer"
    + bytes(12)
    + b"\x7e\x00\x00\x00\x05\x00\x06"
    + struct.pack(">I", 2)
    + b"{}"
)


def small_stream(seed: int = 1, ram_bytes: int = MIB) -> QemuStream:
    rng = np.random.default_rng(seed)
    ram = np.zeros(ram_bytes, dtype=np.uint8)
    ram[: 8 * PAGE_SIZE] = rng.integers(0, 256, 8 * PAGE_SIZE, dtype=np.uint8)
    tags = np.zeros(ram_bytes // 32, dtype=np.uint8)
    tags[:1024] = rng.integers(0, 256, 1024, dtype=np.uint8)
    flash = np.zeros(16 * PAGE_SIZE, dtype=np.uint8)
    flash[3 * PAGE_SIZE : 3 * PAGE_SIZE + 10] = 7
    blocks = [RamBlock(RAM_BLOCK, ram), RamBlock("virt.flash0", flash), RamBlock(TAG_BLOCK, tags)]
    return QemuStream(CONFIG, (2, 0, 4), blocks, TAIL)


def written(stream: QemuStream) -> bytes:
    out = io.BytesIO()
    write_stream(out, stream)
    return out.getvalue()


def same(a: QemuStream, b: QemuStream) -> bool:
    return (
        a.configuration == b.configuration
        and a.ram_section == b.ram_section
        and a.device_tail == b.device_tail
        and [x.name for x in a.blocks] == [x.name for x in b.blocks]
        and all((x.data == y.data).all() for x, y in zip(a.blocks, b.blocks, strict=True))
    )


def test_a_written_stream_reads_back_the_same() -> None:
    original = small_stream()
    assert same(read_stream(written(original), MIB), original)


def raw(*parts: bytes) -> bytes:
    """A stream put together by hand: header, configuration, then the given bytes."""
    return struct.pack(">II", 0x5145564D, 3) + CONFIG + b"".join(parts)


def start(blocks: list[tuple[str, int]]) -> bytes:
    body = (
        struct.pack(">BI", 1, 2)
        + b"\x03ram"
        + struct.pack(">IIQ", 0, 4, sum(n for _, n in blocks) | FLAG_MEM_SIZE)
    )
    for name, length in blocks:
        body += bytes([len(name)]) + name.encode() + struct.pack(">Q", length)
    return body + struct.pack(">Q", FLAG_EOS) + struct.pack(">BI", FOOTER, 2)


def part(kind: int, records: bytes) -> bytes:
    return struct.pack(">BI", kind, 2) + records + struct.pack(">Q", FLAG_EOS) + struct.pack(">BI", FOOTER, 2)


def page(addr: int, flags: int, block: str | None, data: bytes) -> bytes:
    name = b"" if block is None else bytes([len(block)]) + block.encode()
    return struct.pack(">Q", addr | flags) + name + data


def test_a_page_may_continue_the_block_of_the_part_before() -> None:
    """QEMU remembers the last block across parts: a part may start with a CONTINUE record."""
    data = raw(
        start([("ram", 4 * PAGE_SIZE)]),
        part(2, page(0, FLAG_PAGE, "ram", b"\x01" * PAGE_SIZE)),
        part(3, page(PAGE_SIZE, FLAG_PAGE | FLAG_CONTINUE, None, b"\x02" * PAGE_SIZE)
             + page(2 * PAGE_SIZE, FLAG_ZERO | FLAG_CONTINUE, None, b"\x05")),
        TAIL,
    )  # fmt: skip
    stream = read_stream(data, MIB)
    content = stream.block("ram").data.reshape(-1, PAGE_SIZE)
    assert content[:, 0].tolist() == [1, 2, 5, 0] and stream.device_tail == TAIL


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"QEVX" + bytes(4), "magic is not QEVM"),
        (struct.pack(">II", 0x5145564D, 2), "version 2"),
        (raw(start([("ram", 16 * MIB)])), "larger than --max-ram"),
        (raw(start([("ram", 4096)]), part(2, page(0, FLAG_PAGE, "nope", bytes(PAGE_SIZE)))), "block 'nope'"),
        (raw(start([("ram", 4096)]), part(2, page(4096, FLAG_ZERO, "ram", b"\0"))), "outside block 'ram'"),
        (
            raw(start([("ram", 4096)]), part(2, page(0, FLAG_ZERO | FLAG_CONTINUE, None, b"\0"))),
            "continues no block",
        ),
        (raw(start([("ram", 4096)]), part(2, page(0, 0x40, "ram", b""))), "compressed page"),
        (raw(start([("ram", 4096)]), part(2, page(0, 0x80, "ram", b""))), "not a zero page or a page"),
        (raw(start([("ram", 5000), ("x", 3192)])), "not a whole number of pages"),
        (raw(start([("ram", 4096)]), b"\x09"), "unknown section type 0x9"),
        (raw(start([("ram", 4096)]), b"\x08\x00\x01"), "postcopy command"),
        (raw(start([("ram", 4096)]), TAIL), "before the ram section's end"),
        (raw(TAIL), "before any ram section"),
        (raw(start([("ram", 4096)])[:-5], b"\x7e\x00\x00\x00\x09"), "not closed by its footer"),
        (raw(start([("ram", 4096)]))[:-7], "the stream ends at byte"),
    ],
)
def test_a_hostile_stream_is_refused_with_its_reason(data: bytes, why: str) -> None:
    with pytest.raises(StreamError, match=why):
        read_stream(data, 8 * MIB)


@pytest.mark.parametrize(
    ("config", "why"),
    [
        (b"\x07" + struct.pack(">I", 4) + b"virt" + b"\x05\x05other" + bytes(4), "unknown configuration subsection"),
        (b"\x07" + struct.pack(">I", 4) + b"virt\x05\x1econfiguration/target-page-bits" + struct.pack(">II", 1, 16),
         "2\\^16 bytes"),
        (b"\x07" + struct.pack(">I", 4) + b"virt\x05\x1aconfiguration/capabilities" + struct.pack(">II", 1, 1)
         + b"\x0cpostcopy-ram", "changes its layout"),
        (b"\x07" + struct.pack(">I", 4) + b"virt" + b"extra", "5 bytes after its end"),
        (b"\x06", "no configuration section"),
    ],
)  # fmt: skip
def test_a_hostile_configuration_is_refused(config: bytes, why: str) -> None:
    with pytest.raises(StreamError, match=why):
        check_configuration(config)


_VALID = written(small_stream(ram_bytes=64 * PAGE_SIZE))


@settings(max_examples=150, deadline=None)
@given(
    cut=st.integers(0, len(_VALID)),
    flips=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(1, 255)), max_size=4),
)
def test_a_damaged_stream_is_read_or_refused_never_crashes(cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(_VALID[:cut] if cut < len(_VALID) - 64 else _VALID)
    for at, mask in flips:
        if at < len(data):
            data[at] ^= mask
    with contextlib.suppress(StreamError):
        read_stream(bytes(data), 4 * MIB)


def test_a_guest_from_qemu_goes_out_as_the_stream_it_came_in() -> None:
    original = small_stream()
    guest = import_guest(original)
    mem = guest.memory
    assert mem.ram_bytes == MIB
    assert (mem.page_tags.reshape(-1) == original.block(TAG_BLOCK).data).all(), (
        "the tag block is the packed tags"
    )
    assert mem.tag_ioctl.counters.calls >= 1, "placed through the tag edge"
    assert same(export_stream(guest), original)
    # and what travels for it: the rest, once, inside the device state
    copy = Guest.create(MIB)
    apply_device_state(copy, device_state(guest))
    assert copy.foreign == guest.foreign


def test_the_foreign_state_is_part_of_what_the_verification_compares() -> None:
    guest = import_guest(small_stream())
    plain = Guest.create(MIB)
    assert plain.state_digest() == vcpus_digest(plain.vcpus), "guests of our own workload: unchanged digests"
    before = guest.state_digest()
    guest.foreign = guest.foreign[:-1] + bytes([guest.foreign[-1] ^ 1])
    assert guest.state_digest() != before


def test_a_device_state_with_too_much_qemu_state_is_refused() -> None:
    msg = pb.DeviceState(qemu_state=bytes(MAX_FOREIGN_STATE_BYTES + 1))
    msg.vcpus.add(index=0, x=[0] * 31)
    with pytest.raises(WireError, match="QEMU state"):
        apply_device_state(Guest.create(MIB), msg)


def hostile_state(change: str) -> bytes:
    state = pb.QemuState.FromString(import_guest(small_stream()).foreign)
    flash = next(b for b in state.blocks if b.name == "virt.flash0")
    if change == "outside":
        flash.page_numbers = struct.pack("<I", 99)
    elif change == "misaligned":
        flash.page_numbers += b"\x01"
    elif change == "short":
        flash.pages = flash.pages[:-1]
    elif change == "no-ram":
        next(b for b in state.blocks if b.role == pb.QEMU_BLOCK_GUEST_RAM).role = pb.QEMU_BLOCK_OTHER
    elif change == "name":
        flash.name = "x" * 300
    elif change == "length":
        flash.length = 4097
    elif change == "config":
        state.configuration = b"\x07\xff\xff\xff\xff"
    return state.SerializeToString()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("outside", "outside its"),
        ("misaligned", "whole u32s"),
        ("short", "bytes of pages"),
        ("no-ram", "exactly one RAM block"),
        ("name", "cannot be written"),
        ("length", "4097 bytes"),
        ("config", "the stream ends"),
        ("garbage", "does not decode"),
    ],
)
def test_a_hostile_qemu_state_from_a_peer_is_refused_before_writing(change: str, why: str) -> None:
    guest = Guest.create(MIB)
    guest.foreign = b"\xff\xff\xff" if change == "garbage" else hostile_state(change)
    with pytest.raises(StreamError, match=why):
        export_stream(guest)


def test_a_stream_without_a_tagged_guest_is_refused_at_import() -> None:
    stream = small_stream()
    stream.blocks[2] = RamBlock(TAG_BLOCK, np.zeros(4096, dtype=np.uint8))
    with pytest.raises(StreamError, match="virt,mte=on"):
        import_guest(stream)
    stream.blocks.pop(2)
    with pytest.raises(StreamError, match=r"no RAM block 'mach-virt\.tag'"):
        import_guest(stream)


def test_a_hostile_file_is_refused_in_one_line_before_anything_starts(tmp_path: Path) -> None:
    good = written(small_stream())
    cases = {
        "truncated": (good[:5000], "the stream ends at byte 5000"),
        "magic": (b"QEVX" + good[4:], "not a QEMU migration stream"),
        "large": (good, "larger than --max-ram"),
    }
    for name, (data, why) in cases.items():
        path = tmp_path / f"{name}.stream"
        path.write_bytes(data)
        extra = ["--max-ram", "512K"] if name == "large" else []
        done = subprocess.run(
            [*SOURCE, "--from-qemu", str(path), *extra, "--report", str(tmp_path / "r.json")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and why in done.stderr and "Traceback" not in done.stderr


def test_the_destination_says_why_it_cannot_hand_a_guest_back(tmp_path: Path) -> None:
    from dest_node.qemu_handback import QemuHandback

    lines: list[tuple[str, dict[str, object]]] = []

    class Log:
        def error(self, event: str, **fields: object) -> None:
            lines.append((event, fields))

        def info(self, event: str, **fields: object) -> None:
            lines.append((event, fields))

    target = tmp_path / "back.stream"
    handback = QemuHandback(str(target), Log())
    handback.hand_back(Guest.create(MIB))  # a guest of our own workload: nothing to give QEMU
    assert handback.done and not target.exists() and not (tmp_path / "back.stream.partial").exists()
    assert handback.report()["error"] is not None and "did not come from QEMU" in handback.report()["error"]
    good = QemuHandback(str(target), Log())
    good.hand_back(import_guest(small_stream()))
    assert good.report() == {"path": str(target), "bytes": target.stat().st_size, "error": None}
    assert same(read_stream(target.read_bytes(), MIB), small_stream())


def test_the_verification_tells_a_different_qemu_state_apart() -> None:
    from common.guest.digest import DigestCache
    from common.protocol.verify import SourceVerifier, destination_verdict

    source = import_guest(small_stream())
    arrived = import_guest(small_stream())
    state = pb.QemuState.FromString(arrived.foreign)
    state.device_tail = state.device_tail[:-1] + b"]"  # one byte of a device's state differs
    arrived.foreign = state.SerializeToString()
    verifier = SourceVerifier(source, DigestCache(source.memory))
    result, _ = destination_verdict(verifier.request(), arrived, DigestCache(arrived.memory))
    assert not result.ok and result.vcpu_mismatch, "RAM and tags agree; the device state does not"
