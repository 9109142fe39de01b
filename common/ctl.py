"""`source-node ctl` and `dest-node ctl`: one request to a running daemon's control endpoint.
Each daemon is offered only the commands it answers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from common.cli_types import endpoint
from common.control import request
from common.protocol.params import SETTABLE


def ctl_main(argv: Sequence[str], prog: str, *, source: bool) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Steer a running daemon through its control endpoint."
    )
    parser.add_argument(
        "--control",
        required=True,
        type=endpoint("--control"),
        metavar="URI",
        help="the daemon's control endpoint",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="the report so far")
    sub.add_parser("cancel", help="cancel the migration in progress")
    migrate = sub.add_parser(
        "migrate",
        help="start a migration" if source else "send the guest that runs here on to another dest-node",
    )
    migrate.add_argument("uri", help="the destination, tcp://HOST:PORT")
    settle = sub.add_parser(
        "settle", help="after an unanswered commit: say where the guest runs (here resumes it on this node)"
    )
    settle.add_argument("where", choices=["here", "there"])
    if source:
        setp = sub.add_parser("set-parameters", help=f"change {', '.join(SETTABLE)}")
        setp.add_argument("assignments", nargs="+", metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    payload: dict[str, Any] = {}
    if args.command == "migrate":
        payload = {"uri": args.uri}
    elif args.command == "settle":
        payload = {"where": args.where}
    elif args.command == "set-parameters":
        for item in args.assignments:
            name, sep, value = item.partition("=")
            if not sep:
                parser.error(f"'{item}' is not NAME=VALUE")
            payload[name.replace("-", "_")] = value
    reply = request(args.control, args.command, payload, timeout_s=args.timeout)
    if not reply.get("ok"):
        print(f"{prog} {args.command}: {reply.get('error')}", file=sys.stderr)
        return 1
    print(json.dumps(reply.get("result"), indent=2, sort_keys=True))
    return 0
