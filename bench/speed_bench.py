"""Throughput, downtime and what must not regress, against a baseline commit measured in the
same run: the figures of issue 11 in one table.

Usage: python3 bench/speed_bench.py [--baseline REV] [--repeat 3] [--downtime-runs 20]
                                    [--sizes 1GiB,4GiB] [--channels 2,4] [--save]

- First, the machine: whether it is idle (load, busy processes, time stolen by its host; again
  at the end), and what committing fresh memory costs on it, memory that stayed free a few
  seconds and memory freed a moment ago (a VM with free page reporting hands free memory back
  to its host, and every fresh destination, QEMU's too, then pays host faults again).
- Throughput, in rounds: each round measures every contender once, in the same order, so
  that a machine whose speed drifts hits them all alike; every run is listed, in order. The
  contenders: raw ZeroMQ between two processes (plain, and placing 8 MiB messages into
  committed memory: the ceiling of a destination that receives over ZeroMQ), timed by the
  receiver from the first message to the last, and the floor of a verified transfer (the
  sender hashing each page of distinct memory, the receiver placing and checking each, in
  native code with no protocol: bench/raw_zmq.py --verified); QEMU's own migration of a paused virt,mte=on
  guest of each size, its destination with -mem-prealloc and fresh, where qemu-system-aarch64
  is installed; ours, `dest-node --preallocate` (committed before the source came; what that
  took is noted) and fresh; the baseline commit, fresh; ours over parallel channels. Then,
  per size, the issue's targets: QEMU's time over ours round by round, ours against raw
  ZeroMQ, and the fresh runs' spread.
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
directory.
--save writes the output to bench/results-DATE-speed.txt with the machine it ran on.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import machine  # noqa: E402
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


def verified_seconds(run: Run) -> float | None:
    """A run's time, or None (a failure in the table) unless it completed and verified."""
    return seconds(run) if ok(run) else None


@dataclass
class Row:
    """One line of Table 1: every run's seconds (None: it failed), in the order they ran."""

    what: str
    size: int
    runs: list[float | None] = field(default_factory=list)
    note: str = ""

    @property
    def good(self) -> list[float]:
        return [s for s in self.runs if s is not None]

    @property
    def median(self) -> float | None:
        return statistics.median(self.good) if self.good else None


