"""source-node: boots an emulated MTE guest, runs its workload and migrates it.

source-node [guest flags] --report ref.json            the reference run (no migration)
source-node [guest flags] --migrate-to tcp://H:P       migrate once, exit with the report
source-node [guest flags] --control tcp://H:P          a daemon steered by `ctl`
source-node ctl --control tcp://H:P status|migrate|cancel|set-parameters ...
source-node demo                                       a loopback migration to watch
source-node plot REPORT.json -o timeline.png           one migration, drawn
source-node keygen PREFIX                              a CURVE key pair: PREFIX.key, PREFIX.key_secret
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.cli_keys import add_key_arguments, keygen_main, security_from
from common.cli_types import (
    version_text,
    writable_report,
)
from common.control import ControlError
from common.ctl import ctl_main
from common.guest.guest import Guest
from common.guest.memory import check_ram_size
from common.guest.runner import GuestRunner, Inert
from common.guest.workload import Workload, boot
from common.logging import configure, get_logger
from common.malloc import keep_large_buffers, quiet_collector
from common.report import guest_summary, write_report
from common.units import format_rate
from source_node.arguments import (
    add_guest_arguments,
    add_migration_arguments,
    migration_parameters,
    workload_config,
)

USAGE = """source-node [options]                          run a guest; migrate it with --migrate-to or --control
       source-node ctl --control URI COMMAND ...       steer a running source-node (status, migrate, cancel, ...)
       source-node demo [options]                      a loopback migration to watch
       source-node plot REPORT.json [-o PNG]           draw one migration's report
       source-node keygen PREFIX                       write a key pair (PREFIX.key, PREFIX.key_secret)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="source-node",
        usage=USAGE,
        description="Boot an emulated MTE guest and run its workload; migrate it with --migrate-to or on "
        "a `migrate` control command. With neither, this is the reference run: the guest runs to "
        "--stop-at-step (or until interrupted) and the report holds its digests.",
        epilog="Sizes: 4096, 64K, 1.5MiB, 1GB, 16GiB; K, M, G and T mean powers of 1024 with or without "
        "B or iB (as QEMU's -m). Times are in seconds (S) or milliseconds (MS) as each option says. "
        "`source-node ctl --help`, `source-node demo --help` and `source-node plot --help` describe the "
        "subcommands.",
    )
    parser.add_argument("--version", action="version", version=version_text("source-node"))
    add_guest_arguments(parser)
    add_migration_arguments(parser)
    add_key_arguments(parser, dest=False)
    parser.add_argument(
        "--report",
        type=writable_report,
        metavar="PATH",
        help="write the JSON report here (checked before the guest boots; docs/report.md explains it)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def guest_and_runner(args: argparse.Namespace) -> tuple[Guest, GuestRunner]:
    """The guest this node runs: booted with its workload, or imported from QEMU (inert here)."""
    if args.from_qemu:
        guest = load_qemu_guest(args.from_qemu, args.max_ram)
        return guest, GuestRunner(Inert(), stop_at_step=0)
    guest = boot(args.ram, workload_config(args))
    workload = Workload(guest, device_marks_dirty=not args.debug_device_forgets)
    return guest, GuestRunner(workload, stop_at_step=args.stop_at_step)


def load_qemu_guest(path: str, max_ram: int) -> Guest:
    from common.qemu.guest_io import import_guest
    from common.qemu.stream import read_stream

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise QemuImportError(f"--from-qemu {path}: {exc.strerror or exc}") from None
    try:
        stream = read_stream(data, max_ram)
        del data  # the blocks are copies: the file's bytes may go before the guest is built
        return import_guest(stream)
    except ValueError as exc:  # StreamError: what is wrong with the file, and where
        raise QemuImportError(f"--from-qemu {path}: {exc}") from None
    except MemoryError:
        raise QemuImportError(f"--from-qemu {path}: not enough memory for the guest it holds") from None


class QemuImportError(Exception):
    """A stream that cannot be imported: one line, and nothing has started."""


def reference_run(args: argparse.Namespace) -> int:
    log = get_logger("source-node")
    guest, runner = guest_and_runner(args)
    signals: list[str] = []

    def interrupt(signum: int, _: Any) -> None:
        signals.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    log.info(
        "guest imported from QEMU" if args.from_qemu else "guest booted",
        guest_bytes=guest.memory.ram_bytes,
        seed=None if args.from_qemu else args.seed,
        stop_at_step=args.stop_at_step,
    )
    runner.run_until_finished(lambda: bool(signals))
    completed = runner.finished
    goal = f" of {args.stop_at_step}" if args.stop_at_step is not None else ""
    error = runner.error or (
        None if completed else f"interrupted by {signals[0]} at step {runner.step}{goal}"
    )
    report = {
        "status": "completed" if completed else "failed" if runner.error else "interrupted",
        "mode": "none",
        "error": error,
        "guest": guest_summary(guest, here=True, running=False, error=runner.error),
    }
    log.info("guest stopped", status=report["status"], **report["guest"])
    if args.report:
        write_report(args.report, report)
    # a reference cut short is not the reference: scripts comparing digests must notice (128 +
    # the signal, as a shell reports it: 130 for Ctrl-C)
    if completed:
        return 0
    return 1 if runner.error else 128 + signal.Signals[signals[0]].value


def summary_line(report: dict[str, Any]) -> str:
    if report["status"] == "completed" and report.get("postcopy") is not None:
        pc = report["postcopy"]
        return (
            f"postcopy completed: downtime {report['downtime_ms']:.1f} ms, {report['rounds']} precopy rounds, "
            f"{pc['requests']} page requests, {pc['background_pages']} background pages, "
            f"{report['total_time_ms'] / 1000:.2f} s; verified manifest {report['verification']['ram_digest']}"
        )
    if report["status"] == "completed":
        v = report["verification"]
        return (
            f"migration completed: downtime {report['downtime_ms']:.1f} ms (limit {report['downtime_limit_ms']:.0f} ms), "
            f"{report['rounds']} rounds, {report['total_time_ms'] / 1000:.2f} s, {format_rate(report['throughput_bytes_per_s'])}; "
            f"verified ram {v['ram_digest']} tags {v['tag_digest']} vcpu {v['vcpu_digest']}"
        )
    # printed as the process exits: a guest still here stops with it
    where = (
        f"the guest stayed here and stops with this process, at step {report['guest']['step']}"
        if report["guest"]["here"]
        else "the guest is not running on the source"
    )
    return f"migration {report['status']}: {report['error']} ({where})"


def migrate_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import zmq

    from common.outgoing import io_threads
    from source_node.daemon import SourceDaemon, SourceOptions, StartupError, open_control

    log = get_logger("source-node")
    security, peer_key = security_from(args, parser)
    if args.migrate_to:
        try:
            security.check_peer(args.migrate_to, peer_key)
        except ValueError as exc:
            parser.error(str(exc))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=io_threads(args.channels))
    try:
        # bound before the guest boots: a port in use is a one-line error, not a lost guest
        control, zap = open_control(ctx, args.control, security, log) if args.control else (None, None)
    except StartupError as exc:
        ctx.term()
        print(f"source-node: {exc}", file=sys.stderr)
        return 2
    try:
        guest, runner = guest_and_runner(args)
    except QemuImportError as exc:
        if control is not None:
            control.close()
        if zap is not None:
            zap.close()
        ctx.term()
        print(f"source-node: {exc}", file=sys.stderr)
        return 2
    options = SourceOptions(
        params=migration_parameters(args),
        control=args.control,
        one_shot=bool(args.migrate_to),
        security=security,
        peer_key=peer_key,
    )
    daemon = SourceDaemon(guest, runner, options, ctx, control, zap)
    log.info(
        "guest imported from QEMU" if args.from_qemu else "guest booted",
        guest_bytes=guest.memory.ram_bytes,
        seed=None if args.from_qemu else args.seed,
        stop_at_step=args.stop_at_step,
    )
    quiet_collector()
    if args.migrate_to:
        try:
            daemon.migrate(args.migrate_to, peer_key)
        except ControlError as exc:
            log.error("migration not started", reason=str(exc))
    code = daemon.run()
    report = daemon.final_report()
    if args.report:
        write_report(args.report, report)
    if daemon.session is not None:
        print(summary_line(report), flush=True)
    return code


def check_arguments(args: argparse.Namespace) -> str | None:
    """What argparse cannot check alone (values that depend on each other), as one sentence;
    None when the guest may boot."""
    try:
        check_ram_size(args.ram)
    except ValueError as exc:
        return f"--ram: {exc}"
    try:
        workload_config(args).check(args.ram)
        migration_parameters(args).check()
    except ValueError as exc:
        return str(exc)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ctl"]:
        return ctl_main(argv[1:], "source-node ctl", source=True)
    if argv[:1] == ["demo"]:
        from source_node.demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:], "source-node")
    if argv[:1] == ["plot"]:
        from source_node.plot import main as plot_main

        return plot_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(args.log_level)
    keep_large_buffers()
    problem = check_arguments(args)
    if problem:
        parser.error(problem)
    if args.migrate_to or args.control:
        return migrate_run(args, parser)
    try:
        return reference_run(args)
    except QemuImportError as exc:
        print(f"source-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
