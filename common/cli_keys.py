"""The key options both daemons share, and `keygen`: one place for their names and help."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common.keys import KeyFileError, Security, generate, load_public, load_secret


def add_key_arguments(parser: argparse.ArgumentParser, *, dest: bool) -> None:
    keys = parser.add_argument_group(
        "keys",
        "CURVE keys (`keygen PREFIX` writes a pair): encrypted channels that admit known peers only. "
        "Without keys, addresses must stay on this machine (127.0.0.1, ipc://) unless --insecure.",
    )
    keys.add_argument("--key", metavar="FILE", help="this node's key pair, its PREFIX.key_secret")
    if dest:
        keys.add_argument(
            "--allow",
            metavar="DIR",
            help="admit only sources whose public .key file is in DIR (re-read on SIGHUP)",
        )
    else:
        keys.add_argument(
            "--peer-key", metavar="FILE", help="the destination's public .key (with --migrate-to)"
        )
    keys.add_argument(
        "--control-allow",
        metavar="DIR",
        help="public .key files of those who may use a --control endpoint off this machine",
    )
    keys.add_argument(
        "--insecure",
        action="store_true",
        help="allow migration traffic off this machine without keys: guest memory in the clear",
    )


def security_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Security, bytes | None]:
    """The daemon's Security and, on a source, the destination's public key; a bad key file
    is a usage error that names it."""
    try:
        key = load_secret(args.key) if args.key else None
        peer = load_public(args.peer_key) if getattr(args, "peer_key", None) else None
        security = Security(
            key=key,
            allow=getattr(args, "allow", None),
            control_allow=args.control_allow,
            insecure=args.insecure,
        )
        security.allow_lists()  # a bad directory is refused now, not at the first handshake
        if args.control:
            security.check_control(args.control)
    except KeyFileError as exc:
        parser.error(str(exc))
    return security, peer


def keygen_main(argv: Sequence[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{prog} keygen",
        description="Write a CURVE key pair: PREFIX.key (public: give it to peers, or put it in "
        "their --allow directory) and PREFIX.key_secret (this node's --key; mode 0600).",
    )
    parser.add_argument("prefix", metavar="PREFIX", help="path and name without suffix, e.g. keys/dest")
    args = parser.parse_args(argv)
    try:
        public, secret = generate(args.prefix)
    except KeyFileError as exc:
        print(f"{prog} keygen: {exc}", file=sys.stderr)
        return 2
    pair = load_secret(secret)
    print(f"wrote {public} (public) and {secret} (secret, mode 0600); key {pair.fingerprint}...")
    return 0
