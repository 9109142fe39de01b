"""One side's view of a session's link: numbering, acknowledgement, resending and epochs.

Pure: messages and the time in, decisions out. Both sessions hold one, for the direction they
send in and the one they receive from.

- Every sequenced message (seq >= 1) is kept until the peer acknowledges it, and is delivered
  to the receiver once and in order. A message that arrives ahead of the next expected one (its
  predecessor was lost or corrupted) is not delivered: the receiver asks for everything from
  the missing one on (go-back-N; over one TCP connection, loss is rare and comes in runs).
- Every message carries the highest number its sender received in order, so acknowledgement
  rides on traffic either way; Ack messages add flow control.
- An unacknowledged message is sent again when the peer asks, when nothing was acknowledged
  for a retransmission timeout, and after a reconnect (a resume).
- Each connection of a session has an epoch; messages of an older epoch are stale and ignored.
- Over parallel channels, messages arrive out of order as a matter of course: the receiver holds
  those ahead of their turn (up to the window) and delivers them when their turn comes. Only a
  gap that persists, or a full hold, is taken for a loss.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from common.constants import MAX_FRAME_BYTES
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.framing import Buffer

# Unsequenced kinds: liveness and link control, never acknowledged or resent themselves.
UNSEQUENCED = frozenset({"ack", "heartbeat", "resume", "resume_ack"})


class Arrival(Enum):
    NEXT = "next"  # the one expected: handle it
    REPEAT = "repeat"  # already handled: ignore it (resends are idempotent)
    AHEAD = "ahead"  # something before it was lost: ask for a resend, do not handle it


@dataclass
class Unacked:
    """A sent message the peer has not confirmed. Control messages keep their body; data
    messages keep what they carried (kind and page indices) and are encoded again from the
    guest's current memory when resent, so a resend never carries a stale checksum. Either is
    framed again under its own number with the current epoch."""

    seq: int
    kind: str
    size: int
    body: Any = None
    data: Any = None
    t_sent: float = 0.0  # first sent (a resend keeps it)


@dataclass
class LinkStats:
    resent: int = 0  # messages sent again
    resend_requests: int = 0  # times we asked the peer to send again
    corrupt: int = 0  # messages from the peer dropped as corrupt
    out_of_order: int = 0  # messages from the peer that arrived ahead of a lost one
    reordered: int = 0  # messages that overtook another channel's and waited for their turn
    resumes: int = 0  # reconnects that carried the session on


class Link:
    def __init__(self, session_id: bytes, now: float, *, rto_s: float) -> None:
        self.session_id = session_id
        self.epoch = 1
        self.rto_s = rto_s
        self.next_seq = 1
        self.received = 0  # every peer message up to this one was delivered
        self.peer_received = 0  # the peer holds every message of ours up to this one
        self.unacked: deque[Unacked] = deque()
        self.t_last_heard = now
        self.t_last_sent = now
        self.t_progress = now  # the last time the peer acknowledged something new
        # What we had received when we last asked for a resend, and when: a run of losses asks once
        self._asked_after = -1
        self._t_asked = 0.0
        self.stats = LinkStats()

    # -- sending --------------------------------------------------------------------------
    def envelope(self, seq: int, **body: Any) -> pb.Envelope:
        env = framing.envelope(self.session_id, seq, **body)
        env.received = self.received
        env.epoch = self.epoch
        return env

    def sequenced(self, now: float, payload: Buffer = b"", data: Any = None, **body: Any) -> list[Buffer]:
        """Frames for a new sequenced message, kept until the peer acknowledges it."""
        seq = self.next_seq
        self.next_seq += 1
        frames = framing.encode(self.envelope(seq, **body), payload)
        size = sum(len(f) for f in frames)
        if not self.unacked:
            self.t_progress = now  # the retransmission clock starts with the first unacked
        ((kind, message),) = body.items()
        self.unacked.append(Unacked(seq, kind, size, None if data is not None else message, data, now))
        self.t_last_sent = now
        return frames

    def unsequenced(self, now: float, **body: Any) -> list[Buffer]:
        self.t_last_sent = now
        return framing.encode(self.envelope(0, **body))

    def again(self, entry: Unacked, payload: Buffer = b"", body: Any = None) -> list[Buffer]:
        """A message framed again under its own number, with this epoch and what we received
        so far; a data message passes its freshly encoded body and payload."""
        return framing.encode(self.envelope(entry.seq, **{entry.kind: body or entry.body}), payload)

    # -- receiving ------------------------------------------------------------------------
    def heard(self, env: pb.Envelope, now: float) -> list[Unacked]:
        """A valid message of this session and epoch arrived: note it, and release what it
        acknowledges. Returns the released messages (their sizes measure bandwidth)."""
        self.t_last_heard = now
        return self.acknowledged(env.received, now)

    def acknowledged(self, upto: int, now: float) -> list[Unacked]:
        if upto >= self.next_seq:
            raise ValueError(f"acknowledged message {upto}, never sent")
        released: list[Unacked] = []
        while self.unacked and self.unacked[0].seq <= upto:
            released.append(self.unacked.popleft())
        if upto > self.peer_received:
            self.peer_received = upto
            self.t_progress = now
        return released

    def arrive(self, seq: int) -> Arrival:
        if seq <= self.received:
            return Arrival.REPEAT
        if seq != self.received + 1:
            return Arrival.AHEAD  # the caller counts it: held for its turn, or a loss
        self.received = seq
        return Arrival.NEXT

    def retract(self, seq: int) -> None:
        """The message that just arrived turned out damaged: it was not delivered after all."""
        if seq == self.received:
            self.received = seq - 1

    def stale(self, env: pb.Envelope) -> bool:
        return env.epoch < self.epoch

    def should_ask_resend(self, now: float) -> bool:
        """After a loss, ask once for everything from the missing message on; ask again only
        if a retransmission timeout passes without it."""
        if self._asked_after == self.received and now - self._t_asked < self.rto_s:
            return False
        self._asked_after = self.received
        self._t_asked = now
        self.stats.resend_requests += 1
        return True

    # -- resending --------------------------------------------------------------------------
    def to_resend(self, after: int) -> list[Unacked]:
        """Everything unacknowledged past `after`, oldest first (go-back-N)."""
        entries = [e for e in self.unacked if e.seq > after]
        self.stats.resent += len(entries)
        return entries

    def retransmit_at(self) -> float | None:
        """When what is unacknowledged is due to be sent again (None: nothing is)."""
        return self.t_progress + self.rto_s if self.unacked else None

    def restart_retransmit_clock(self, now: float) -> None:
        self.t_progress = now

    def new_epoch(self) -> int:
        self.epoch += 1
        self.stats.resumes += 1
        return self.epoch

    def data_in_flight(self) -> int:
        return sum(1 for e in self.unacked if e.data is not None)

    def silence(self, now: float) -> float:
        return now - self.t_last_heard


class Reorder:
    """Messages that arrived ahead of their turn over parallel channels, held until it comes.
    Bounded: a sender never has more than its window of batches in flight, so a hold full of
    batches means a loss. The control messages behind them (an end of round, the vCPU state,
    a postcopy manifest) have a looser bound of their own: they are few, but not counted by
    the window. Bytes are bounded too, whatever the kinds: what a peer can make us hold is at
    most a window of the largest messages the wire admits."""

    def __init__(self, limit: int, max_bytes: int | None = None) -> None:
        self.limit = limit
        self.control_limit = 4 * limit + 64
        self.max_bytes = (limit + 1) * MAX_FRAME_BYTES if max_bytes is None else max_bytes
        self.held: dict[int, tuple[Any, bool, int]] = {}
        self.batches = 0
        self.bytes = 0
        self.t_gap: float | None = None  # since when a message ahead waits for a missing one

    def hold(self, seq: int, item: Any, now: float, *, batch: bool, size: int = 0) -> bool:
        """Keep `item` for its turn; False when its kind's share of the hold, or the bytes
        held, would pass their bound (ask for a resend instead)."""
        if seq in self.held:
            # A resent copy replaces the first, and is counted as what it is now: a peer that
            # sends one number as a control message and then as a batch changes no count.
            self._pop(seq)
        if batch and self.batches >= self.limit:
            return False
        if not batch and len(self.held) - self.batches >= self.control_limit:
            return False
        if self.bytes + size > self.max_bytes:
            return False
        self.held[seq] = (item, batch, size)
        self.batches += batch
        self.bytes += size
        if self.t_gap is None:
            self.t_gap = now
        return True

    def _pop(self, seq: int) -> Any:
        item, batch, size = self.held.pop(seq)
        self.batches -= batch
        self.bytes -= size
        return item

    def take(self, seq: int, now: float) -> Any:
        """The held message numbered `seq`, if it is here; the gap clock restarts on it."""
        if seq not in self.held:
            return None
        item = self._pop(seq)
        self.t_gap = now if self.held else None
        return item

    def waited(self, now: float) -> float:
        """How long the oldest unbroken wait for a missing message has lasted."""
        return 0.0 if self.t_gap is None else now - self.t_gap

    def restart(self, now: float) -> None:
        """A resend was asked for: wait for it afresh."""
        if self.t_gap is not None:
            self.t_gap = now

    def drop_upto(self, seq: int) -> None:
        """Forget what was delivered meanwhile (a resend overtook the held copy)."""
        for old in [s for s in self.held if s <= seq]:
            self._pop(old)
        if not self.held:
            self.t_gap = None

    def clear(self) -> None:
        self.held.clear()
        self.batches = 0
        self.bytes = 0
        self.t_gap = None


@dataclass
class Reconnector:
    """When a broken link's next Resume goes out: at once, then backing off from the first
    interval to the cap (RECONNECT_BACKOFF_S), until an answer restores the link."""

    first: float
    cap: float
    since: float | None = None  # None: connected
    next_at: float = 0.0
    attempts: int = 0

    @property
    def connected(self) -> bool:
        return self.since is None

    def broken(self, now: float) -> None:
        self.since = now
        self.attempts = 0
        self.next_at = now

    def resume_due(self, now: float) -> bool:
        """True when a Resume should go out now (and schedules the next one)."""
        if self.connected or now < self.next_at:
            return False
        self.next_at = now + min(self.cap, self.first * 2**self.attempts)
        self.attempts += 1
        return True

    def restored(self) -> None:
        self.since = None
