"""`source-node ctl` and `dest-node ctl`: one request to a running daemon's control endpoint.
Each daemon is offered exactly the commands it answers: the table below is the one list, and
each daemon's handlers are checked against it by the tests."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.cli_types import endpoint, positive, rounds_or_never
from common.control import request
from common.event_stream import follow_events
from common.human import describe
from common.keys import KeyFileError, load_public, load_secret
from common.outgoing_commands import MODES
from common.protocol.params import SETTABLE, describe_parameters


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    source: bool = True
    dest: bool = True


COMMANDS = (
    Command("status", "the migration so far, in short (--json: the whole report)"),
    Command("events", "follow migrations as JSON lines: status changes, rounds, postcopy, the link"),
    Command(
        "parameters",
        "the parameters of this node's migrations (QMP's query-migrate-parameters; a dest-node's "
        "are those of the hops it sends on)",
    ),
    Command("set-parameters", f"change {', '.join(SETTABLE)} (also during a migration)"),
    Command(
        "migrate",
        "start a migration to a dest-node: URI is tcp://HOST:PORT; mode, channels and keys are this "
        "migration's own",
    ),
    Command("cancel", "cancel the migration in progress; the guest keeps running here"),
    Command("postcopy-start", "switch a running migration that allowed postcopy (--mode postcopy) to it now"),
    Command("recover", "postcopy: after a broken link, reconnect now (to URI, if the destination moved)"),
    Command(
        "settle",
        "after an unanswered commit: say where the guest runs (here resumes it on this node, there "
        "gives it up)",
    ),
)


def commands_for(*, source: bool) -> list[str]:
    return [c.name for c in COMMANDS if (c.source if source else c.dest)]


def _connection_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # accepted before and after the command: `ctl --timeout 1 status` and `ctl status --timeout 1`
    parser.add_argument(
        "--control",
        type=endpoint("--control"),
        metavar="URI",
        default=None if defaults else argparse.SUPPRESS,
        help="the daemon's control endpoint (its --control)",
    )
    parser.add_argument(
        "--key",
        metavar="FILE",
        default=None if defaults else argparse.SUPPRESS,
        help="your .key_secret, for a control endpoint off this machine (its --control-allow holds your .key)",
    )
    parser.add_argument(
        "--control-key",
        metavar="FILE",
        default=None if defaults else argparse.SUPPRESS,
        help="the daemon's public .key, for a control endpoint off this machine",
    )
    parser.add_argument(
        "--timeout",
        type=positive(float),
        metavar="S",
        default=5.0 if defaults else argparse.SUPPRESS,
        help="seconds to wait for an answer (default 5)",
    )


def build_parser(prog: str, *, source: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Steer a running daemon through its control endpoint."
    )
    _connection_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        if not (command.source if source else command.dest):
            continue
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        _connection_options(p, defaults=False)
        p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
        if command.name == "migrate":
            _migrate_options(p)
        elif command.name == "recover":
            p.add_argument("uri", metavar="URI", nargs="?", help="the destination's new tcp://HOST:PORT")
        elif command.name == "events":
            p.add_argument(
                "--until-finished",
                action="store_true",
                help="exit after the next migration ends (a MIGRATION_FINISHED event)",
            )
        elif command.name == "settle":
            p.add_argument("where", choices=["here", "there"])
        elif command.name == "set-parameters":
            p.add_argument("assignments", nargs="+", metavar="NAME=VALUE", help=describe_parameters())
    return parser


def _migrate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri", metavar="URI", help="the destination, tcp://HOST:PORT")
    p.add_argument(
        "--mode",
        choices=MODES,
        help="postcopy: allowed for this migration (QEMU's postcopy-ram); default: the daemon's --mode",
    )
    p.add_argument(
        "--postcopy-after-rounds",
        type=lambda text: "never" if text == "never" else rounds_or_never(text),
        metavar="N|never",
        help="postcopy: precopy rounds before the switchover; never = only on 'ctl postcopy-start'",
    )
    p.add_argument(
        "--channels",
        type=positive(int),
        metavar="N",
        help="connections for page and tag batches (QEMU's multifd); default: the daemon's",
    )
    p.add_argument(
        "--peer-key",
        metavar="FILE",
        help="the destination's public .key (this node needs its own --key, given at start-up)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="this migration may cross the network in the clear (no keys)",
    )


def _migrate_payload(args: argparse.Namespace) -> dict[str, Any]:
    payload: dict[str, Any] = {"uri": args.uri}
    if args.peer_key is not None:
        payload["peer_key"] = load_public(args.peer_key).decode()
    if args.mode is not None:
        payload["mode"] = args.mode
    if args.postcopy_after_rounds is not None:
        payload["postcopy_after_rounds"] = args.postcopy_after_rounds
    if args.channels is not None:
        payload["channels"] = args.channels
    if args.insecure:
        payload["insecure"] = True
    return payload


def ctl_main(argv: Sequence[str], prog: str, *, source: bool) -> int:
    parser = build_parser(prog, source=source)
    args = parser.parse_args(argv)
    if args.control is None:
        parser.error("--control URI is required: the daemon's control endpoint")
    payload: dict[str, Any] = {}
    curve = None
    try:
        if (args.key is None) != (args.control_key is None):
            parser.error("--key and --control-key go together: yours and the daemon's")
        if args.key is not None:
            curve = (load_secret(args.key), load_public(args.control_key))
        if args.command == "migrate":
            payload = _migrate_payload(args)
    except KeyFileError as exc:
        parser.error(str(exc))
    if args.command == "events":
        return follow_events(args.control, args.timeout, curve, args.until_finished, prog)
    if args.command == "recover" and args.uri is not None:
        payload = {"uri": args.uri}
    if args.command == "settle":
        payload = {"where": args.where}
    elif args.command == "set-parameters":
        for item in args.assignments:
            name, sep, value = item.partition("=")
            if not sep:
                parser.error(f"'{item}' is not NAME=VALUE")
            payload[name.replace("-", "_")] = value
    reply = request(args.control, args.command, payload, timeout_s=args.timeout, curve=curve)
    if not reply.get("ok"):
        if args.json:  # a script reads stdout: the error in the same JSON shape as an answer
            print(json.dumps({"ok": False, "error": reply.get("error")}, indent=2))
        print(f"{prog} {args.command}: {reply.get('error')}", file=sys.stderr)
        return 1
    try:
        _print_result(reply.get("result"), args, prog)
    except BrokenPipeError:
        # the reader went away (`ctl status --json | head`): what it wanted, it has
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print_result(result: Any, args: argparse.Namespace, prog: str) -> None:
    if args.json or not isinstance(result, dict):
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.command in ("parameters", "set-parameters"):
        print(describe({"parameters": result}))
    elif args.command == "migrate":
        print(f"migration started (session {result.get('session')}); watch it with '{prog} status'")
    else:
        print(describe(result))
    sys.stdout.flush()  # a closed pipe shows here, not at exit
