"""The control endpoint (the role QEMU's QMP plays): JSON requests over a ZeroMQ REP socket.

A request is {"command": NAME, "args": {...}}; every reply is {"ok": true, "result": ...} or
{"ok": false, "error": "what and why"}. A malformed request gets an error reply, never silence,
and never stops the daemon.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import zmq

from common.keys import CONTROL_DOMAIN, KeyPair, curve_client, curve_server, is_z85_key

Handler = Callable[[dict[str, Any]], Any]


class ControlError(Exception):
    """A command that cannot be carried out; its text goes back to the caller."""


def peer_key_arg(args: dict[str, Any]) -> bytes | None:
    """The destination's public key as a control request carries it (Z85 text)."""
    key = args.get("peer_key")
    if key is None:
        return None
    if not isinstance(key, str) or not key.isascii() or not is_z85_key(key.encode()):
        raise ControlError('"peer_key" must be a 40-character Z85 public key (ctl migrate --peer-key FILE)')
    return key.encode()


class ControlServer:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        address: str,
        handlers: dict[str, Handler],
        curve: KeyPair | None = None,
    ) -> None:
        """`curve`: serve with this key, admitting the keys of the control allow-list alone
        (the daemon's ZAP handler decides)."""
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        if curve is not None:
            curve_server(self.socket, curve, CONTROL_DOMAIN)
        try:
            self.socket.bind(address)
        except zmq.ZMQError:
            self.socket.close(linger=0)  # or the context could never terminate
            raise
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.handlers = handlers

    def handle_one(self) -> None:
        """Answer one waiting request (call when the socket is readable)."""
        try:
            # readable may still mean nothing to read: a peer that is not a REQ (a migration
            # pointed at this endpoint, say) sends what REP drops unread, and a blocking read
            # would hold this node's loop, and its signals, for good
            raw = self.socket.recv(flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        self.socket.send_string(json.dumps(self.dispatch(raw), default=str))

    def dispatch(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": 'request must be an object with a "command" string'}
        handler = self.handlers.get(request["command"])
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown command '{request['command']}'; known: {known}"}
        args = request.get("args") or {}
        if not isinstance(args, dict):
            return {"ok": False, "error": '"args" must be an object'}
        try:
            return {"ok": True, "result": handler(args)}
        except (ControlError, ValueError, RuntimeError, zmq.ZMQError) as exc:
            return {"ok": False, "error": str(exc)}

    def close(self) -> None:
        self.socket.close(linger=0)


def request(
    address: str,
    command: str,
    args: dict[str, Any] | None = None,
    timeout_s: float = 5.0,
    curve: tuple[KeyPair, bytes] | None = None,
) -> dict[str, Any]:
    """Send one control request and wait for its reply (the `ctl` subcommand uses this).
    `curve`: this user's key pair and the daemon's public key, for an endpoint off this machine."""
    if address.startswith("ipc://") and not os.path.exists(address[len("ipc://") :]):
        # nothing listens there: waiting the whole timeout would only hide that
        return {
            "ok": False,
            "error": f"no daemon at {address}: there is no such socket file (is its --control this?)",
        }
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve_client(sock, *curve)
    try:
        sock.connect(address)
        sock.send_string(json.dumps({"command": command, "args": args or {}}))
        if not sock.poll(int(timeout_s * 1000)):
            return {
                "ok": False,
                "error": f"no answer from the control endpoint {address} within {timeout_s:.0f} s"
                + (
                    ""
                    if curve is None
                    else " (with keys: is your .key in its --control-allow, and is the endpoint off this "
                    "machine? a local one takes no keys)"
                ),
            }
        reply: dict[str, Any] = json.loads(sock.recv())
        return reply
    finally:
        sock.close(linger=0)
