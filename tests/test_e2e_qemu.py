"""A real MTE guest on QEMU, through the pipeline and back to QEMU, which resumes it.

Boot the self-checking guest (scripts/qemu_guest.py), let it pass its checks, stop it and save
its stream; migrate that through source-node and dest-node (once clean, once through the fault
proxy with a reset and corrupted chunks); load what dest-node wrote into a second QEMU. The RAM
and tag blocks that QEMU loaded equal those the first one saved, byte for byte, and the guest
resumes: more passes, no failure. Needs QEMU, the cross compiler and the kernel that
scripts/install.sh installs as root; without them it skips and says what is missing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.qemu.guest_io import RAM_BLOCK, TAG_BLOCK
from common.qemu.stream import read_stream
from faultinject.proxy import FaultProxy
from scripts import qemu_guest
from tests.e2e import SMALL_GUEST, Dest, run_source
from tests.test_qemu_stream import small_stream, written

# a QEMU boot and a resume take seconds each under TCG on two cores: more than the default bound
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


_MISSING = qemu_guest.missing()
needs_qemu = pytest.mark.skipif(bool(_MISSING), reason="missing: " + "; ".join(_MISSING))


@pytest.fixture(scope="module")
def saved_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stopped guest that has passed its checks twice, as QEMU saved it."""
    work = tmp_path_factory.mktemp("qemu")
    qemu_guest.build()
    guest = qemu_guest.Guest(work)
    try:
        guest.wait_for_passes(2, timeout_s=240)
        stream = work / "saved.stream"
        guest.save(stream)
    finally:
        guest.close()
    return stream


def hand_back(
    tmp: Path, saved: Path, *extra: str, faults: Callable[[FaultProxy], None] | None = None
) -> tuple[Path, dict[str, Any], FaultProxy | None]:
    """source-node --from-qemu to dest-node --to-qemu, through a fault proxy set up by `faults`
    if given; the stream written, the source's report and the proxy."""
    back = tmp / "back.stream"
    dest = Dest(tmp, "--to-qemu", str(back), "--peer-timeout", "1")
    proxy = None
    try:
        with contextlib.ExitStack() as stack:
            target = dest.uri
            if faults is not None:
                proxy = stack.enter_context(FaultProxy(("127.0.0.1", dest.port), seed=5))
                faults(proxy)
                target = proxy.uri
            src = run_source(tmp, "--from-qemu", str(saved), "--migrate-to", target, *extra)
            got = dest.finish()
    finally:
        dest.kill()
    assert src.code == 0, src.stderr[-3000:] + "\n--- dest ---\n" + got.stderr[-3000:]
    assert got.code == 0, got.stderr[-3000:]
    assert src.report["verification"]["ok"] is True
    assert "does not execute here" in src.report["guest"]["imported"]
    assert got.report["qemu_stream"] == {"path": str(back), "bytes": back.stat().st_size, "error": None}
    return back, src.report, proxy


def resume_and_compare(tmp: Path, saved: Path, back: Path) -> None:
    """QEMU loads what came back: its RAM and tags equal the saved ones; the guest runs on."""
    guest = qemu_guest.Guest(tmp, incoming=back)
    try:
        guest.loaded()
        loaded = tmp / "loaded.stream"
        guest.save(loaded)  # what this QEMU holds, saved again before it runs
        guest.qmp.call("cont")
        guest.wait_for_passes(2, timeout_s=240)
        assert guest.failures() == []
    finally:
        guest.close()
    before = read_stream(saved.read_bytes(), 1 << 34)
    after = read_stream(loaded.read_bytes(), 1 << 34)
    for name in (RAM_BLOCK, TAG_BLOCK):
        assert (before.block(name).data == after.block(name).data).all(), f"{name} changed on the way"
    tags = after.block(TAG_BLOCK).data
    assert tags.any(), "the guest's tags were there to lose"


@needs_qemu
@pytest.mark.parametrize("how", [(), ("--mode", "postcopy", "--channels", "2")], ids=["precopy", "postcopy"])
def test_a_qemu_guest_goes_through_the_pipeline_and_resumes_on_qemu(
    tmp_path: Path, saved_guest: Path, how: tuple[str, ...]
) -> None:
    back, report, _ = hand_back(tmp_path, saved_guest, *how)
    assert report["mode"] == ("postcopy" if how else "precopy")
    assert report["tag_ioctl"]["calls"] > 0, "the tags were read through the tag edge"
    resume_and_compare(tmp_path, saved_guest, back)


@needs_qemu
def test_a_qemu_guest_rides_out_a_reset_and_corrupted_chunks(tmp_path: Path, saved_guest: Path) -> None:
    def faults(proxy: FaultProxy) -> None:
        proxy.corrupt_down = 0.02
        proxy.when(lambda m: m.bytes_down > 8 << 20, proxy.reset)

    link = ("--peer-timeout", "1", "--reconnect-timeout", "20")
    back, report, proxy = hand_back(tmp_path, saved_guest, *link, faults=faults)
    assert proxy is not None
    assert proxy.resets == 1 and proxy.corrupted > 0
    assert report["link"]["resent_messages"] > 0 or report["link"]["reconnects"] > 0
    resume_and_compare(tmp_path, saved_guest, back)


# -- the daemons' QEMU paths on a stream written here (no QEMU needed) -----------------------------


def test_the_daemons_hand_a_qemu_guest_back_byte_for_byte(tmp_path: Path) -> None:
    saved = tmp_path / "small.stream"
    saved.write_bytes(written(small_stream()))
    back, report, _ = hand_back(tmp_path, saved)
    assert back.read_bytes() == saved.read_bytes(), "what QEMU gave is what QEMU gets back"
    assert report["guest"]["here"] is False


def test_a_qemu_guest_is_refused_by_a_destination_that_cannot_hand_it_back(tmp_path: Path) -> None:
    saved = tmp_path / "small.stream"
    saved.write_bytes(written(small_stream()))
    dest = Dest(tmp_path, "--peer-timeout", "1")  # no --to-qemu
    try:
        src = run_source(tmp_path, "--from-qemu", str(saved), "--migrate-to", dest.uri)
        got = dest.finish()
    finally:
        dest.kill()
    assert src.code != 0 and "needs a destination started with --to-qemu" in src.report["error"]
    assert src.report["guest"]["here"] is True, "the source keeps the guest it could not hand over"
    assert got.code != 0


def test_a_destination_for_qemu_guests_refuses_an_ordinary_one(tmp_path: Path) -> None:
    back = tmp_path / "back.stream"
    dest = Dest(tmp_path, "--to-qemu", str(back), "--peer-timeout", "1")
    try:
        src = run_source(tmp_path, *SMALL_GUEST, "--stop-at-step", "0", "--migrate-to", dest.uri)
        got = dest.finish()
    finally:
        dest.kill()
    assert src.code != 0 and "did not come from QEMU" in src.report["error"]
    assert src.report["guest"]["here"] is True and not back.exists()
    assert got.code != 0
