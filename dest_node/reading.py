"""How the destination reads its socket: fairly, the session's own source first, and never more
of a message than the wire admits."""

from __future__ import annotations

import time
from collections import deque

import zmq

from common.constants import (
    DRAIN_BUDGET_MESSAGES,
    MAX_FRAMES_PER_MESSAGE,
    READS_PER_TURN,
    STRANGER_MESSAGES_PER_TURN,
)
from common.protocol.dest import DestSession
from common.protocol.urgent import is_urgent_peer
from common.wire import mte_migration_pb2 as pb
from dest_node.refusals import RefusalLog


def peer_key(frame: zmq.Frame) -> bytes:
    """The public key the connection proved (the ZAP handler's user id); empty without keys."""
    try:
        return frame.get("User-Id").encode()
    except zmq.ZMQError:
        return b""


class Reader:
    """Reads the destination's socket for its session, and holds what it read but has not yet
    handled: everything that arrived is read each turn, so that an answer on the source's urgent
    connection (a page the guest waits for) is placed at once, ahead of background batches that
    came before it; the rest is handled in order, a budget per turn."""

    def __init__(
        self, sock: zmq.Socket[bytes], refusals: RefusalLog, *, keyed: bool, hold: int = READS_PER_TURN
    ) -> None:
        """`keyed`: CURVE keys are in use, so each message carries the key its connection
        proved (without keys there is none to ask). `hold`: the most messages held (past it,
        reading stops and ZeroMQ's queue holds the source back): room for the source's window,
        so that an answer behind it is still read at once."""
        self.hold = hold
        self.sock = sock
        self.refusals = refusals
        self.keyed = keyed
        self.held: deque[tuple[bytes, list[zmq.Frame]]] = deque()

    def drain(self, session: DestSession) -> None:
        """Take what arrived, the session's own source first. ZeroMQ hands over messages one
        connection at a time in turn; once a session exists, only a few of each turn's messages
        from anyone else are read (the rest are dropped unread and counted), and the turn
        handles its budget of the source's own: a flood from any number of connections costs
        the migration reads, never its turns. Before any session, everyone is a stranger and
        up to READS_PER_TURN are read (a source's hello may be among them). A budget per turn
        also lets a postcopy vCPU run soon after its page lands."""
        session_id = session.session_id
        guarded = bool(session_id)
        strangers = 0
        for _ in range(READS_PER_TURN):
            if len(self.held) >= self.hold:
                break  # the rest waits in ZeroMQ's queue, whose bound holds the source back
            received = receive_one(self.sock)
            if received is None:
                break
            peer, frames = received
            if guarded and peer.startswith(session_id):
                if is_urgent_peer(peer, session_id):
                    self._handle(session, peer, frames)
                else:
                    self.held.append((peer, frames))
                continue
            strangers += 1
            if guarded and strangers > STRANGER_MESSAGES_PER_TURN:
                self.refusals.dropped()
                continue
            self._handle(session, peer, frames)
        for _ in range(min(DRAIN_BUDGET_MESSAGES, len(self.held))):
            self._handle(session, *self.held.popleft())

    def forget(self) -> None:
        """A new session: what the last one's source sent is not its business."""
        self.held.clear()

    def _handle(self, session: DestSession, peer: bytes, frames: list[zmq.Frame]) -> None:
        now = time.monotonic()
        if len(frames) > MAX_FRAMES_PER_MESSAGE:
            session.refuse(
                peer, pb.ERROR_BAD_MESSAGE, f"a message of more than {MAX_FRAMES_PER_MESSAGE} frames", now
            )
        elif frames:
            key = peer_key(frames[0]) if self.keyed else b""
            session.receive(peer, [f.buffer for f in frames], now, peer_key=key)


def receive_one(sock: zmq.Socket[bytes]) -> tuple[bytes, list[zmq.Frame]] | None:
    """One message, frame by frame: past MAX_FRAMES_PER_MESSAGE the rest are read and
    dropped, never kept (a message of endless frames must not grow this process)."""
    try:
        routing = sock.recv(flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None
    frames: list[zmq.Frame] = []
    more = routing.more
    while more:
        frame = sock.recv(copy=False)
        more = frame.more
        if len(frames) <= MAX_FRAMES_PER_MESSAGE:
            frames.append(frame)
    return routing.bytes, frames
