"""What keys cost: the same idle random guest migrated through the real daemons on loopback,
in the clear and with CURVE (every byte encrypted and authenticated by libzmq), alternating.

Usage: python3 bench/keys_bench.py [--ram 1GiB] [--repeat 3]

Prints the median total time and throughput of each, and CURVE's ratio to the clear run
measured in the same session. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.units import format_rate, parse_size  # noqa: E402
from source_node.demo import free_ports  # noqa: E402
from tests.e2e import Keys, make_keys  # noqa: E402

SOURCE = [sys.executable, "-m", "source_node.cli"]
DEST = [sys.executable, "-m", "dest_node.cli"]


def migrate(tmp: Path, ram: str, keys: Keys | None) -> dict[str, Any]:
    (port,) = free_ports(1)
    uri = f"tcp://127.0.0.1:{port}"
    dest_keys = keys.dest_args() if keys else []
    source_keys = keys.source_args() if keys else []
    dest = subprocess.Popen(
        [*DEST, "--listen", uri, "--once", "--stop-at-step", "0", "--log-level", "error", *dest_keys]
    )
    time.sleep(0.3)
    report = tmp / f"source-{port}.json"
    try:
        subprocess.run(
            [*SOURCE, "--ram", ram, "--fill", "random", "--working-set", "1MiB", "--stop-at-step", "0",
             "--migrate-to", uri, "--report", str(report), "--log-level", "error", *source_keys],
            check=False, capture_output=True, timeout=600,
        )  # fmt: skip
    finally:
        try:
            dest.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dest.kill()
    result: dict[str, Any] = json.loads(report.read_text())
    return result


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
