"""The source's link as its session keeps it up: which timers are armed and when (setup, the
peer's silence, reconnects and resumes, retransmission, heartbeats, giving up), what an ack or a
resume answer releases or restores, what is sent again, and the answers a session gives after
it ended (a repeat acknowledged; an operator's taking the guest back said again). A part of its
SourceSession, whose phase table decides which timer runs in which phase.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from common.constants import REFUSAL_ANSWERS_PER_S
from common.protocol import events as ev
from common.protocol import front
from common.protocol.link import Unacked
from common.protocol.outbound import Outbound
from common.protocol.phases import SourcePhase
from common.protocol.ratelimit import PerSecond
from common.protocol.timers import Timer
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.framing import Buffer, WireError

if TYPE_CHECKING:
    from common.protocol.source import SourceSession

_S = SourcePhase


class SourceLinkSide:
    def __init__(self, session: SourceSession) -> None:
        self.s = session
        # the destination acknowledged the commit: handled, so the guest runs there
        self.commit_acked = False
        self._reminders = PerSecond(REFUSAL_ANSWERS_PER_S)  # of the guest taken back, a second

    def remind_taken_back(self, frames: list[Buffer], now: float) -> None:
        """The destination speaks after the operator took the guest back here: whatever it
        says, it is told again to stop its copy (a bounded number of times a second)."""
        s = self.s
        try:
            env = framing.decode(frames).envelope
        except WireError:
            return
        if env.session_id == s.session_id and self._reminders.take(now):
            self.tell_taken_back(now)

    def ack_repeat(self, frames: list[Buffer], now: float) -> None:
        """Done here, yet a destination whose ack was lost (its Started's, say) sends a message
        again and waits: a repeat is acknowledged, as in every other phase; nothing else is
        handled any more."""
        s = self.s
        try:
            message = framing.decode(frames)
        except WireError:
            return
        env = message.envelope
        if env.session_id == s.session_id and not s.link.stale(env) and 0 < env.seq <= s.link.received:
            self.ack(now)

    def timers(self, now: float) -> list[Timer]:
        """Every armed timer, in the order poll acts on them: the one list both poll and
        next_deadline read. Which phase runs which timer is the phase table's to say; this
        says when each is due."""
        s = self.s
        if s.phase.ended or s.phase is _S.IDLE:
            return []
        link, params = s.link, s.params
        timers = [
            Timer("setup-timeout", link.t_last_heard + params.peer_timeout_s, self._setup_timed_out),
            Timer("give-up", link.t_last_heard + self._give_up_after(), self._give_up),
        ]
        if s.connected:
            timers.append(Timer("link-broken", link.t_last_heard + params.peer_timeout_s, self._link_broken))
        if not s.connected:
            timers.append(Timer("send-resume", s.reconnector.next_at, self._send_resume))
        elif (resend_at := link.retransmit_at()) is not None:
            timers.append(Timer("retransmit", resend_at, self._retransmit))
        else:
            # The destination acknowledged our hello but its answer was lost: ask for it, as after
            # any loss, rather than wait for its own retransmission, which may come after our
            # setup timeout (a hello resent after the loss is acknowledged, not answered again).
            timers.append(Timer("ask-hello-answer", link.t_progress + link.rto_s, self._ask_hello_answer))
        if not params.postcopy_on_its_own and s.t_setup_done is not None:
            # postcopy is the answer to a guest that does not converge; the check runs on time,
            # not only when a round ends: a long round must not overrun it
            at = s.t_setup_done + params.convergence_timeout_s
            timers.append(Timer("convergence", at, s._not_converging))
        send_at = self._send_at(now) if s.connected else None
        if send_at is not None:
            timers.append(Timer("send", send_at, s._pump, work=True))
        if s._catching_up:
            # the round's end waits for its batches to be placed there (or for time to run out)
            done = s.in_flight == 0 or s.t_setup_done is None
            at = now if done else s.t_setup_done + params.convergence_timeout_s  # type: ignore[operator]
            timers.append(Timer("round-end", at, s.precopy_side.end_of_pass, work=done))
        if s.connected:
            timers.append(
                Timer("send-heartbeat", link.t_last_sent + params.heartbeat_interval_s, self._heartbeat)
            )
        return [self._armed(timer) for timer in timers if s.machine.handles(timer.name)]

    def _armed(self, timer: Timer) -> Timer:
        """The timer as poll acts on it: through the phase table, as any trigger."""
        s = self.s
        return replace(timer, act=lambda now: s._fire(timer.name, partial(timer.act, now), now))

    def _send_at(self, now: float) -> float | None:
        """When there is something to send and room for it: at once, when the cap allows, or
        never (None) until an ack or a request makes room or work."""
        s = self.s
        if s.postcopy is not None:
            return s.postcopy_side.send_at(now)
        return s.precopy_side.send_at(now)

    def _setup_timed_out(self, now: float) -> None:
        s = self.s
        timeout = s.params.peer_timeout_s
        reason = f"no answer from the destination within {timeout:.1f} s (is dest-node listening there?)"
        s._fail(pb.ERROR_TIMEOUT, reason, now)

    def _heartbeat(self, now: float) -> None:
        s = self.s
        s._unsequenced(now, heartbeat=pb.Heartbeat())

    def tell_taken_back(self, now: float) -> None:
        s = self.s
        reason = "the source's operator took the guest back ('ctl settle here'): stop this copy"
        s._unsequenced(now, abort=pb.Abort(code=pb.ERROR_GUEST_TAKEN_BACK, reason=reason))

    def _link_broken(self, now: float) -> None:
        s = self.s
        silent = s.link.silence(now)
        s.reconnector.broken(now)
        epoch = s.link.new_epoch()
        s._events.append(ev.Reconnect(epoch, silent))
        # the silence says when the outage began (the plot draws it from there)
        s._mark_time(f"link lost, reconnecting (epoch {epoch}; silent for {silent:.3f} s)", now)
        if s.phase in (_S.POSTCOPY, _S.POSTCOPY_VERIFYING):
            s._paused_from = s.phase
            s._move(_S.POSTCOPY_PAUSED)

    def _send_resume(self, now: float) -> None:
        s = self.s
        if s.reconnector.resume_due(now):
            s._unsequenced(now, resume=pb.Resume(epoch=s.link.epoch, last_received=s.link.received))

    def _retransmit(self, now: float) -> None:
        s = self.s
        self.resend(s.link.to_resend(s.link.peer_received), now)
        s.link.restart_retransmit_clock(now)

    def _ask_hello_answer(self, now: float) -> None:
        s = self.s
        self.ack(now, resend=True)
        s.link.restart_retransmit_clock(now)

    def _give_up_after(self) -> float:
        s = self.s
        if s.phase.postcopy:
            return s.params.postcopy_recover_timeout_s
        return s.params.reconnect_timeout_s

    def _give_up(self, now: float) -> None:
        s = self.s
        silent = s.link.silence(now)
        if s.phase.postcopy:
            lacks = "an unknown number of" if s.dest_missing is None else f"{s.dest_missing}"
            s._unsettled(
                now,
                f"postcopy paused: no answer from the destination for {silent:.1f} s; it runs the guest "
                f"and last said it lacked {lacks} pages, held only here. 'ctl recover' tries again",
                postcopy=True,
            )
            return
        if s.phase is _S.COMMITTING:
            s._unsettled(now, f"no answer from the destination for {silent:.1f} s after the commit")
            return
        s._fail(
            pb.ERROR_TIMEOUT,
            f"destination unreachable: silent for {silent:.1f} s, reconnecting for "
            f"{s.params.reconnect_timeout_s:.1f} s did not bring it back",
            now,
        )

    def on_ack(self, ack: pb.Ack, now: float) -> None:
        s = self.s
        self.resend(front.resend_after(s.link, ack, "destination"), now)

    def on_resume_ack(self, ack: pb.ResumeAck, now: float) -> None:
        s = self.s
        if ack.epoch != s.link.epoch or s.connected:
            return  # an answer to an earlier attempt
        s.reconnector.restored()
        if ack.guest_running and s.postcopy is not None:
            # A destination says the guest runs there, after postcopy, only once its verdict
            # matched (a live session, or one it remembers after the guest moved on): the
            # verdict itself was lost with the link.
            s.verifier.verified = True
            s._complete(now, "the destination verified the guest and runs it (said on reconnecting)")
            return
        if s.phase is _S.POSTCOPY_PAUSED:
            s._move(s._paused_from or _S.POSTCOPY)
            if s.postcopy is not None:
                s.postcopy.recoveries += 1
        entries = s.link.to_resend(ack.last_received)
        s._events.append(ev.LinkRestored(s.link.epoch, len(entries)))
        s._mark_time(f"link restored (epoch {s.link.epoch})", now)
        if s.phase in (_S.COMMITTING, _S.UNSETTLED) and ack.guest_running:
            # (unsettled too: an answer that came after the source gave up still settles it)
            s._complete(now, None)
            return
        self.resend(entries, now)
        s.link.restart_retransmit_clock(now)

    def acknowledged(self, entry: Unacked, now: float) -> None:
        s = self.s
        if entry.data is None and entry.kind != "hello":  # (a hello's answer waits for an allocation)
            # a control message is acknowledged as soon as the destination has handled it: the
            # fastest such round trip is what each handshake inside the downtime costs at least
            s.precopy.round_trip_s = min(s.precopy.round_trip_s, now - entry.t_sent)
        if entry.data is not None:
            s.meter.add(now, entry.size)
        elif entry.kind == "commit":
            # The destination acknowledges a message only after handling it, and handling the
            # commit starts the guest there: this ack says where it runs, even if Started is lost.
            self.commit_acked = True

    def settle_by_ack(self, now: float) -> None:
        """After the message that carried it was handled: a Started in the same message says
        more than the ack of the commit does."""
        s = self.s
        if self.commit_acked and s.phase in (_S.COMMITTING, _S.UNSETTLED):
            s._fire("ack", partial(s._complete, now, "destination acknowledged the commit"), now)

    def ask_resend(self, now: float) -> None:
        s = self.s
        if s.phase is not _S.SETUP and s.connected and s.link.should_ask_resend(now):
            self.ack(now, resend=True)

    def ack(self, now: float, *, resend: bool = False) -> None:
        s = self.s
        s._count_control(front.ack(s.link, now, resend=resend))

    def resend(self, entries: list[Unacked], now: float) -> None:
        s = self.s
        for entry in entries:
            if entry.data is None:
                s._outgoing.append(Outbound(s.link.again(entry)))
            elif entry.kind == "postcopy_pages":
                chunk, requested = entry.data
                body, payload, _ = s.postcopy_side.encode(chunk, requested=requested)
                s._outgoing.append(Outbound(s.link.again(entry, payload, body), True, entry.seq))
            else:
                chunk, round_no = entry.data
                borrow = s.host.guest_quiet()
                batch = s.precopy_side.encode((entry.kind, chunk), round_no=round_no, borrow=borrow)
                s.precopy_side.record_sent(entry.kind, batch.stats)
                s._outgoing.append(Outbound(s.link.again(entry, batch.payload, batch.body), True, entry.seq))
        if entries:
            s.link.t_last_sent = now
