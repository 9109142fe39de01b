"""What the machine under a benchmark is doing: whether it is idle (load, busy processes, time
stolen by the host), whether its VM hands freed memory back to the host, and what first
touching memory costs here. Benchmarks print this before their figures, so that a reader can
tell a slow run from a busy machine."""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.guest.prefault import libc_madvise, populate  # noqa: E402

GIB = 1 << 30
_BALLOON_F_REPORTING = 5  # VIRTIO_BALLOON_F_REPORTING
_HUGE = 2 << 20
# A process using more than this share of a core while the machine should be idle is named.
BUSY_SHARE = 0.05


def meminfo(field: str) -> int:
    lines = Path("/proc/meminfo").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))


def _cpu_ticks() -> dict[int, tuple[str, int]]:
    """Every process's name and CPU ticks so far."""
    ticks: dict[int, tuple[str, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        ticks[int(stat.parent.name)] = (name, int(fields[11]) + int(fields[12]))
    return ticks


def _steal_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[7] if len(values) > 7 else 0, sum(values)


@dataclass
class Idleness:
    load: float  # 1-minute load average
    busy: list[tuple[str, float]]  # processes and the share of a core each used
    steal: float  # share of CPU time the host took from this VM

    @property
    def idle(self) -> bool:
        return not self.busy and self.steal < 0.02

    def describe(self) -> str:
        others = ", ".join(f"{name} {share:.0%}" for name, share in self.busy) or "none"
        verdict = "idle" if self.idle else "NOT IDLE: figures below are not comparable"
        return (
            f"{verdict}: load average {self.load:.2f} (1 min, {os.cpu_count()} cores), "
            f"busy processes over {BUSY_SHARE:.0%} of a core: {others}; stolen by the host {self.steal:.1%}"
        )


def idleness(sample_s: float = 2.0) -> Idleness:
    """Sampled over `sample_s`: who used the CPUs (this process excluded)."""
    mine = {os.getpid()}
    before, steal0 = _cpu_ticks(), _steal_ticks()
    time.sleep(sample_s)
    after, steal1 = _cpu_ticks(), _steal_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (name, ticks) in after.items():
        share = (ticks - before.get(pid, (name, ticks))[1]) / hz / sample_s
        if pid not in mine and share > BUSY_SHARE:
            busy.append((name, share))
    total = max(1, steal1[1] - steal0[1])
    return Idleness(os.getloadavg()[0], sorted(busy, key=lambda b: -b[1]), (steal1[0] - steal0[0]) / total)


def free_page_reporting() -> bool:
    """Whether this VM hands freed memory back to its host (a virtio balloon with REPORTING):
    then memory that stayed free a moment costs a host fault again at its next first touch."""
    for device in Path("/sys/bus/virtio/devices").glob("*"):
        try:
            if (device / "device").read_text().strip() != "0x0005":  # the balloon
                continue
            features = (device / "features").read_text().strip()
        except OSError:
            continue
        if len(features) > _BALLOON_F_REPORTING and features[_BALLOON_F_REPORTING] == "1":
            return True
    return False


def populate_seconds(size: int) -> float:
    """Seconds to commit `size` bytes of fresh memory on huge pages, as a destination does
    (common/guest/prefault.py's own calls)."""
    madvise = libc_madvise()
    area = mmap.mmap(-1, size + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = ctypes.addressof(ctypes.c_char.from_buffer(area))
    base = (start + _HUGE - 1) & ~(_HUGE - 1)
    began = time.perf_counter()
    if madvise is None or populate(madvise, base, size, True, lambda: False) < size:
        area[:: mmap.PAGESIZE] = b"\1" * (len(area) // mmap.PAGESIZE)  # an older kernel: touch
    took = time.perf_counter() - began
    del start
    area.close()
    return took


def first_touch(size: int = GIB // 4, settle_s: float = 4.0) -> tuple[float, float]:
    """Seconds per GiB to commit memory that stayed free `settle_s` (long enough for a VM with
    free page reporting to hand it to its host), then memory freed a moment ago."""
    time.sleep(settle_s)
    cold = populate_seconds(size)
    warm = populate_seconds(size)
    return cold * GIB / size, warm * GIB / size


def describe() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores ({cpu}), "
        f"{meminfo('MemTotal:') >> 30} GiB, Linux {platform.release()}; commit {head.stdout.strip()}; "
        f"free page reporting {'ON' if free_page_reporting() else 'off'}"
    )
