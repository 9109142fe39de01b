"""Throughput, downtime and what must not regress, against a baseline commit measured in the
same run: the figures of issue 11 in one table.

Usage: python3 bench/speed_bench.py [--baseline REV] [--repeat 3] [--downtime-runs 20]
                                    [--sizes 1GiB,4GiB] [--channels 2,4] [--save]

- Throughput: idle guests of random, fully tagged memory, beside raw ZeroMQ between two
  processes (plain, and with the receiver placing into fresh memory and into committed memory:
  the ceiling of any destination that receives over ZeroMQ) and QEMU's own migration of
  a paused virt,mte=on guest (one channel, and multifd on two) where qemu-system-aarch64 is
  installed. Ours twice: into fresh memory, and into memory `dest-node --preallocate` committed
  before the source came (QEMU's -mem-prealloc); what committing took is its own column. Then
  preallocated again over parallel channels (`--channels N`, QEMU's multifd).
- Encoding alone: what the source does to each batch (copy, hash, zero and lz4 sampling,
  protobuf), for 1 GiB, in one thread and in as many as each channel count: how far the part
  that parallel channels spread scales on this machine when nothing else runs.
- Downtime: a 1 GiB guest with a 128 MiB working set dirtying about 40k pages/s (half of its
  steps retag only), 50 ms limit: the median of the first 5 runs and all of them, the worst,
  and how many went over.
- Regressions: a 16 GiB guest with a 64 MiB working set (time, and the destination's peak RSS
  against the guest RAM it touched plus 100 MiB), twice: zero-filled and idle, and busy for
  2000 steps of 64 page writes (the migration is quick: most of them run at the destination,
  after the handover, which the touched RAM counts); and the share of tag bytes on the wire.
The baseline (default: the commit before this work) runs from a git worktree in a temporary
directory. First the machine's free memory is touched once: a VM that backs its memory lazily
(this one does) otherwise charges the first use of each page to whichever run comes first.
--save writes the output to bench/results-DATE-speed.txt with the machine it ran on.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import qemu_compare  # noqa: E402
from raw_zmq import measure as raw_zmq_seconds  # noqa: E402
from runs import Run, migrate, ok  # noqa: E402

from common.units import format_size, parse_size  # noqa: E402

BASELINE = "de30f44"  # main before issue 11
GIB = 1 << 30
DOWNTIME_GUEST = [
    "--ram", "1GiB", "--working-set", "128MiB", "--dirty-pages-per-step", "32", "--tag-only-share", "0.5",
    "--steps-per-second", "1250", "--seed", "3", "--downtime-limit", "50", "--convergence-timeout", "30",
]  # fmt: skip
LARGE_GUEST = ["--ram", "16GiB", "--fill", "zero", "--working-set", "64MiB"]
# idle; or 2000 steps of 64 page writes or retags each, as fast as it can, on either side
LARGE_IDLE, LARGE_STEPS = "0", "2000"


def idle_guest(size: int) -> list[str]:
    return ["--ram", str(size), "--fill", "random", "--working-set", "1MiB", "--stop-at-step", "0"]


def _meminfo(field: str) -> int:
    lines = Path("/proc/meminfo").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))


def warm_memory() -> tuple[int, float]:
    """Touch most free memory once (then free it); returns bytes and seconds."""
    avail = _meminfo("MemAvailable:")
    size = max(0, min(avail - (3 << 30), 16 << 30))
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    began = time.monotonic()
    done = 0
    for _ in range(size // GIB):
        area = mmap.mmap(-1, GIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(area))
        if libc.madvise(ctypes.c_void_p(base), GIB, 23) != 0:  # MADV_POPULATE_WRITE
            area[::4096] = b"\1" * (GIB // 4096)
        done += GIB
        del base
        area.close()
    return done, time.monotonic() - began


def baseline_tree(rev: str, parent: Path) -> Path:
    tree = parent / "baseline"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
        check=True, capture_output=True,
    )  # fmt: skip
    return tree


def median_of(runs: list[Run], key: Callable[[Run], float]) -> float | None:
    good = [key(r) for r in runs if ok(r)]
    return statistics.median(good) if good else None


def seconds(run: Run) -> float:
    return float(run.source["total_time_ms"]) / 1000


def throughput(tmp: Path, tree: Path, sizes: list[int], repeat: int, channels: list[int]) -> None:
    raw = statistics.median(GIB / raw_zmq_seconds(GIB, 1 << 20, False) for _ in range(repeat))
    placed = statistics.median(GIB / raw_zmq_seconds(GIB, 1 << 20, True) for _ in range(repeat))
    committed = statistics.median(GIB / raw_zmq_seconds(GIB, 1 << 20, True, True) for _ in range(repeat))
    qemu = qemu_compare.measure(GIB, repeat)
    qemu2 = qemu_compare.measure(GIB, repeat, channels=2) if qemu else None
    qemu_rate = GIB / qemu["seconds"] if qemu else None
    print("Table 1: idle guests of random, fully tagged memory, loopback (medians)")
    print(f"{'what':56} {'time':>8} {'GB/s':>6} {'vs raw':>7} {'vs QEMU':>8}  note")

    def row(what: str, secs: float | None, size: int, note: str = "") -> None:
        if secs is None:
            print(f"{what:56} {'failed':>8}")
            return
        rate = size / secs
        vs_qemu = f"{rate / qemu_rate:7.2f}x" if qemu_rate else f"{'-':>8}"
        print(f"{what:56} {secs:7.2f}s {rate / 1e9:6.2f} {rate / raw:7.2f} {vs_qemu}  {note}")

    row("raw ZeroMQ PUSH/PULL, 1 MiB messages", GIB / raw, GIB)
    row("raw ZeroMQ, receiver placing into fresh memory", GIB / placed, GIB)
    # the ceiling of any destination that receives over ZeroMQ and places what it got
    row("raw ZeroMQ, receiver placing into committed memory", GIB / committed, GIB)
    if qemu and qemu2:
        row("QEMU 7.2, paused 1 GiB virt,mte=on, 1 channel", qemu["seconds"], GIB,
            f"range {qemu['min']:.2f}..{qemu['max']:.2f} s")  # fmt: skip
        row("QEMU 7.2, multifd, 2 channels", qemu2["seconds"], GIB,
            f"range {qemu2['min']:.2f}..{qemu2['max']:.2f} s")  # fmt: skip
    else:
        print("QEMU: qemu-system-aarch64 is not installed (Debian: qemu-system-arm); no side-by-side rows")
    for size in sizes:
        label = format_size(size)
        before = [migrate(tmp, idle_guest(size), tree=tree) for _ in range(repeat)]
        fresh, prealloc = [], []
        parallel: dict[int, list[Run]] = {n: [] for n in channels}
        for _ in range(repeat):  # alternating, so that drift in the machine hits all of them
            fresh.append(migrate(tmp, idle_guest(size)))
            prealloc.append(migrate(tmp, idle_guest(size), ["--preallocate", str(size)]))
            for n, runs in parallel.items():
                runs.append(
                    migrate(tmp, [*idle_guest(size), "--channels", str(n)], ["--preallocate", str(size)])
                )
        commit = statistics.median(r.dest["preallocation"]["seconds"] for r in prealloc if ok(r))
        row(f"previous ({BASELINE}), {label}", median_of(before, seconds), size,
            f"{sum(map(ok, before))}/{repeat} verified")  # fmt: skip
        row(f"now, {label}, into fresh memory", median_of(fresh, seconds), size,
            f"{sum(map(ok, fresh))}/{repeat} verified")  # fmt: skip
        row(f"now, {label}, into preallocated memory", median_of(prealloc, seconds), size,
            f"{sum(map(ok, prealloc))}/{repeat} verified; committing it took {commit:.2f} s before")  # fmt: skip
        for n, runs in parallel.items():
            spread = [r.dest["link"]["channel_batches"] for r in runs if ok(r)]
            row(f"now, {label}, preallocated, {n} channels", median_of(runs, seconds), size,
                f"{sum(map(ok, runs))}/{repeat} verified; batches per channel {spread[0] if spread else '-'}")  # fmt: skip
        if size == GIB:
            share = prealloc[0].source["tags"]["wire_bytes"] / prealloc[0].source["ram"]["wire_bytes"]
            old = before[0].source["tags"]["wire_bytes"] / before[0].source["ram"]["wire_bytes"]
            print(f"{'  tag bytes / RAM bytes on the wire, 1 GiB':56} previous {old:.2%}, now {share:.2%}")


def encode_threads(channels: list[int], repeat: int) -> None:
    from common.guest.workload import Fill, WorkloadConfig, boot
    from common.transfer import PagePass, encode_batch

    mem = boot(GIB, WorkloadConfig(fill=Fill.RANDOM, working_set_bytes=1 << 20)).memory
    every = np.arange(mem.page_count, dtype=np.int64)

    def encode_all(pool: ThreadPoolExecutor, n: int) -> float:
        whole = PagePass(every, every)
        began = time.perf_counter()
        while chunks := whole.next_chunks(n):
            for _ in pool.map(lambda c: encode_batch(mem, *c, use_lz4=True, round_no=1), chunks):
                pass
        return time.perf_counter() - began

    print()
    print("Table 1b: the source's encoding alone (pages and tag sections of 1 GiB random memory)")
    single = None
    for n in [1, *channels]:
        with ThreadPoolExecutor(n) as pool:
            secs = statistics.median(encode_all(pool, n) for _ in range(repeat))
        single = single or secs
        print(
            f"{n} thread{'s' if n > 1 else ' '} {secs:6.3f} s  {GIB / secs / 1e9:5.2f} GB/s  {single / secs:5.2f}x"
        )


def downtime(tmp: Path, tree: Path, runs: int) -> None:
    print()
    print("Table 2: downtime, 1 GiB guest, 128 MiB working set, ~40k pages/s (half tag-only), 50 ms limit")
    print(f"{'what':30} {'runs':>5} {'median of 5':>12} {'median':>8} {'worst':>8} {'over 50 ms':>11} "
          f"{'dirtied/s':>10}  downtimes (ms)")  # fmt: skip
    for label, where, n in ((f"previous ({BASELINE})", tree, 5), ("now", None, runs)):
        done = [migrate(tmp, DOWNTIME_GUEST, tree=where) for _ in range(n)]
        ms = [float(r.source["downtime_ms"]) for r in done if ok(r)]
        if not ms:
            print(f"{label:30} {n:>5} all failed: {done[0].source.get('error')}")
            continue
        rate = statistics.median(float(r.source["dirty_pages_rate"]) for r in done if ok(r))
        print(
            f"{label:30} {len(ms):>5} {statistics.median(ms[:5]):11.1f}  {statistics.median(ms):7.1f}  "
            f"{max(ms):7.1f}  {sum(m > 50 for m in ms):>10}  {rate:9.0f}  {', '.join(f'{m:.0f}' for m in ms)}"
        )


def regressions(tmp: Path, tree: Path, repeat: int) -> None:
    print()
    print("Table 3: what must not regress")
    for steps, what in ((LARGE_IDLE, "idle, zero fill"), (LARGE_STEPS, "busy, 2000 steps")):
        for label, where in ((f"previous ({BASELINE})", tree), ("now", None)):
            guest = [*LARGE_GUEST, "--dirty-pages-per-step", "64", "--stop-at-step", steps]
            done = [migrate(tmp, guest, tree=where, dest_stop=steps) for _ in range(repeat)]
            good = [r for r in done if ok(r)]
            title = f"16 GiB guest, 64 MiB working set, {what}, {label}"
            if not good:
                print(f"{title}: failed: {done[0].source.get('error')}")
                continue
            r = max(good, key=lambda x: x.dest_peak_rss)
            # what the guest wrote at the destination, migrated or written there after the
            # handover (the baseline reports no populated_bytes: what arrived with content)
            touched = r.dest["guest"].get("populated_bytes")
            if touched is None:
                touched = (r.dest["ram"]["pages"] - r.dest["ram"]["zero_pages"]) * 4096
            touched += touched // 32  # and its tags
            peak = r.dest_peak_rss
            print(
                f"{title}: {median_of(done, seconds):.2f} s; dest peak RSS {format_size(peak)} for "
                f"{format_size(touched)} of guest RAM touched "
                f"({'within' if peak <= touched + (100 << 20) else 'OVER'} touched + 100 MiB)"
            )


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    mem = _meminfo("MemTotal:")
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores ({cpu}), "
        f"{mem >> 30} GiB, Linux {platform.release()}; commit {head.stdout.strip()}; "
        f"free page reporting {'ON' if free_page_reporting() else 'off'}"
    )


_BALLOON_F_REPORTING = 5  # VIRTIO_BALLOON_F_REPORTING


def free_page_reporting() -> bool:
    """Whether this VM hands freed memory back to its host (a virtio balloon with REPORTING):
    then memory a process frees costs a host fault again at its next first touch, so a fresh
    destination's first populate can take 2 s per GiB instead of 0.1 (measured 2026-12-06),
    and fresh-destination figures of any VMM, QEMU's too, come out bimodal."""
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


