"""The source daemon: a running guest, a control endpoint, and the sockets around a
SourceSession. Everything protocol-shaped lives in the session; this file moves bytes,
keeps time and steers the vCPU thread."""

from __future__ import annotations

import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq

from common.constants import CLOSE_LINGER_MS, MAX_FRAME_BYTES
from common.control import ControlError, ControlServer
from common.guest.guest import Guest
from common.guest.runner import GuestRunner
from common.logging import get_logger
from common.progress import Progress
from common.protocol.params import MigrationParameters
from common.protocol.phases import SourcePhase
from common.protocol.source import SourceSession
from common.report import guest_summary
from common.wire.framing import Buffer

_POLL_CAP_S = 0.05


@dataclass
class SourceOptions:
    params: MigrationParameters
    control: str | None = None
    one_shot: bool = False  # --migrate-to: migrate once, then exit when the guest stops


class SourceDaemon:
    def __init__(self, guest: Guest, runner: GuestRunner, options: SourceOptions) -> None:
        self.guest = guest
        self.runner = runner
        self.options = options
        self.params = options.params
        self.log = get_logger("source-node")
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.data: zmq.Socket[bytes] | None = None
        self.session: SourceSession | None = None
        self.pending: deque[list[Buffer]] = deque()
        self.progress = Progress()
        self.quit = False
        self.finished_report: dict[str, Any] | None = None
        self._last_round = 0
        self.control: ControlServer | None = None
        if options.control:
            self.control = ControlServer(
                self.ctx,
                options.control,
                {
                    "status": lambda _: self.status(),
                    "migrate": self._ctl_migrate,
                    "cancel": lambda _: self.cancel(),
                    "set-parameters": self._ctl_set_parameters,
                },
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
        if self.session is not None and not self.session.phase.terminal:
            raise ControlError(f"a migration is already in progress (phase {self.session.phase.value})")
        if self.session is not None and self.session.phase is SourcePhase.COMPLETED:
            raise ControlError("the guest has already been migrated away")
        if not uri.startswith(("tcp://", "ipc://")):
            raise ControlError(f"destination '{uri}' is not a tcp:// or ipc:// address")
        if self.data is not None:
            self.data.close(linger=0)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # No ZMQ_IMMEDIATE: with it libzmq drops a disconnected peer's unread messages at once,
        # and a destination that exits right after its Started reply lost that reply (seen
        # about once in 50 migrations). An absent peer still shows as the setup timeout.
        sock.setsockopt(zmq.SNDHWM, 4 * self.params.window + 64)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        sock.connect(uri)
        self.data = sock
        self.pending.clear()
        now = time.monotonic()
        self.session = SourceSession(self.guest, self, self.params, now)
        self.session.start(now)
        self.finished_report = None
        self._last_round = 0
        self.log.info(
            "migration started",
            destination=uri,
            session=self.session.session_id.hex(),
            ram_bytes=self.guest.memory.ram_bytes,
        )

    def cancel(self) -> dict[str, Any]:
        if self.session is None or self.session.phase.terminal:
            raise ControlError("no migration in progress")
        self.session.cancel(time.monotonic())
        self._flush()
        return self.status()

    def status(self, with_digests: bool = False) -> dict[str, Any]:
        """The report so far. Digests of a running guest would be torn, and hashing a large
        guest on every status request is wasted work: they come with the final report."""
        now = time.monotonic()
        report: dict[str, Any] = (
            self.session.report(now) if self.session else {"status": "none", "mode": None, "error": None}
        )
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
            self.session.set_parameters(args)
        return {
            "downtime_limit_ms": self.params.downtime_limit_ms,
            "max_bandwidth": self.params.max_bandwidth,
            "convergence_timeout_s": self.params.convergence_timeout_s,
        }

    # -- the loop ----------------------------------------------------------------------------
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
        while True:
            try:
                frames = self.data.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.session.receive([f.buffer for f in frames], time.monotonic())

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "quit", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "quit", True))
        self.runner.start()
        poller = zmq.Poller()
        if self.control:
            poller.register(self.control.socket, zmq.POLLIN)
        registered: zmq.Socket[bytes] | None = None
        while not self.quit:
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
            if session is not None and not session.phase.terminal:
                session.poll(now)
                self._flush()
                timeout = min(timeout, max(0.0, session.next_deadline(now) - now))
                if self.pending and self.data is not None:
                    poller.modify(self.data, zmq.POLLIN | zmq.POLLOUT)
                elif self.data is not None:
                    poller.modify(self.data, zmq.POLLIN)
            events = dict(poller.poll(int(timeout * 1000)))
            if self.data is not None and self.data in events and session is not None:
                if events[self.data] & zmq.POLLIN:
                    self._drain()
                self._flush()
            if self.control and self.control.socket in events:
                self.control.handle_one()
            self.runner.run_slice()
            if session is not None:
                self._observe(session)
            if self.options.one_shot and self._one_shot_done():
                break
        return self._finish()

    def _observe(self, session: SourceSession) -> None:
        now = time.monotonic()
        if not session.phase.terminal:
            report = session.report(now)
            self.progress.update(report)
            if session.round != self._last_round:
                self._last_round = session.round
                self.log.info(
                    "round",
                    round=session.round,
                    phase=session.phase.value,
                    pages_remaining=report["pages_remaining"],
                    expected_downtime_ms=report["expected_downtime_ms"],
                    throughput_mbps=report["throughput_mbps"],
                )
            return
        if self.finished_report is None:
            self.progress.update(session.report(now), force=True)
            self.progress.finish()
            self.finished_report = session.report(now)
            if session.phase is SourcePhase.COMPLETED:
                self.log.info(
                    "migration completed",
                    downtime_ms=self.finished_report["downtime_ms"],
                    total_time_ms=self.finished_report["total_time_ms"],
                    rounds=session.round,
                )
            else:
                self.log.error(
                    "migration failed",
                    status=self.finished_report["status"],
                    error=self.finished_report["error"],
                    guest_runs_here=session.guest_runs_here,
                )

    def _one_shot_done(self) -> bool:
        session = self.session
        if session is None or not session.phase.terminal:
            return False
        if session.phase is SourcePhase.COMPLETED:
            return True
        # A failed migration leaves the guest running here, as it should: the process
        # lives on until the guest stops at --stop-at-step (or a signal).
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
