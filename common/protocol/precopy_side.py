"""Precopy as the source session carries it out: rounds of page and tag batches paced by the
window and the bandwidth cap, the end of each round (another, the switchover, postcopy or giving
up, as `precopy` decides), the stop and the last pass, and the verification's answer (the
commit, or a repair pass). A part of its SourceSession: it sends and moves through it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from common.guest.workload import REG_STEP
from common.protocol import events as ev
from common.protocol.outbound import Outbound
from common.protocol.phases import DestPhase, SourcePhase
from common.protocol.precopy import Verdict
from common.protocol.stats import Downtime, RoundRecord
from common.protocol.verify import MAX_VERIFY_ATTEMPTS, destination_verdict
from common.transfer import (
    DamagedBatch,
    OutgoingBatch,
    apply_device_state,
    apply_ram_pages,
    apply_tag_sections,
    device_state,
    encode_batch,
)
from common.wire import mte_migration_pb2 as pb
from common.wire.codec import BatchStats
from common.wire.framing import Buffer, WireError

if TYPE_CHECKING:
    from common.protocol.dest import DestSession
    from common.protocol.source import SourceSession

_S = SourcePhase
_D = DestPhase


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
        kind, pages = chunk
        read = self.s.precopy.log.read_tags(pages) if kind == "tag_sections" else None
        return encode_batch(
            self.s.mem, kind, pages, use_lz4=self.s._use_lz4, round_no=round_no, borrow=borrow, tag_rows=read
        )

    def _send_batch(self, batch: OutgoingBatch, now: float) -> None:
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
        after = s.params.postcopy_after_rounds
        if s.params.postcopy and (s._postcopy_now or (after is not None and finished_round >= after)):
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
        if end.verdict is Verdict.SWITCHOVER and s.params.postcopy_on_its_own:
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
            assert s.t_stop is not None
            s.stats.downtime.source_s = now - s.t_stop
            s._send(now, commit=pb.Commit(source_downtime_us=Downtime.to_us(now - s.t_stop)))
            return
        s._move(_S.SWITCHOVER)
        s.precopy.repair_pass(*fault)
        self.resend_vcpus = result.vcpu_mismatch


class DestPrecopySide:
    """Precopy as the destination carries it out: batches placed and checked as they arrive,
    the rounds and the stop, the vCPU state, the verification (and the repair it may ask for)
    and the commit that starts the guest here. A part of its DestSession."""

    def __init__(self, session: DestSession) -> None:
        self.s = session
        self.repairing = False  # what arrives between a mismatch and the next request repairs it
        self.corrupted = False  # test builds: the one page flipped after placing it
        self.verify_requests = 0

    def on_ram_pages(self, msg: pb.RamPages, payload: Buffer, now: float) -> None:
        s = self.s
        assert s.guest is not None and s.digests is not None
        try:
            decoded = apply_ram_pages(s.guest.memory, msg, payload)
        except DamagedBatch as exc:
            # what landed as expected has its leaves; the rest is hashed again unless the
            # resend (asked for below) places it first
            s.digests.record_ram(exc.placed_pages, exc.placed_digests, exc.placed_pages[:0])
            s.digests.mark(exc.unknown_pages, [])
            raise
        if s.t_first_data is None:
            s.t_first_data = now
        s.digests.record_ram(decoded.indices, decoded.digests, decoded.zero)
        self._note_repair(decoded.indices, decoded.zero)
        s.stats.pages += int(decoded.indices.size + decoded.zero.size)
        s.stats.zero_pages += int(decoded.zero.size)
        s.stats.ram_bytes += s._arrived_bytes
        self._maybe_corrupt(decoded.indices)
        s._ack(now)

    def on_tag_sections(self, msg: pb.TagSections, payload: Buffer, now: float) -> None:
        s = self.s
        assert s.guest is not None and s.digests is not None
        decoded = apply_tag_sections(s.guest.memory, msg, payload)
        s.digests.record_tags(decoded.indices, decoded.digests, decoded.zero)
        self._note_repair(decoded.indices, decoded.zero)
        s.stats.tag_sections += int(decoded.indices.size + decoded.zero.size)
        s.stats.untagged_pages += int(decoded.zero.size)
        s.stats.tag_bytes += s._arrived_bytes
        s._ack(now)

    def _note_repair(self, *placed: np.ndarray) -> None:
        s = self.s
        if self.repairing:
            pages = set(s.mismatched_pages)
            for part in placed:
                pages.update(part.tolist())
            s.mismatched_pages = sorted(pages)

    def _maybe_corrupt(self, placed: np.ndarray) -> None:
        s = self.s
        target = s.params.corrupt_page
        if target is None or self.corrupted or s.guest is None or not (placed == target).any():
            return
        # Only once, so a resend repairs it: this proves the handshake names and fixes pages.
        self.corrupted = True
        s.guest.memory.pages[target, 100] ^= 0xFF
        # as the in-place check of a faulty placement would: the page is hashed again
        assert s.digests is not None
        s.digests.mark([target], [])

    def on_end_of_round(self, msg: pb.EndOfRound, _: Buffer, now: float) -> None:
        s = self.s
        s.rounds = msg.round
        if not msg.final and s.digests is not None:
            s.digests.update_blocks()  # the source's guest runs: the verification then hashes less
        if msg.final and not s.source_stopped:
            s.source_stopped = True  # (in postcopy, the source is waited for longer from here)
            s.t_stop_seen = now

    def on_device_state(self, msg: pb.DeviceState, _: Buffer, now: float) -> None:
        s = self.s
        assert s.guest is not None
        if bool(msg.qemu_state) != s.params.qemu_handback:
            # refused before any commit: the source keeps its guest rather than lose it here
            raise WireError(
                pb.ERROR_FEATURE_MISMATCH,
                "this destination hands guests back to QEMU (--to-qemu) and this guest did not come from QEMU"
                if s.params.qemu_handback
                else "a guest from QEMU (source-node --from-qemu) needs a destination started with --to-qemu",
            )
        apply_device_state(s.guest, msg)

    def on_verify_request(self, msg: pb.VerifyRequest, _: Buffer, now: float) -> None:
        s = self.s
        if s.phase is _D.POSTCOPY:
            s.postcopy_side.verdict(msg, now)
            return
        assert s.guest is not None and s.digests is not None
        if not s.source_stopped:
            raise WireError(pb.ERROR_BAD_MESSAGE, "verify_request before the source stopped its guest")
        self.verify_requests += 1
        if self.verify_requests > MAX_VERIFY_ATTEMPTS:
            # a source gives up after its last repair; one that asks on holds this node for nothing
            raise WireError(
                pb.ERROR_BAD_MESSAGE,
                f"verification asked for {self.verify_requests} times; a source asks at most {MAX_VERIFY_ATTEMPTS}",
            )
        result, s.my_digests = destination_verdict(msg, s.guest, s.digests)
        s.verified = result.ok
        if result.ok:
            s._move(_D.AWAIT_COMMIT)
        else:
            self.repairing = True  # what arrives before the next request is the repair
        s._send(now, verify_result=result)

    def on_commit(self, msg: pb.Commit, __: Buffer, now: float) -> None:
        s = self.s
        assert s.guest is not None
        began = time.perf_counter()  # what starting costs is not in the session's `now`
        s.host.start_guest(s.guest)
        s._move(_D.RUNNING)
        s.t_running = s.t_end = now
        downtime = s.stats.downtime
        downtime.source_s = Downtime.from_us(msg.source_downtime_us)
        downtime.destination_s = time.perf_counter() - began
        started = pb.Started(
            step=s.guest.vcpus[0].x[REG_STEP], destination_downtime_us=Downtime.to_us(downtime.destination_s)
        )
        s._send(now, started=started)
        s._events.append(ev.Finished("completed", None))
