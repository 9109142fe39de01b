"""ZeroMQ endpoints given by a person: checked before any socket sees them, so a typo gets a
one-line error that names it instead of a ZMQError traceback (or a silently random port)."""

from __future__ import annotations

import re

_TCP = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+):(?P<port>[0-9]+)$")


def check_endpoint(uri: str, what: str) -> str:
    """The endpoint unchanged if it is a usable tcp://HOST:PORT or ipc://PATH; else ValueError
    saying what is wrong with it."""
    if uri.startswith("ipc://"):
        if len(uri) == len("ipc://"):
            raise ValueError(f"{what} '{uri}' names no path (ipc:///tmp/name)")
        return uri
    if not uri.startswith("tcp://"):
        raise ValueError(f"{what} '{uri}' is not a tcp://HOST:PORT or ipc://PATH address")
    match = _TCP.match(uri)
    if match is None:
        raise ValueError(f"{what} '{uri}' is not tcp://HOST:PORT (e.g. tcp://127.0.0.1:4444)")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"{what} '{uri}': port {port} is outside 1 .. 65535")
    return uri
