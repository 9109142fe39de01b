"""How the destination reads its socket: fairly, the session's own source first, and never more
of a message than the wire admits."""

from __future__ import annotations

import time

import zmq

from common.constants import (
    DRAIN_BUDGET_MESSAGES,
    MAX_FRAMES_PER_MESSAGE,
    READS_PER_TURN,
    STRANGER_MESSAGES_PER_TURN,
)
from common.protocol.dest import DestSession
from common.wire import mte_migration_pb2 as pb
from dest_node.refusals import RefusalLog


def peer_key(frame: zmq.Frame) -> bytes:
    """The public key the connection proved (the ZAP handler's user id); empty without keys."""
    try:
        return frame.get("User-Id").encode()
    except zmq.ZMQError:
        return b""


def drain(sock: zmq.Socket[bytes], session: DestSession, refusals: RefusalLog, *, keyed: bool) -> None:
    """Take what arrived, the session's own source first. ZeroMQ hands over messages one
    connection at a time in turn; once a session exists, only a few of each turn's messages
    from anyone else are read (the rest are dropped unread and counted), and the turn ends
    after its budget of the source's own: a flood from any number of connections costs
    the migration reads, never its turns. Before any session, everyone is a stranger and
    up to READS_PER_TURN are read (a source's hello may be among them). A budget per turn
    also lets a postcopy vCPU run soon after its page lands. `keyed`: CURVE keys are in use,
    so each message carries the key its connection proved (without keys there is none to ask)."""
    session_id = session.session_id
    guarded = bool(session_id)
    own_taken = strangers = 0
    for _ in range(READS_PER_TURN):
        received = receive_one(sock)
        if received is None:
            return
        peer, frames = received
        own = guarded and peer.startswith(session_id)
        if not own:
            strangers += 1
            if guarded and strangers > STRANGER_MESSAGES_PER_TURN:
                refusals.dropped()
                continue
        now = time.monotonic()
        if len(frames) > MAX_FRAMES_PER_MESSAGE:
            session.refuse(
                peer, pb.ERROR_BAD_MESSAGE, f"a message of more than {MAX_FRAMES_PER_MESSAGE} frames", now
            )
        elif frames:
            session.receive(
                peer, [f.buffer for f in frames], now, peer_key=peer_key(frames[0]) if keyed else b""
            )
        if own:
            own_taken += 1
            if own_taken >= DRAIN_BUDGET_MESSAGES:
                return


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
