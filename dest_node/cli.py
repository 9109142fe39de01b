"""dest-node: waits for an incoming migration (like QEMU's -incoming) and runs the guest
after a verified handover.

  dest-node --listen tcp://127.0.0.1:4444 [--once] [--stop-at-step N] [--report PATH]
  dest-node ctl --control tcp://H:P status|cancel|migrate|settle
  dest-node keygen PREFIX        a CURVE key pair: PREFIX.key (public), PREFIX.key_secret
  dest-node --listen tcp://0.0.0.0:4444 --key dest.key_secret --allow sources/
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from common.cli_keys import add_key_arguments, keygen_main, security_from
from common.cli_types import (
    endpoint,
    non_negative,
    positive,
    positive_size,
    size,
    version_text,
    writable_report,
)
from common.constants import HEARTBEAT_INTERVAL_S, MAX_RAM_BYTES, MAX_SOURCE_WAIT_S, PEER_DEAD_AFTER_S
from common.ctl import ctl_main
from common.guest.memory import check_ram_size
from common.logging import configure
from common.malloc import keep_large_buffers, quiet_collector
from common.protocol.dest import DestParameters
from common.units import format_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dest-node",
        usage="dest-node --listen URI [options]            wait for a source, run the guest it sends\n"
        "       dest-node ctl --control URI COMMAND ...    steer a running dest-node (status, events, migrate, ...)\n"
        "       dest-node keygen PREFIX                    write a key pair (PREFIX.key, PREFIX.key_secret)",
        description="Receive a migrating MTE guest and, once verified, run it (QEMU's -incoming).",
        epilog="Times are in seconds (S). `dest-node ctl --help` describes the control commands.",
    )
    parser.add_argument("--version", action="version", version=version_text("dest-node"))
    parser.add_argument(
        "--listen",
        required=True,
        type=endpoint("--listen"),
        metavar="URI",
        help="where to accept a source (tcp://HOST:PORT or ipc://PATH)",
    )
    parser.add_argument(
        "--once", action="store_true", help="exit after one migration (non-zero when it failed)"
    )
    parser.add_argument(
        "--stop-at-step",
        type=non_negative(int),
        default=None,
        metavar="N",
        help="stop the arrived guest's workload at this step (default: run until interrupted)",
    )
    parser.add_argument(
        "--report",
        type=writable_report,
        metavar="PATH",
        help="write the JSON report here when the guest stops or the migration fails",
    )
    parser.add_argument(
        "--control", type=endpoint("--control"), metavar="URI", help="serve control commands here"
    )
    parser.add_argument(
        "--auth-token",
        default=os.environ.get("MTE_MIGRATION_TOKEN", ""),
        metavar="TOKEN",
        help="accept only sources presenting this token (default $MTE_MIGRATION_TOKEN)",
    )
    parser.add_argument(
        "--peer-timeout",
        type=positive(float),
        default=PEER_DEAD_AFTER_S,
        metavar="S",
        help="keep an unfinished session at least this long while its source is silent; the source's "
        f"reconnect timeout, if longer, wins (default {PEER_DEAD_AFTER_S:g} s)",
    )
    parser.add_argument(
        "--max-source-wait",
        type=positive(float),
        default=MAX_SOURCE_WAIT_S,
        metavar="S",
        help="keep an unfinished session at most this long while its source is silent, whatever "
        f"reconnect timeout the source asks for (default {MAX_SOURCE_WAIT_S:g} s)",
    )
    parser.add_argument(
        "--max-ram",
        type=positive_size,
        default=MAX_RAM_BYTES,
        metavar="SIZE",
        help=f"refuse guests larger than this: what a source may make this node allocate "
        f"(default {format_size(MAX_RAM_BYTES)})",
    )
    parser.add_argument(
        "--preallocate",
        type=size,
        default=None,
        metavar="SIZE",
        help="commit this much guest memory at start-up, before any source arrives (QEMU's "
        "-mem-prealloc): the stream then never waits on the kernel. Used by a guest of at most "
        "SIZE; costs SIZE of RAM while waiting (default: commit pages as they arrive)",
    )
    parser.add_argument(
        "--to-qemu",
        type=writable_report,
        metavar="FILE",
        help="a guest imported from QEMU (source-node --from-qemu) is handed back: once verified, its "
        'migration stream is written to FILE for qemu-system-aarch64 -incoming "exec:cat FILE"',
    )
    add_key_arguments(parser, dest=True)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # Test builds: flip a byte of this page once after placing it (proves verification repairs).
    parser.add_argument("--debug-corrupt-page", type=non_negative(int), default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ctl"]:
        return ctl_main(argv[1:], "dest-node ctl", source=False)
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:], "dest-node")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preallocate is not None:
        try:
            check_ram_size(args.preallocate)
        except ValueError as exc:
            parser.error(f"--preallocate: {exc}")
        if args.preallocate > args.max_ram:
            parser.error(
                f"--preallocate {format_size(args.preallocate)} is more than --max-ram {format_size(args.max_ram)}"
            )
    security, _ = security_from(args, parser)
    configure(args.log_level)
    keep_large_buffers()
    from dest_node.daemon import DestDaemon, DestOptions, StartupError

    params = DestParameters(
        auth_token=args.auth_token.encode(),
        peer_timeout_s=args.peer_timeout,
        heartbeat_interval_s=min(HEARTBEAT_INTERVAL_S, args.peer_timeout / 4),
        corrupt_page=args.debug_corrupt_page,
        max_ram_bytes=args.max_ram,
        max_source_wait_s=args.max_source_wait,
        qemu_handback=args.to_qemu is not None,
    )
    try:
        daemon = DestDaemon(
            DestOptions(
                listen=args.listen,
                params=params,
                once=args.once,
                stop_at_step=args.stop_at_step,
                report=args.report,
                control=args.control,
                security=security,
                preallocate_bytes=args.preallocate,
                to_qemu=args.to_qemu,
            )
        )
    except StartupError as exc:
        print(f"dest-node: {exc}", file=sys.stderr)
        return 2
    quiet_collector()
    return daemon.run()


if __name__ == "__main__":
    sys.exit(main())
