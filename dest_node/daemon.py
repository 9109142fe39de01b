"""The destination daemon: a listening socket around a DestSession, and after a verified
handover, the vCPU thread that runs the arrived guest."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from common.constants import (
    CLOSE_LINGER_MS,
    DRAIN_BUDGET_MESSAGES,
    MAX_CHANNELS,
    MAX_FRAME_BYTES,
    MAX_FRAMES_PER_MESSAGE,
    READS_PER_TURN,
    REFUSAL_LOG_LINES_PER_S,
    STRANGER_MESSAGES_PER_TURN,
)
from common.control import ControlError, ControlServer, peer_key_arg
from common.guest.guest import Guest
from common.guest.prefault import Preallocation, Prefaulter
from common.guest.presence import PresenceGate, RestartableVcpu
from common.guest.runner import GuestRunner
from common.guest.workload import NotAWorkloadGuest, Workload
from common.keys import DATA_DOMAIN, KeyFileError, Security, curve_server
from common.logging import get_logger
from common.outgoing import OutgoingMigration, SocketSlot, io_threads
from common.protocol import events as ev
from common.protocol.dest import DestParameters, DestSession
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase
from common.protocol.ratelimit import PerSecond
from common.report import guest_summary, write_report
from common.units import format_size
from common.wire import mte_migration_pb2 as pb
from common.zap import ZapHandler

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


def _peer_key(frame: zmq.Frame) -> bytes:
    """The public key the connection proved (the ZAP handler's user id); empty without keys."""
    try:
        return frame.get("User-Id").encode()
    except zmq.ZMQError:
        return b""


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
        self.sock.setsockopt(zmq.RCVHWM, 4 * options.params.window + 64)
        try:
            self.sock.bind(options.listen)
        except zmq.ZMQError as exc:
            self.sock.close(linger=0)
            self._close_zap()
            self.ctx.term()
            raise StartupError(f"cannot listen on {options.listen}: {exc}") from None
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._undelivered = 0
        self.session = self._new_session()
        self.runner: GuestRunner | None = None
        self.vcpu: RestartableVcpu | None = None
        self._warned_postcopy_signal = False
        self.running_guest: Guest | None = None
        self.prefaulter: Prefaulter | None = None
        self.last_prefault: dict[str, Any] | None = None
        self.preallocation: Preallocation | None = None
        self._preallocated_guest: Guest | None = None
        self._prealloc_logged: Preallocation | None = None  # the last one whose time was logged
        self._t_guest_done: float | None = None
        self._guest_error_logged: GuestRunner | None = None  # the runner whose error was logged
        self._preallocate()
        self.outgoing: OutgoingMigration | None = None
        self.last_outgoing: dict[str, Any] | None = None
        self.quit = False
        self.signalled: str | None = None
        self._reported_failure = False
        self._refusals_unlogged = 0  # refused messages not yet in the log
        self._dropped_unlogged = 0  # strangers' messages dropped unread, not yet in the log
        self._hello_log_lines = PerSecond(REFUSAL_LOG_LINES_PER_S)
        self._t_refusal_logged = float("-inf")
        self._last_refusal: ev.Refused | None = None
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
                        "settle": self._ctl_settle,
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
        handed_over = previous.handed_over_sessions() if previous is not None else None
        return DestSession(self, self.options.params, time.monotonic(), handed_over)

    def _preallocate(self) -> None:
        size = self.options.preallocate_bytes
        if size is not None and (self.preallocation is None or self.preallocation.backing is None):
            if self.preallocation is not None:
                self.preallocation.stop()  # still committing the memory of a discarded guest
            self.preallocation = Preallocation(size)
            self.preallocation.start()

    # -- the host interface the session steers --------------------------------------------------
    def create_guest(self, ram_bytes: int, vcpu_count: int) -> Guest:
        prealloc = self.preallocation
        backing = prealloc.take(ram_bytes) if prealloc is not None else None
        guest = Guest.create(ram_bytes, vcpu_count, backing)
        if prealloc is not None:
            if backing is None:
                self.log.warning(
                    "guest larger than the preallocation: its memory is committed as pages arrive",
                    ram=format_size(ram_bytes),
                    preallocated=format_size(prealloc.ram_bytes),
                )
            else:
                self._preallocated_guest = guest
        return guest

    def start_guest(self, guest: Guest, gate: PresenceGate | None = None) -> None:
        self._stop_prefault()
        self.running_guest = guest
        if gate is not None:
            # postcopy: steps restart when they touch a page that has not arrived
            self.vcpu = RestartableVcpu(guest, gate, Workload)
            self.runner = GuestRunner(self.vcpu, stop_at_step=self.options.stop_at_step)
            self.runner.start()
            self.log.info(
                "guest running (postcopy)",
                step=self.vcpu.step_count,
                missing_pages=gate.missing,
                stop_at_step=self.options.stop_at_step,
            )
            return
        try:
            workload = Workload(guest)
        except NotAWorkloadGuest as exc:
            self.log.warning("guest holds no workload; it runs idle", reason=str(exc))
            return
        self.runner = GuestRunner(workload, stop_at_step=self.options.stop_at_step)
        self.runner.start()
        self.log.info("guest running", step=workload.step_count, stop_at_step=self.options.stop_at_step)

    def take_page_misses(self) -> list[int]:
        return self.vcpu.take_misses() if self.vcpu is not None else []

    # the host interface of an outgoing migration: the guest that runs here
    def stop_guest(self) -> None:
        if self.runner is not None:
            self.runner.pause()

    def resume_guest(self) -> None:
        if self.runner is not None:
            self.runner.resume()

    def set_throttle(self, share: float) -> None:
        if self.runner is not None:
            self.runner.throttle = share

    def guest_quiet(self) -> bool:
        return self.runner is None or not self.runner.running

    def discard_guest(self, guest: Guest) -> None:
        self._stop_prefault()
        if guest is self.running_guest:
            # it ran here (postcopy, or handed over) until the source took it back: it stops now,
            # and so does any copy this node was sending on
            outgoing = self.outgoing
            if outgoing is not None and not outgoing.session.phase.terminal:
                outgoing.session.withdraw(
                    time.monotonic(), "the guest was taken back by the node it came from"
                )
                outgoing.after_call()
            if self.runner is not None:
                self.runner.pause()
            self.runner = None
            self.vcpu = None
            self.running_guest = None
            self.log.warning("guest stopped here: the source runs it again")
        self.log.info("incoming guest discarded")
        if guest is self._preallocated_guest:
            self._preallocated_guest = None
            if not self.options.once:
                self._preallocate()  # for the next source; this guest's memory goes with it

    def prefault(self, guest: Guest, pages: np.ndarray) -> None:
        if guest is self._preallocated_guest:
            return  # committed already
        self._stop_prefault()
        session = self.session
        self.prefaulter = Prefaulter(guest.memory, pages, arrived=lambda: session.stats.pages)
        self.prefaulter.start()

    def _stop_prefault(self) -> None:
        if self.prefaulter is not None:
            self.prefaulter.stop()
            self.last_prefault = {
                "faulted_pages": self.prefaulter.faulted_pages,
                "held_back": self.prefaulter.held_back,
            }
            self.log.info(
                "prefault done",
                faulted_pages=self.prefaulter.faulted_pages,
                # it waited for pages to arrive: the hint named more than the source sent yet
                held_back=self.prefaulter.held_back,
            )
            self.prefaulter = None

    # -- commands --------------------------------------------------------------------------------
    def status(self, with_digests: bool = False) -> dict[str, Any]:
        """The report so far; digests only when asked and the guest is not running."""
        report = self.session.report(time.monotonic())
        report["listen"] = self.address
        prealloc = self.preallocation
        report["preallocation"] = (
            None
            if prealloc is None
            else {
                "bytes": prealloc.ram_bytes,
                "committed_bytes": prealloc.committed_bytes,
                "seconds": prealloc.seconds,
            }
        )
        prefaulter = self.prefaulter
        report["prefault"] = (
            {"faulted_pages": prefaulter.faulted_pages, "held_back": prefaulter.held_back}
            if prefaulter is not None
            else self.last_prefault
        )
        if self.outgoing is not None:
            report["outgoing"] = self.outgoing.session.report(time.monotonic())
        elif self.last_outgoing is not None:
            report["outgoing"] = self.last_outgoing
        guest = self.running_guest or self.session.guest
        running = self.runner is not None and self.runner.running
        error = self.runner.error if self.runner is not None else None
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
        uri = args.get("uri")
        if not isinstance(uri, str):
            raise ControlError('migrate needs "uri", e.g. tcp://127.0.0.1:4444')
        peer_key = peer_key_arg(args)
        security = self.options.security
        try:
            security.check_peer(uri, peer_key)
        except KeyFileError as exc:
            raise ControlError(str(exc)) from None
        if self.outgoing is not None and not self.outgoing.session.phase.terminal:
            raise ControlError(
                f"a migration is already in progress (phase {self.outgoing.session.phase.value})"
            )
        if self.session.phase is not DestPhase.RUNNING or self.running_guest is None:
            raise ControlError(f"no guest runs here to migrate (phase {self.session.phase.value})")
        if self.runner is None or self.runner.stopped_for_good:
            raise ControlError(
                "the guest here has stopped (--stop-at-step): there is nothing live to migrate"
            )
        self.outgoing = OutgoingMigration(
            self.ctx,
            self.running_guest,
            self,
            self.options.outgoing_params,
            uri,
            self.log,
            node_name="dest-node",
            curve=(security.key, peer_key) if security.key is not None and peer_key is not None else None,
        )
        return {"session": self.outgoing.session.session_id.hex()}

    def _ctl_settle(self, args: dict[str, Any]) -> dict[str, Any]:
        where = args.get("where")
        if where not in ("here", "there"):
            raise ControlError('settle needs "where": "here" or "there"')
        if self.outgoing is None:
            raise ControlError("nothing to settle: no outgoing migration has run")
        try:
            self.outgoing.session.settle(where == "here", time.monotonic())
        except RuntimeError as exc:
            raise ControlError(str(exc)) from None
        self.outgoing.after_call()
        return self.status()

    def _outgoing_done(self) -> None:
        """The guest left for good: this node is free for the next incoming migration."""
        outgoing = self.outgoing
        if outgoing is None or outgoing.finished is None:
            return
        if outgoing.finished.status != "completed" or self.running_guest is None:
            if self.running_guest is None and outgoing.session.phase.terminal:
                # the guest was taken back while it was on its way on: nothing here to send
                self.last_outgoing = outgoing.session.report(time.monotonic())
                outgoing.close()
                self.outgoing = None
            return
        self.log.info("guest migrated away; waiting for the next incoming migration")
        self.last_outgoing = outgoing.session.report(time.monotonic())
        outgoing.close()
        self.outgoing = None
        self.runner = None
        self.running_guest = None  # its memory goes with the last reference
        if self.options.once:
            self.quit = True
            return
        self.session = self._new_session()

    # -- the loop ---------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._take_events()
        for peer, frames in self.session.take_outgoing():
            try:
                self.sock.send_multipart([peer, *frames], flags=zmq.NOBLOCK, copy=False)
            except (zmq.Again, zmq.ZMQError) as exc:
                if peer != self.session.peer:
                    continue  # a refusal a stranger does not read: nothing to say about it
                # Our source is gone or stuck. Nothing is lost: the session keeps every sequenced
                # message until it is acknowledged and sends it again after a resume. Said once
                # per run of failures, not once per message.
                if self._undelivered == 0:
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
                self._log_refusal(event)

    def _log_refusal(self, event: ev.Refused) -> None:
        """Refused hellos are logged one by one while they are few (an operator needs to see a
        misconfigured source); beyond REFUSAL_LOG_LINES_PER_S, and for every other refused
        message, a count at most once a second: a hostile peer must not flood the log, nor go
        unseen."""
        if event.hello and self._hello_log_lines.take(time.monotonic()):
            self.log.warning("source refused", connection=event.peer.hex(), reason=event.reason)
            return
        self._refusals_unlogged += 1
        self._last_refusal = event
        self._flush_refusals()

    def _flush_refusals(self, *, final: bool = False) -> None:
        now = time.monotonic()
        if not (final or now - self._t_refusal_logged >= 1.0):
            return
        event = self._last_refusal
        if event is not None and self._refusals_unlogged:
            self.log.warning(
                "messages refused",
                count=self._refusals_unlogged,
                last_reason=event.reason,
                connection=event.peer.hex(),
            )
            self._refusals_unlogged = 0
            self._t_refusal_logged = now
        if self._dropped_unlogged:
            self.log.warning("strangers' messages dropped unread", count=self._dropped_unlogged)
            self._dropped_unlogged = 0
            self._t_refusal_logged = now

    def _drain(self) -> None:
        """Take what arrived, the session's own source first. ZeroMQ hands over messages one
        connection at a time in turn; once a session exists, only a few of each turn's messages
        from anyone else are read (the rest are dropped unread and counted), and the turn ends
        after its budget of the source's own: a flood from any number of connections costs
        the migration reads, never its turns. Before any session, everyone is a stranger and
        up to READS_PER_TURN are read (a source's hello may be among them). A budget per turn
        also lets a postcopy vCPU run soon after its page lands."""
        session_id = self.session.session_id
        guarded = bool(session_id)
        keyed = self.zap is not None  # without keys there is no user id to ask each frame for
        own_taken = strangers = 0
        for _ in range(READS_PER_TURN):
            received = self._receive_one()
            if received is None:
                return
            peer, frames = received
            own = guarded and peer.startswith(session_id)
            if not own:
                strangers += 1
                if guarded and strangers > STRANGER_MESSAGES_PER_TURN:
                    self._dropped_unlogged += 1
                    continue
            now = time.monotonic()
            if len(frames) > MAX_FRAMES_PER_MESSAGE:
                self.session.refuse(
                    peer, pb.ERROR_BAD_MESSAGE, f"a message of more than {MAX_FRAMES_PER_MESSAGE} frames", now
                )
            elif frames:
                self.session.receive(
                    peer, [f.buffer for f in frames], now, peer_key=_peer_key(frames[0]) if keyed else b""
                )
            if own:
                own_taken += 1
                if own_taken >= DRAIN_BUDGET_MESSAGES:
                    return

    def _receive_one(self) -> tuple[bytes, list[zmq.Frame]] | None:
        """One message, frame by frame: past MAX_FRAMES_PER_MESSAGE the rest are read and
        dropped, never kept (a message of endless frames must not grow this process)."""
        try:
            routing = self.sock.recv(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        frames: list[zmq.Frame] = []
        more = routing.more
        while more:
            frame = self.sock.recv(copy=False)
            more = frame.more
            if len(frames) <= MAX_FRAMES_PER_MESSAGE:
                frames.append(frame)
        return routing.bytes, frames

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
            guest_wait = self.runner.seconds_until_due(now) if self.runner else None
            if guest_wait is not None:
                timeout = min(timeout, guest_wait)
            events = dict(poller.poll(int(timeout * 1000)))
            if self.zap is not None:
                self.zap.service(events, time.monotonic())
            if self.sock in events:
                self._drain()
                self._flush()
            slot.service(outgoing, events)
            if self.control and self.control.socket in events:
                self.control.handle_one()
                self._flush()
            if self.runner is not None:
                self.runner.run_slice()
                self._note_guest_error()
            self._observe()
            self._flush_refusals()
            self._outgoing_done()
            if self._done():
                break
        return self._finish()

    def _note_guest_error(self) -> None:
        runner = self.runner
        if runner is not None and runner.error is not None and runner is not self._guest_error_logged:
            self._guest_error_logged = runner
            self.log.error("guest stopped by an error of its own", reason=runner.error)

    def _observe(self) -> None:
        prealloc = self.preallocation
        if prealloc is not None and prealloc.seconds is not None and prealloc is not self._prealloc_logged:
            self._prealloc_logged = prealloc
            self.log.info(
                "memory preallocated",
                size=format_size(prealloc.ram_bytes),
                seconds=round(prealloc.seconds, 3),
                rate=f"{prealloc.committed_bytes / max(prealloc.seconds, 1e-9) / (1 << 30):.1f} GiB/s",
            )
        phase = self.session.phase
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
                self.session = self._new_session()
                self._reported_failure = False

    def _done(self) -> bool:
        if self.session.phase is DestPhase.FAILED and self.options.once:
            return True
        if self.outgoing is not None and not self.outgoing.session.phase.ended:
            # the guest is on its way on: leaving now would abandon the next node mid-stream
            return False
        if not (
            self.session.phase is DestPhase.RUNNING
            and self.runner is not None
            and self.runner.stopped_for_good
        ):
            return False
        # The guest is done here; after a precopy handover the source must also have heard that
        # it ran here (Started is sent again until acknowledged), or it is left unsure whose
        # guest it is. A source that never answers is given its reconnect time.
        now = time.monotonic()
        if self._t_guest_done is None:
            self._t_guest_done = now
        unheard = any(entry.kind == "started" for entry in self.session.link.unacked)
        return not unheard or now - self._t_guest_done > self.session.keep_for_s

    def _finish(self) -> int:
        self._flush_refusals(final=True)
        if self.preallocation is not None:
            self.preallocation.stop()
        prefaulter = self.prefaulter
        self._stop_prefault()
        if prefaulter is not None:
            prefaulter.join()
        if self.runner is not None:
            self.runner.pause()
        if self.outgoing is not None:
            self.outgoing.close()
        completed = self.session.phase is DestPhase.RUNNING or self.last_outgoing is not None
        report = self.status(with_digests=True)
        if self.options.report:
            write_report(self.options.report, report)
        self.log.info("dest-node exiting", status=report["status"], error=report["error"])
        self.sock.close(linger=CLOSE_LINGER_MS)  # the Started reply must reach the source
        if self.control:
            self.control.close()
        self._close_zap()
        self.ctx.term()
        return 0 if completed else 1
