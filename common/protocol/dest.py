"""The destination side of a migration as a pure state machine.

It treats the incoming stream as hostile: a hello is checked (version, geometry, features,
token) before any memory is allocated; every message is checked for session, epoch, sequence
and checksum before it is decoded, and decoded batches are range-checked before placement.
Messages from a peer other than the session's source change nothing; they are answered with a
refusal that says why. A lost or corrupted message is asked for again, never a failure.

The guest placed here runs only after the source's digests matched ours and the source
committed the handover; any failure before that discards what arrived. After the commit the
session keeps answering the source (a resume, its repeated commit), so that a source whose
link broke learns that the guest runs here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

import numpy as np

from common.constants import (
    HEARTBEAT_INTERVAL_S,
    INITIAL_CREDIT,
    MAX_RAM_BYTES,
    MAX_SOURCE_WAIT_S,
    PEER_DEAD_AFTER_S,
    REORDER_WAIT_S,
    RETRANSMIT_AFTER_S,
)
from common.guest.digest import DigestCache
from common.guest.guest import Guest
from common.guest.presence import PresenceGate
from common.protocol import events as ev
from common.protocol import front
from common.protocol.dest_admission import DestAdmission, HandedOver
from common.protocol.front import Intake
from common.protocol.link import UNSEQUENCED, Link, Reorder, Unacked
from common.protocol.phases import DEST_FAILURES, DEST_MOVES, DEST_TRIGGERS, DestPhase, Failure, PhaseMachine
from common.protocol.postcopy import DestPostcopy
from common.protocol.postcopy_sides import DestPostcopySide
from common.protocol.precopy_side import DestPrecopySide
from common.protocol.reports import dest_report
from common.protocol.stats import TransferStats
from common.protocol.timers import Timer, next_deadline, run_due
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.framing import Buffer, WireError

_D = DestPhase
_LIVE = (_D.RECEIVING, _D.AWAIT_COMMIT, _D.POSTCOPY)


class DestHost(Protocol):
    def create_guest(self, ram_bytes: int, vcpu_count: int) -> Guest:
        """Where an arriving guest lives (a preallocation, or fresh memory)."""
        ...

    def start_guest(self, guest: Guest, gate: PresenceGate | None = None) -> None:
        """Run the guest here; in postcopy its accesses go through the gate."""

    def take_page_misses(self) -> dict[int, float]:
        """Postcopy: the pages the guest found missing since the last call, and when."""

    def discard_guest(self, guest: Guest) -> None: ...
    def prefault(self, guest: Guest, pages: np.ndarray) -> None:
        """The source says these pages will arrive: fault them in ahead, if that helps."""


@dataclass(frozen=True)
class DestParameters:
    auth_token: bytes = b""
    window: int = INITIAL_CREDIT
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    # Before the hello names the source's reconnect timeout, and at the least after it: how
    # long an unfinished session is kept while its source is silent.
    peer_timeout_s: float = PEER_DEAD_AFTER_S
    retransmit_after_s: float = RETRANSMIT_AFTER_S
    # The longest this node keeps an unfinished session for a silent source, whatever its
    # hello asks (dest-node --max-source-wait).
    max_source_wait_s: float = MAX_SOURCE_WAIT_S
    # The largest guest a source may make this node allocate (dest-node --max-ram).
    max_ram_bytes: int = MAX_RAM_BYTES
    # Test builds only: flip a byte of this page after placing it, to prove verification.
    corrupt_page: int | None = None
    # Test builds only: place postcopy data and tags apart (a turn between), to prove that the
    # atomicity test can fail.
    split_placement: bool = False
    # dest-node --to-qemu: this node takes guests from QEMU (and only those) to hand them back.
    qemu_handback: bool = False


class DestSession:
    def __init__(
        self,
        host: DestHost,
        params: DestParameters,
        now: float,
        handed_over: dict[bytes, HandedOver] | None = None,
    ) -> None:
        self.host = host
        self.params = params
        self.machine = PhaseMachine(_D.WAITING, DEST_MOVES, DEST_TRIGGERS, DEST_FAILURES)
        self.failure: Failure | None = None
        self.guest: Guest | None = None
        self.digests: DigestCache | None = None
        self.peer: bytes | None = None
        self.peer_key = b""  # the CURVE key of the source that opened the session
        self._t_received = now  # refusals are rate-limited by the time of what they answer
        self.session_id = b""
        self.link = Link(b"", now, rto_s=params.retransmit_after_s)
        self.use_lz4 = False
        self.channels = 1  # connections the source's batches come over (parallel channels)
        self.channel_batches = [0]  # batches that arrived over each, resends included
        self.reorder = Reorder(params.window)
        self.stats = TransferStats()
        self.refused_messages = 0
        self._outgoing: list[tuple[bytes, list[Buffer]]] = []
        self._events: list[ev.Event] = []
        self.source_stopped = False
        self.verified: bool | None = None
        self.mismatched_pages: list[int] = []
        self.my_digests: dict[str, str] | None = None
        self.rounds = 0
        self.reconnect_wait_s = params.peer_timeout_s  # the source's reconnect timeout, once known
        self.t_start = now
        self.t_hello: float | None = None
        self.t_stop_seen: float | None = None
        self.t_first_data: float | None = None
        self.t_running: float | None = None
        self.t_last_placed = 0.0  # postcopy: when a page last became present here
        self.t_end: float | None = None
        self.postcopy_mode = False
        self.postcopy_keep_s = 0.0  # how long the source reconnects once it stopped, in postcopy
        self.last_refusal: str | None = None  # postcopy: the last message refused (never a failure)
        self._arrived_bytes = 0  # the size of the message being handled
        self.postcopy: DestPostcopy | None = None
        self.admission = DestAdmission(self, handed_over or {})
        self.precopy_side = DestPrecopySide(self)
        self.postcopy_side = DestPostcopySide(self)
        # What acts on each message the phase table lets in (timers carry their own actions).
        self._handlers: dict[str, Callable[[Any, Buffer, float], None]] = {
            "ram_pages": self.precopy_side.on_ram_pages,
            "tag_sections": self.precopy_side.on_tag_sections,
            "end_of_round": self.precopy_side.on_end_of_round,
            "device_state": self.precopy_side.on_device_state,
            "link_timeouts": self.admission.on_link_timeouts,
            "verify_request": self.precopy_side.on_verify_request,
            "commit": self.precopy_side.on_commit,
            "abort": self._on_abort,
            "page_manifest": self.postcopy_side.on_page_manifest,
            "postcopy_start": self.postcopy_side.on_postcopy_start,
            "postcopy_pages": self.postcopy_side.on_postcopy_pages,
        }

    @property
    def phase(self) -> DestPhase:
        return self.machine.phase

    @property
    def keep_for_s(self) -> float:
        """How long a silent source is waited for: its reconnect timeout, and once it stopped
        its guest for good in postcopy, as long as it goes on recovering if that is longer."""
        if self.postcopy_mode and self.source_stopped:
            return max(self.reconnect_wait_s, self.postcopy_keep_s)
        return self.reconnect_wait_s

    def handed_over_sessions(self) -> dict[bytes, HandedOver]:
        """What the next session on this node must remember: this one too, if its guest ran here."""
        return self.admission.handed_over_sessions()

    # -- verbs ------------------------------------------------------------------------------
    def take_outgoing(self) -> list[tuple[bytes, list[Buffer]]]:
        out, self._outgoing = self._outgoing, []
        return out

    def take_events(self) -> list[ev.Event]:
        out, self._events = self._events, []
        return out

    def receive(self, peer: bytes, frames: list[Buffer], now: float, peer_key: bytes = b"") -> None:
        """One message from `peer` (a connection). `peer_key`: the public key that connection
        proved in its CURVE handshake (empty without keys); a session belongs to the key that
        opened it, so a stranger can neither join it nor take it over by naming it."""
        self._t_received = now
        # wire bytes, counted as the source counts them: the whole message
        self._arrived_bytes = sum(memoryview(f).nbytes for f in frames)
        try:
            message = front.decode(frames, "destination")
        except WireError as exc:
            if (
                exc.code != pb.ERROR_VERSION_MISMATCH
                and self.admission.from_source(peer)
                and self.phase in _LIVE
            ):
                # From our source (any of its channels) but damaged in transit: ask for it again.
                self.link.stats.corrupt += 1
                self._ask_resend(now)
            else:
                self._refuse(peer, exc.code, exc.reason)
            return
        env = message.envelope
        if message.kind == "hello":
            if self.machine.handles("hello"):
                self._fire("hello", partial(self.admission.on_hello, peer, env, now, peer_key), now)
            else:
                self.admission.hello_while_busy(peer, env, now, peer_key)
            return
        if env.session_id in self.admission.handed_over and env.session_id != self.session_id:
            self.admission.answer_handed_over(peer, env, message.kind, peer_key)
            return
        if env.session_id != self.session_id or self.phase is _D.WAITING:
            self._refuse(peer, pb.ERROR_WRONG_SESSION, "no migration session of yours is open here")
            return
        if peer_key != self.peer_key:
            self._refuse(peer, pb.ERROR_UNAUTHORIZED, "this session belongs to another source's key")
            return
        if message.kind == "resume":
            if self.machine.handles("resume"):
                self._fire("resume", partial(self.admission.on_resume, peer, env, now), now)
            else:
                self._refuse(
                    peer,
                    pb.ERROR_WRONG_SESSION,
                    "no migration session of yours is open here (it was discarded)",
                )
            return
        if message.kind == "abort" and env.abort.code == pb.ERROR_GUEST_TAKEN_BACK:
            # From any connection of the session's key, its own epoch or a newer one: a source
            # whose operator took the guest back says so on the connection it has now, which
            # may be one whose Resume never got here (a partition), and no older one is left.
            if env.epoch >= self.link.epoch and self.machine.handles("taken-back"):
                self._fire("taken-back", partial(self.admission.taken_back, env.abort.reason, now), now)
            return
        if message.kind in ("postcopy_pages", "urgent_ready") and env.seq == 0:
            if env.epoch >= self.link.epoch:
                self.postcopy_side.on_urgent(peer, message, now)
            return
        if not self.admission.from_source(peer):
            # (a channel of a connection the source has left, too: refused, rate-limited, as
            # that connection's own messages are)
            self._refuse(peer, pb.ERROR_WRONG_SESSION, "no migration session of yours is open here")
            return
        if self.phase is _D.FAILED:
            return  # stragglers after the end
        try:
            intake, _ = front.admit(self.link, env, now, "source")
        except WireError as exc:
            self._fail(exc.code, exc.reason, now)
            return
        if intake is Intake.STALE:
            return  # from a connection the source has left
        if intake is Intake.UNSEQUENCED:
            self._on_unsequenced(message, now)
            return
        if message.kind in framing.BATCH_KINDS:
            self.channel_batches[0 if peer == self.peer else peer[-1]] += 1
        if intake is Intake.REPEAT:
            self._ack(now)  # our ack may be what was lost
            return
        if intake is Intake.AHEAD:
            batch = message.kind in framing.BATCH_KINDS
            if self.channels > 1 and self.reorder.hold(
                env.seq, (message, self._arrived_bytes), now, batch=batch, size=self._arrived_bytes
            ):
                self.link.stats.reordered += 1
                return
            self.link.stats.out_of_order += 1
            self._ask_resend(now)
            return
        self._deliver(message, now)
        self.reorder.drop_upto(self.link.received)  # copies a resend overtook
        while self.reorder.held and self.phase in _LIVE:
            held = self.reorder.take(self.link.received + 1, now)
            if held is None:
                return
            message, self._arrived_bytes = held
            self.link.arrive(message.envelope.seq)
            self._deliver(message, now)

    def _deliver(self, message: framing.Message, now: float) -> None:
        """Handle the next message in sequence order."""
        env = message.envelope
        if self.phase is _D.RUNNING:
            # a commit sent again because our answer was lost: it is answered by the resend of
            # Started; anything else after the handover is out of place and changes nothing
            return
        if message.kind in UNSEQUENCED or not self.machine.handles(message.kind):
            self._fail(
                pb.ERROR_BAD_MESSAGE,
                f"unexpected {message.kind} from the source in phase {self.phase.value}",
                now,
            )
            return
        handler = partial(self._handlers[message.kind], getattr(env, message.kind), message.payload, now)
        if not self._fire(message.kind, handler, now, damaged=message):
            return
        if message.kind not in framing.BATCH_KINDS and self.phase is not _D.FAILED:
            self._ack(now)  # data messages are acknowledged with the flow control

    def _fire(
        self, trigger: str, act: Callable[[], None], now: float, damaged: framing.Message | None = None
    ) -> bool:
        """Act on a trigger through the phase table (which also holds its moves to what the
        table lists). An error inside ends the session with its reason, never the daemon; a
        batch whose pages did not land as their digests say (`damaged`) is asked for again.
        False when the trigger did not complete."""
        try:
            self.machine.fire(trigger, act)
        except WireError as exc:
            if (
                damaged is not None
                and exc.code == pb.ERROR_CHECKSUM
                and damaged.kind in framing.PAGE_DIGESTED
            ):
                # damaged in transit: the message counts as not delivered, and is asked for again
                self.link.retract(damaged.envelope.seq)
                self.link.stats.corrupt += 1
                self._ask_resend(now)
                return False
            self._fail(exc.code, exc.reason, now)
            return False
        except Exception as exc:  # a host error or a bug: the session fails, the node lives
            self._fail(pb.ERROR_INTERNAL, f"the destination failed handling {trigger}: {exc!r}", now)
            return False
        return True

    def poll(self, now: float) -> None:
        """Advance on time: take what the guest found missing (postcopy), then act on every
        timer that is due."""
        if self.phase is _D.POSTCOPY:
            self.postcopy_side.take_misses(now)
        run_due(self.timers, now)

    def next_deadline(self, now: float) -> float:
        return next_deadline(self.timers(now), now)

    def timers(self, now: float) -> list[Timer]:
        """Every armed timer, in the order poll acts on them: the one list both poll and
        next_deadline read. Which phase runs which timer is the phase table's to say (a
        postcopy guest runs here, so the source's silence never discards it; after the
        handover only Started is sent again); this says when each is due."""
        link = self.link
        timers = [Timer("source-silent", link.t_last_heard + self.keep_for_s, self._source_silent)]
        timers += self.postcopy_side.timers(now)
        if (resend_at := link.retransmit_at()) is not None:
            timers.append(Timer("retransmit", resend_at, self._retransmit))
        if self.reorder.t_gap is not None:
            timers.append(Timer("reorder-gap", self.reorder.t_gap + REORDER_WAIT_S, self._gap_is_a_loss))
        timers.append(
            Timer("send-heartbeat", link.t_last_sent + self.params.heartbeat_interval_s, self._heartbeat)
        )
        return [self._armed(timer) for timer in timers if self.machine.handles(timer.name)]

    def _armed(self, timer: Timer) -> Timer:
        """The timer as poll acts on it: through the phase table, as any trigger."""
        return replace(timer, act=lambda now: self._fire(timer.name, partial(timer.act, now), now))

    def _source_silent(self, now: float) -> None:
        silent = self.link.silence(now)
        self._fail(
            pb.ERROR_TIMEOUT,
            f"source silent for {silent:.1f} s (it had {self.keep_for_s:.1f} s to reconnect); what arrived is discarded",
            now,
        )

    def _retransmit(self, now: float) -> None:
        self._resend_from(self.link.peer_received, now)
        self.link.restart_retransmit_clock(now)

    def _gap_is_a_loss(self, now: float) -> None:
        self._ask_resend(now)  # what the held messages wait for is lost, not late
        self.reorder.restart(now)  # asked again after a retransmission timeout, not every turn

    def _heartbeat(self, now: float) -> None:
        self._unsequenced(now, heartbeat=pb.Heartbeat())

    def cancel(self, now: float, reason: str = "cancelled by the destination's operator") -> None:
        if self.phase is _D.POSTCOPY:
            raise RuntimeError(
                "too late to cancel: the guest runs here in postcopy and the source is stopped"
            )
        if self.phase not in _LIVE:
            raise RuntimeError(f"no incoming migration to cancel (phase {self.phase.value})")
        self._fail(pb.ERROR_CANCELLED, reason, now)

    # -- hello and resume -----------------------------------------------------------------------
    def _on_unsequenced(self, message: framing.Message, now: float) -> None:
        kind = message.kind
        if kind not in UNSEQUENCED or kind == "resume_ack":
            self._fail(pb.ERROR_BAD_MESSAGE, f"the source sent {kind} without a sequence number", now)
            return
        if kind == "ack" and self.machine.handles("ack"):
            self._fire("ack", partial(self._on_ack, message.envelope.ack, now), now)

    def _on_ack(self, ack: pb.Ack, now: float) -> None:
        self._resend(front.resend_after(self.link, ack, "source"), now)

    # -- data ---------------------------------------------------------------------------
    def _on_abort(self, msg: pb.Abort, _: Buffer, now: float) -> None:
        self._fail(msg.code, f"source aborted: {msg.reason}", now, notify=False)

    def _stop_copy(self, code: int, why: str, now: float, *, notify: bool) -> None:
        """End the session whatever ran here, even a guest that runs: it is stopped and discarded
        (its reason replaces any earlier one: this is what became of the guest)."""
        if self.phase is _D.FAILED:
            return
        self.failure = Failure(code, why, self.phase.value)
        self._discard(code, why, now, notify=notify)

    # -- verification and handover -------------------------------------------------------------
    # -- postcopy -------------------------------------------------------------------------------
    # -- sending and failure -------------------------------------------------------------------
    def _ask_resend(self, now: float) -> None:
        if self.link.should_ask_resend(now):
            self._to_source(front.ack(self.link, now, resend=True))

    def _ack(self, now: float) -> None:
        self._to_source(front.ack(self.link, now))

    def _resend_from(self, after: int, now: float) -> None:
        self._resend(self.link.to_resend(after), now)

    def _resend(self, entries: list[Unacked], now: float) -> None:
        assert self.peer is not None
        for entry in entries:
            self._outgoing.append((self.peer, self.link.again(entry)))
            self.link.t_last_sent = now

    def _send(self, now: float, **body: Any) -> None:
        assert self.peer is not None
        frames = self.link.sequenced(now, **body)
        self.stats.other_bytes += sum(len(f) for f in frames)
        self._outgoing.append((self.peer, frames))

    def _unsequenced(self, now: float, **body: Any) -> None:
        self._to_source(self.link.unsequenced(now, **body))

    def _to_source(self, frames: list[Buffer]) -> None:
        assert self.peer is not None
        self.stats.other_bytes += sum(len(f) for f in frames)
        self._outgoing.append((self.peer, frames))

    def refuse(self, peer: bytes, code: int, reason: str, now: float) -> None:
        """A message the daemon refused unread (too many frames, say): counted and answered
        as any refusal."""
        self._t_received = now
        self._refuse(peer, code, reason)

    def _refuse(self, peer: bytes, code: int, reason: str) -> None:
        self.admission.refuse(peer, code, reason)

    def _refuse_hello(self, peer: bytes, session_id: bytes, code: int, reason: str) -> None:
        self.admission.refuse_hello(peer, session_id, code, reason)

    def _move(self, to: DestPhase) -> None:
        self.machine.move(to)
        self._events.append(ev.PhaseChanged(to.value))

    def _fail(self, code: int, reason: str, now: float, *, notify: bool = True) -> None:
        if self.phase.terminal or self.phase in (_D.FAILING, _D.WAITING):
            return  # (waiting: no session to fail; a hello that could not be handled is refused)
        if self.phase is _D.POSTCOPY:
            # The guest runs here and the source is stopped: it is never discarded. The fault is
            # noted and refused; the source may resume the session and carry on.
            self.refused_messages += 1
            self.last_refusal = f"{reason} (refused; the guest keeps running here)"
            return
        if self.failure is None:
            self.failure = Failure(code, reason, self.phase.value)
        self._discard(code, reason, now, notify=notify)

    def _discard(self, code: int, reason: str, now: float, *, notify: bool) -> None:
        self._move(_D.FAILING)
        if notify and self.peer is not None:
            self._send(now, abort=pb.Abort(code=code, reason=reason))
        if self.guest is not None:
            self.host.discard_guest(self.guest)
        self.t_end = now
        self._move(_D.FAILED)
        status = "cancelled" if code == pb.ERROR_CANCELLED else "failed"
        self._events.append(ev.Finished(status, reason))

    # -- reporting ---------------------------------------------------------------------------
    def report(self, now: float) -> dict[str, Any]:
        return dest_report(self, now)
