"""Precopy as the source session carries it out: rounds of page and tag batches paced by the
window and the bandwidth cap, the end of each round (another, the switchover, postcopy or giving
up, as `precopy` decides), the stop and the last pass, and the verification's answer (the
commit, or a repair pass). A part of its SourceSession: it sends and moves through it.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from common.protocol import events as ev
from common.protocol.phases import SourcePhase
from common.protocol.precopy import Verdict
from common.protocol.stats import RoundRecord
from common.transfer import OutgoingBatch, device_state, encode_batch
from common.wire import mte_migration_pb2 as pb
from common.wire.codec import BatchStats

if TYPE_CHECKING:
    from common.protocol.source import SourceSession

_S = SourcePhase


class SourcePrecopySide:
    def __init__(self, session: SourceSession) -> None:
        self.s = session
        self.resend_vcpus = True  # the vCPU state goes (again) before the next verification

    def start(self, now: float) -> None:
        """Round 1: every page written, every tagged page."""
        s = self.s
        zero, untagged = s.precopy.first_round(now)
        s.stats.skipped_pages += zero
        s.stats.skipped_tag_pages += untagged
        self.round_started(now)

    # -- sending ---------------------------------------------------------------------------
    def capped(self) -> bool:
        """The cap paces precopy; inside the downtime every byte is downtime, so none waits."""
        return not self.s.guest_stopped

    def send_at(self, now: float) -> float | None:
        s = self.s
        if s.precopy.pass_ is None or s.in_flight >= s.params.window:
            return None
        if self.capped():
            return s.bucket.ready_at(now) or now
        return now

    def pump(self, now: float) -> None:
        s = self.s
        while s.precopy.pass_ is not None and s.in_flight < s.params.window:
            if self.capped() and s.bucket.ready_at(now) is not None:
                return
            p = s.precopy.pass_
            chunks = p.next_chunks(min(s.channels, s.params.window - s.in_flight))
            encode_map = s._encode_map if s.channels > 1 else map  # as granted
            encode = partial(self.encode, round_no=s.round, borrow=s.host.guest_quiet())
            for batch in encode_map(encode, chunks):
                self._send_batch(batch, now)
            if p.done:
                s.precopy.pass_ = None
                self.end_of_pass(now)

    def encode(self, chunk: tuple[str, Any], *, round_no: int, borrow: bool) -> OutgoingBatch:
        return encode_batch(self.s.mem, *chunk, use_lz4=self.s._use_lz4, round_no=round_no, borrow=borrow)

    def _send_batch(self, batch: OutgoingBatch, now: float) -> None:
        from common.protocol.source import Outbound

        s = self.s
        frames = s.link.sequenced(now, batch.payload, data=(batch.pages, s.round), **{batch.kind: batch.body})
        size = sum(len(f) for f in frames)
        s._outgoing.append(Outbound(frames, True, s.link.next_seq - 1))
        self.record_sent(batch.kind, batch.stats)
        s._account(size)
        if self.capped():
            s.bucket.spend(size, now)
        stats = s.stats
        if batch.kind == "ram_pages":
            stats.ram_bytes += size
            stats.pages += batch.stats.pages
            stats.zero_pages += batch.stats.zero
        else:
            stats.tag_bytes += size
            stats.tag_sections += batch.stats.pages
            stats.untagged_pages += batch.stats.zero

    def record_sent(self, kind: str, stats: BatchStats) -> None:
        """The digests a batch carries are this side's verification leaves: what was sent."""
        digests = self.s.digests
        record = digests.record_ram if kind == "ram_pages" else digests.record_tags
        record(stats.content, stats.digests, stats.empty)

    # -- rounds ----------------------------------------------------------------------------
    def end_of_pass(self, now: float) -> None:
        s = self.s
        if s.phase is _S.SWITCHOVER:
            self._finish_switchover(now)
            return
        finished_round = s.round
        if s.params.postcopy and (s._postcopy_now or finished_round >= s.params.postcopy_after_rounds):
            self._round_sent(finished_round, now)
            s.postcopy_side.switchover(now)
            return
        end = s.precopy.end_of_round(
            now, in_flight=s.in_flight, active_for=s._active_for(now), meter=s.meter, params=s.params
        )
        s._catching_up = end.verdict is Verdict.WAIT
        if end.sync is None:
            return
        s.digests.update_blocks()  # before any stop: the verification then hashes less
        self._round_sent(finished_round, now)
        if end.verdict is Verdict.SWITCHOVER and s.params.postcopy:
            # converged before its rounds were up: postcopy starts now, with little left to pull
            s.postcopy_side.switchover(now)
        elif end.verdict is Verdict.SWITCHOVER:
            self._switchover(now, end.sync)
        elif end.verdict is Verdict.GIVE_UP:
            s._fail(pb.ERROR_NOT_CONVERGING, end.reason, now)
        else:
            if s.throttle:
                s.host.set_throttle(s.throttle)
            self.round_started(now)

    def _round_sent(self, round_no: int, now: float) -> None:
        s = self.s
        s._mark_time(f"round {round_no} sent", now)
        record = s.round_records[-1]
        record.t_end, record.end = now, replace(s.stats)
        record.dirty_pages_rate = s.precopy.dirty_pages_rate
        record.expected_downtime_s = s.precopy.expected_downtime_s
        s._send(now, end_of_round=pb.EndOfRound(round=round_no))

    def round_started(self, now: float) -> None:
        s = self.s
        p = s.precopy.pass_
        data, tags = (0, 0) if p is None else (int(p.data.size), int(p.tags.size))
        s.round_records.append(RoundRecord(s.round, now, replace(s.stats), s.throttle))
        s._events.append(ev.RoundStarted(s.round, data, tags))

    # -- the stop and the verification ----------------------------------------------------------
    def _switchover(self, now: float, sync: Any) -> None:
        s = self.s
        s.host.stop_guest()
        s.guest_stopped = True
        s.t_stop = now
        s._mark_time("guest stopped", now)
        s._move(_S.SWITCHOVER)
        s._send(now, end_of_round=pb.EndOfRound(round=s.round + 1, final=True))
        s.precopy.final_pass(sync)
        self.resend_vcpus = True

    def _finish_switchover(self, now: float) -> None:
        s = self.s
        if self.resend_vcpus:
            s._send(now, device_state=device_state(s.guest))
        request = s.verifier.request()
        s._send(now, verify_request=request)
        s._mark_time(f"verify request {request.attempt} sent", now)
        s._move(_S.VERIFYING)

    def on_verify_result(self, result: pb.VerifyResult, now: float) -> None:
        """Verified: commit. Pages that differ: a repair pass, then ask again (the verifier
        fails the migration when the last attempt still differs)."""
        s = self.s
        fault = s.verifier.judge(result)
        if fault is None:
            s._move(_S.COMMITTING)
            s._send(now, commit=pb.Commit())
            return
        s._move(_S.SWITCHOVER)
        s.precopy.repair_pass(*fault)
        self.resend_vcpus = result.vcpu_mismatch
