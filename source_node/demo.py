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

from common.cli_types import non_negative, size
from common.control import request
from common.guest.dirtylog import DirtyModel
from common.human import describe
from common.units import format_size


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
    parser = argparse.ArgumentParser(
        prog="source-node demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--ram", type=size, default="256MiB", metavar="SIZE", help="guest RAM (default 256MiB)"
    )
    parser.add_argument(
        "--working-set",
        type=size,
        default="32MiB",
        metavar="SIZE",
        help="memory the busy workload touches (default 32MiB)",
    )
    parser.add_argument(
        "--dirty-pages-per-step",
        type=non_negative(int),
        default=32,
        metavar="N",
        help="pages the workload writes or retags per step (default 32)",
    )
    parser.add_argument(
        "--downtime-limit",
        type=non_negative(float),
        default=300.0,
        metavar="MS",
        help="switch over when the rest fits this downtime (default 300 ms)",
    )
    parser.add_argument(
        "--seed", type=non_negative(int), default=7, metavar="N", help="workload seed (default 7)"
    )
    parser.add_argument(
        "--dirty-model",
        choices=[m.value for m in DirtyModel],
        default=DirtyModel.KVM.value,
        help="what the source's host shows of dirty pages: kvm, tcg or split (default kvm; "
        "`source-node --help` says what each means)",
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="write both reports into DIR and keep them (default: a temporary folder, removed at the end)",
    )
    args = parser.parse_args(argv)

    from source_node.cli import build_parser as source_parser
    from source_node.cli import check_arguments
    from source_node.cli import main as source_main

    # checked before a destination starts: a guest that cannot boot is an error here, in the
    # demo's own words, not a destination left waiting and the main usage
    problem = check_arguments(source_parser().parse_args(_source_arguments(args, "tcp://127.0.0.1:1")))
    if problem:
        parser.error(problem)

    if args.keep:
        workdir = Path(args.keep)
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--keep: cannot make folder {workdir}: {exc.strerror}")
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="mte-demo-")
        workdir = Path(cleanup.name)
    try:
        return _run(args, workdir, source_main)
    finally:
        if cleanup is not None:
            cleanup.cleanup()


def _source_arguments(args: argparse.Namespace, listen: str, report: str | None = None) -> list[str]:
    return [
        "--ram", str(args.ram), "--seed", str(args.seed), "--working-set", str(args.working_set),
        "--dirty-pages-per-step", str(args.dirty_pages_per_step), "--downtime-limit", str(args.downtime_limit),
        "--dirty-model", args.dirty_model,
        "--migrate-to", listen, "--log-level", "warning", *(["--report", report] if report else []),
    ]  # fmt: skip


def _run(args: argparse.Namespace, workdir: Path, source_main: Any) -> int:
    port, control_port = free_ports(2)
    listen = f"tcp://127.0.0.1:{port}"
    control = f"tcp://127.0.0.1:{control_port}"
    dest_report = workdir / "dest.json"
    source_report = workdir / "source.json"
    print(f"demo: destination listening on {listen}", flush=True)
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
    code = 1
    try:
        if not wait_for_control(control).get("ok"):
            print("demo: the destination did not come up", file=sys.stderr)
            return 1
        print(
            f"demo: migrating a busy {format_size(args.ram)} guest (seed {args.seed}) to it ...", flush=True
        )
        code = source_main(_source_arguments(args, listen, str(source_report)))
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
        print("demo: the source's report, in short:")
        print(describe(json.loads(source_report.read_text())))
    if dest_report.exists():
        guest = json.loads(dest_report.read_text()).get("guest")
        if guest:
            print(f"demo: on the destination the guest stopped at step {guest['step']}")
    if args.keep:
        print(f"demo: reports kept in {source_report} and {dest_report}")
    return code
