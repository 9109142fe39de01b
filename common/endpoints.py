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


_LOOPBACK = frozenset({"127.0.0.1", "localhost", "0.0.0.0", "*", "[::1]", "[::]"})


def same_endpoint(a: str, b: str) -> bool:
    """Whether two endpoints reach the same socket on this node: the same ipc path, or the same
    TCP port on one host (any spelling of this node's loopback or wildcard counts as one)."""
    if a.startswith("ipc://") or b.startswith("ipc://"):
        return a == b
    left, right = _TCP.match(a), _TCP.match(b)
    if left is None or right is None:
        return a == b
    if left["port"] != right["port"]:
        return False
    hosts = {left["host"], right["host"]}
    return len(hosts) == 1 or hosts <= _LOOPBACK
