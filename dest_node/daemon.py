"""The destination daemon: a listening socket around a DestSession, and after a verified
handover, the vCPU thread that runs the arrived guest."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from common.constants import (
    CLOSE_LINGER_MS,
    MAX_CHANNELS,
    MAX_FRAME_BYTES,
)
from common.control import ControlError, ControlServer
from common.event_log import EventLog
from common.keys import DATA_DOMAIN, KeyFileError, Security, curve_server
from common.logging import get_logger
from common.outgoing import OutgoingMigration, SocketSlot, io_threads
from common.outgoing_commands import OutgoingCommands, migrate_choices
from common.protocol import events as ev
from common.protocol.dest import DestParameters, DestSession
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase
from common.report import guest_summary, write_report
from common.zap import ZapHandler
from dest_node.guest_host import GuestHost
from dest_node.qemu_handback import QemuHandback
from dest_node.reading import Reader
from dest_node.refusals import HandshakeWatch, RefusalLog, watch_handshakes

_POLL_CAP_S = 0.05


class StartupError(Exception):
    """The daemon cannot start as asked (an address in use, say): one line, no traceback."""


@dataclass
class DestOptions:
    listen: str
    params: DestParameters
    once: bool = False
    stop_at_step: int | None = None
    report: str | None = None
    control: str | None = None
    # for sending a guest that runs here onward (ctl migrate)
    outgoing_params: MigrationParameters = field(default_factory=MigrationParameters)
    security: Security = field(default_factory=Security)
    preallocate_bytes: int | None = None  # commit this much guest memory before a source arrives
    to_qemu: str | None = None  # hand a guest from QEMU back to QEMU: its stream goes here


def source_left_after_handover(session: DestSession) -> bool:
    """The guest runs here and its source heard so: a source gone now simply left (a one-shot
    source exits), and what is still sent to it (acknowledgements) is not missed."""
    return session.phase is DestPhase.RUNNING and not any(e.kind == "started" for e in session.link.unacked)


class DestDaemon:
    def __init__(self, options: DestOptions) -> None:
        self.options = options
        self.log = get_logger("dest-node")
        security = options.security
        try:
            security.check_listen(options.listen)
            if options.control:
                security.check_control(options.control)
        except KeyFileError as exc:
            raise StartupError(str(exc)) from None
        # a source's parallel channels are known only from its hello: room for all of them
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=io_threads(MAX_CHANNELS))
        # the key check, bound before any socket that needs it: without a handler libzmq admits any key
        self.zap = (
            ZapHandler(self.ctx, security.allow_lists, get_logger("dest-node"))
            if security.needs_zap
            else None
        )
        self.sock = self.ctx.socket(zmq.ROUTER)
        if security.key is not None:
            curve_server(self.sock, security.key, DATA_DOMAIN)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable reply raises, not vanishes
        # A source's connection that ZeroMQ re-established after a reset keeps its routing id;
        # the new connection takes that id over instead of being refused as a duplicate.
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        receive_queue = 4 * options.params.window + 64
        self.sock.setsockopt(zmq.RCVHWM, receive_queue)
        try:
            self.sock.bind(options.listen)
        except zmq.ZMQError as exc:
            self.sock.close(linger=0)
            self._close_zap()
            self.ctx.term()
            raise StartupError(f"cannot listen on {options.listen}: {exc}") from None
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._undelivered = 0
        self.host = GuestHost(
            self.log,
            stop_at_step=options.stop_at_step,
            preallocate_bytes=options.preallocate_bytes,
            keep_preallocating=not options.once,
            arrived_pages=self._arrived_pages,
            on_taken_back=self._withdraw_onward,
        )
        self.refusals = RefusalLog(self.log)
        self.handshakes: HandshakeWatch | None = None  # watched while the loop runs
        self.reader = Reader(self.sock, self.refusals, keyed=self.zap is not None, hold=receive_queue)
        self.session = self._new_session()
        self._warned_postcopy_signal = False
        self._t_guest_done: float | None = None
        self.outgoing: OutgoingMigration | None = None
        self.last_outgoing: dict[str, Any] | None = None
        # the incoming migration before the one this node waits for, and how it ended
        self.last_incoming: dict[str, Any] | None = None
        self.quit = False
        self.signalled: str | None = None
        self._reported_failure = False
        self.handback = QemuHandback(options.to_qemu, self.log) if options.to_qemu else None
        self.events = EventLog()
        # what this node's onward migrations use (its own guest's parameters came from its source)
        self.commands = OutgoingCommands(
            options.outgoing_params,
            lambda: self.outgoing,
            lambda: self.outgoing.after_call() if self.outgoing else None,
            self.status,
            self.log,
        )
        self.control: ControlServer | None = None
        if options.control:
            try:
                self.control = ControlServer(
                    self.ctx,
                    options.control,
                    {
                        "status": lambda _: self.status(),
                        "cancel": lambda _: self.cancel(),
                        "migrate": self._ctl_migrate,
                        "events": lambda args: self.events.after(args.get("after", 0)),
                        **self.commands.handlers(),
                    },
                    curve=security.control_curve(options.control),
                )
            except zmq.ZMQError as exc:
                self.sock.close(linger=0)
                self._close_zap()
                self.ctx.term()
                raise StartupError(f"cannot serve control commands on {options.control}: {exc}") from None

    def _close_zap(self) -> None:
        if self.zap is not None:
            self.zap.close()

    def _new_session(self) -> DestSession:
        """A session for the next source, remembering the sessions whose guest ran here (their
        sources may still be reconnecting to learn that)."""
        previous: DestSession | None = getattr(self, "session", None)
        self.reader.forget()
        handed_over = previous.handed_over_sessions() if previous is not None else None
        return DestSession(self.host, self.options.params, time.monotonic(), handed_over)

    def _next_incoming(self) -> None:
        self.last_incoming = self.session.report(time.monotonic())
        self.session = self._new_session()

    def _arrived_pages(self) -> Callable[[], int]:
        session = self.session  # a prefault runs ahead of this session's pages, not a later one's
        return lambda: session.stats.pages

    def _withdraw_onward(self) -> None:
        """The guest that ran here was taken back upstream: any copy this node was sending on
        is withdrawn (the guest it carries no longer runs anywhere it came from)."""
        outgoing = self.outgoing
        if outgoing is not None and not outgoing.session.phase.terminal:
            outgoing.session.withdraw(time.monotonic(), "the guest was taken back by the node it came from")
            outgoing.after_call()

    # -- commands --------------------------------------------------------------------------------
    def status(self, with_digests: bool = False) -> dict[str, Any]:
        """The report so far; digests only when asked and the guest is not running."""
        report = self.session.report(time.monotonic())
        report["listen"] = self.address
        if self.session.phase is DestPhase.WAITING and self.last_incoming is not None:
            report["last_incoming"] = self.last_incoming
        report.update(self.host.memory_report())
        if self.handback is not None:
            report["qemu_stream"] = self.handback.report()
        if self.outgoing is not None:
            report["outgoing"] = self.outgoing.session.report(time.monotonic())
        elif self.last_outgoing is not None:
            report["outgoing"] = self.last_outgoing
        runner = self.host.runner
        guest = self.host.running_guest or self.session.guest
        running = runner is not None and runner.running
        error = runner.error if runner is not None else None
        report["guest"] = None
        if guest is not None:
            report["guest"] = guest_summary(
                guest,
                here=self.session.phase in (DestPhase.RUNNING, DestPhase.POSTCOPY),
                running=running,
                with_digests=with_digests and not running,
                error=error,
            )
        return report

    def cancel(self, reason: str = "cancelled by the destination's operator") -> dict[str, Any]:
        outgoing = self.outgoing
        if outgoing is not None and not outgoing.session.phase.terminal:
            outgoing.session.cancel(time.monotonic(), reason)
            outgoing.after_call()
            return self.status()
        self.session.cancel(time.monotonic(), reason)
        self._flush()
        return self.status()

    def _ctl_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        """Send the guest that runs here onward, as a source-node would."""
        security = self.options.security
        choices = migrate_choices(args, self.commands.params, security, None)
        peer_key = choices.peer_key
        if self.outgoing is not None and not self.outgoing.session.phase.terminal:
            raise ControlError(
                f"a migration is already in progress (phase {self.outgoing.session.phase.value})"
            )
        guest = self.host.running_guest
        if self.session.phase is not DestPhase.RUNNING or guest is None:
            raise ControlError(f"no guest runs here to migrate (phase {self.session.phase.value})")
        if self.host.runner is None or self.host.stopped_for_good:
            raise ControlError(
                "the guest here has stopped (--stop-at-step): there is nothing live to migrate"
            )
        self.outgoing = OutgoingMigration(
            self.ctx,
            guest,
            self.host,
            choices.params,
            choices.uri,
            self.log,
            node_name="dest-node",
            on_event=lambda session_id, event: self.events.record("outgoing", session_id, event),
            curve=(security.key, peer_key) if security.key is not None and peer_key is not None else None,
            own_endpoints=(self.address, *([self.control.address] if self.control else [])),
        )
        return {"session": self.outgoing.session.session_id.hex()}

    def _outgoing_done(self) -> None:
        """The guest left for good: this node is free for the next incoming migration."""
        outgoing = self.outgoing
        if outgoing is None or outgoing.finished is None:
            return
        if outgoing.finished.status != "completed" or self.host.running_guest is None:
            if self.host.running_guest is None and outgoing.session.phase.terminal:
                # the guest was taken back while it was on its way on: nothing here to send
                self.last_outgoing = outgoing.session.report(time.monotonic())
                outgoing.close()
                self.outgoing = None
            return
        self.log.info("guest migrated away; waiting for the next incoming migration")
        self.last_outgoing = outgoing.session.report(time.monotonic())
        outgoing.close()
        self.outgoing = None
        self.host.migrated_away()
        if self.options.once:
            self.quit = True
            return
        self._next_incoming()

    # -- the loop ---------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._take_events()
        for peer, frames in self.session.take_outgoing():
            try:
                self.sock.send_multipart([peer, *frames], flags=zmq.NOBLOCK, copy=False)
            except (zmq.Again, zmq.ZMQError) as exc:
                if peer != self.session.peer:
                    # a refusal a stranger does not read, or a request the source's urgent
                    # connection did not take (it is asked again, sequenced)
                    self.session.postcopy_side.unreachable(peer)
                    continue
                # Our source is gone or stuck. Nothing is lost: the session keeps every sequenced
                # message until it is acknowledged and sends it again after a resume. Said once
                # per run of failures, not once per message.
                if self._undelivered == 0 and not source_left_after_handover(self.session):
                    self.log.warning(
                        "source unreachable; replies wait for it", peer=peer.hex(), reason=str(exc)
                    )
                self._undelivered += 1
                continue
            if self._undelivered:
                self.log.info("source reachable again", undelivered_replies=self._undelivered)
                self._undelivered = 0

    def _take_events(self) -> None:
        for event in self.session.take_events():
            self.events.record("incoming", self.session.session_id, event)
            if isinstance(event, ev.PhaseChanged):
                self.log.info("phase", phase=event.phase, rounds=self.session.rounds)
            elif isinstance(event, ev.PostcopyStarted):
                self.log.info("postcopy: guest runs here", missing_pages=event.missing_pages)
            elif isinstance(event, ev.Finished) and self.session.postcopy is not None:
                report = self.session.report(time.monotonic())
                self.log.info(
                    f"postcopy {event.status}",
                    error=event.reason,
                    **{k: v for k, v in report["postcopy"].items() if k != "fault_latencies_ms"},
                )
            elif isinstance(event, ev.LinkRestored):
                self.log.info("source reconnected", epoch=event.epoch, resent_messages=event.resent)
            elif isinstance(event, ev.Refused):
                self.refusals.refused(event)

    def _on_signal(self, signum: int, _: Any) -> None:
        self.signalled = signal.Signals(signum).name

    def _on_hangup(self, _signum: int, _: Any) -> None:
        if self.zap is not None:
            self.zap.request_reload()

    def _handle_signal(self) -> None:
        """An incoming migration is cancelled and its source told at once (it resumes there)."""
        if self.session.phase is DestPhase.POSTCOPY and not self._warned_postcopy_signal:
            # the guest runs only here now, with pages still on the source: a second signal is needed
            self._warned_postcopy_signal = True
            self.signalled = None
            self.log.error("postcopy in progress: the guest runs only here; signal again to exit anyway")
            return
        if self.session.phase in (DestPhase.RECEIVING, DestPhase.AWAIT_COMMIT):
            self.cancel(f"destination interrupted by {self.signalled}")
            self._observe()
        self.quit = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
        security = self.options.security
        self.log.info(
            "waiting for an incoming migration",
            listen=self.address,
            keys="CURVE" if security.key is not None else "none",
            key=security.key.fingerprint if security.key is not None else None,
            allowed_sources=self.zap.keys(DATA_DOMAIN) if self.zap is not None else None,
        )
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap.socket, zmq.POLLIN)
        if self.control:
            poller.register(self.control.socket, zmq.POLLIN)
        slot = SocketSlot(poller)
        while not self.quit:
            if self.signalled:
                self._handle_signal()
                if self.quit:
                    break
            now = time.monotonic()
            self.session.poll(now)
            self._flush()
            timeout = min(_POLL_CAP_S, max(0.0, self.session.next_deadline(now) - now))
            outgoing = self.outgoing
            if outgoing is not None:
                timeout = min(timeout, outgoing.poll(now))
            slot.track(outgoing)
            guest_wait = self.host.seconds_until_due(now)
            if guest_wait is not None:
                timeout = min(timeout, guest_wait)
            if self.reader.held:
                timeout = 0.0
            events = dict(poller.poll(int(timeout * 1000)))
            if self.zap is not None:
                self.zap.service(events, time.monotonic())
            self.handshakes = watch_handshakes(
                self.handshakes, self, poller, events, waiting=self.session.phase is DestPhase.WAITING
            )
            if self.sock in events or self.reader.held:
                self.reader.drain(self.session)
                self._flush()
            slot.service(outgoing, events)
            if self.control and self.control.socket in events:
                self.control.handle_one()
                self._flush()
            self.host.run_slice()
            self._observe()
            self.refusals.flush()
            self._outgoing_done()
            if self._done():
                break
        return self._finish()

    def _observe(self) -> None:
        self.host.log_preallocation()
        phase = self.session.phase
        session = self.session
        if self.handback is not None and phase is DestPhase.RUNNING and session.guest is not None:
            if session.verified is True and session.failure is None:
                self.handback.hand_back(session.guest)  # verified and committed: the guest is ours
            else:
                self.handback.refuse("the migration did not verify: no stream written")
        if phase is DestPhase.FAILED and not self._reported_failure:
            self._reported_failure = True
            self.log.error(
                "incoming migration failed",
                error=self.session.failure.reason if self.session.failure else None,
            )
            if self.options.report:
                write_report(self.options.report, self.status(with_digests=True))
            if not self.options.once:
                # ready for the next source; what arrived was discarded
                self._next_incoming()
                self._reported_failure = False

    def _done(self) -> bool:
        if self.session.phase is DestPhase.FAILED and self.options.once:
            return True
        if self.outgoing is not None and not self.outgoing.session.phase.ended:
            # the guest is on its way on: leaving now would abandon the next node mid-stream
            return False
        if not (self.session.phase is DestPhase.RUNNING and self.host.stopped_for_good):
            return False
        # The guest is done here; after a precopy handover the source must also have heard that
        # it ran here (Started is sent again until acknowledged), or it is left unsure whose
        # guest it is. A source that never answers is given its reconnect time.
        now = time.monotonic()
        if self._t_guest_done is None:
            self._t_guest_done = now
        return source_left_after_handover(self.session) or now - self._t_guest_done > self.session.keep_for_s

    def _finish(self) -> int:
        self.refusals.flush(final=True)
        self.host.close()
        if self.outgoing is not None:
            self.outgoing.close()
        completed = self.session.phase is DestPhase.RUNNING or self.last_outgoing is not None
        if self.handback is not None and self.handback.error is not None:
            completed = False
        report = self.status(with_digests=True)
        if report["status"] == "none" and "last_incoming" in report:
            # what it waited for never came: the report is of the last migration that did
            report = {**report, **report.pop("last_incoming")}
        if self.options.report:
            write_report(self.options.report, report)
        self.log.info("dest-node exiting", status=report["status"], error=report["error"])
        watch_handshakes(self.handshakes, self, None, {}, waiting=False)
        self.sock.close(linger=CLOSE_LINGER_MS)  # the Started reply must reach the source
        if self.control:
            self.control.close()
        self._close_zap()
        self.ctx.term()
        return 0 if completed else 1
