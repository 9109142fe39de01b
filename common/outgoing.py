"""One outgoing migration of a running guest: its SourceSession and the connection under it.

Both daemons use it: source-node for the guest it booted, dest-node to send a guest it received
onward (so two dest-nodes can pass a guest back and forth, as QEMU instances do). The session
decides; this moves bytes, opens a new connection when the session asks for one (a reconnect),
and logs what the session reports.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from common.constants import (
    CLOSE_LINGER_MS,
    MAX_FRAME_BYTES,
    URGENT_MAX_MESSAGE_BYTES,
    URGENT_RESTART_S,
)
from common.control import ControlError
from common.endpoints import check_endpoint, same_endpoint
from common.guest.guest import Guest
from common.keys import KeyPair, curve_client
from common.protocol import events as ev
from common.protocol.params import MigrationParameters
from common.protocol.reports import take_sample
from common.protocol.source import Outbound, SourceHost, SourceSession
from common.protocol.urgent import routing_id, urgent_routing_id
from common.urgent_server import UrgentServer
from common.wire.framing import Buffer


def io_threads(channels: int) -> int:
    """libzmq I/O threads for a context that carries `channels` connections of one migration:
    each connection's TCP work is bound to one I/O thread, so parallel channels want their own,
    as many as there are cores for them."""
    return max(1, min(channels, os.cpu_count() or 1))


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
        own_endpoints: tuple[str, ...] = (),
        on_event: Callable[[bytes, ev.Event], None] | None = None,
    ) -> None:
        """`curve`: this node's key pair and the destination's public key; every connection
        of the migration (data, urgent, each reconnect) then proves both. `on_event`: told
        each of the session's events with its session id (`ctl events`)."""
        try:
            check_endpoint(uri, "destination")
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        for own in own_endpoints:
            if same_endpoint(uri, own):
                # it would wait on itself for an answer that never comes
                raise ControlError(
                    f"{uri} is this node's own endpoint ({own}): give the destination's --listen address"
                )
        self.ctx = ctx
        self.uri = uri
        self.on_event = on_event
        self.curve = curve
        self.monitor: zmq.Socket[bytes] | None = None
        self._failed_handshakes = 0
        self._handshakes_ok = 0
        self.log = log
        self.socket: zmq.Socket[bytes] | None = None
        # parallel channels past the first, once the destination granted them: page and tag
        # batches only, each connection with its own queue (and libzmq I/O thread)
        self.lanes: list[Lane] = []
        self._lanes_failed = False  # could not open them: batches keep to the first connection
        self._main_sent: deque[int] = deque()  # batches sent on the first connection
        self._next_lane = 0
        self._pool = ThreadPoolExecutor(params.channels, "encode") if params.channels > 1 else None
        # postcopy requests and answers: a connection and a thread of their own, so that they
        # never wait behind the background stream in the loop, ZeroMQ's pipe or TCP's buffers
        # (QEMU's postcopy-preempt channel)
        self.urgent: UrgentServer | None = None
        self._urgent_restart_at = 0.0
        self.pending: deque[list[Buffer]] = deque()
        self.finished: ev.Finished | None = None
        now = time.monotonic()
        self.session = SourceSession(
            guest,
            host,
            params,
            now,
            node_name=node_name,
            encode_map=self._pool.map if self._pool is not None else map,
        )
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
        """A fresh connection for this epoch (see `_routing`)."""
        try:
            # the one connection the destination answers on: its messages are bounded
            sock = self._dealer(self._routing(epoch), self._stream_hwm(), max_message=MAX_FRAME_BYTES)
        except zmq.ZMQError as exc:
            raise ControlError(f"cannot connect to {self.uri}: {exc}") from None
        if self.socket is not None:
            self._close_monitor()
            self.socket.close(linger=0)
        self.socket = sock
        # a refused handshake is silent on the wire: only the socket's monitor hears of it
        self.monitor = sock.get_monitor_socket(HANDSHAKE_FAILURES)
        self._stop_urgent()  # opened again for this epoch by the next flush
        self._close_lanes()  # opened again for this epoch before the next batch goes out
        # what waited for the old connection is either resent by the session or not needed
        self.pending.clear()

    def retarget(self, uri: str) -> None:
        """The destination moved (ctl recover URI): this epoch's connection is opened again there,
        since a socket would go on reconnecting to the address it was made for."""
        self.uri = uri
        self._connect(self.session.link.epoch)

    def _open_lanes(self) -> None:
        """The parallel channels the destination granted, for this epoch: the session's routing
        id with b"D" and the channel's number, so the destination knows them as its source's."""
        routing = self._routing(self.session.link.epoch) + b"D"
        try:
            for number in range(1, self.session.channels):
                self.lanes.append(Lane(self._dealer(routing + bytes([number]), self._stream_hwm())))
        except zmq.ZMQError as exc:
            self._close_lanes()
            self._lanes_failed = True
            self.log.error("cannot open parallel channels; batches keep to one connection", reason=str(exc))

    def _close_lanes(self) -> None:
        for lane in self.lanes:
            lane.socket.close(linger=0)
        self.lanes = []
        self._main_sent.clear()

    def _start_urgent(self) -> None:
        session = self.session
        routing = urgent_routing_id(session.session_id, session.link.epoch)
        answerer = session.postcopy_side.urgent_answerer()
        # what comes on it is a request (under 20 KiB) or a refusal
        self.urgent = UrgentServer(
            self.ctx, lambda: self._dealer(routing, 256, max_message=URGENT_MAX_MESSAGE_BYTES), answerer
        )

    def _stop_urgent(self) -> None:
        if self.urgent is not None:
            self.urgent.stop()
            self.urgent = None

    def _routing(self, epoch: int) -> bytes:
        return routing_id(self.session.session_id, epoch)

    def _stream_hwm(self) -> int:
        return 4 * self.session.params.window + 64

    def _dealer(self, routing: bytes, send_hwm: int, max_message: int = -1) -> zmq.Socket[bytes]:
        """A connection to the destination, keyed when this migration has keys; closed again
        if it cannot be made (the ZMQError goes to the caller)."""
        sock = self.ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, routing)
            # No ZMQ_IMMEDIATE: with it libzmq drops a disconnected peer's unread messages at once.
            sock.setsockopt(zmq.SNDHWM, send_hwm)
            sock.setsockopt(zmq.MAXMSGSIZE, max_message)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            self._secure(sock)
            sock.connect(self.uri)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        return sock

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
        self._stop_urgent()
        self._close_lanes()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def sockets(self) -> list[tuple[zmq.Socket[bytes], bool, bool]]:
        """Each connection with what the loop polls it for: (socket, read, write)."""
        out = [(lane.socket, False, bool(lane.pending)) for lane in self.lanes]
        if self.socket is not None:
            out.insert(0, (self.socket, True, bool(self.pending)))
        return out

    # -- driving the session -----------------------------------------------------------------------
    def poll(self, now: float) -> float:
        """Let the session act on time; returns how long the loop may sleep."""
        session = self.session
        if session.phase.ended:
            return 3600.0
        self.check_handshake(now)
        session.poll(now)
        self.after_call()
        take_sample(session, now)
        return max(0.0, session.next_deadline(now) - now)

    def after_call(self) -> None:
        self._take_events()
        self.flush()

    def flush(self) -> None:
        """Send what the session produced, batches spread over the parallel channels."""
        self._serve_urgent()
        outgoing = self.session.take_outgoing()
        if self.session.phase.ended:
            self._close_lanes()  # a recovery (postcopy) opens them again
        elif (
            self.session.channels > 1
            and not self.lanes
            and not self._lanes_failed
            and self.socket is not None
        ):
            self._open_lanes()
        for message in outgoing:
            self._queue(message)
        if self.socket is not None:
            _send_queued(self.socket, self.pending)
        for lane in self.lanes:
            _send_queued(lane.socket, lane.pending)

    def _serve_urgent(self) -> None:
        """In postcopy, the urgent connection's thread runs ahead of the first request; what it
        answered is the session's news, and what the session answered goes out on it."""
        session = self.session
        now = time.monotonic()
        if self.urgent is not None:
            for answered in self.urgent.take_answered():
                session.postcopy_side.answered(answered, now)
            if not self.urgent.alive:
                # it stopped on an error of its own: another takes over, not at once (a failing
                # one is not reopened in a loop); what it held unsent is asked for again
                self.log.error("postcopy urgent connection failed; opening another", reason=self.urgent.error)
                self._stop_urgent()
                self._urgent_restart_at = now + URGENT_RESTART_S
        if session.postcopy is None or session.phase.ended:
            self._stop_urgent()  # it reads guest memory, which may run again here
        elif self.urgent is None and self.socket is not None and now >= self._urgent_restart_at:
            self._start_urgent()
        urgent = session.take_urgent()
        if self.urgent is None:
            return  # between connections: the destination asks again
        for frames in urgent:
            self.urgent.send(frames)

    def _queue(self, message: Outbound) -> None:
        """A batch goes to the channel with the fewest batches queued or unacknowledged, taken
        in turn among equals: a stalled channel (a reset, a reconnect backing off) holds its
        batches unacknowledged and is passed over, resends included. Everything else keeps to
        the first connection, in order."""
        if not message.bulk or not self.lanes:
            self.pending.append(message.frames)
            return
        acked = self.session.link.peer_received
        lanes = [(self.pending, self._main_sent), *((lane.pending, lane.sent) for lane in self.lanes)]
        chosen = least_loaded(
            [len(pending) + unacknowledged(sent, acked) for pending, sent in lanes], self._next_lane
        )
        self._next_lane = (chosen + 1) % len(lanes)
        pending, sent = lanes[chosen]
        pending.append(message.frames)
        sent.append(message.seq)

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
            if self.on_event is not None:
                self.on_event(session.session_id, event)
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
                now = time.monotonic()
                take_sample(session, now, due_only=False)
                report = session.report(now)
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


