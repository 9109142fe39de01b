"""The source side of a migration as a pure state machine.

Feed it what the destination sent (`receive`) and the time (`poll`); take the frames it wants
sent from `take_outgoing`. It reaches the guest only through its memory (to read pages) and a
`SourceHost` (to stop, resume and throttle the vCPUs): no sockets, threads or clocks here, so
precopy is tested through an in-memory link with a fake clock.

Precopy in brief: round 1 sends every populated page and tag section; each later round sends
what the dirty sync took. After each round the bytes still dirty over the measured bandwidth
give the expected downtime; under the limit, the guest stops and the last pass, the vCPU state
and the verification request follow. Only a verified, committed handover stops the source for
good: any failure before the commit resumes the guest here.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from common.constants import (
    DIGEST_BLOCK_PAGES,
    PACKED_TAG_BYTES_PER_PAGE,
    PAGE_SIZE,
    PAGES_PER_BATCH,
    PROTOCOL_VERSION,
    SESSION_ID_BYTES,
)
from common.guest.digest import DigestCache
from common.guest.guest import Guest
from common.guest.vcpu import vcpus_digest
from common.protocol.params import MigrationParameters
from common.protocol.phases import Failure, SourcePhase
from common.protocol.sequence import Arrival, Sequence
from common.protocol.stats import BandwidthMeter, TransferStats, ms, verification_section
from common.transfer import PagePass, device_state
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.bitmap import encode_bitmap
from common.wire.framing import Buffer, WireError

Indices = npt.NDArray[np.int64]
_EMPTY: Indices = np.zeros(0, dtype=np.int64)
# The guest is stopped only when both sides have at most this many pages left to hash, so that
# hashing does not land inside the downtime (about a millisecond of work).
CATCH_UP_PAGES = 4096
MAX_VERIFY_ATTEMPTS = 2


class SourceHost(Protocol):
    def stop_guest(self) -> None: ...
    def resume_guest(self) -> None: ...
    def set_throttle(self, share: float) -> None: ...


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
    ) -> None:
        self.guest = guest
        self.mem = guest.memory
        self.host = host
        self.params = params.check()
        self.session_id = session_id or os.urandom(SESSION_ID_BYTES)
        self.node_name = node_name
        self.phase = SourcePhase.IDLE
        self.failure: Failure | None = None
        self.stats = TransferStats()
        self.meter = BandwidthMeter()
        self.digests = DigestCache(self.mem)
        self._outgoing: list[list[Buffer]] = []
        self._seq = 0
        self._incoming = Sequence()
        self._inflight: deque[tuple[int, int]] = deque()  # (seq, wire bytes) of data messages
        self._pass: PagePass | None = None
        self._use_lz4 = False
        self.round = 0
        self.throttle = 0.0
        self.guest_stopped = False
        self.verify_attempt = 0
        self.mismatched_pages: list[int] = []
        self.verified: bool | None = None
        self.dest_digests: dict[str, str] | None = None
        self.expected_downtime_s: float | None = None
        self.dirty_pages_rate = 0.0
        self._rate_limited_until: float | None = None
        # times
        self.t_start = now
        self.t_setup_done: float | None = None
        self.t_round: float = now
        self.t_stop: float | None = None
        self.t_end: float | None = None
        self.t_last_heard = now
        self.t_last_sent = now
        self._sent_since_active = 0
        self._acked_at_round = 0
        self.dest_backlog = 0  # pages the destination has placed but not hashed
        self._catching_up = False
        self._resend_vcpus = True
        self.source_digests: dict[str, str] | None = None
        self.timeline: list[tuple[str, float]] = []  # (event, seconds since start)

    # -- verbs ------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        if self.phase is not SourcePhase.IDLE:
            raise RuntimeError(f"migration already started (phase {self.phase.value})")
        self.phase = SourcePhase.SETUP
        features = [pb.FEATURE_MTE, pb.FEATURE_VERIFY] + ([pb.FEATURE_LZ4] if self.params.use_lz4 else [])
        self._send_control(
            now,
            hello=pb.Hello(
                protocol_version=PROTOCOL_VERSION,
                page_size=PAGE_SIZE,
                granule_size=16,
                ram_bytes=self.mem.ram_bytes,
                features=features,
                mode=pb.MODE_PRECOPY,
                vcpu_count=len(self.guest.vcpus),
                node_name=self.node_name,
                auth_token=self.params.auth_token,
                populated_hint_lz4=encode_bitmap(self.mem.data_populated),
            ),
        )

    def take_outgoing(self) -> list[list[Buffer]]:
        out, self._outgoing = self._outgoing, []
        return out

    def receive(self, frames: list[Buffer], now: float) -> None:
        if self.phase.terminal or self.phase is SourcePhase.IDLE:
            return
        try:
            message = framing.decode(frames)
        except WireError as exc:
            self._fail(exc.code, f"destination sent a bad message: {exc.reason}", now)
            return
        env = message.envelope
        if (
            env.seq == 0
            and message.kind in ("hello_ack", "abort")
            and env.session_id in (self.session_id, b"")
        ):
            # Sent outside any session: the destination refuses us (our hello, or a message it
            # could not place in a session). Its reason is the one worth reporting.
            body = getattr(env, message.kind)
            if message.kind == "abort":
                self._fail(body.code, f"destination refused: {body.reason}", now, notify=False)
            elif not body.accepted and self.phase is SourcePhase.SETUP:
                self._fail(
                    body.code or pb.ERROR_FEATURE_MISMATCH,
                    f"destination refused the migration: {body.reason}",
                    now,
                    notify=False,
                )
            return
        if env.session_id != self.session_id:
            self._fail(pb.ERROR_WRONG_SESSION, "destination answered for another session", now)
            return
        arrival = self._incoming.arrive(env.seq)
        if arrival is Arrival.REPEAT:
            return  # already handled
        if arrival is Arrival.GAP:
            self._fail(pb.ERROR_SEQUENCE_GAP, self._incoming.gap_reason(env.seq, "destination"), now)
            return
        self.t_last_heard = now
        handler = getattr(self, f"_on_{message.kind}", None)
        if handler is None:
            self._fail(
                pb.ERROR_BAD_MESSAGE,
                f"unexpected {message.kind} from the destination in phase {self.phase.value}",
                now,
            )
            return
        try:
            handler(getattr(env, message.kind), now)
        except WireError as exc:
            self._fail(exc.code, exc.reason, now)

    def poll(self, now: float) -> None:
        """Advance on time: send what the window and bandwidth allow, check the peer."""
        if self.phase.terminal or self.phase is SourcePhase.IDLE:
            return
        # After the commit, giving up leaves the guest stopped here, so wait longer for proof.
        patience = self.params.peer_timeout_s * (3 if self.phase is SourcePhase.COMMITTING else 1)
        if now - self.t_last_heard > patience:
            if self.phase is SourcePhase.SETUP:
                reason = f"no answer from the destination within {self.params.peer_timeout_s:.1f} s (is dest-node listening there?)"
            elif self.phase is SourcePhase.COMMITTING:
                reason = (
                    "the destination did not confirm it runs the guest after the commit; the guest is not "
                    "resumed here because it may be running there (its state is kept intact here)"
                )
            else:
                reason = f"destination silent for {self.params.peer_timeout_s:.1f} s"
            self._fail(pb.ERROR_TIMEOUT, reason, now)
            return
        if self.phase in (SourcePhase.ACTIVE, SourcePhase.SWITCHOVER):
            self._pump(now)
        if self.phase is SourcePhase.ACTIVE and self.digests.stale_pages:
            self.digests.refresh(self.params.digest_budget_pages)
        if self.phase is SourcePhase.ACTIVE and self._catching_up:
            self._end_of_pass(now)
        if now - self.t_last_sent >= self.params.heartbeat_interval_s:
            self._send_control(now, heartbeat=pb.Heartbeat())

    def next_deadline(self, now: float) -> float:
        """When poll next has something to do even if no message arrives."""
        deadline = min(
            self.t_last_sent + self.params.heartbeat_interval_s,
            self.t_last_heard + self.params.peer_timeout_s,
        )
        if self.phase in (SourcePhase.ACTIVE, SourcePhase.SWITCHOVER):
            if self._pass is not None and len(self._inflight) < self.params.window:
                deadline = min(deadline, self._rate_limited_until or now)
            if self.phase is SourcePhase.ACTIVE and self.digests.stale_pages:
                deadline = now  # hashing to do; otherwise an ack (an arrival) is what we wait for
        return deadline

    def cancel(self, now: float, reason: str = "cancelled by the operator") -> None:
        if self.phase.terminal:
            return
        if self.phase is SourcePhase.COMMITTING:
            raise RuntimeError("too late to cancel: the guest has been handed to the destination")
        self._fail(pb.ERROR_CANCELLED, reason, now, cancelled=True)

    def set_parameters(self, changes: dict[str, Any]) -> None:
        self.params = self.params.updated(changes)

    # -- handlers -------------------------------------------------------------------------
    def _on_hello_ack(self, ack: pb.HelloAck, now: float) -> None:
        if self.phase is not SourcePhase.SETUP:
            raise WireError(pb.ERROR_BAD_MESSAGE, f"hello_ack in phase {self.phase.value}")
        if not ack.accepted:
            raise WireError(
                ack.code or pb.ERROR_FEATURE_MISMATCH, f"destination refused the migration: {ack.reason}"
            )
        if not 1 <= ack.initial_credit <= 1024:
            raise WireError(pb.ERROR_BAD_MESSAGE, f"destination granted a window of {ack.initial_credit}")
        self.params = replace(self.params, window=min(self.params.window, ack.initial_credit))
        self._use_lz4 = pb.FEATURE_LZ4 in ack.features and self.params.use_lz4
        self.phase = SourcePhase.ACTIVE
        self.t_setup_done = self.t_round = now
        self._mark_time("setup done", now)
        self.round = 1
        first = self.mem.populated_pages()
        self.digests.mark(first.data_pages, first.tag_pages)
        # Never-written pages are zero on both sides already: they cost nothing at all.
        self.stats.zero_pages += self.mem.page_count - int(first.data_pages.size)
        self.stats.untagged_pages += self.mem.page_count - int(first.tag_pages.size)
        self._pass = PagePass(first.data_pages, first.tag_pages)

    def _on_ack(self, ack: pb.Ack, now: float) -> None:
        if ack.acked_seq > self._seq:
            raise WireError(
                pb.ERROR_BAD_MESSAGE, f"destination acknowledged message {ack.acked_seq}, never sent"
            )
        self.dest_backlog = ack.digest_backlog
        acked = 0
        while self._inflight and self._inflight[0][0] <= ack.acked_seq:
            acked += self._inflight.popleft()[1]
        if acked:
            self.meter.add(now, acked)

    def _on_heartbeat(self, _: pb.Heartbeat, now: float) -> None:
        pass

    def _on_abort(self, abort: pb.Abort, now: float) -> None:
        self._fail(abort.code, f"destination aborted: {abort.reason}", now, notify=False)

    def _on_verify_result(self, result: pb.VerifyResult, now: float) -> None:
        if self.phase is not SourcePhase.VERIFYING or result.attempt != self.verify_attempt:
            raise WireError(
                pb.ERROR_BAD_MESSAGE, f"verify_result (attempt {result.attempt}) in phase {self.phase.value}"
            )
        dest = result.destination
        self.dest_digests = {
            "ram": dest.ram_digest.hex(),
            "tags": dest.tag_digest.hex(),
            "vcpu": dest.vcpu_digest.hex(),
        }
        self._mark_time(f"verify result {result.attempt}: {'ok' if result.ok else 'mismatch'}", now)
        if result.ok:
            self.verified = True
            self.phase = SourcePhase.COMMITTING
            self._send_control(now, commit=pb.Commit())
            return
        data, tags = self._pages_at_fault(result)
        self.mismatched_pages = sorted(set(data.tolist()) | set(tags.tolist()))
        if self.verify_attempt >= MAX_VERIFY_ATTEMPTS:
            self.verified = False
            shown = ", ".join(map(str, self.mismatched_pages[:8])) or "vCPU state"
            raise WireError(
                pb.ERROR_VERIFICATION_FAILED,
                f"verification failed after resending: pages {shown} still differ",
            )
        self.phase = SourcePhase.SWITCHOVER
        self._pass = PagePass(data, tags)
        self._resend_vcpus = result.vcpu_mismatch

    def _on_started(self, started: pb.Started, now: float) -> None:
        if self.phase is not SourcePhase.COMMITTING:
            raise WireError(pb.ERROR_BAD_MESSAGE, f"started in phase {self.phase.value}")
        self.phase = SourcePhase.COMPLETED
        self.t_end = now
        self._mark_time("destination running", now)
        if self.throttle:
            self.host.set_throttle(0.0)  # the report keeps how far it went

    def _mark_time(self, event: str, now: float) -> None:
        self.timeline.append((event, now - self.t_start))

    # -- the data path ----------------------------------------------------------------------
    def _active_since(self, now: float) -> float:
        return now if self.t_setup_done is None else self.t_setup_done

    def _active_for(self, now: float) -> float:
        return now - self._active_since(now)

    def _pump(self, now: float) -> None:
        while self._pass is not None and len(self._inflight) < self.params.window:
            if self.params.max_bandwidth:
                allowed = self.params.max_bandwidth * self._active_for(now) + PAGES_PER_BATCH * PAGE_SIZE
                if self._sent_since_active > allowed:
                    self._rate_limited_until = (
                        self._active_since(now)
                        + (self._sent_since_active - PAGES_PER_BATCH * PAGE_SIZE) / self.params.max_bandwidth
                    )
                    return
            self._rate_limited_until = None
            p = self._pass
            batch = p.next_batch(self.mem, use_lz4=self._use_lz4, round_no=self.round)
            if batch is not None:
                size = self._send_data(now, batch.payload, **{batch.kind: batch.body})
                if batch.kind == "ram_pages":
                    self.stats.ram_bytes += size
                    self.stats.pages_sent += batch.stats.pages
                    self.stats.zero_pages += batch.stats.zero
                else:
                    self.stats.tag_bytes += size
                    self.stats.tag_sections += batch.stats.pages
                    self.stats.untagged_pages += batch.stats.zero
            if p.done:
                self._pass = None
                self._end_of_pass(now)

    def _end_of_pass(self, now: float) -> None:
        if self.phase is SourcePhase.SWITCHOVER:
            self._finish_switchover(now)
            return
        # Decide only once the destination has applied everything and both sides have hashed
        # nearly all of it: what is still in flight or unhashed would otherwise be downtime.
        behind = (
            bool(self._inflight)
            or self.digests.stale_pages > CATCH_UP_PAGES
            or self.dest_backlog > CATCH_UP_PAGES
        )
        if behind and self._active_for(now) <= self.params.convergence_timeout_s:
            self._catching_up = True
            return
        self._catching_up = False
        sync = self.mem.dirty_sync()
        self.digests.mark(sync.data_pages, sync.tag_pages)
        self._mark_time(f"round {self.round} sent", now)
        elapsed = max(now - self.t_round, 1e-6)
        self.dirty_pages_rate = (sync.data_pages.size + sync.tag_pages.size) / elapsed
        remaining = sync.data_pages.size * PAGE_SIZE + sync.tag_pages.size * PACKED_TAG_BYTES_PER_PAGE
        bandwidth = self.meter.rate() or (self.meter.total / max(self._active_for(now), 1e-6)) or None
        self.expected_downtime_s = remaining / bandwidth if bandwidth else None
        self._send_control(
            now,
            end_of_round=pb.EndOfRound(
                round=self.round,
                pages_sent=self.stats.pages_sent,
                tag_sections_sent=self.stats.tag_sections,
                remaining_dirty_pages=int(sync.data_pages.size),
            ),
        )
        limit_s = self.params.downtime_limit_ms / 1000.0
        if remaining == 0 or (self.expected_downtime_s is not None and self.expected_downtime_s <= limit_s):
            self._switchover(now, sync.data_pages, sync.tag_pages)
            return
        if self._active_for(now) > self.params.convergence_timeout_s:
            reason = (
                f"not converging after {self.params.convergence_timeout_s:.0f} s and {self.round} rounds: "
                f"{self.dirty_pages_rate:.0f} pages/s dirtied, expected downtime "
                f"{(self.expected_downtime_s or 0) * 1000:.0f} ms over the {self.params.downtime_limit_ms:.0f} ms limit"
                f" at throttle {self.throttle:.0%}"
            )
            self._fail(pb.ERROR_NOT_CONVERGING, reason, now)
            return
        # Auto-converge: a round that leaves more than half of what it sent dirty again
        # means the guest outruns the link; hold its vCPU back a little more each time.
        sent_this_round = max(1, self.meter.total - self._acked_at_round)
        if self.round >= 2 and remaining > sent_this_round // 2:
            self.throttle = min(
                self.params.throttle_max,
                self.throttle + self.params.throttle_increment
                if self.throttle
                else self.params.throttle_initial,
            )
            self.host.set_throttle(self.throttle)
        self._acked_at_round = self.meter.total
        self.round += 1
        self.t_round = now
        self._pass = PagePass(sync.data_pages, sync.tag_pages)

    def _switchover(self, now: float, data: Indices, tags: Indices) -> None:
        self.host.stop_guest()
        self.guest_stopped = True
        self.t_stop = now
        self._mark_time("guest stopped", now)
        self.phase = SourcePhase.SWITCHOVER
        self.round += 1
        self._send_control(now, end_of_round=pb.EndOfRound(round=self.round, final=True))
        last = self.mem.dirty_sync()
        self.digests.mark(last.data_pages, last.tag_pages)
        self._pass = PagePass(np.union1d(data, last.data_pages), np.union1d(tags, last.tag_pages))
        self._resend_vcpus = True

    def _finish_switchover(self, now: float) -> None:
        if self._resend_vcpus:
            self._send_control(now, device_state=device_state(self.guest))
        digests = self.digests.digests()
        vcpu_digest = vcpus_digest(self.guest.vcpus)
        self.verify_attempt += 1
        self._send_control(
            now,
            verify_request=pb.VerifyRequest(
                attempt=self.verify_attempt,
                source=pb.GuestDigests(
                    ram_digest=digests.ram,
                    tag_digest=digests.tags,
                    vcpu_digest=vcpu_digest,
                    ram_block_digests=digests.ram_blocks.astype("<u8").tobytes(),
                    tag_block_digests=digests.tag_blocks.astype("<u8").tobytes(),
                ),
            ),
        )
        self._mark_time(f"verify request {self.verify_attempt} sent", now)
        self.source_digests = {
            "ram": digests.ram.hex(),
            "tags": digests.tags.hex(),
            "vcpu": vcpu_digest.hex(),
        }
        self.phase = SourcePhase.VERIFYING

    def _pages_at_fault(self, result: pb.VerifyResult) -> tuple[Indices, Indices]:
        """Compare the destination's page digests with ours; hostile input is refused."""
        data: list[int] = []
        tags: list[int] = []
        if len(result.page_digests) > self.digests.ram.block_digests.size:
            raise WireError(pb.ERROR_BAD_MESSAGE, "verify_result names more blocks than the guest has")
        for block in result.page_digests:
            count = len(block.ram_digests) // 8
            if (
                block.first_page % DIGEST_BLOCK_PAGES
                or block.first_page >= self.mem.page_count
                or len(block.ram_digests) != len(block.tag_digests)
                or len(block.ram_digests) % 8
                or count > min(DIGEST_BLOCK_PAGES, self.mem.page_count - block.first_page)
            ):
                raise WireError(
                    pb.ERROR_BAD_MESSAGE,
                    f"verify_result page digests at page {block.first_page} are malformed",
                )
            ours_ram, ours_tags = self.digests.page_digests(block.first_page, count)
            theirs_ram = np.frombuffer(block.ram_digests, dtype="<u8")
            theirs_tags = np.frombuffer(block.tag_digests, dtype="<u8")
            data.extend((block.first_page + np.flatnonzero(ours_ram != theirs_ram)).tolist())
            tags.extend((block.first_page + np.flatnonzero(ours_tags != theirs_tags)).tolist())
        return np.array(sorted(data), dtype=np.int64), np.array(sorted(tags), dtype=np.int64)

    # -- sending ---------------------------------------------------------------------------
    def _next_envelope(self, **body: Any) -> pb.Envelope:
        self._seq += 1
        return framing.envelope(self.session_id, self._seq, **body)

    def _account(self, size: int) -> None:
        if self.guest_stopped:
            self.stats.downtime_bytes += size
        elif self.phase is not SourcePhase.SETUP:
            self.stats.precopy_bytes += size

    def _send_data(self, now: float, payload: Buffer, **body: Any) -> int:
        frames = framing.encode(self._next_envelope(**body), payload)
        size = sum(len(f) for f in frames)
        self._inflight.append((self._seq, size))
        self._outgoing.append(frames)
        self._account(size)
        self._sent_since_active += size
        self.t_last_sent = now
        return size

    def _send_control(self, now: float, **body: Any) -> None:
        frames = framing.encode(self._next_envelope(**body))
        size = sum(len(f) for f in frames)
        self.stats.other_bytes += size
        self._account(size)
        self._outgoing.append(frames)
        self.t_last_sent = now

    # -- failure ---------------------------------------------------------------------------
    def _fail(
        self, code: int, reason: str, now: float, *, notify: bool = True, cancelled: bool = False
    ) -> None:
        if self.failure is None:
            self.failure = Failure(code, reason, self.phase.value)
        committed = self.phase is SourcePhase.COMMITTING
        self.phase = SourcePhase.FAILING
        if notify:
            self._send_control(now, abort=pb.Abort(code=code, reason=reason))
        self._pass = None
        if self.throttle:
            self.host.set_throttle(0.0)
        # Before the commit the guest is still ours: run it again here. After it, the
        # destination may already run it, so resuming here could run it twice.
        if self.guest_stopped and not committed:
            self.host.resume_guest()
            self.guest_stopped = False
        self.t_end = now
        self.phase = SourcePhase.CANCELLED if cancelled else SourcePhase.FAILED

    # -- reporting --------------------------------------------------------------------------
    @property
    def guest_runs_here(self) -> bool:
        return not self.guest_stopped and self.phase is not SourcePhase.COMPLETED

    def report(self, now: float) -> dict[str, Any]:
        end = self.t_end or now
        total_s = end - self.t_start
        status = {
            SourcePhase.COMPLETED: "completed",
            SourcePhase.FAILED: "failed",
            SourcePhase.CANCELLED: "cancelled",
        }.get(self.phase, "active")
        downtime = (
            (self.t_end - self.t_stop)
            if (self.t_stop is not None and self.t_end is not None and self.phase is SourcePhase.COMPLETED)
            else None
        )
        return {
            "status": status,
            "phase": self.phase.value,
            "mode": "precopy",
            "error": self.failure.reason if self.failure else None,
            "total_time_ms": ms(total_s),
            "setup_time_ms": ms(self.t_setup_done - self.t_start) if self.t_setup_done else None,
            "downtime_ms": ms(downtime),
            "expected_downtime_ms": ms(self.expected_downtime_s),
            "downtime_limit_ms": self.params.downtime_limit_ms,
            "rounds": self.round,
            "throttle": round(self.throttle, 3),
            "ram": self.stats.ram_section(self.mem.ram_bytes),
            "tags": self.stats.tags_section(),
            "throughput_mbps": round(self.stats.total_bytes * 8 / 1e6 / total_s, 1) if total_s > 0 else 0.0,
            "dirty_pages_rate": round(self.dirty_pages_rate, 1),
            "pages_remaining": self._pass.remaining_bytes // PAGE_SIZE if self._pass else 0,
            "timeline_ms": {event: round(at * 1000, 3) for event, at in self.timeline},
            "verification": verification_section(
                self.verified, self.dest_digests or self.source_digests, self.mismatched_pages
            ),
        }
