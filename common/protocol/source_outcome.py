"""How a source's migration ends, and the rules that make the guest run in exactly one place:
only a verified, committed handover stops the source for good; any failure before the commit
resumes the guest here; after it (and all through postcopy) the guest stays stopped here until
the destination, or an operator's 'settle', says where it runs. Also what a refusal from outside
the session means at each point. A part of its SourceSession.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.protocol import events as ev
from common.protocol.phases import Failure, SourcePhase
from common.wire import framing
from common.wire import mte_migration_pb2 as pb

if TYPE_CHECKING:
    from common.protocol.source import SourceSession

_S = SourcePhase


class SourceOutcome:
    def __init__(self, session: SourceSession) -> None:
        self.s = session

    def withdraw(self, now: float, reason: str) -> None:
        """The guest this node was sending on was taken back by the node it came from: the next
        node must not run it either. Before the commit it is cancelled; after it (or in postcopy)
        the next node is told, as an operator's 'settle here' tells it."""
        s = self.s
        if s.phase.terminal:
            return
        s._fail(pb.ERROR_GUEST_TAKEN_BACK, reason, now, notify=False, cancelled=True, after_commit_ok=True)
        s._taken_back = True
        s.link_side.tell_taken_back(now)

    def settle(self, runs_here: bool, now: float) -> None:
        """An operator's word on an unsettled handover: where the guest runs from now on."""
        s = self.s
        if s.phase is not _S.UNSETTLED:
            raise RuntimeError(f"nothing to settle (phase {s.phase.value})")
        if runs_here:
            reason = "settled by the operator: the guest runs here again"
            self.fail(pb.ERROR_CANCELLED, reason, now, notify=False, cancelled=True, after_commit_ok=True)
            # The destination may still run a copy (it started it, or it may come back): it hears
            # that the guest was taken back now, and again in answer to anything it sends later.
            s._taken_back = True
            s.link_side.tell_taken_back(now)
            return
        if s.postcopy is not None and not s.verified:
            # Only verification proves that the destination holds the whole guest; before it,
            # pages may exist only here, and calling it done would drop them unseen.
            lacks = "an unknown number of pages" if s.dest_missing is None else f"{s.dest_missing} pages"
            raise RuntimeError(
                f"postcopy is not verified: the destination last said it lacked {lacks}, held only "
                "here. 'ctl recover' reconnects and finishes it; 'ctl settle here' only if the "
                "destination is gone for good"
            )
        self.complete(now, "settled by the operator: the guest runs on the destination")

    def refused(self, message: framing.Message, now: float) -> None:
        """Sent outside any session: the destination refuses us (our hello or resume, or a
        message it could not place in a session). Its reason is the one worth reporting."""
        s = self.s
        body = getattr(message.envelope, message.kind)
        if message.kind == "abort" and body.code == pb.ERROR_CHECKSUM:
            # Our message arrived damaged before the destination knew us (a hello, or a resume,
            # which is tried again anyway): send it again rather than give up.
            if s.phase is _S.SETUP:
                s.link_side.resend(s.link.to_resend(0), now)
            return
        if message.kind == "abort" and body.code == pb.ERROR_WRONG_SESSION and s.phase is _S.SETUP:
            return  # something of ours overtook a lost hello; the hello is resent
        if message.kind == "abort" and s.postcopy is not None:
            s.postcopy_side.refused(body, now)
            return
        if message.kind == "abort":
            if s.phase in (_S.COMMITTING, _S.UNSETTLED):
                # It holds no session of ours, so it does not run our guest.
                self.fail(
                    body.code,
                    f"destination refused after the commit: {body.reason}; it does not run the guest, so it runs here again",
                    now,
                    notify=False,
                    after_commit_ok=True,
                )
            else:
                self.fail(body.code, f"destination refused: {body.reason}", now, notify=False)
        elif not body.accepted and s.phase is _S.SETUP:
            self.fail(
                body.code or pb.ERROR_FEATURE_MISMATCH,
                f"destination refused the migration: {body.reason}",
                now,
                notify=False,
            )

    def past_trouble(self, now: float) -> None:
        """The trouble that made this migration unsettled is over: it belongs to the timeline,
        not to `error`, which an orchestrator reads as this migration's outcome."""
        s = self.s
        if s.failure is not None:
            s._mark_time(f"earlier trouble, since overcome: {s.failure.reason}", now)
            s.failure = None

    def complete(self, now: float, note: str | None) -> None:
        s = self.s
        self.past_trouble(now)
        s._move(_S.COMPLETED)
        s.t_end = now
        s._mark_time(note or "destination running", now)
        if s.throttle:
            s.host.set_throttle(0.0)  # the report keeps how far it went
        s._events.append(ev.Finished("completed", note))

    def unsettled(self, now: float, why: str, *, postcopy: bool = False) -> None:
        s = self.s
        reason = (
            f"{why}: the guest is not resumed here because it may be running there (its state is kept "
            "intact here); settle it with 'ctl settle here' or 'ctl settle there'"
        )
        if postcopy:
            reason = (
                f"{why}; this side keeps the guest as it was at the switchover. 'ctl recover' if the "
                "destination lives on (it finishes the migration; 'ctl settle there' waits for its "
                "verdict), 'ctl settle here' only if it is gone for good"
            )
        if s.failure is None:
            s.failure = Failure(pb.ERROR_TIMEOUT, reason, s.phase.value)
        s._move(_S.UNSETTLED)
        s.t_end = now
        s._events.append(ev.Finished("unsettled", reason))

    def fail(
        self,
        code: int,
        reason: str,
        now: float,
        *,
        notify: bool = True,
        cancelled: bool = False,
        after_commit_ok: bool = False,
    ) -> None:
        s = self.s
        if s.phase.terminal:
            return
        if s.failure is None or after_commit_ok:
            s.failure = Failure(code, reason, s.phase.value)
        if s.phase.postcopy and not after_commit_ok:
            # Neither side alone holds the guest: never resumed here, never given up.
            self.unsettled(now, f"postcopy stopped: {reason}", postcopy=True)
            return
        committed = s.phase in (_S.COMMITTING, _S.UNSETTLED) and not after_commit_ok
        if committed:
            # After the commit the destination may already run the guest: resuming here could
            # run it twice. Only an answer from there, or an operator, settles it.
            if s.phase is _S.COMMITTING:
                self.unsettled(now, reason)
            return
        s._move(_S.FAILING)
        if notify:
            s._send(now, abort=pb.Abort(code=code, reason=reason))
        s.precopy.pass_ = None
        if s.throttle:
            s.host.set_throttle(0.0)
        if s.guest_stopped:
            s.host.resume_guest()
            s.guest_stopped = False
        s.t_end = now
        final = _S.CANCELLED if cancelled else _S.FAILED
        s._move(final)
        s._events.append(ev.Finished(final.value, reason))
