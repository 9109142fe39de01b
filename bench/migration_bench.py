"""Migration benchmark: real daemons on loopback, against raw ZeroMQ measured in the same run.

Usage: python3 bench/migration_bench.py [--sizes 1GiB,4GiB] [--repeat 3] [--quick] [--dirty-model kvm]

Table 1: idle guests filled with random data (every granule tagged) migrated by source-node to
dest-node; throughput is guest RAM over the migration's total time, beside raw ZeroMQ PUSH/PULL
between two processes (1 MiB zero-copy messages), plain and with the receiver placing every
message into fresh memory as a destination must. Figures are medians of --repeat runs.
Table 2: measured downtime against the limit for a 1 GiB guest at several dirty rates.
Where qemu-system-aarch64 is installed, QEMU's own migration of a paused 1 GiB virt,mte=on
guest with random RAM is measured too, side by side (bench/qemu_compare.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import qemu_compare  # noqa: E402
import runs  # noqa: E402
from raw_zmq import measure as raw_zmq_seconds  # noqa: E402

from common.units import parse_size  # noqa: E402

DIRTY_MODEL = ["--dirty-model", "kvm"]  # set from --dirty-model in main


def migrate(tmp: Path, guest: list[str], knobs: list[str], dest_stop: str) -> dict[str, Any]:
    """One migration through the real daemons; the source's report."""
    return runs.migrate(tmp, [*guest, *knobs, *DIRTY_MODEL], dest_stop=dest_stop).source


def throughput_table(tmp: Path, sizes: list[int], repeat: int) -> float | None:
    """Prints table 1; returns our median seconds for 1 GiB, if measured."""
    ours_1gib = None
    gib = 1 << 30
    raw = statistics.median(gib / raw_zmq_seconds(gib, 1 << 20, False) for _ in range(repeat))
    placed = statistics.median(gib / raw_zmq_seconds(gib, 1 << 20, True) for _ in range(repeat))
    print("Table 1: idle random guests (fully tagged), loopback")
    print(f"{'what':46} {'median':>10} {'GB/s':>7} {'vs raw':>7} {'vs raw+place':>12}")
    print(
        f"{'raw ZeroMQ PUSH/PULL, 1 MiB messages':46} {'':>10} {raw / 1e9:7.2f} {1.0:7.2f} {raw / placed:12.2f}"
    )
    print(
        f"{'raw ZeroMQ, receiver placing into fresh memory':46} {'':>10} {placed / 1e9:7.2f} {placed / raw:7.2f} {1.0:12.2f}"
    )
    for size in sizes:
        guest = ["--ram", str(size), "--fill", "random", "--working-set", "1MiB", "--stop-at-step", "0"]
        reports = [migrate(tmp, guest, [], "0") for _ in range(repeat)]
        ok = [r for r in reports if r["status"] == "completed" and r["verification"]["ok"]]
        if not ok:
            print(f"migration of {size >> 20} MiB failed: {reports[0]['error']}")
            continue
        seconds = statistics.median(r["total_time_ms"] / 1000 for r in ok)
        if size == 1 << 30:
            ours_1gib = seconds
        rate = size / seconds
        label = f"migration, {size >> 30} GiB ({len(ok)}/{repeat} verified)"
        print(f"{label:46} {seconds:9.2f}s {rate / 1e9:7.2f} {rate / raw:7.2f} {rate / placed:12.2f}")
        r = ok[0]
        tag_share = r["tags"]["wire_bytes"] / r["ram"]["wire_bytes"]
        print(
            f"{'  tags / RAM bytes on the wire':46} {tag_share:10.2%}   downtime {statistics.median(x['downtime_ms'] for x in ok):.1f} ms"
        )
    few = migrate(
        tmp,
        [
            "--ram",
            "1GiB",
            "--fill",
            "zero",
            "--working-set",
            "4MiB",
            "--seed",
            "2",
            "--stop-at-step",
            "2000",
            "--steps-per-second",
            "0",
        ],
        [],
        "2000",
    )
    if few["status"] == "completed":
        print(
            f"{'1 GiB, few tagged pages (zero fill, 4 MiB heap)':46} tags {few['tags']['wire_bytes']} B beside "
            f"{few['ram']['wire_bytes']} B of RAM ({few['tags']['wire_bytes'] / max(1, few['ram']['wire_bytes']):.2%}), "
            f"{few['tags']['untagged_pages']} untagged pages free"
        )
    return ours_1gib


def downtime_table(tmp: Path, quick: bool) -> None:
    print()
    print("Table 2: downtime against the limit, 1 GiB guest, 64 MiB working set, mixed fill")
    print(
        f"{'target pages/s':>14} {'limit ms':>9} {'status':>10} {'downtime ms':>12} {'expected ms':>12} {'rounds':>7} {'throttle':>9} {'dirtied/s':>10}"
    )
    rates = [(0, 1), (4000, 8), (20000, 16), (40000, 32)]
    limits = [50, 300] if not quick else [50]
    for target, per_step in rates:
        for limit in limits:
            steps = "0" if target == 0 else str(target // per_step)
            guest = [
                "--ram",
                "1GiB",
                "--working-set",
                "64MiB",
                "--dirty-pages-per-step",
                str(per_step),
                "--steps-per-second",
                steps,
                "--seed",
                "3",
            ]
            if target == 0:
                guest += ["--stop-at-step", "0"]
            r = migrate(tmp, guest, ["--downtime-limit", str(limit), "--convergence-timeout", "30"], "0")
            downtime = f"{r['downtime_ms']:.1f}" if r["downtime_ms"] is not None else "-"
            expected = f"{r['expected_downtime_ms']:.1f}" if r["expected_downtime_ms"] is not None else "-"
            print(
                f"{target:>14} {limit:>9} {r['status']:>10} {downtime:>12} {expected:>12} {r['rounds']:>7} {r['throttle']:>9.0%} {r['dirty_pages_rate']:>10.0f}"
            )


def qemu_row(repeat: int, ours_1gib: float | None) -> None:
    print()
    result = qemu_compare.measure(1 << 30, repeat)
    if result is None:
        print("QEMU: qemu-system-aarch64 is not installed (Debian: qemu-system-arm); no side-by-side run.")
        return
    rate = (1 << 30) / result["seconds"]
    line = f"QEMU 7.x, paused 1 GiB virt,mte=on, random RAM: median {result['seconds']:.2f} s ({rate / 1e9:.2f} GB/s), range {result['min']:.2f}..{result['max']:.2f} s"
    if ours_1gib:
        line += f"; ours / QEMU time: {ours_1gib / result['seconds']:.2f}x"
    print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1GiB,4GiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one limit in table 2")
    parser.add_argument("--skip-downtime", action="store_true")
    parser.add_argument(
        "--dirty-model", choices=["kvm", "tcg", "split"], default="kvm", help="the source's (default kvm)"
    )
    args = parser.parse_args()
    DIRTY_MODEL[1] = args.dirty_model
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        ours_1gib = throughput_table(Path(tmp), sizes, args.repeat)
        if not args.skip_downtime:
            downtime_table(Path(tmp), args.quick)
    qemu_row(args.repeat, ours_1gib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
