"""The source's urgent connection in postcopy, served by a thread of its own.

The daemon's loop encodes the background stream a batch at a time; a page request read by that
loop waits for the batch in hand (measured: up to 2.7 ms). This thread blocks on the urgent
connection alone, so a request that comes on it is answered as soon as the thread holds the
interpreter (within a switch interval, which `URGENT_SWITCH_INTERVAL_S` keeps short) and the
answer leaves on the same connection, ahead of everything on the main one.

The thread owns its socket from creation to close (a ZeroMQ socket belongs to one thread). The
loop talks to it through two queues: answers it encoded itself (to requests that came on the
sequenced connection) go out here, and the pages this thread answered come back so that the
session's background stream skips them and its cap counts them.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections import deque
from collections.abc import Callable

import zmq

from common.constants import URGENT_SWITCH_INTERVAL_S
from common.protocol.urgent import Answered, UrgentAnswerer
from common.wire.framing import Buffer

_names = itertools.count(1)
_switching = {"servers": 0, "interval": 0.0}
_switching_lock = threading.Lock()
_READS_PER_WAKE = 64  # then the loop's own answers get their turn


class UrgentServer:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        open_socket: Callable[[], zmq.Socket[bytes]],
        answerer: UrgentAnswerer,
    ) -> None:
        """`open_socket` is called in the thread: the connection is made and used there only."""
        self.answerer = answerer
        self._open_socket = open_socket
        self._outbox: deque[list[Buffer]] = deque()
        self._answered: deque[Answered] = deque()
        self._stopping = False
        self.error: str | None = None
        address = f"inproc://urgent-{next(_names)}"
        self._wake = ctx.socket(zmq.PAIR)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.bind(address)
        self._woken = ctx.socket(zmq.PAIR)  # the thread's end, used only there once started
        self._woken.setsockopt(zmq.LINGER, 0)
        self._woken.connect(address)
        _short_switches(+1)
        self._thread = threading.Thread(target=self._run, name="urgent", daemon=True)
        self._thread.start()

    # -- the loop's side ----------------------------------------------------------------------
    def send(self, frames: list[Buffer]) -> None:
        """An answer the loop encoded: out on this connection, after whatever this thread holds."""
        self._outbox.append(frames)
        self._poke()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def take_answered(self) -> list[Answered]:
        out = []
        while self._answered:
            out.append(self._answered.popleft())
        return out

    def stop(self) -> None:
        """Closed and joined: no page is read from guest memory after this returns."""
        self._stopping = True
        self._poke()
        self._thread.join()
        self._wake.close(linger=0)
        _short_switches(-1)

    def _poke(self) -> None:
        try:
            self._wake.send(b"", flags=zmq.NOBLOCK)
        except zmq.Again:
            return  # full: a wake-up is pending already

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        sock: zmq.Socket[bytes] | None = None
        try:
            sock = self._open_socket()
            sock.send_multipart(self.answerer.ready(), flags=zmq.NOBLOCK)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._woken, zmq.POLLIN)
            while not self._stopping:
                events = dict(poller.poll())
                if sock in events:
                    self._answer(sock)
                if self._woken in events:
                    while self._woken.poll(0):
                        self._woken.recv()
                self._send_outbox(sock)
        except Exception as exc:  # whatever it was, the loop hears of it and opens another
            self.error = f"urgent connection: {exc!r}"
        finally:
            if sock is not None:
                sock.close(linger=0)
            self._woken.close(linger=0)

    def _answer(self, sock: zmq.Socket[bytes]) -> None:
        for _ in range(_READS_PER_WAKE):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            answer = self.answerer.answer([f.buffer for f in frames])
            if answer is None:
                continue
            out, answered = answer
            if _send(sock, out):  # unsent, it is asked for again: the background must not skip it
                self._answered.append(answered)

    def _send_outbox(self, sock: zmq.Socket[bytes]) -> None:
        while self._outbox:
            _send(sock, self._outbox.popleft())


def _send(sock: zmq.Socket[bytes], frames: list[Buffer]) -> bool:
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=True)
    except zmq.Again:
        return False  # the destination asks again for what it does not get
    return True


def _short_switches(change: int) -> None:
    """A short switch interval while any urgent thread runs; the interpreter's own otherwise
    (other threads, such as parallel channels' encoders, switch at the usual pace)."""
    with _switching_lock:
        if _switching["servers"] == 0 and change > 0:
            _switching["interval"] = sys.getswitchinterval()
            sys.setswitchinterval(min(URGENT_SWITCH_INTERVAL_S, _switching["interval"]))
        _switching["servers"] += change
        if _switching["servers"] == 0:
            sys.setswitchinterval(_switching["interval"])