class Table:
    """Runs gathered round by round: each round measures every row once, so that a machine
    whose speed drifts (a VM's host is busy, then not) hits every row alike."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def add(self, key: str, what: str, size: int, secs: float | None, note: str = "") -> None:
        row = self.rows.setdefault(key, Row(what, size))
        row.runs.append(secs)
        row.note = note or row.note

    def median(self, key: str) -> float | None:
        row = self.rows.get(key)
        return row.median if row else None

    def ratio(self, ours: str, theirs: str) -> list[float]:
        """Round by round: their seconds / ours (above 1: we were faster that round)."""
        a, b = self.rows.get(ours), self.rows.get(theirs)
        if a is None or b is None:
            return []
        return [t / o for o, t in zip(a.runs, b.runs, strict=False) if o and t]

    def print(self, raw_key: str, qemu_key: Callable[[int], str]) -> None:
        """`vs raw` and `vs QEMU`: ratios of medians (the targets below take QEMU's round by round)."""
        raw = self.median(raw_key)
        print(
            f"{'what':58} {'median':>7} {'GB/s':>6} {'vs raw':>7} {'vs QEMU':>8}  every run (s), in order; note"
        )
        for row in self.rows.values():
            med = row.median
            runs = ", ".join("failed" if s is None else f"{s:.2f}" for s in row.runs)
            if med is None:
                print(f"{row.what:58} {'failed':>7}  {runs}")
                continue
            rate = row.size / med
            qemu = self.median(qemu_key(row.size))
            vs_raw = f"{rate / (GIB / raw):7.2f}" if raw else f"{'-':>7}"
            vs_qemu = f"{rate / (row.size / qemu):7.2f}x" if qemu else f"{'-':>8}"
            print(
                f"{row.what:58} {med:6.2f}s {rate / 1e9:6.2f} {vs_raw} {vs_qemu}  {runs}{'; ' + row.note if row.note else ''}"
            )


def qemu_key(size: int, fresh: bool = False) -> str:
    return f"qemu-{'fresh' if fresh else 'prealloc'}-{size}"


def throughput(tmp: Path, tree: Path, sizes: list[int], repeat: int, channels: list[int]) -> None:
    """Table 1: every contender once per round, `repeat` rounds."""
    table = Table()
    blobs = (
        {size: qemu_compare.random_ram(size, tmp / f"qemu-{size}.bin") for size in sizes}
        if qemu_compare.available()
        else {}
    )
    for _ in range(repeat):
        # ceilings, timed by the receiver from the first message to the last
        table.add("raw", "raw ZeroMQ PUSH/PULL, 1 MiB messages", GIB, raw_zmq_seconds(GIB, 1 << 20, False))
        table.add("committed", "raw ZeroMQ, 8 MiB messages placed into committed memory", GIB,
                  raw_zmq_seconds(GIB, 8 << 20, True, True))  # fmt: skip
        # the floor of any verified migration over ZeroMQ: both sides' copies and hashes, native
        table.add("verified", "verified floor: raw ZeroMQ, 8 MiB, hashed, placed and checked", GIB,
                  raw_zmq_seconds(GIB, 8 << 20, True, True, verified=True))  # fmt: skip
        for size in sizes:
            label = format_size(size)
            if size in blobs:
                table.add(qemu_key(size), f"QEMU 7.2, {label}, destination -mem-prealloc", size,
                          qemu_compare.seconds_once(size, blobs[size], tmp, preallocate=True))  # fmt: skip
            pre = migrate(tmp, idle_guest(size), ["--preallocate", str(size)])
            table.add(f"pre-{size}", f"this project, {label}, dest-node --preallocate", size, verified_seconds(pre),
                      f"committing took {pre.dest.get('preallocation', {}).get('seconds', 0):.2f} s before")  # fmt: skip
            if size in blobs:
                table.add(qemu_key(size, fresh=True), f"QEMU 7.2, {label}, fresh destination", size,
                          qemu_compare.seconds_once(size, blobs[size], tmp))  # fmt: skip
            fresh = migrate(tmp, idle_guest(size))
            table.add(
                f"fresh-{size}",
                f"this project, {label}, fresh destination",
                size,
                verified_seconds(fresh),
            )
            before = migrate(tmp, idle_guest(size), tree=tree)
            table.add(f"prev-{size}", f"previous ({BASELINE}), {label}, fresh destination", size,
                      verified_seconds(before))  # fmt: skip
            for n in channels:
                run = migrate(tmp, [*idle_guest(size), "--channels", str(n)], ["--preallocate", str(size)])
                spread = run.dest.get("link", {}).get("channel_batches", "-") if ok(run) else "-"
                table.add(f"ch{n}-{size}", f"this project, {label}, --preallocate, {n} channels", size,
                          verified_seconds(run), f"batches per channel {spread}")  # fmt: skip
            if size == GIB:
                share = pre.source["tags"]["wire_bytes"] / pre.source["ram"]["wire_bytes"]
                table.rows[f"pre-{size}"].note += f"; tag bytes / RAM bytes on the wire {share:.2%}"
    print("Table 1: idle guests of random, fully tagged memory, loopback, one round after another")
    table.print("raw", qemu_key)
    print()
    for size in sizes:
        label = format_size(size)
        pre, fresh = table.rows[f"pre-{size}"], table.rows[f"fresh-{size}"]
        vs_qemu = table.ratio(f"pre-{size}", qemu_key(size))
        if vs_qemu:
            print(f"{label} preallocated, QEMU's time / ours, round by round (the target's measure): "
                  f"{', '.join(f'{r:.2f}' for r in vs_qemu)}; median {statistics.median(vs_qemu):.2f} (target 0.8)")  # fmt: skip
        raw = table.median("raw")
        floor = table.median("verified")
        if raw and floor and pre.median:
            print(f"{label} preallocated against raw ZeroMQ: {size / pre.median / (GIB / raw):.2f} (target 0.6); "
                  f"against the verified floor: {size / pre.median / (GIB / floor):.2f}")  # fmt: skip
        qf = table.median(qemu_key(size, fresh=True))
        if fresh.median:
            print(f"{label} fresh: median {fresh.median:.2f} s, QEMU's fresh median "
                  f"{f'{qf:.2f} s' if qf else '-'}; slowest run / median {max(fresh.good) / fresh.median:.2f} "
                  f"(target 1.25); against ours preallocated {fresh.median / pre.median if pre.median else 0:.2f} (target 1.2)")  # fmt: skip


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
        print(f"# python3 bench/speed_bench.py  ({machine.describe()})")
        print(f"# before: {machine.idleness().describe()}")
        cold, warm = machine.first_touch()
        print(
            f"# committing fresh memory on huge pages: {cold:.2f} s per GiB where it stayed free a few seconds, "
            f"{warm:.2f} s per GiB just freed (a VM whose host took it back pays host faults again)"
        )
        tree = baseline_tree(args.baseline, tmp)
        try:
            channels = [int(n) for n in args.channels.split(",") if n]
            throughput(tmp, tree, sizes, args.repeat, channels)
            encode_threads(channels, args.repeat)
            downtime(tmp, tree, args.downtime_runs)
            regressions(tmp, tree, args.repeat)
            print(f"# after: {machine.idleness().describe()}")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    if args.save:
        path = ROOT / "bench" / f"results-{time.strftime('%Y-%m-%d')}-speed.txt"
        path.write_text(out.getvalue())
        print(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
