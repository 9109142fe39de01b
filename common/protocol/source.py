"""The source side of a migration as a pure state machine.

Feed it what the destination sent (`receive`) and the time (`poll`); take the frames it wants
sent (`take_outgoing`) and what happened (`take_events`). It reaches the guest only through its
memory (to read pages) and a `SourceHost` (to stop, resume and throttle the vCPUs): no sockets,
threads or clocks here, so precopy is tested through an in-memory link with a fake clock.

The work is split by job: `Link` numbers, acknowledges and resends messages and notices a
broken link; `Precopy` decides what each round sends and when the guest stops; the
`SourceVerifier` runs the digest handshake; the phase table in `phases` says which moves and
messages are legal. This class wires them together and owns the failure rules: only a
verified, committed handover stops the source for good; any failure before the commit resumes
the guest here, and after it the guest stays stopped until the destination (or an operator)
settles where it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import Any, Protocol

from common.constants import (
    RECONNECT_BACKOFF_S,
    SESSION_ID_BYTES,
)
from common.guest.digest import DigestCache
from common.guest.guest import Guest
from common.protocol import events as ev
from common.protocol import front
from common.protocol.front import Intake
from common.protocol.handshake import link_timeouts, source_hello
from common.protocol.link import UNSEQUENCED, Link, Reconnector
from common.protocol.outbound import Outbound
from common.protocol.params import MigrationParameters
from common.protocol.phases import (
    SOURCE_FAILURES,
    SOURCE_MOVES,
    SOURCE_TRIGGERS,
    Failure,
    PhaseMachine,
    SourcePhase,
)
from common.protocol.postcopy import SourcePostcopy
from common.protocol.postcopy_sides import SourcePostcopySide
from common.protocol.precopy import Precopy
from common.protocol.precopy_side import SourcePrecopySide
from common.protocol.ratelimit import TokenBucket
from common.protocol.reports import source_report
from common.protocol.source_link import SourceLinkSide
from common.protocol.source_outcome import SourceOutcome
from common.protocol.stats import BandwidthMeter, Downtime, RoundRecord, TransferStats
from common.protocol.timers import Timer, next_deadline, run_due
from common.protocol.verify import SourceVerifier
from common.transfer import OutgoingBatch
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.framing import Buffer, WireError

_S = SourcePhase


class SourceHost(Protocol):
    def stop_guest(self) -> None: ...
    def resume_guest(self) -> None: ...
    def set_throttle(self, share: float) -> None: ...

    def guest_quiet(self) -> bool:
        """Nothing writes guest memory until the session resumes the guest (it is stopped, or
        has run its last step): page batches may be sent from guest memory without a copy."""
        ...


# How a session encodes several batches at once: `map` in order, or a thread pool's `map`
# (the edge's, with parallel channels); either way the results come back in order.
EncodeMap = Callable[
    [Callable[[tuple[str, Any]], OutgoingBatch], list[tuple[str, Any]]], Iterable[OutgoingBatch]
]


POSTCOPY_NOT_ALLOWED = (
    "this migration did not allow postcopy: cancel it (the guest keeps running here) and start the "
    "next with 'ctl migrate URI --mode postcopy' (--postcopy-after-rounds never: only on postcopy-start)"
)


class SourceSession:
    def __init__(
        self,
        guest: Guest,
        host: SourceHost,
        params: MigrationParameters,
        now: float,
        *,
        session_id: bytes | None = None,
        node_name: str = "source",
        encode_map: EncodeMap = map,
    ) -> None:
        self.guest = guest
        self.mem = guest.memory
        self.host = host
        self.params = params.check()
        self.session_id = session_id or os.urandom(SESSION_ID_BYTES)
        self.node_name = node_name
        self.machine = PhaseMachine(_S.IDLE, SOURCE_MOVES, SOURCE_TRIGGERS, SOURCE_FAILURES)
        self.failure: Failure | None = None
        self.stats = TransferStats()
        self.meter = BandwidthMeter()
        self.digests = DigestCache(self.mem)
        self.link = Link(self.session_id, now, rto_s=self.params.retransmit_after_s)
        self.precopy = Precopy(self.mem, self.digests, self.params.dirty_model)
        self.verifier = SourceVerifier(guest, self.digests, rehash=self.params.verify_rehash)
        self.precopy.verify_cost_s = self.verifier.rehash_estimate_s
        self.bucket = TokenBucket(self.params.max_bandwidth, now, min_burst=1 << 20)
        self._outgoing: list[Outbound] = []
        self.channels = 1  # granted by the destination's HelloAck
        self._encode_map = encode_map
        self._urgent: list[list[Buffer]] = []  # postcopy answers, for the urgent connection
        self._events: list[ev.Event] = []
        self._use_lz4 = False
        self.guest_stopped = False
        self._catching_up = False
        self._taken_back = False  # an operator's 'settle here': the destination must stop its copy
        self.reconnector = Reconnector(*RECONNECT_BACKOFF_S)
        # postcopy: set at the switchover; from then on the guest is the destination's
        self.postcopy: SourcePostcopy | None = None
        self.link_side = SourceLinkSide(self)
        self.outcome = SourceOutcome(self)
        self.precopy_side = SourcePrecopySide(self)
        self.postcopy_side = SourcePostcopySide(self)
        # What acts on each trigger the phase table lets in (timers carry their own actions).
        self._handlers: dict[str, Callable[[Any, float], None]] = {
            "hello_ack": self._on_hello_ack,
            "abort": self._on_abort,
            "verify_result": self._on_verify_result,
            "started": self._on_started,
            "page_request": self.postcopy_side.on_page_request,
            "received_bitmap": self.postcopy_side.on_received_bitmap,
            "ack": self.link_side.on_ack,
            "resume_ack": self.link_side.on_resume_ack,
        }
        self._postcopy_now = False  # an operator's postcopy-start
        self._paused_from: SourcePhase | None = None
        self.refused_pages = 0  # pages named in page requests that were out of range or too many
        self.dest_missing: int | None = None  # pages the destination said it lacks, last we heard
        # times
        self.t_start = now
        self.t_setup_done: float | None = None
        self.t_stop: float | None = None
        self.t_dest_running: float | None = None  # postcopy: the destination said it runs
        self.t_end: float | None = None
        self.timeline: list[tuple[str, float]] = []  # (event, seconds since start)
        self.round_records: list[RoundRecord] = []

    # -- state, read-only ---------------------------------------------------------------------
    @property
    def phase(self) -> SourcePhase:
        return self.machine.phase

    @property
    def round(self) -> int:
        return self.precopy.round

    @property
    def throttle(self) -> float:
        return self.precopy.throttle

    @property
    def verified(self) -> bool | None:
        return self.verifier.verified

    @property
    def verify_attempt(self) -> int:
        return self.verifier.attempt

    @property
    def mismatched_pages(self) -> list[int]:
        return self.verifier.mismatched_pages

    @property
    def in_flight(self) -> int:
        return self.link.data_in_flight()

    @property
    def connected(self) -> bool:
        return self.reconnector.connected

    @property
    def guest_runs_here(self) -> bool:
        return not self.guest_stopped and self.phase is not _S.COMPLETED

    # -- verbs ------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        if self.phase is not _S.IDLE:
            raise RuntimeError(f"migration already started (phase {self.phase.value})")
        self._move(_S.SETUP)
        self._send(now, hello=source_hello(self.guest, self.params, self.node_name))

    def take_outgoing(self) -> list[Outbound]:
        out, self._outgoing = self._outgoing, []
        return out

    def take_urgent(self) -> list[list[Buffer]]:
        """Postcopy answers to page requests, for a connection of their own (QEMU's preempt
        channel): they never queue behind the background stream. Unsequenced and idempotent: a
        lost one is asked for again."""
        out, self._urgent = self._urgent, []
        return out

    def take_events(self) -> list[ev.Event]:
        out, self._events = self._events, []
        return out

    def receive(self, frames: list[Buffer], now: float) -> None:
        if self.phase is _S.COMPLETED:
            self.link_side.ack_repeat(frames, now)
            return
        if self._taken_back:
            self.link_side.remind_taken_back(frames, now)
            return
        if self.phase.terminal or self.phase is _S.IDLE:
            return
        try:
            message = front.decode(frames, "source")
        except WireError as exc:
            if exc.code == pb.ERROR_VERSION_MISMATCH:
                self._fail(exc.code, f"the destination sent {exc.reason}", now)
                return
            # Corrupted in transit: whatever it was, it is sent again when we ask.
            self.link.stats.corrupt += 1
            self.link_side.ask_resend(now)
            return
        env = message.envelope
        if (
            env.seq == 0
            and message.kind in ("hello_ack", "abort")
            and env.session_id in (self.session_id, b"")
        ):
            if self.machine.handles("refusal"):
                self._fire("refusal", partial(self.outcome.refused, message, now), now)
            return
        if env.session_id != self.session_id:
            self._fail(pb.ERROR_WRONG_SESSION, "destination answered for another session", now)
            return
        try:
            intake, released = front.admit(self.link, env, now, "destination")
        except WireError as exc:
            self._fail(exc.code, exc.reason, now)
            return
        for entry in released:
            self.link_side.acknowledged(entry, now)
        if intake is Intake.STALE:
            return  # from a connection this session has left behind
        if intake is Intake.UNSEQUENCED:
            self._on_unsequenced(message, now)
            self.link_side.settle_by_ack(now)
            return
        if intake is Intake.REPEAT:
            self.link_side.ack(now)  # our ack may be what was lost
            return
        if intake is Intake.AHEAD:
            self.link.stats.out_of_order += 1
            self.link_side.ask_resend(now)
            return
        if message.kind in UNSEQUENCED or not self.machine.handles(message.kind):
            self._fail(
                pb.ERROR_BAD_MESSAGE,
                f"unexpected {message.kind} from the destination in phase {self.phase.value}",
                now,
            )
            return
        handler = self._handlers[message.kind]
        if not self._fire(message.kind, partial(handler, getattr(env, message.kind), now), now):
            return
        if not self.phase.terminal or message.kind == "started":
            # (Started too, though nothing follows it: its destination waits for this ack
            # before a --once exit, so that a lost Started is sent again, not lost for good)
            self.link_side.ack(now)
        self.link_side.settle_by_ack(now)

    def poll(self, now: float) -> None:
        """Advance on time: act on every timer that is due (sending what the window and the
        bandwidth allow is one of them)."""
        run_due(self.link_side.timers, now)

    def next_deadline(self, now: float) -> float:
        """When poll next has something to do even if no message arrives."""
        return next_deadline(self.link_side.timers(now), now)

    def timers(self, now: float) -> list[Timer]:
        """Every armed timer, in the order poll acts on them (the phase table says which phase
        runs which; the link side, when each is due)."""
        return self.link_side.timers(now)

    def _not_converging(self, now: float) -> None:
        self._fail(pb.ERROR_NOT_CONVERGING, self.precopy.give_up_reason(self.params), now)

    def cancel(self, now: float, reason: str = "cancelled by the operator") -> None:
        if self.phase.terminal:
            return
        if self.phase in (_S.COMMITTING, _S.UNSETTLED) or self.phase.postcopy:
            raise RuntimeError("too late to cancel: the guest has been handed to the destination")
        self._fail(pb.ERROR_CANCELLED, reason, now, cancelled=True)

    def refused_by_peer(self, reason: str, now: float) -> None:
        """The connection itself was refused (the destination's key check): nothing of ours
        can reach it, so there is nobody to tell; before the commit the guest stays here."""
        self._fail(pb.ERROR_UNAUTHORIZED, reason, now, notify=False)

    def start_postcopy(self, now: float) -> None:
        """An operator's postcopy-start: switch a running precopy over now."""
        if self.phase not in (_S.SETUP, _S.ACTIVE):
            raise RuntimeError(f"postcopy cannot start in phase {self.phase.value}")
        if not self.params.postcopy:
            raise RuntimeError(POSTCOPY_NOT_ALLOWED)
        self._postcopy_now = True
        if self.phase is _S.ACTIVE:
            self.postcopy_side.switchover(now)

    def recover(self, now: float) -> None:
        """After postcopy broke the link: reconnect now (and keep trying for the timeout again)."""
        if self.postcopy is None or not (self.phase is _S.UNSETTLED or self.phase is _S.POSTCOPY_PAUSED):
            raise RuntimeError(f"nothing to recover (phase {self.phase.value})")
        if self.phase is _S.UNSETTLED:
            self.outcome.past_trouble(now)
            self._paused_from = self._paused_from or _S.POSTCOPY
            self._move(_S.POSTCOPY_PAUSED)
            self.t_end = None
            self.link.t_last_heard = now  # the recover timeout starts again
            if self.connected:
                self.reconnector.broken(now)
                epoch = self.link.new_epoch()
                self._events.append(ev.Reconnect(epoch, 0.0))
        self.reconnector.next_at = now

    def cap(self) -> int:
        """The bandwidth cap in force: precopy's, or postcopy's once the guest was handed over."""
        return self.params.max_postcopy_bandwidth if self.postcopy is not None else self.params.max_bandwidth

    def set_parameters(self, params: MigrationParameters, now: float) -> None:
        before = self.params
        self.params = replace(params.check(), window=self.params.window)
        self.bucket.set_rate(self.cap(), now)
        changed = (before.reconnect_timeout_s, before.postcopy_recover_timeout_s) != (
            self.params.reconnect_timeout_s,
            self.params.postcopy_recover_timeout_s,
        )
        if changed and self.phase is not _S.IDLE and not self.phase.ended:
            # the destination keeps an unfinished session only as long as it was told we
            # reconnect: told at the hello, and again whenever that changes
            self._send(now, link_timeouts=link_timeouts(self.params))

    # -- link ----------------------------------------------------------------------------------
    def _on_unsequenced(self, message: framing.Message, now: float) -> None:
        kind = message.kind
        if kind == "resume":
            self._fail(pb.ERROR_BAD_MESSAGE, "the destination sent a resume: only a source resumes", now)
            return
        if kind not in UNSEQUENCED:
            self._fail(pb.ERROR_BAD_MESSAGE, f"the destination sent {kind} without a sequence number", now)
            return
        if kind != "heartbeat" and self.machine.handles(kind):  # (the rest: no use in this phase)
            handler = self._handlers[kind]
            self._fire(kind, partial(handler, getattr(message.envelope, kind), now), now)

    def _fire(self, trigger: str, act: Callable[[], None], now: float) -> bool:
        """Act on a trigger through the phase table (which also holds its moves to what the
        table lists). An error inside ends the session with its reason (before the commit the
        guest runs here again), never the daemon. False when it ended so."""
        try:
            self.machine.fire(trigger, act)
        except WireError as exc:
            self._fail(exc.code, exc.reason, now)
            return False
        except Exception as exc:  # a host error or a bug
            self._fail(pb.ERROR_INTERNAL, f"the source failed handling {trigger}: {exc!r}", now)
            return False
        return True

    # -- handlers of sequenced messages -------------------------------------------------------
    def _on_hello_ack(self, ack: pb.HelloAck, now: float) -> None:
        if not ack.accepted:
            raise WireError(
                ack.code or pb.ERROR_FEATURE_MISMATCH, f"destination refused the migration: {ack.reason}"
            )
        if not 1 <= ack.initial_credit <= 1024:
            raise WireError(pb.ERROR_BAD_MESSAGE, f"destination granted a window of {ack.initial_credit}")
        self.params = replace(self.params, window=min(self.params.window, ack.initial_credit))
        self._use_lz4 = pb.FEATURE_LZ4 in ack.features and self.params.use_lz4
        if pb.FEATURE_MULTI_CHANNEL in ack.features:
            if not 2 <= ack.channels <= self.params.channels:
                raise WireError(
                    pb.ERROR_BAD_MESSAGE,
                    f"destination granted {ack.channels} channels; this source asked for {self.params.channels}",
                )
            self.channels = ack.channels
        self._move(_S.ACTIVE)
        self.t_setup_done = now
        self._mark_time("setup done", now)
        if self.params.postcopy and (self.params.postcopy_after_rounds == 0 or self._postcopy_now):
            self.postcopy_side.switchover(now)
            return
        self.precopy_side.start(now)

    def _on_abort(self, abort: pb.Abort, now: float) -> None:
        self._fail(abort.code, f"destination aborted: {abort.reason}", now, notify=False)

    def _on_verify_result(self, result: pb.VerifyResult, now: float) -> None:
        if not self.verifier.expects(result):
            raise WireError(
                pb.ERROR_BAD_MESSAGE, f"verify_result (attempt {result.attempt}) in phase {self.phase.value}"
            )
        self._mark_time(f"verify result {result.attempt}: {'ok' if result.ok else 'mismatch'}", now)
        if self.phase is _S.POSTCOPY_VERIFYING:
            self.postcopy_side.on_verify_result(result, now)
            return
        self.precopy_side.on_verify_result(result, now)

    def _on_started(self, started: pb.Started, now: float) -> None:
        self.stats.downtime.destination_s = Downtime.from_us(started.destination_downtime_us)
        self._complete(now, None)

    # -- the data path ----------------------------------------------------------------------
    def _pump(self, now: float) -> None:
        if not self.connected:
            return
        if self.postcopy is not None:
            self.postcopy_side.pump(now)
        else:
            self.precopy_side.pump(now)

    def _active_for(self, now: float) -> float:
        return 0.0 if self.t_setup_done is None else now - self.t_setup_done

    # -- sending ---------------------------------------------------------------------------
    def _account(self, size: int) -> None:
        if self.t_dest_running is not None:
            return  # the destination runs the guest: no downtime any more
        if self.guest_stopped:
            self.stats.downtime_bytes += size
        elif self.phase is not _S.SETUP:
            self.stats.precopy_bytes += size

    def _send(self, now: float, **body: Any) -> None:
        frames = self.link.sequenced(now, **body)
        self._count_control(frames)

    def _unsequenced(self, now: float, **body: Any) -> None:
        self._count_control(self.link.unsequenced(now, **body))

    def _count_control(self, frames: list[Buffer]) -> None:
        size = sum(len(f) for f in frames)
        self.stats.other_bytes += size
        self._account(size)
        self._outgoing.append(Outbound(frames))

    # -- endings ---------------------------------------------------------------------------
    def _move(self, to: SourcePhase) -> None:
        self.machine.move(to)
        self._events.append(ev.PhaseChanged(to.value))

    # -- endings: the rules are the outcome's; these are what every part of the session calls
    def settle(self, runs_here: bool, now: float) -> None:
        """An operator's word on an unsettled handover: where the guest runs from now on."""
        self.outcome.settle(runs_here, now)

    def withdraw(self, now: float, reason: str) -> None:
        """The guest was taken back upstream: this migration ends, and the next node is told."""
        self.outcome.withdraw(now, reason)

    def _fail(self, code: int, reason: str, now: float, **how: bool) -> None:
        self.outcome.fail(code, reason, now, **how)

    def _unsettled(self, now: float, why: str, *, postcopy: bool = False) -> None:
        self.outcome.unsettled(now, why, postcopy=postcopy)

    def _complete(self, now: float, note: str | None) -> None:
        self.outcome.complete(now, note)

    def _mark_time(self, event: str, now: float) -> None:
        self.timeline.append((event, now - self.t_start))

    def report(self, now: float) -> dict[str, Any]:
        return source_report(self, now)
