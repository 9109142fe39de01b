"""The source daemon: a running guest, a control endpoint, and the sockets around a
SourceSession. Everything protocol-shaped lives in the session; this file moves bytes, keeps
time, steers the vCPU and acts on the session's events (a reconnect opens a new connection)."""

from __future__ import annotations

import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq

from common.constants import CLOSE_LINGER_MS, MAX_FRAME_BYTES
from common.control import ControlError, ControlServer
from common.endpoints import check_endpoint
from common.guest.guest import Guest
from common.guest.runner import GuestRunner
from common.logging import get_logger
from common.progress import Progress
from common.protocol import events as ev
from common.protocol.params import MigrationParameters
from common.protocol.phases import SourcePhase
from common.protocol.source import SourceSession
from common.report import guest_summary
from common.wire.framing import Buffer

_POLL_CAP_S = 0.05


class StartupError(Exception):
    """The daemon cannot start as asked (an address in use, say): one line, no traceback."""


@dataclass
class SourceOptions:
    params: MigrationParameters
    control: str | None = None
    one_shot: bool = False  # --migrate-to: migrate once, then exit when the guest stops


def open_control(ctx: zmq.Context[zmq.Socket[bytes]], address: str) -> ControlServer:
    try:
        return ControlServer(ctx, address, {})
    except zmq.ZMQError as exc:
        raise StartupError(f"cannot serve control commands on {address}: {exc}") from None


