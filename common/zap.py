"""Who gets in: a ZAP handler (ZeroMQ RFC 27) answering the CURVE handshakes of one context.

The decision is a pure function of the request and the allow-lists; `ZapHandler` is the edge
that owns the inproc socket, re-reads the lists on request (SIGHUP) and keeps the log bounded.
It runs in the daemon's own loop: no thread, so a decision never races a reload."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils import z85

from common.constants import REFUSAL_LOG_LINES_PER_S
from common.protocol.ratelimit import PerSecond

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str
    user_id: bytes  # the peer's public key in Z85: what every message it sends then carries
    name: str  # the name of its key file, or "unknown"
    address: str
    domain: str


def decide(frames: list[bytes], allowed: Mapping[str, Mapping[bytes, str]]) -> tuple[list[bytes], Verdict]:
    """The reply to one ZAP request, and what was decided. `allowed` maps a ZAP domain (which
    socket) to the public keys (Z85) it admits, each with a name."""
    if len(frames) < 6:
        verdict = Verdict(False, "malformed ZAP request", b"", "unknown", "?", "?")
        request_id = frames[1] if len(frames) > 1 else b""
        return [ZAP_VERSION, request_id, b"500", b"malformed request", b"", b""], verdict
    version, request_id, domain_b, address_b, _identity, mechanism = frames[:6]
    domain, address = domain_b.decode(errors="replace"), address_b.decode(errors="replace")

    def answer(
        ok: bool, reason: str, user_id: bytes = b"", name: str = "unknown"
    ) -> tuple[list[bytes], Verdict]:
        code = b"200" if ok else b"400"
        reply = [ZAP_VERSION, request_id, code, reason.encode()[:255], user_id, b""]
        return reply, Verdict(ok, reason, user_id, name, address, domain)

    if version != ZAP_VERSION:
        return answer(False, f"ZAP version {version!r} is not 1.0")
    keys = allowed.get(domain)
    if keys is None:
        return answer(False, f"no allow-list for domain '{domain}'")
    if mechanism != b"CURVE" or len(frames) != 7 or len(frames[6]) != 32:
        return answer(
            False, f"mechanism {mechanism.decode(errors='replace')} without a CURVE key is not admitted"
        )
    key = z85.encode(frames[6])
    name = keys.get(key)
    if name is None:
        return answer(False, f"key {key[:8].decode()}... is not in the allow-list", key)
    return answer(True, "OK", key, name)


class ZapHandler:
    """Binds the context's ZAP endpoint; `handle()` answers what is pending (the loop polls
    `socket`). `load` returns the allow-lists afresh; `reload()` calls it again."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        load: Callable[[], dict[str, dict[bytes, str]]],
        log: object,
    ) -> None:
        self._load = load
        self.allowed = load()
        self.log = log
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)
        self.admitted = 0
        self.refused = 0
        self._log_lines = PerSecond(REFUSAL_LOG_LINES_PER_S)
        self._unlogged = 0
        self._t_counted = float("-inf")
        self._last: Verdict | None = None
        self._reload_wanted = False

    def request_reload(self) -> None:
        """From a signal handler (SIGHUP): the next loop turn re-reads the lists."""
        self._reload_wanted = True

    def service(self, events: dict[Any, int], now: float) -> None:
        """One turn of a daemon's loop: a requested reload, the handshakes waiting (`events`
        is the poll's answer), and the count of refusals due in the log."""
        if self._reload_wanted:
            self._reload_wanted = False
            self.reload()
        if self.socket in events:
            self.handle(now)
        else:
            self.flush(now)

    def keys(self, domain: str) -> int:
        return len(self.allowed.get(domain, {}))

    def reload(self) -> None:
        """Re-read the allow-lists; on an error the old ones stay (a typo must not lock
        everyone out, nor let everyone in)."""
        try:
            fresh = self._load()
        except ValueError as exc:
            self.log.error("allow-list not reloaded; the previous one stays", reason=str(exc))  # type: ignore[attr-defined]
            return
        self.allowed = fresh
        self.log.info("allow-list reloaded", **{d: len(k) for d, k in fresh.items()})  # type: ignore[attr-defined]

    def handle(self, now: float) -> None:
        for _ in range(64):  # bounded: a handshake flood must not starve the migration
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            reply, verdict = decide(frames, self.allowed)
            self.socket.send_multipart(reply)
            if verdict.allowed:
                self.admitted += 1
                self.log.info(
                    "peer key admitted", peer=verdict.name, address=verdict.address, domain=verdict.domain
                )  # type: ignore[attr-defined]
                continue
            self.refused += 1
            if self._log_lines.take(now):
                self.log.warning(
                    "peer key refused", address=verdict.address, domain=verdict.domain, reason=verdict.reason
                )  # type: ignore[attr-defined]
            else:
                self._unlogged += 1
                self._last = verdict
        self.flush(now)

    def flush(self, now: float, *, final: bool = False) -> None:
        """Each refusal gets a line while they are few (REFUSAL_LOG_LINES_PER_S); the others
        become one count a second (the daemon calls this every loop turn) and at the end."""
        verdict = self._last
        if verdict is None or not self._unlogged or not (final or now - self._t_counted >= 1.0):
            return
        self.log.warning(  # type: ignore[attr-defined]
            "peer keys refused",
            count=self._unlogged,
            last_address=verdict.address,
            last_reason=verdict.reason,
        )
        self._unlogged = 0
        self._t_counted = now

    def close(self) -> None:
        self.flush(0.0, final=True)
        self.socket.close(linger=0)
