"""source-node demo: a whole migration on loopback, for a first look.

Starts a dest-node on a free loopback port, boots a busy guest here, migrates it with live
progress, shows the guest still running (and stepping) on the destination, then stops the
destination and prints both reports' headline figures.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.control import request


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: every probe stays bound until all are chosen, or the
    kernel may hand the same port out twice."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_for_control(address: str, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        reply = request(address, "status", timeout_s=1.0)
        if reply.get("ok") or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="source-node demo", description=__doc__)
    parser.add_argument("--ram", default="256MiB", help="guest RAM (default 256MiB)")
    parser.add_argument(
        "--working-set", default="32MiB", help="memory the busy workload touches (default 32MiB)"
    )
    parser.add_argument("--dirty-pages-per-step", default="32")
    parser.add_argument("--downtime-limit", default="300", metavar="MS")
    parser.add_argument("--seed", default="7")
    args = parser.parse_args(argv)

    from source_node.cli import main as source_main

    workdir = Path(tempfile.mkdtemp(prefix="mte-demo-"))
    port, control_port = free_ports(2)
    listen = f"tcp://127.0.0.1:{port}"
    control = f"tcp://127.0.0.1:{control_port}"
    dest_report = workdir / "dest.json"
    source_report = workdir / "source.json"
    print(f"demo: destination listening on {listen}; reports in {workdir}", flush=True)
    dest = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dest_node.cli",
            "--listen",
            listen,
            "--once",
            "--control",
            control,
            "--report",
            str(dest_report),
            "--log-level",
            "warning",
        ],
    )
    try:
        if not wait_for_control(control).get("ok"):
            print("demo: the destination did not come up", file=sys.stderr)
            return 1
        print(f"demo: migrating a busy {args.ram} guest (seed {args.seed}) to it ...", flush=True)
        code = source_main(
            [
                "--ram", args.ram, "--seed", args.seed, "--working-set", args.working_set,
                "--dirty-pages-per-step", args.dirty_pages_per_step, "--downtime-limit", args.downtime_limit,
                "--migrate-to", listen, "--report", str(source_report), "--log-level", "warning",
            ]
        )  # fmt: skip
        if code == 0:
            first = request(control, "status")
            time.sleep(1.0)
            later = request(control, "status")
            if first.get("ok") and later.get("ok"):
                a, b = first["result"]["guest"]["step"], later["result"]["guest"]["step"]
                print(
                    f"demo: the guest runs on the destination: step {a} -> {b} one second later", flush=True
                )
    finally:
        dest.terminate()
        try:
            dest.wait(timeout=15)
        except subprocess.TimeoutExpired:
            dest.kill()
    if source_report.exists():
        report = json.loads(source_report.read_text())
        print("demo: source report:")
        headline = {
            k: report[k]
            for k in (
                "status",
                "error",
                "downtime_ms",
                "expected_downtime_ms",
                "total_time_ms",
                "rounds",
                "throughput_mbps",
            )
        }
        headline["verification_ok"] = report["verification"]["ok"]
        headline["tags_bytes"] = report["tags"]["transferred_bytes"]
        headline["ram_bytes"] = report["ram"]["transferred_bytes"]
        print(json.dumps(headline, indent=2))
    if dest_report.exists():
        guest = json.loads(dest_report.read_text()).get("guest")
        print(f"demo: destination guest when stopped: {json.dumps(guest)}")
    return code