def main() -> int:
    global BASELINE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline", default=BASELINE, help=f"the commit to compare with (default {BASELINE})"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--downtime-runs", type=int, default=20)
    parser.add_argument("--sizes", default="1GiB,4GiB")
    parser.add_argument("--channels", default="2,4", help="parallel channel counts to measure (default 2,4)")
    parser.add_argument("--save", action="store_true", help="also write bench/results-DATE-speed.txt")
    args = parser.parse_args()
    BASELINE = args.baseline
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    out = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            sys.__stdout__.write(text)
            sys.__stdout__.flush()
            return out.write(text)

    with redirect_stdout(Tee()), tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        print(f"# python3 bench/speed_bench.py  ({machine()})")
        warmed, took = warm_memory()
        print(f"# memory warmed first: {format_size(warmed)} touched once in {took:.1f} s")
        tree = baseline_tree(args.baseline, tmp)
        try:
            channels = [int(n) for n in args.channels.split(",") if n]
            throughput(tmp, tree, sizes, args.repeat, channels)
            encode_threads(channels, args.repeat)
            downtime(tmp, tree, args.downtime_runs)
            regressions(tmp, tree, args.repeat)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    if args.save:
        path = ROOT / "bench" / f"results-{time.strftime('%Y-%m-%d')}-speed.txt"
        path.write_text(out.getvalue())
        print(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
