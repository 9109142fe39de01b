"""source-node: boots an emulated MTE guest, runs its workload and (later) migrates it."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from common.guest.memory import check_ram_size
from common.guest.runner import GuestRunner
from common.guest.workload import Fill, Workload, WorkloadConfig, boot
from common.logging import configure, get_logger
from common.report import guest_summary, write_report
from common.units import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(kind: type[int] | type[float]):  # type: ignore[no-untyped-def]
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text} is negative")
        return value

    return parse


def add_guest_arguments(parser: argparse.ArgumentParser) -> None:
    guest = parser.add_argument_group("guest")
    guest.add_argument(
        "--ram", type=_size, default=parse_size("64MiB"), help="guest RAM, 1MiB .. 16GiB (default 64MiB)"
    )
    guest.add_argument("--seed", type=_non_negative(int), default=1, help="workload seed (default 1)")
    guest.add_argument(
        "--fill",
        choices=[f.value for f in Fill],
        default=Fill.MIXED.value,
        help="initial RAM content (default mixed)",
    )
    guest.add_argument(
        "--working-set",
        type=_size,
        default=parse_size("4MiB"),
        help="memory the workload touches (default 4MiB)",
    )
    guest.add_argument(
        "--dirty-pages-per-step",
        type=_non_negative(int),
        default=16,
        help="pages written or retagged per step (default 16)",
    )
    guest.add_argument(
        "--tag-only-share",
        type=_non_negative(float),
        default=0.25,
        help="share of steps that only retag, 0..1 (default 0.25)",
    )
    guest.add_argument(
        "--steps-per-second",
        type=_non_negative(float),
        default=0.0,
        help="workload pace; 0 = as fast as it can (default 0)",
    )
    guest.add_argument(
        "--stop-at-step", type=_non_negative(int), default=None, help="stop the workload at this step"
    )


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(
        seed=args.seed,
        working_set_bytes=args.working_set,
        dirty_pages_per_step=args.dirty_pages_per_step,
        tag_only_share=args.tag_only_share,
        steps_per_second=args.steps_per_second,
        fill=Fill(args.fill),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="source-node",
        description="Boot an emulated MTE guest and run its workload. Without --migrate-to "
        "this is the reference run: the guest runs to --stop-at-step (or until interrupted) "
        "and the report holds its digests.",
    )
    add_guest_arguments(parser)
    parser.add_argument("--report", help="write the JSON report here")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def reference_run(args: argparse.Namespace) -> int:
    log = get_logger("source-node")
    guest = boot(args.ram, workload_config(args))
    runner = GuestRunner(Workload(guest), stop_at_step=args.stop_at_step)
    interrupted = []
    signal.signal(signal.SIGTERM, lambda *_: interrupted.append(True))
    log.info("guest booted", ram_bytes=args.ram, seed=args.seed, stop_at_step=args.stop_at_step)
    runner.start()
    try:
        while not runner.finished and not interrupted:
            time.sleep(0.05)
    except KeyboardInterrupt:
        pass
    runner.pause()
    runner.shutdown()
    report = {
        "status": "completed",
        "mode": "none",
        "error": None,
        "guest": guest_summary(guest, running=False),
    }
    log.info("guest stopped", **report["guest"])
    if args.report:
        write_report(args.report, report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(args.log_level)
    try:
        check_ram_size(args.ram)
    except ValueError as exc:
        parser.error(f"--ram: {exc}")
    try:
        workload_config(args).check(args.ram)
    except ValueError as exc:
        parser.error(str(exc))
    return reference_run(args)


if __name__ == "__main__":
    sys.exit(main())
