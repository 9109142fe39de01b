"""QEMU's own migration of a paused virt,mte=on guest with random RAM, over loopback.

What a user would otherwise use, measured the same way: a paused guest (so one pass) whose RAM
is loaded from a random file, migrated with QEMU's bandwidth cap raised (its default of
128 MiB/s would measure the cap). Needs qemu-system-aarch64 (Debian: qemu-system-arm).

Usage: python3 bench/qemu_compare.py [--ram 1GiB] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.units import parse_size  # noqa: E402
from scripts.qemu_guest import Qmp  # noqa: E402
from source_node.demo import free_ports  # noqa: E402

QEMU = "qemu-system-aarch64"
RAM_BASE = 0x40000000  # where the virt machine's RAM starts
# virt puts its device tree at the start of RAM when no kernel is given; the random data
# starts past it and fills the rest.
DTB_ROOM = 2 << 20
RAM_PIECE = 1 << 30


def qemu_cmd(ram: int, qmp: Path, extra: list[str]) -> list[str]:
    return [
        QEMU, "-M", "virt,mte=on", "-cpu", "max", "-m", f"{ram >> 20}M", "-S",
        "-display", "none", "-nodefaults", "-qmp", f"unix:{qmp},server=on,wait=off", *extra,
    ]  # fmt: skip


def migrate_once(
    ram: int, blob: list[Path], tmp: Path, channels: int = 1, preallocate: bool = False
) -> dict[str, Any]:
    """One migration; channels > 1 turns on multifd with that many channels at both ends;
    `preallocate`: the destination commits its RAM before it listens (-mem-prealloc)."""
    (port,) = free_ports(1)
    src_qmp, dst_qmp = tmp / f"src-{port}.qmp", tmp / f"dst-{port}.qmp"
    loaders = []
    for i, piece in enumerate(blob):
        addr = RAM_BASE + DTB_ROOM + i * RAM_PIECE
        loaders += ["-device", f"loader,file={piece},addr={addr:#x},force-raw=on"]
    src = subprocess.Popen(qemu_cmd(ram, src_qmp, loaders), stderr=subprocess.PIPE)
    incoming = ["-incoming", "defer", *(["-mem-prealloc"] if preallocate else [])]
    dst = subprocess.Popen(qemu_cmd(ram, dst_qmp, incoming), stderr=subprocess.PIPE)
    try:
        try:
            # a large source loads its image, a -mem-prealloc destination commits its RAM,
            # before either answers: on a VM whose host took memory back, seconds per GiB
            patience = 60.0 + 30.0 * ram / (1 << 30)
            s, d = Qmp(src_qmp, patience), Qmp(dst_qmp, patience)
        except OSError:
            for proc in (src, dst):
                if proc.poll() is not None and proc.stderr is not None:
                    raise RuntimeError(
                        f"QEMU exited: {proc.stderr.read().decode(errors='replace').strip()}"
                    ) from None
            raise
        if channels > 1:
            for side in (s, d):
                side.call("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
                side.call("migrate-set-parameters", **{"multifd-channels": channels})
        d.call("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        s.call("migrate-set-parameters", **{"max-bandwidth": 100 << 30})
        s.call("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            info = s.call("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        s.close()
        d.close()
        return info  # type: ignore[no-any-return]
    finally:
        for proc in (src, dst):
            proc.kill()
            proc.wait(timeout=10)


def random_ram(ram: int, path: Path) -> list[Path]:
    """The RAM image a source QEMU loads: random, past the device tree's room, in files of at
    most RAM_PIECE (QEMU's loader reads a file in one read(), which Linux caps below 2 GiB)."""
    rng = np.random.default_rng(1)
    pieces = []
    left = ram - DTB_ROOM
    while left > 0:
        size = min(left, RAM_PIECE)
        piece = path.with_name(f"{path.name}.{len(pieces)}")
        piece.write_bytes(rng.bit_generator.random_raw(size // 8).tobytes())
        pieces.append(piece)
        left -= size
    return pieces


def available() -> bool:
    return shutil.which(QEMU) is not None


def seconds_once(
    ram: int, blob: list[Path], tmp: Path, channels: int = 1, preallocate: bool = False
) -> float | None:
    """One migration's own "total time" in seconds; None if it did not complete."""
    info = migrate_once(ram, blob, tmp, channels, preallocate)
    return info["total-time"] / 1000 if info.get("status") == "completed" else None


def measure(ram: int, repeat: int, channels: int = 1) -> dict[str, float] | None:
    if not available():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        blob = random_ram(ram, Path(tmp) / "ram.bin")
        runs = [migrate_once(ram, blob, Path(tmp), channels) for _ in range(repeat)]
    done = [r for r in runs if r.get("status") == "completed"]
    if not done:
        raise RuntimeError(f"QEMU migration did not complete: {runs[0]}")
    seconds = [r["total-time"] / 1000 for r in done]
    return {
        "seconds": statistics.median(seconds),
        "min": min(seconds),
        "max": max(seconds),
        "runs": len(done),
        "transferred": done[0]["ram"]["transferred"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ram", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--channels", type=int, default=1, help="multifd channels (1: multifd off)")
    args = parser.parse_args()
    result = measure(args.ram, args.repeat, args.channels)
    if result is None:
        print(f"{QEMU} is not installed (Debian: apt-get install qemu-system-arm)")
        return 1
    rate = args.ram / result["seconds"]
    print(
        f"QEMU {args.ram >> 20} MiB paused virt,mte=on, random RAM, {args.channels} channel(s): median {result['seconds']:.2f} s ({rate / 1e9:.2f} GB/s), range {result['min']:.2f}..{result['max']:.2f} s over {result['runs']} runs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
