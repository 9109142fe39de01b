"""The source daemon: a running guest, a control endpoint, and an outgoing migration of that
guest when asked for one. Everything protocol-shaped lives in the session; this file keeps
time, steers the vCPU and answers the control endpoint."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from common.control import ControlError, ControlServer
from common.event_log import EventLog
from common.guest.guest import Guest
from common.guest.runner import GuestRunner
from common.keys import KeyFileError, Security
from common.logging import get_logger
from common.outgoing import OutgoingMigration, SocketSlot
from common.outgoing_commands import OutgoingCommands, migrate_choices
from common.progress import Progress
from common.protocol.params import MigrationParameters
from common.protocol.phases import SourcePhase
from common.protocol.source import SourceSession
from common.report import guest_summary
from common.zap import ZapHandler

_POLL_CAP_S = 0.05


class StartupError(Exception):
    """The daemon cannot start as asked (an address in use, say): one line, no traceback."""


@dataclass
class SourceOptions:
    params: MigrationParameters
    control: str | None = None
    one_shot: bool = False  # --migrate-to: migrate once, then exit when the guest stops
    security: Security = field(default_factory=Security)
    peer_key: bytes | None = None  # the destination's public key, unless `migrate` names one


def open_control(
    ctx: zmq.Context[zmq.Socket[bytes]], address: str, security: Security, log: Any
) -> tuple[ControlServer, ZapHandler | None]:
    """The control endpoint, and the key check in front of it when it leaves this machine
    (bound first: without a handler, libzmq would admit any key)."""
    try:
        security.check_control(address)
        zap = ZapHandler(ctx, security.allow_lists, log) if security.needs_zap else None
    except KeyFileError as exc:
        raise StartupError(str(exc)) from None
    try:
        return ControlServer(ctx, address, {}, curve=security.control_curve(address)), zap
    except zmq.ZMQError as exc:
        if zap is not None:
            zap.close()
        raise StartupError(f"cannot serve control commands on {address}: {exc}") from None


class SourceDaemon:
    def __init__(
        self,
        guest: Guest,
        runner: GuestRunner,
        options: SourceOptions,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        control: ControlServer | None = None,
        zap: ZapHandler | None = None,
    ) -> None:
        self.guest = guest
        self.runner = runner
        self._guest_error_logged = False
        self.options = options
        self.log = get_logger("source-node")
        self.events = EventLog()
        self.commands = OutgoingCommands(
            options.params, lambda: self.outgoing, self._after_session_call, self.status, self.log
        )
        self.ctx: zmq.Context[zmq.Socket[bytes]] = ctx or zmq.Context()
        self.outgoing: OutgoingMigration | None = None
        self.progress = Progress(log=self.log)
        self.quit = False
        self.signalled: str | None = None
        self._quit_by: str | None = None
        self.finished_report: dict[str, Any] | None = None
        self._warned_postcopy_signal = False
        self.control = control
        self.zap = zap
        if control is None and options.control:
            self.control, self.zap = open_control(self.ctx, options.control, options.security, self.log)
        if self.control is not None:
            self.control.handlers.update(
                {
                    "status": lambda _: self.status(),
                    "migrate": self._ctl_migrate,
                    "cancel": lambda _: self.cancel(),
                    "events": lambda args: self.events.after(args.get("after", 0)),
                    **self.commands.handlers(),
                }
            )
            self.log.info("control endpoint ready", address=self.control.address)

    # -- the host interface the session steers ----------------------------------------------
    def stop_guest(self) -> None:
        self.runner.pause()

    def resume_guest(self) -> None:
        self.runner.resume()

    def set_throttle(self, share: float) -> None:
        self.runner.throttle = share
        self.log.info("auto-converge throttle", throttle=round(share, 2))

    def guest_quiet(self) -> bool:
        return not self.runner.running  # its steps run on this thread, between our calls

    # -- commands -----------------------------------------------------------------------------
    @property
    def session(self) -> SourceSession | None:
        return self.outgoing.session if self.outgoing is not None else None

    def migrate(
        self, uri: str, peer_key: bytes | None = None, params: MigrationParameters | None = None
    ) -> None:
        """Send the guest to `uri`; `peer_key`: the destination's public key (with --key);
        `params`: this migration's (the node's, unless ctl migrate chose a mode or channels)."""
        if params is None:
            try:
                self.options.security.check_peer(uri, peer_key)
            except KeyFileError as exc:
                raise ControlError(str(exc)) from None
        session = self.session
        if session is not None and session.phase is SourcePhase.UNSETTLED:
            raise ControlError(
                "the last handover is unsettled: the guest may run on the destination; "
                "settle it first with 'ctl settle here' or 'ctl settle there'"
            )
        if session is not None and not session.phase.terminal:
            raise ControlError(f"a migration is already in progress (phase {session.phase.value})")
        if session is not None and session.phase is SourcePhase.COMPLETED:
            raise ControlError("the guest has already been migrated away")
        key = self.options.security.key
        curve = (key, peer_key) if key is not None and peer_key is not None else None
        own = (self.control.address,) if self.control is not None else ()
        outgoing = OutgoingMigration(
            self.ctx,
            self.guest,
            self,
            params or self.commands.params,
            uri,
            self.log,
            curve=curve,
            own_endpoints=own,
            on_event=lambda session_id, event: self.events.record("outgoing", session_id, event),
        )
        if self.outgoing is not None:
            self.outgoing.close()
        self.outgoing = outgoing
        self.finished_report = None

    def cancel(self, reason: str = "cancelled by the operator") -> dict[str, Any]:
        if self.session is None or self.session.phase.terminal:
            raise ControlError("no migration in progress")
        self.session.cancel(time.monotonic(), reason)
        self._after_session_call()
        return self.status()

    def status(self, with_digests: bool = False) -> dict[str, Any]:
        """The report so far. Digests of a running guest would be torn, and hashing a large
        guest on every status request is wasted work: they come with the final report."""
        now = time.monotonic()
        report: dict[str, Any] = (
            self.session.report(now) if self.session else {"status": "none", "mode": None, "error": None}
        )
        report["parameters"] = self.commands.params.settable()
        report["guest"] = guest_summary(
            self.guest,
            here=self.guest_would_run,
            running=self.runner.running,
            with_digests=with_digests and not self.runner.running,
            error=self.runner.error,
        )
        return report

    def final_report(self) -> dict[str, Any]:
        """The report once the vCPU has stopped: digests included, computed once. A migration
        left unfinished by a signal (a second one during postcopy) says so, not "active"."""
        self.runner.pause()
        report = self.status(with_digests=True)
        session = self.session
        if self._quit_by and session is not None and not session.phase.ended:
            lost = (report.get("postcopy") or {}).get("pages_not_yet_sent")
            report["status"] = "failed"
            report["error"] = f"abandoned by {self._quit_by} in phase {session.phase.value}" + (
                f": the destination runs the guest without the {lost} pages not yet sent, held only here and now lost"
                if session.postcopy is not None
                else ""
            )
        return report

    @property
    def guest_would_run(self) -> bool:
        return self.session is None or self.session.guest_runs_here

    def _ctl_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        choices = migrate_choices(args, self.commands.params, self.options.security, self.options.peer_key)
        self.migrate(choices.uri, choices.peer_key, choices.params)
        return {"session": self.session.session_id.hex() if self.session else None}

    def _postcopy_waits(self) -> bool:
        """Postcopy handed the guest over but the destination still needs pages only we hold."""
        session = self.session
        return (
            session is not None
            and session.postcopy is not None
            and not session.phase.terminal  # completed, or settled: no longer a postcopy in progress
        )

    # -- the loop ----------------------------------------------------------------------------
    def _note_guest_error(self) -> None:
        if self.runner.error is not None and not self._guest_error_logged:
            self._guest_error_logged = True
            self.log.error("guest stopped by an error of its own", reason=self.runner.error)

    def _after_session_call(self) -> None:
        if self.session is not None and not self.session.phase.ended:
            self.finished_report = None  # recovered: it will end again, and be reported then
        if self.outgoing is not None:
            self.outgoing.after_call()
            self._note_finish()

    def _note_finish(self) -> None:
        outgoing = self.outgoing
        if outgoing is not None and outgoing.finished is not None and self.finished_report is None:
            self.finished_report = outgoing.session.report(time.monotonic())
            self.progress.update(self.finished_report, force=True)
            self.progress.finish()
            if (
                self.options.one_shot
                and self.signalled is None
                and self.guest_would_run
                and self.runner.running
            ):
                self.log.warning(
                    "the guest keeps running here; this process ends when it stops "
                    "(--stop-at-step, or Ctrl-C / SIGTERM, which stop the guest too)"
                )

    def _on_signal(self, signum: int, _: Any) -> None:
        self.signalled = signal.Signals(signum).name

    def _on_hangup(self, _signum: int, _: Any) -> None:
        if self.zap is not None:
            self.zap.request_reload()

    def _handle_signal(self) -> None:
        """A signal cancels a migration (telling the destination at once) and ends the daemon;
        after the commit it waits for the handover to settle instead: cancelling then could
        leave the guest running nowhere or twice."""
        session = self.session
        if self._postcopy_waits() and not self._warned_postcopy_signal:
            # the destination runs the guest with pages only this process holds: leaving now
            # would lose them, so a second signal is needed
            self._warned_postcopy_signal = True
            self.signalled = None
            self.log.error(
                "postcopy in progress: the destination still needs pages held only here; "
                "signal again to exit anyway (those pages are then lost)"
            )
            return
        if session is not None and not session.phase.ended and not session.phase.postcopy:
            if session.phase in (SourcePhase.COMMITTING,):
                return
            session.cancel(time.monotonic(), f"interrupted by {self.signalled}")
            self._after_session_call()
        self.quit = True
        self._quit_by = self.signalled

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
        self.runner.start()
        poller = zmq.Poller()
        if self.control:
            poller.register(self.control.socket, zmq.POLLIN)
        if self.zap:
            poller.register(self.zap.socket, zmq.POLLIN)
        slot = SocketSlot(poller)
        while not self.quit:
            if self.signalled:
                self._handle_signal()
                if self.quit:
                    break
            now = time.monotonic()
            outgoing = self.outgoing
            slot.track(outgoing)
            timeout = _POLL_CAP_S
            guest_wait = self.runner.seconds_until_due(now)
            if guest_wait is not None:
                timeout = min(timeout, guest_wait)
            if outgoing is not None and not outgoing.session.phase.ended:
                timeout = min(timeout, outgoing.poll(now))
                self._note_finish()
                slot.track(outgoing)  # the poll may have reconnected, or queued more
            events = dict(poller.poll(int(timeout * 1000)))
            if slot.service(outgoing, events):
                self._note_finish()
            if self.zap is not None:
                self.zap.service(events, time.monotonic())
            if self.control and self.control.socket in events:
                self.control.handle_one()
            self.runner.run_slice()
            self._note_guest_error()
            if outgoing is not None and not outgoing.session.phase.ended and self.progress.wanted():
                self.progress.update(outgoing.session.report(time.monotonic()))
            if self.options.one_shot and self._one_shot_done():
                break
        return self._finish()

    def _one_shot_done(self) -> bool:
        session = self.session
        if session is None or not session.phase.ended:
            return False
        if session.phase is SourcePhase.COMPLETED:
            return True
        if session.phase is SourcePhase.UNSETTLED and session.postcopy is not None:
            # Never leave with pages the destination's guest still needs: try the link again
            # every recover timeout; an operator may settle it meanwhile.
            now = time.monotonic()
            if session.t_end is not None and now - session.t_end > session.params.postcopy_recover_timeout_s:
                session.recover(now)
                self._after_session_call()
            return False
        if session.phase is SourcePhase.UNSETTLED:
            return True  # nothing more will happen here without an operator
        # A failed migration leaves the guest running here, as it should: the process lives on
        # until the guest stops at --stop-at-step (or a signal, or an error of its own).
        return self.runner.stopped_for_good

    def _finish(self) -> int:
        self.runner.pause()
        if self.outgoing is not None:
            self.outgoing.close()
        if self.control:
            self.control.close()
        if self.zap:
            self.zap.close()
        self.ctx.term()
        self.progress.finish()
        if self.session is not None and self.session.phase is SourcePhase.COMPLETED:
            return 0
        # ended by a signal: as a shell reports it (130 for Ctrl-C)
        return 128 + signal.Signals[self._quit_by].value if self._quit_by else 1
