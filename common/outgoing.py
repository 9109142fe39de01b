"""One outgoing migration of a running guest: its SourceSession and the connection under it.

Both daemons use it: source-node for the guest it booted, dest-node to send a guest it received
onward (so two dest-nodes can pass a guest back and forth, as QEMU instances do). The session
decides; this moves bytes, opens a new connection when the session asks for one (a reconnect),
and logs what the session reports.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from common.constants import CLOSE_LINGER_MS, MAX_FRAME_BYTES
from common.control import ControlError
from common.endpoints import check_endpoint
from common.guest.guest import Guest
from common.keys import KeyPair, curve_client
from common.protocol import events as ev
from common.protocol.params import MigrationParameters
from common.protocol.source import SourceHost, SourceSession
from common.wire.framing import Buffer


class OutgoingMigration:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        guest: Guest,
        host: SourceHost,
        params: MigrationParameters,
        uri: str,
        log: Any,
        *,
        node_name: str = "source",
        curve: tuple[KeyPair, bytes] | None = None,
    ) -> None:
        """`curve`: this node's key pair and the destination's public key; every connection
        of the migration (data, urgent, each reconnect) then proves both."""
        try:
            check_endpoint(uri, "destination")
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        self.ctx = ctx
        self.uri = uri
        self.curve = curve
        self.monitor: zmq.Socket[bytes] | None = None
        self._failed_handshakes = 0
        self._handshakes_ok = 0
        self.log = log
        self.socket: zmq.Socket[bytes] | None = None
        # postcopy answers: a connection of their own, so that they never wait behind the
        # background stream in ZeroMQ's pipe or TCP's buffers (QEMU's postcopy-preempt channel)
        self.urgent: zmq.Socket[bytes] | None = None
        self.pending: deque[list[Buffer]] = deque()
        self.finished: ev.Finished | None = None
        now = time.monotonic()
        self.session = SourceSession(guest, host, params, now, node_name=node_name)
        self._connect(epoch=1)  # raises ControlError, and nothing has started
        self.session.start(now)
        log.info(
            "migration started",
            destination=uri,
            session=self.session.session_id.hex(),
            guest_bytes=guest.memory.ram_bytes,
        )
        self.after_call()

    # -- the connection --------------------------------------------------------------------------
    def _connect(self, epoch: int) -> None:
        """A fresh connection for this epoch. Its routing id names the session and epoch, so
        that ZeroMQ's own reconnects (after a reset) keep it and the destination still knows it."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.session.session_id + epoch.to_bytes(4, "big"))
        # No ZMQ_IMMEDIATE: with it libzmq drops a disconnected peer's unread messages at once.
        sock.setsockopt(zmq.SNDHWM, 4 * self.session.params.window + 64)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        try:
            self._secure(sock)
            sock.connect(self.uri)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ControlError(f"cannot connect to {self.uri}: {exc}") from None
        if self.socket is not None:
            self._close_monitor()
            self.socket.close(linger=0)
        self.socket = sock
        # a refused handshake is silent on the wire: only the socket's monitor hears of it
        self.monitor = sock.get_monitor_socket(HANDSHAKE_FAILURES)
        if self.urgent is not None:
            self.urgent.close(linger=0)
            self.urgent = None  # opened again for this epoch when the next answer goes out
        # what waited for the old connection is either resent by the session or not needed
        self.pending.clear()

    def _urgent_socket(self) -> zmq.Socket[bytes]:
        if self.urgent is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(
                zmq.ROUTING_ID, self.session.session_id + self.session.link.epoch.to_bytes(4, "big") + b"U"
            )
            sock.setsockopt(zmq.SNDHWM, 256)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            self._secure(sock)
            sock.connect(self.uri)
            self.urgent = sock
        return self.urgent

    def _secure(self, sock: zmq.Socket[bytes]) -> None:
        if self.curve is not None:
            curve_client(sock, *self.curve)

    def _close_monitor(self) -> None:
        if self.monitor is not None and self.socket is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
        self.monitor = None

    def check_handshake(self, now: float) -> None:
        """Turn a refused handshake into a failure that says why, instead of a silent timeout.
        A refused key is final whenever it comes (the destination's allow-list said no). Other
        handshake failures count only until a first handshake succeeded: after that they are
        the network's doing (libzmq reports a damaged CURVE message the same way), and the
        link's own reconnect and resend repair them."""
        while self.monitor is not None:
            try:
                event = recv_monitor_message(self.monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshakes_ok += 1
                self._failed_handshakes = 0
                continue
            if kind != zmq.EVENT_HANDSHAKE_FAILED_AUTH and self._handshakes_ok:
                continue
            self._failed_handshakes += 1
            if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self._failed_handshakes < 3:
                continue  # a connection lost mid-handshake looks the same once: a wrong key, every time
            reason = handshake_failure(kind, event["value"], self.uri, self.curve)
            if reason is not None and not self.session.phase.ended:
                self.session.refused_by_peer(reason, now)
                self.after_call()

    def close(self) -> None:
        self._close_monitor()
        if self.socket is not None:
            self.flush()
            self.socket.close(linger=CLOSE_LINGER_MS)  # a last Abort must reach the destination
            self.socket = None
        if self.urgent is not None:
            self.urgent.close(linger=0)
            self.urgent = None

    # -- driving the session -----------------------------------------------------------------------
    def poll(self, now: float) -> float:
        """Let the session act on time; returns how long the loop may sleep."""
        session = self.session
        if session.phase.ended:
            return 3600.0
        self.check_handshake(now)
        session.poll(now)
        self.after_call()
        return max(0.0, session.next_deadline(now) - now)

    def after_call(self) -> None:
        self._take_events()
        self.flush()

    def flush(self) -> None:
        """Send what the session produced. Every payload is its message's own (page batches are
        copied out of guest memory as they are hashed), so the socket takes it without copying."""
        if (
            self.session.postcopy is not None
            and not self.session.phase.ended
            and self.urgent is None
            and self.socket is not None
        ):
            self._urgent_socket()  # connected ahead of the first request, not on its path
        urgent = self.session.take_urgent()
        if urgent:
            sock = self._urgent_socket()
            for frames in urgent:
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break  # not sent: the destination asks again after a timeout
        self.pending.extend(self.session.take_outgoing())
        while self.pending and self.socket is not None:
            try:
                self.socket.send_multipart(self.pending[0], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.pending.popleft()

    def drain(self) -> None:
        sock = self.socket
        while sock is not None and self.socket is sock:  # a reconnect replaces it: next turn
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self.session.receive([f.buffer for f in frames], time.monotonic())
            self._take_events()
        self.flush()

    def _take_events(self) -> None:
        session = self.session
        for event in session.take_events():
            if isinstance(event, ev.Reconnect):
                self.log.warning(
                    "link lost; reconnecting", epoch=event.epoch, silent_for_s=round(event.silent_for_s, 2)
                )
                try:
                    self._connect(event.epoch)
                except ControlError as exc:
                    self.log.error("reconnect failed", reason=str(exc))
            elif isinstance(event, ev.LinkRestored):
                self.log.info("link restored", epoch=event.epoch, resent_messages=event.resent)
            elif isinstance(event, ev.RoundStarted):
                report = session.report(time.monotonic())
                self.log.info(
                    "round",
                    round=event.round,
                    data_pages=event.data_pages,
                    tag_pages=event.tag_pages,
                    expected_downtime_ms=report["expected_downtime_ms"],
                    throughput_bytes_per_s=report["throughput_bytes_per_s"],
                )
            elif isinstance(event, ev.Finished):
                self.finished = event
                report = session.report(time.monotonic())
                if event.status == "completed":
                    self.log.info(
                        "migration completed",
                        downtime_ms=report["downtime_ms"],
                        total_time_ms=report["total_time_ms"],
                        rounds=session.round,
                        note=event.reason,
                    )
                else:
                    self.log.error(
                        f"migration {event.status}",
                        error=event.reason,
                        guest_runs_here=session.guest_runs_here,
                    )


HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def handshake_failure(event: int, value: int, uri: str, curve: tuple[KeyPair, bytes] | None) -> str | None:
    """What a refused ZeroMQ handshake means to the person who started the migration."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        mine = curve[0].fingerprint if curve else "none"
        return (
            f"the destination {uri} refused this node's key ({mine}...; status {value}): "
            "put this node's .key file in the destination's --allow directory (then SIGHUP it)"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if curve is None:
            return f"the destination {uri} requires keys: give --key and --peer-key"
        return f"the destination {uri} runs without keys: drop --key/--peer-key, or give it --key and --allow"
    if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL) and curve:
        return (
            f"the CURVE handshake with {uri} failed (event {event}, value {value}): "
            "is --peer-key the destination's own public key?"
        )
    return None


class SocketSlot:
    """A poller's entry for an outgoing migration's connection, which a reconnect replaces:
    both daemons' loops keep it current with `track` and ask it whether the socket is ready."""

    def __init__(self, poller: zmq.Poller) -> None:
        self.poller = poller
        self.registered: zmq.Socket[bytes] | None = None

    def track(self, outgoing: OutgoingMigration | None) -> None:
        sock = outgoing.socket if outgoing is not None else None
        if sock is self.registered:
            return
        if self.registered is not None:
            self.poller.unregister(self.registered)
        if sock is not None:
            self.poller.register(sock, zmq.POLLIN)
        self.registered = sock

    def want_writable(self, writable: bool) -> None:
        if self.registered is not None:
            self.poller.modify(self.registered, zmq.POLLIN | (zmq.POLLOUT if writable else 0))

    def service(self, outgoing: OutgoingMigration | None, events: dict[Any, int]) -> bool:
        """Read or write what the poll found; True if the socket was ready."""
        if outgoing is None or self.registered is None or self.registered not in events:
            return False
        if events[self.registered] & zmq.POLLIN:
            outgoing.drain()
        else:
            outgoing.flush()
        return True