class Lane:
    """A parallel channel: its connection, what waits to go out on it, and the batches it
    carried that the destination may not have yet."""

    def __init__(self, socket: zmq.Socket[bytes]) -> None:
        self.socket = socket
        self.pending: deque[list[Buffer]] = deque()
        self.sent: deque[int] = deque()


def least_loaded(loads: list[int], turn: int) -> int:
    """The channel with the least load; among equals the first from `turn` on."""
    return min(range(len(loads)), key=lambda i: (loads[i], (i - turn) % len(loads)))


def unacknowledged(sent: deque[int], acked: int) -> int:
    """How many of a channel's batches are past what the destination acknowledged (dropping
    the rest; a resend may be numbered below a later batch, so not only from the left)."""
    if sent and min(sent) <= acked:
        kept = [seq for seq in sent if seq > acked]
        sent.clear()
        sent.extend(kept)
    return len(sent)


def _send_queued(sock: zmq.Socket[bytes], pending: deque[list[Buffer]]) -> None:
    """As much of the queue as the socket takes now. Payloads go without a copy: each is its
    message's own (page batches are copied out of guest memory as they are hashed), or guest
    memory that nothing writes until it has left (encode_ram_pages' `borrow`)."""
    while pending:
        try:
            sock.send_multipart(pending[0], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        pending.popleft()


class SocketSlot:
    """A poller's entries for an outgoing migration's connections, which a reconnect replaces:
    both daemons' loops keep them current with `track` and ask whether one was ready."""

    def __init__(self, poller: zmq.Poller) -> None:
        self.poller = poller
        self.registered: dict[zmq.Socket[bytes], int] = {}
        self.reading: zmq.Socket[bytes] | None = None

    def track(self, outgoing: OutgoingMigration | None) -> None:
        """Poll each connection for reading (the first) and for writing (any with a queue)."""
        wanted: dict[zmq.Socket[bytes], int] = {}
        self.reading = None
        if outgoing is not None:
            for sock, read, write in outgoing.sockets():
                wanted[sock] = (zmq.POLLIN if read else 0) | (zmq.POLLOUT if write else 0)
                if read:
                    self.reading = sock
        for sock in [s for s in self.registered if wanted.get(s, 0) == 0]:
            self.poller.unregister(sock)
            del self.registered[sock]
        for sock, flags in wanted.items():
            if flags and self.registered.get(sock) != flags:
                if sock in self.registered:
                    self.poller.modify(sock, flags)
                else:
                    self.poller.register(sock, flags)
                self.registered[sock] = flags

    def service(self, outgoing: OutgoingMigration | None, events: dict[Any, int]) -> bool:
        """Read or write what the poll found; True if a connection was ready."""
        if outgoing is None or not any(sock in events for sock in self.registered):
            return False
        if self.reading is not None and events.get(self.reading, 0) & zmq.POLLIN:
            outgoing.drain()
        else:
            outgoing.flush()
        return True
