"""A fault-injecting TCP proxy for ZeroMQ links, on loopback.

Place it between a source and a destination (`--migrate-to` the proxy's address) and steer it
while a migration runs: delay and jitter, a rate cap, stalls, connection resets, a cut for good,
and corrupted bytes. It reads the ZMTP 3 framing as it forwards (greeting, then frames of a
flags byte, a 1- or 8-byte size and a body), so that corruption lands inside a message's body,
where ZeroMQ delivers it and the migration's own checksum must catch it, rather than in the
framing, where ZeroMQ would just drop the connection. It also decodes the header frame of each
message the source sends, so faults can fire at milestones: bytes sent, round N, the
switchover, the verification request.

Seeded (one `random.Random`), one thread, bounded: it stops with `close()` or its context.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from common.wire import framing

GREETING_BYTES = 64
CHUNK = 64 << 10  # corruption chances are per 64 KiB of message bytes
_FLAG_MORE = 0x01
_FLAG_LONG = 0x02
_FLAG_COMMAND = 0x04


@dataclass
class Milestones:
    """What the source has sent through the proxy so far (the downstream direction)."""

    bytes_down: int = 0
    bytes_up: int = 0
    messages_down: int = 0
    round: int = 0  # the last end-of-round seen
    switchover: bool = False  # the final end-of-round passed
    verify_requests: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


class _ZmtpStream:
    """Parses one direction of a ZMTP connection as bytes pass; may flip a byte in a body."""

    def __init__(self, proxy: FaultProxy, downstream: bool) -> None:
        self.proxy = proxy
        self.downstream = downstream
        self.greeting_left = GREETING_BYTES
        self.header: bytearray = bytearray()  # flags + size bytes of the frame being read
        self.body_left = 0
        self.command = False
        self.first_frame = True  # the next message frame starts a message
        self.in_first = False
        self.first_body = bytearray()
        self.corrupt_at: list[int] = []  # offsets in the current body to flip, ascending
        self.body_seen = 0

    def feed(self, data: bytes) -> bytes:
        out = bytearray(data)
        i = 0
        n = len(out)
        while i < n:
            if self.greeting_left:
                take = min(self.greeting_left, n - i)
                self.greeting_left -= take
                i += take
                continue
            if self.body_left == 0:
                self.header.append(out[i])
                i += 1
                flags = self.header[0]
                need = 1 + (8 if flags & _FLAG_LONG else 1)
                if len(self.header) < need:
                    continue
                size = (
                    struct.unpack(">Q", bytes(self.header[1:9]))[0] if flags & _FLAG_LONG else self.header[1]
                )
                self.command = bool(flags & _FLAG_COMMAND)
                more = bool(flags & _FLAG_MORE)
                self.header.clear()
                self._frame_start(size, more)
                if size == 0:
                    self._frame_end()
                continue
            take = min(self.body_left, n - i)
            while self.corrupt_at and self.corrupt_at[0] < self.body_seen + take:
                out[i + self.corrupt_at.pop(0) - self.body_seen] ^= 1 << self.proxy.rng.randrange(8)
                self.proxy._corrupted += 1
            if self.in_first and len(self.first_body) < 65536:
                self.first_body += out[i : i + take]
            self.body_seen += take
            self.body_left -= take
            i += take
            if self.body_left == 0:
                self._frame_end()
        return bytes(out)

    def _frame_start(self, size: int, more: bool) -> None:
        self.body_left = size
        self.body_seen = 0
        self._more = more
        self.in_first = not self.command and self.first_frame
        self.first_body = bytearray()
        hit = not self.command or (self.proxy.corrupt_commands and size > 1024)
        self.corrupt_at = self.proxy._corruption_offsets(self.downstream, size) if hit else []

    def _frame_end(self) -> None:
        if self.command:
            return
        if self.in_first and self.downstream:
            self.proxy._saw_message(bytes(self.first_body))
        self.in_first = False
        self.first_frame = not self._more


class _Connection:
    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.down = _ZmtpStream(proxy, downstream=True)
        self.up = _ZmtpStream(proxy, downstream=False)
        # bytes waiting to be written, with the time they may leave
        self.to_upstream: deque[tuple[float, bytes]] = deque()
        self.to_client: deque[tuple[float, bytes]] = deque()
        self.closed = False


class FaultProxy:
    def __init__(
        self,
        target: tuple[str, int],
        *,
        seed: int = 0,
        listen_host: str = "127.0.0.1",
        capture_bytes: int = 0,
    ) -> None:
        """`capture_bytes`: keep up to this many of the bytes the source sends, as a wiretap
        would see them (the tests look for guest memory in them)."""
        self.target = target
        self.capture_limit = capture_bytes
        self.captured = bytearray()
        self.rng = random.Random(seed)
        self.milestones = Milestones()
        self._lock = threading.RLock()  # triggers run under it and call the controls
        self._listener = socket.create_server((listen_host, 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self.uri = f"tcp://{listen_host}:{self.port}"
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._connections: list[_Connection] = []
        self._stop = threading.Event()
        # the faults in force
        self.delay_s = 0.0
        self.jitter_s = 0.0
        self.rate = 0.0  # bytes per second per direction; 0 = unlimited
        self.corrupt_down = 0.0  # chance per 64 KiB chunk of message bytes, source to destination
        self.corrupt_up = 0.0
        # CURVE carries every message inside a command: corrupt those too (the large ones, past
        # the handshake's), where libzmq's decryption, not the migration's checksum, notices
        self.corrupt_commands = False
        self._stalled_until = 0.0
        self._cut = False
        self._next_free = {True: 0.0, False: 0.0}
        self._triggers: list[tuple[Callable[[Milestones], bool], Callable[[], None]]] = []
        self._corrupted = 0
        self.resets = 0
        self.log: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- control, from any thread --------------------------------------------------------------
    @property
    def corrupted(self) -> int:
        return self._corrupted

    def stall(self, seconds: float) -> None:
        """Forward nothing either way for a while (connections stay up; new ones wait)."""
        with self._lock:
            self._stalled_until = time.monotonic() + seconds
            self._note(f"stall {seconds:.1f} s")

    def reset(self) -> None:
        """Reset every connection (RST both ways); new connections are accepted as before."""
        with self._lock:
            self._note("reset")
            self.resets += 1
            for conn in self._connections:
                self._abort(conn)

    def cut(self) -> None:
        """Cut for good: reset everything and refuse every new connection."""
        with self._lock:
            self._note("cut")
            self._cut = True
            for conn in self._connections:
                self._abort(conn)

    def restore(self) -> None:
        """After a cut: accept new connections again (the old ones stay gone)."""
        with self._lock:
            self._note("restore")
            self._cut = False

    def when(self, condition: Callable[[Milestones], bool], action: Callable[[], None]) -> None:
        """Fire action once, in the proxy's thread, the first time condition holds."""
        with self._lock:
            self._triggers.append((condition, action))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._connections:
            self._abort(conn)
        self._listener.close()
        self._selector.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the proxy's thread ---------------------------------------------------------------------
    def _note(self, what: str) -> None:
        self.log.append((time.monotonic(), what))

    def _corruption_offsets(self, downstream: bool, size: int) -> list[int]:
        """Where to flip a bit in a message frame of this size: each CHUNK of it is hit with
        the chance in force (a small frame counts as one chunk)."""
        chance = self.corrupt_down if downstream else self.corrupt_up
        if chance <= 0 or size == 0:
            return []
        offsets = []
        for start in range(0, size, CHUNK):
            if self.rng.random() < chance:
                offsets.append(start + self.rng.randrange(min(CHUNK, size - start)))
        return offsets

    def _saw_message(self, header_frame: bytes) -> None:
        m = self.milestones
        m.messages_down += 1
        try:
            message = framing.decode([header_frame])
        except framing.WireError:
            return  # a corrupted header, or one whose payload frame follows: not a milestone
        kind = message.kind
        m.kinds[kind] = m.kinds.get(kind, 0) + 1
        if kind == "end_of_round":
            if message.envelope.end_of_round.final:
                m.switchover = True
            else:
                m.round = max(m.round, message.envelope.end_of_round.round)
        elif kind == "verify_request":
            m.verify_requests += 1

    def _fire_triggers(self) -> None:
        for trigger in list(self._triggers):
            condition, action = trigger
            if condition(self.milestones):
                self._triggers.remove(trigger)
                self._note(f"trigger {getattr(action, '__name__', 'action')}")
                action()

    def _abort(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        for sock in (conn.client, conn.upstream):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._cut:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(self, client, upstream)
        self._connections.append(conn)
        self._selector.register(client, selectors.EVENT_READ, (conn, True))
        self._selector.register(upstream, selectors.EVENT_READ, (conn, False))

    def _release_time(self, downstream: bool, size: int, now: float) -> float:
        at = now + self.delay_s + (self.rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0)
        if self.rate:
            start = max(at, self._next_free[downstream])
            self._next_free[downstream] = start + size / self.rate
            at = self._next_free[downstream]
        return at

    def _read(self, conn: _Connection, downstream: bool, now: float) -> None:
        sock = conn.client if downstream else conn.upstream
        # read only what the queue can take: a stalled or slow link pushes back on the sender
        queue = conn.to_upstream if downstream else conn.to_client
        if sum(len(b) for _, b in queue) > 4 << 20:
            return
        try:
            data = sock.recv(256 << 10)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._abort(conn)
            return
        stream = conn.down if downstream else conn.up
        data = stream.feed(data)
        if downstream:
            self.milestones.bytes_down += len(data)
            room = self.capture_limit - len(self.captured)
            if room > 0:
                self.captured += data[:room]
        else:
            self.milestones.bytes_up += len(data)
        queue.append((self._release_time(downstream, len(data), now), data))

    def _write(self, conn: _Connection, now: float) -> None:
        for queue, sock in ((conn.to_upstream, conn.upstream), (conn.to_client, conn.client)):
            while queue and queue[0][0] <= now and not conn.closed:
                at, data = queue[0]
                try:
                    sent = sock.send(data)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    self._abort(conn)
                    return
                if sent < len(data):
                    queue[0] = (at, data[sent:])
                    break
                queue.popleft()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                stalled = now < self._stalled_until
                self._connections = [c for c in self._connections if not c.closed]
                conns = list(self._connections)
                self._fire_triggers()
            if stalled:
                time.sleep(min(0.01, self._stalled_until - now))
                continue
            try:
                ready = self._selector.select(timeout=0.002)
            except OSError:
                ready = []
            with self._lock:
                for key, _ in ready:
                    if key.data is None:
                        self._accept()
                        continue
                    conn, downstream = key.data
                    if not conn.closed:
                        self._read(conn, downstream, now)
                for conn in conns:
                    self._write(conn, time.monotonic())