class SourceDaemon:
    def __init__(
        self,
        guest: Guest,
        runner: GuestRunner,
        options: SourceOptions,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        control: ControlServer | None = None,
    ) -> None:
        self.guest = guest
        self.runner = runner
        self.options = options
        self.params = options.params
        self.log = get_logger("source-node")
        self.ctx: zmq.Context[zmq.Socket[bytes]] = ctx or zmq.Context()
        self.data: zmq.Socket[bytes] | None = None
        self.uri: str | None = None
        self.session: SourceSession | None = None
        self.pending: deque[list[Buffer]] = deque()
        self.progress = Progress()
        self.quit = False
        self.signalled: str | None = None
        self.finished_report: dict[str, Any] | None = None
        self.control = control
        if control is None and options.control:
            self.control = open_control(self.ctx, options.control)
        if self.control is not None:
            self.control.handlers.update(
                {
                    "status": lambda _: self.status(),
                    "migrate": self._ctl_migrate,
                    "cancel": lambda _: self.cancel(),
                    "set-parameters": self._ctl_set_parameters,
                    "settle": self._ctl_settle,
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

    # -- commands -----------------------------------------------------------------------------
    def migrate(self, uri: str) -> None:
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
        try:
            check_endpoint(uri, "destination")
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        now = time.monotonic()
        candidate = SourceSession(self.guest, self, self.params, now)
        self.uri = uri
        self._connect(candidate, epoch=1)  # raises ControlError, and nothing has changed
        self.session = candidate
        self.session.start(now)
        self.finished_report = None
        self.log.info(
            "migration started",
            destination=uri,
            session=candidate.session_id.hex(),
            ram_bytes=self.guest.memory.ram_bytes,
        )
        self._take_events()

    def _connect(self, session: SourceSession, epoch: int) -> None:
        """A fresh connection for this epoch. Its routing id names the session and epoch, so
        that ZeroMQ's own reconnects (after a reset) keep it and the destination still knows it."""
        assert self.uri is not None
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, session.session_id + epoch.to_bytes(4, "big"))
        # No ZMQ_IMMEDIATE: with it libzmq drops a disconnected peer's unread messages at once.
        sock.setsockopt(zmq.SNDHWM, 4 * self.params.window + 64)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        try:
            sock.connect(self.uri)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ControlError(f"cannot connect to {self.uri}: {exc}") from None
        if self.data is not None:
            self.data.close(linger=0)
        self.data = sock
        # what waited for the old connection is either resent by the session or not needed
        self.pending.clear()

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
        report["parameters"] = self.params.settable()
        report["guest"] = guest_summary(
            self.guest, running=self.guest_would_run, with_digests=with_digests and not self.runner.running
        )
        return report

    def final_report(self) -> dict[str, Any]:
        """The report once the vCPU has stopped: digests included, computed once."""
        self.runner.pause()
        return self.status(with_digests=True)

    @property
    def guest_would_run(self) -> bool:
        return self.session is None or self.session.guest_runs_here

    def _ctl_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        uri = args.get("uri")
        if not isinstance(uri, str):
            raise ControlError('migrate needs "uri", e.g. tcp://127.0.0.1:4444')
        self.migrate(uri)
        return {"session": self.session.session_id.hex() if self.session else None}

    def _ctl_set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        self.params = self.params.updated(args)
        if self.session is not None and not self.session.phase.terminal:
            self.session.set_parameters(self.params, time.monotonic())
        self.log.info("parameters changed", **args)
        return self.params.settable()

    def _ctl_settle(self, args: dict[str, Any]) -> dict[str, Any]:
        where = args.get("where")
        if where not in ("here", "there"):
            raise ControlError('settle needs "where": "here" (resume the guest on the source) or "there"')
        if self.session is None:
            raise ControlError("nothing to settle: no migration has run")
        self.session.settle(where == "here", time.monotonic())
        self._after_session_call()
        return self.status()

    # -- the loop ----------------------------------------------------------------------------
    def _take_events(self) -> None:
        session = self.session
        if session is None:
            return
        for event in session.take_events():
            if isinstance(event, ev.Reconnect):
                self.log.warning(
                    "link lost; reconnecting", epoch=event.epoch, silent_for_s=round(event.silent_for_s, 2)
                )
                try:
                    self._connect(session, event.epoch)
                except ControlError as exc:
                    self.log.error("reconnect failed", reason=str(exc))
            elif isinstance(event, ev.LinkRestored):
                self.log.info("link restored", epoch=event.epoch, resent_messages=event.resent)
            elif isinstance(event, ev.RoundStarted):
                report = session.report(time.monotonic())
                self.log.info(
                    "round",
                    round=event.round,
                    pages=event.pages,
                    expected_downtime_ms=report["expected_downtime_ms"],
                    throughput_mbps=report["throughput_mbps"],
                )
            elif isinstance(event, ev.Finished):
                self._finished(session, event)

    def _finished(self, session: SourceSession, event: ev.Finished) -> None:
        now = time.monotonic()
        self.progress.update(session.report(now), force=True)
        self.progress.finish()
        self.finished_report = session.report(now)
        if event.status == "completed":
            self.log.info(
                "migration completed",
                downtime_ms=self.finished_report["downtime_ms"],
                total_time_ms=self.finished_report["total_time_ms"],
                rounds=session.round,
                note=event.reason,
            )
        else:
            self.log.error(
                f"migration {event.status}",
                status=event.status,
                error=event.reason,
                guest_runs_here=session.guest_runs_here,
            )

    def _after_session_call(self) -> None:
        self._take_events()
        self._flush()

    def _flush(self) -> None:
        """Send what the session produced. Page payloads may be views of guest memory (no copy
        was made to encode them), so they are copied by the socket here, before the vCPU's next
        slice; whatever cannot be sent now is copied out before the guest may run again."""
        if self.session is not None:
            self.pending.extend(self.session.take_outgoing())
        while self.pending and self.data is not None:
            try:
                self.data.send_multipart(self.pending[0], flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                self.pending = deque([bytes(f) for f in frames] for frames in self.pending)
                return
            self.pending.popleft()

    def _drain(self) -> None:
        assert self.data is not None and self.session is not None
        data = self.data
        while self.data is data:  # a reconnect replaces the socket: read the new one next turn
            try:
                frames = data.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.session.receive([f.buffer for f in frames], time.monotonic())
            self._take_events()

    def _on_signal(self, signum: int, _: Any) -> None:
        self.signalled = signal.Signals(signum).name

    def _handle_signal(self) -> None:
        """A signal cancels a migration (telling the destination at once) and ends the daemon;
        after the commit it waits for the handover to settle instead: cancelling then could
        leave the guest running nowhere or twice."""
        session = self.session
        if session is not None and not session.phase.ended:
            if session.phase in (SourcePhase.COMMITTING,):
                return
            session.cancel(time.monotonic(), f"interrupted by {self.signalled}")
            self._after_session_call()
        self.quit = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.runner.start()
        poller = zmq.Poller()
        if self.control:
            poller.register(self.control.socket, zmq.POLLIN)
        registered: zmq.Socket[bytes] | None = None
        while not self.quit:
            if self.signalled:
                self._handle_signal()
                if self.quit:
                    break
            now = time.monotonic()
            session = self.session
            if self.data is not registered:
                if registered is not None:
                    poller.unregister(registered)
                if self.data is not None:
                    poller.register(self.data, zmq.POLLIN)
                registered = self.data
            timeout = _POLL_CAP_S
            guest_wait = self.runner.seconds_until_due(now)
            if guest_wait is not None:
                timeout = min(timeout, guest_wait)
            if session is not None and not session.phase.ended:
                session.poll(now)
                self._after_session_call()
                timeout = min(timeout, max(0.0, session.next_deadline(now) - now))
                if self.data is not None and self.data is registered:
                    poller.modify(self.data, zmq.POLLIN | (zmq.POLLOUT if self.pending else 0))
            events = dict(poller.poll(int(timeout * 1000)))
            if registered is not None and registered in events and session is not None:
                if events[registered] & zmq.POLLIN:
                    self._drain()
                self._flush()
            if self.control and self.control.socket in events:
                self.control.handle_one()
            self.runner.run_slice()
            if session is not None and not session.phase.ended:
                self.progress.update(session.report(time.monotonic()))
            if self.options.one_shot and self._one_shot_done():
                break
        return self._finish()

    def _one_shot_done(self) -> bool:
        session = self.session
        if session is None or not session.phase.ended:
            return False
        if session.phase is SourcePhase.COMPLETED:
            return True
        if session.phase is SourcePhase.UNSETTLED:
            return True  # nothing more will happen here without an operator
        # A failed migration leaves the guest running here, as it should: the process lives on
        # until the guest stops at --stop-at-step (or a signal).
        return self.runner.finished

    def _finish(self) -> int:
        self.runner.pause()
        if self.data is not None:
            self._flush()
            self.data.close(linger=CLOSE_LINGER_MS)  # a last Abort must reach the destination
        if self.control:
            self.control.close()
        self.ctx.term()
        self.progress.finish()
        return 0 if self.session is not None and self.session.phase is SourcePhase.COMPLETED else 1
