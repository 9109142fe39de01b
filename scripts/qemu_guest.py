"""A real MTE guest on QEMU for the round trip: build it, boot it and save it, load it and resume it.

    python3 scripts/qemu_guest.py build                     # the check program and its initramfs
    python3 scripts/qemu_guest.py save guest.stream         # boot, let it pass its checks, stop, save
    python3 scripts/qemu_guest.py resume guest.stream       # load in a new QEMU, resume, watch it

The guest is a Debian arm64 kernel (CONFIG_ARM64_MTE) on `qemu-system-aarch64 -M virt,mte=on
-cpu max` (TCG), whose /init is tests/qemu_guest/mte_check.c: it tags a region with random
tags, keeps the tags it expects, and checks every granule through tagged pointers, one line on
the console per pass. `resume` succeeds when the resumed guest prints further passes and no
failure. scripts/install.sh installs QEMU, the cross compiler and the kernel (as root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QEMU = "qemu-system-aarch64"
CC = "aarch64-linux-gnu-gcc"
KERNEL_DIR = Path(os.environ.get("MTE_GUEST_KERNEL_DIR", "/opt/mte-guest/kernel"))
BUILD = Path(os.environ.get("MTE_GUEST_BUILD", Path.home() / ".cache" / "mte-guest"))
RAM = "256M"
PASS, FAIL, READY = "mte-check pass", "mte-check FAIL", "mte-check ready"


def missing() -> list[str]:
    """What the round trip needs and this machine lacks, in words (empty: all there)."""
    out = []
    if shutil.which(QEMU) is None:
        out.append(f"{QEMU} (Debian: qemu-system-arm)")
    if shutil.which(CC) is None:
        out.append(f"{CC} (Debian: gcc-aarch64-linux-gnu)")
    if kernel() is None:
        out.append(f"an arm64 kernel in {KERNEL_DIR} (scripts/install.sh fetches Debian's)")
    return out


def kernel() -> Path | None:
    found = sorted(KERNEL_DIR.glob("vmlinuz-*")) if KERNEL_DIR.is_dir() else []
    return found[-1] if found else None


# -- the initramfs: a newc cpio holding /dev/console and /init ------------------------------------


def _cpio_entry(
    name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 1
) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4) + data
    return out + b"\0" * (-len(out) % 4)


def initramfs(init: bytes) -> bytes:
    entries = [
        _cpio_entry("dev", 0o040755, ino=1),
        _cpio_entry("dev/console", 0o020600, rdev=(5, 1), ino=2),
        _cpio_entry("init", 0o100755, init, ino=3),
        _cpio_entry("TRAILER!!!", 0, ino=0),
    ]
    return b"".join(entries)


def build(out: Path = BUILD) -> Path:
    """Compile the check program and pack it as /init; returns the initramfs."""
    out.mkdir(parents=True, exist_ok=True)
    program = out / "init"
    subprocess.run(
        [
            CC,
            "-static",
            "-O2",
            "-march=armv8.5-a+memtag",
            "-o",
            str(program),
            str(ROOT / "tests/qemu_guest/mte_check.c"),
        ],
        check=True,
    )
    image = out / "initramfs.cpio"
    image.write_bytes(initramfs(program.read_bytes()))
    return image


# -- QEMU and its QMP socket -----------------------------------------------------------------------


class Qmp:
    """A QMP client on a unix socket (bench/qemu_compare.py drives QEMU with it too)."""

    def __init__(self, path: Path, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout_s)
        self.file = self.sock.makefile("rw")
        self._read()
        self.call("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            message: dict[str, Any] = json.loads(self.file.readline())
            if "event" not in message:
                return message

    def call(self, command: str, **arguments: Any) -> dict[str, Any]:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"QMP {command}: {answer['error'].get('desc')}")
        return answer.get("return", {})

    def close(self) -> None:
        self.sock.close()


class Guest:
    """One QEMU process running the check guest, its console in a file."""

    def __init__(self, workdir: Path, incoming: Path | None = None) -> None:
        self.workdir = workdir
        self.console = workdir / f"console-{time.monotonic_ns()}.log"
        self.qmp_path = workdir / f"qmp-{time.monotonic_ns()}.sock"
        image = kernel()
        if image is None:
            raise RuntimeError("no arm64 kernel: " + "; ".join(missing()))
        args = [
            QEMU, "-M", "virt,mte=on", "-cpu", os.environ.get("MTE_GUEST_CPU", "max"), "-m", RAM, "-nographic", "-monitor", "none",
            "-kernel", str(image), "-initrd", str(BUILD / "initramfs.cpio"),
            "-append", "console=ttyAMA0 rdinit=/init quiet",
            "-serial", f"file:{self.console}", "-qmp", f"unix:{self.qmp_path},server,nowait",
        ]  # fmt: skip
        if incoming is not None:
            args += ["-incoming", f"exec:cat {incoming}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.qmp = Qmp(self.qmp_path)

    def lines(self) -> list[str]:
        try:
            return self.console.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def passes(self) -> int:
        return sum(1 for line in self.lines() if line.startswith(PASS))

    def failures(self) -> list[str]:
        return [line for line in self.lines() if FAIL in line]

    def wait_for_passes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.passes() < count:
            if self.failures():
                tail = "\n".join(line for line in self.lines() if "mte-check" in line)
                raise AssertionError(
                    f"the guest failed its check: {self.failures()[0]}; console ends:\n{tail}"
                )
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.lines()[-15:])
                raise TimeoutError(
                    f"{self.passes()} of {count} passes after {timeout_s:.0f} s; console ends:\n{tail}"
                )
            time.sleep(0.2)

    def save(self, path: Path, timeout_s: float = 120.0) -> None:
        """Stop the guest and write its migration stream to `path`."""
        self.qmp.call("stop")
        self.qmp.call("migrate", uri=f"exec:cat > {path}")
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.qmp.call("query-migrate").get("status")
            if status == "completed":
                return
            if status == "failed" or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU's migration to {path} ended {status}")
            time.sleep(0.1)

    def loaded(self, timeout_s: float = 120.0) -> None:
        """Wait until an incoming stream is loaded (the guest paused, not yet resumed)."""
        deadline = time.monotonic() + timeout_s
        while self.qmp.call("query-status").get("status") == "inmigrate":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("QEMU did not load the stream: " + self.stderr())
            time.sleep(0.1)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.qmp.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="compile the check program and pack its initramfs")
    save = sub.add_parser(
        "save", help="boot the guest, wait for its checks to pass, stop it and save its stream"
    )
    save.add_argument("stream", type=Path)
    save.add_argument("--passes", type=int, default=2)
    resume = sub.add_parser("resume", help="load a stream in a new QEMU, resume it and watch its checks")
    resume.add_argument("stream", type=Path)
    resume.add_argument("--passes", type=int, default=2, help="further passes to wait for")
    args = parser.parse_args(argv)
    lacking = missing()
    if lacking:
        print("qemu_guest: missing " + "; ".join(lacking), file=sys.stderr)
        return 2
    if args.command == "build":
        print(f"built {build()}")
        return 0
    if not (BUILD / "initramfs.cpio").exists():
        build()
    with tempfile.TemporaryDirectory(prefix="mte-guest-") as tmp:
        if args.command == "save":
            guest = Guest(Path(tmp))
            try:
                guest.wait_for_passes(args.passes, timeout_s=300)
                guest.save(args.stream.resolve())
            finally:
                guest.close()
            print(f"saved the guest after {guest.passes()} passes to {args.stream}")
            return 0
        guest = Guest(Path(tmp), incoming=args.stream.resolve())
        try:
            guest.loaded()
            before = guest.passes()
            guest.qmp.call("cont")
            guest.wait_for_passes(before + args.passes, timeout_s=300)
            print("\n".join(line for line in guest.lines() if line.startswith("mte-check")))
        finally:
            guest.close()
        print(f"resumed: {args.passes} more passes, no failure")
        return 0


if __name__ == "__main__":
    sys.exit(main())
