"""What keys cost: the same idle random guest migrated through the real daemons on loopback,
in the clear and with CURVE (every byte encrypted and authenticated by libzmq), alternating.

Usage: python3 bench/keys_bench.py [--ram 1GiB] [--repeat 3]

Prints the median total time and throughput of each, and CURVE's ratio to the clear run
measured in the same session. Not part of CI.
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

import runs  # noqa: E402

from common.units import format_rate, parse_size  # noqa: E402
from tests.e2e import Keys, make_keys  # noqa: E402


def migrate(tmp: Path, ram: str, keys: Keys | None) -> dict[str, Any]:
    guest = ["--ram", ram, "--fill", "random", "--working-set", "1MiB", "--stop-at-step", "0"]
    return runs.migrate(
        tmp, [*guest, *(keys.source_args() if keys else [])], keys.dest_args() if keys else []
    ).source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", default="1GiB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.ram)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        keys = make_keys(tmp / "keys")
        runs: dict[str, list[float]] = {"clear": [], "CURVE": []}
        for _ in range(args.repeat):  # alternating, so that drift in the machine hits both
            for label, key_dir in (("clear", None), ("CURVE", keys)):
                report = migrate(tmp, args.ram, key_dir)
                if report["status"] != "completed":
                    print(f"{label}: {report['status']}: {report['error']}", file=sys.stderr)
                    return 1
                runs[label].append(report["total_time_ms"] / 1000)
    clear = statistics.median(runs["clear"])
    print(f"| {args.ram} idle random guest, loopback | runs (s) | median | throughput | vs clear |")
    print("| --- | --- | --- | --- | --- |")
    for label, times in runs.items():
        median = statistics.median(times)
        shown = ", ".join(f"{t:.2f}" for t in times)
        print(
            f"| {label} | {shown} | {median:.2f} s | {format_rate(size / median)} | {median / clear:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
