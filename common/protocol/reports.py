"""The reports both sessions give: built in one place, from what the sessions counted."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from common.constants import LATENCY_SAMPLES, PAGE_SIZE, PAGE_STATE_BYTES
from common.protocol.phases import DestPhase, SourcePhase
from common.protocol.stats import ms, verification_section
from common.wire import mte_migration_pb2 as pb

if TYPE_CHECKING:
    from common.protocol.dest import DestSession
    from common.protocol.source import SourceSession


def source_report(session: SourceSession, now: float) -> dict[str, Any]:
    """The source's report: what a user reads, during and after a migration."""
    end = session.t_end if session.t_end is not None else now
    total_s = end - session.t_start
    status = {
        SourcePhase.COMPLETED: "completed",
        SourcePhase.FAILED: "failed",
        SourcePhase.CANCELLED: "cancelled",
        SourcePhase.UNSETTLED: "unsettled",
    }.get(session.phase, "active")
    pc = session.postcopy
    link = session.link.stats
    remaining = source_remaining(session)
    rate = session.meter.rate() if not session.phase.terminal else None
    return {
        "status": status,
        "phase": session.phase.value,
        # what the migration is (postcopy once the switchover began), and what it may become
        "mode": "postcopy" if pc is not None else "precopy",
        "postcopy_allowed": session.params.postcopy,
        "error": session.failure.reason if session.failure else None,
        "total_time_ms": ms(total_s),
        "setup_time_ms": ms(session.t_setup_done - session.t_start)
        if session.t_setup_done is not None
        else None,
        "downtime_ms": session.stats.downtime.total_ms(),
        "downtime_parts_ms": session.stats.downtime.parts_ms(),
        "expected_downtime_ms": ms(session.precopy.expected_downtime_s),
        "downtime_limit_ms": session.params.downtime_limit_ms,
        "rounds": session.round,
        "throttle": round(session.throttle, 3),
        "progress_percent": _shown_percent(session, _percent(status, remaining, session.mem.ram_bytes)),
        "remaining_bytes": remaining,
        "eta_s": round(remaining / rate, 3) if remaining is not None and rate else None,
        "rate_bytes_per_s": round(rate) if rate else None,
        "ram": session.stats.ram_section(session.mem.ram_bytes, source=True),
        "tags": session.stats.tags_section(source=True),
        "throughput_bytes_per_s": round(session.stats.total_bytes / total_s) if total_s > 0 else 0,
        "dirty_pages_rate": round(session.precopy.dirty_pages_rate, 1),
        "link": {
            "epoch": session.link.epoch,
            "reconnects": link.resumes,
            "resent_messages": link.resent,
            "resend_requests": link.resend_requests,
            "corrupt_received": link.corrupt,
            "channels": session.channels,
        },
        "timeline": [{"event": event, "at_ms": ms(at)} for event, at in session.timeline],
        "rounds_detail": [r.section(session.t_start, end, session.stats) for r in session.round_records],
        "postcopy": None
        if pc is None
        else {
            "requests": pc.requests,
            "requests_per_s": round(pc.requests / (end - session.t_dest_running), 1)
            if session.t_dest_running is not None and end > session.t_dest_running
            else 0.0,
            "background_pages": pc.background_pages,
            "answered_by_urgent_thread": pc.urgent_thread_pages,
            "pages_missing_at_destination": session.dest_missing,
            "pages_not_yet_sent": pc.missing(),
            "refused_pages": session.refused_pages,
            "recoveries": pc.recoveries,
        },
        "verification": {
            **verification_section(
                session.verified,
                session.verifier.dest_digests or session.verifier.source_digests,
                session.mismatched_pages,
            ),
            "repaired_pages": session.verifier.repaired_pages,
            "rehashed_pages": session.verifier.rehashed_pages,
        },
        "dirty_model": {
            "model": session.params.dirty_model.value,
            **session.precopy.log.counts.as_report(),
        },
        "tag_ioctl": session.mem.tag_ioctl.counters.as_report(),
        "samples": session.stats.samples.as_report(),
    }


def take_sample(session: SourceSession, now: float, *, due_only: bool = True) -> None:
    """One of the plot's samples of the report's figures over time (common/samples.py): when
    one is due, or at once (`due_only=False`, at the end)."""
    samples = session.stats.samples
    if not due_only or samples.due(now):
        samples.add(now, session, source_remaining(session))


def source_remaining(session: SourceSession) -> int | None:
    """Bytes of pages and tags still to send as far as anyone knows now: the rest of this pass
    in precopy (later rounds may add what the guest dirties meanwhile), what the destination
    lacks in postcopy; None once nothing more will be sent."""
    phase = session.phase
    if phase is SourcePhase.COMPLETED:
        return 0
    if phase.terminal or phase in (SourcePhase.UNSETTLED, SourcePhase.IDLE, SourcePhase.SETUP):
        return None  # nothing more will be sent, or round 1 has not yet counted what there is
    pc = session.postcopy
    if pc is not None:
        # what is still to send: until the destination's bitmap says what it holds, its last
        # word (or unknown), never "everything", which would show progress going back to 0 %
        if pc.needed is not None:
            return pc.missing() * PAGE_STATE_BYTES
        return None if session.dest_missing is None else session.dest_missing * PAGE_STATE_BYTES
    p = session.precopy.pass_
    return p.remaining_bytes if p is not None else 0


def _shown_percent(session: SourceSession, percent: float | None) -> float | None:
    """Postcopy's progress starts where precopy's stopped and never goes back: the source
    learns what the destination holds only from its bitmap, and precopy's figure, which
    ignored pages dirtied again, may have been above it. The figure shown is a floor kept
    with the session, so a report is the one place that writes it."""
    if session.postcopy is None or session.phase.terminal:
        if percent is not None and not session.phase.terminal:
            session.precopy.shown_percent = percent
        return percent
    floor = session.precopy.shown_percent
    if floor is not None and (percent is None or percent < floor):
        return floor
    session.precopy.shown_percent = percent
    return percent


def _percent(status: str, remaining: int | None, guest_bytes: int) -> float | None:
    """How much of the guest's state (data and tags) is already where it is going, as virsh's
    `[ 45 %]`: 100 once completed, None when it will not get there."""
    if status == "completed":
        return 100.0
    if remaining is None or guest_bytes == 0:
        return None
    state = guest_bytes // PAGE_SIZE * PAGE_STATE_BYTES
    # rounded down and below 100 while anything is left: "100 %" means done
    return min(99.9, math.floor(1000 * max(0, state - remaining) / state) / 10)


def dest_report(session: DestSession, now: float) -> dict[str, Any]:
    """The destination's report, in the same vocabulary as the source's."""
    end = session.t_end if session.t_end is not None else now
    status = {DestPhase.RUNNING: "completed", DestPhase.FAILED: "failed", DestPhase.WAITING: "none"}.get(
        session.phase, "active"
    )
    if session.phase is DestPhase.RUNNING and session.verified is False:
        status = "failed"
    if session.failure and session.failure.code == pb.ERROR_CANCELLED:
        status = "cancelled"
    total = end - _dest_t0(session)
    link = session.link.stats
    guest_bytes = session.guest.memory.ram_bytes if session.guest else 0
    pc = session.postcopy
    remaining = (
        0
        if status == "completed"
        else pc.missing() * PAGE_STATE_BYTES
        if pc is not None and pc.started and status == "active"
        else None
    )
    return {
        "status": status,
        "phase": session.phase.value,
        "mode": "postcopy" if pc is not None and pc.started else "precopy",
        "postcopy_allowed": session.postcopy_mode,
        "error": session.failure.reason if session.failure else None,
        "total_time_ms": ms(total),
        # what this side sees of setup: from the hello to the first page batch
        "setup_time_ms": ms(session.t_first_data - session.t_hello)
        if session.t_hello is not None and session.t_first_data is not None
        else None,
        "downtime_ms": session.stats.downtime.total_ms(),
        "downtime_parts_ms": session.stats.downtime.parts_ms(),
        "expected_downtime_ms": None,
        "rounds": session.rounds,
        "progress_percent": _percent(status, remaining, guest_bytes),
        "remaining_bytes": remaining,
        "eta_s": None,  # the destination does not measure the rate: the source's report has it
        "rate_bytes_per_s": None,
        "ram": session.stats.ram_section(guest_bytes, source=False),
        "tags": session.stats.tags_section(source=False),
        "throughput_bytes_per_s": round((session.stats.ram_bytes + session.stats.tag_bytes) / total)
        if total > 0
        else 0,
        "dirty_pages_rate": None,
        "refused_messages": session.refused_messages,
        "last_refusal": session.last_refusal,
        "link": {
            "epoch": session.link.epoch,
            "resumes": link.resumes,
            "resent_messages": link.resent,
            "resend_requests": link.resend_requests,
            "corrupt_received": link.corrupt,
            "channels": session.channels,
            "channel_batches": list(session.channel_batches),
            "reordered": link.reordered,
        },
        "verification": verification_section(session.verified, session.my_digests, session.mismatched_pages),
        "postcopy": None if session.postcopy is None else _dest_postcopy(session, end),
        "tag_ioctl": session.guest.memory.tag_ioctl.counters.as_report() if session.guest else None,
    }


def _dest_t0(session: DestSession) -> float:
    return session.t_hello if session.t_hello is not None else session.t_start


def _dest_postcopy(session: DestSession, end: float) -> dict[str, Any]:
    pc = session.postcopy
    assert pc is not None
    return {
        "requests": len(pc.latencies_s),
        "fault_latency_ms": pc.latency_ms(),  # from the vCPU's miss to the page present
        "fault_latency_parts_ms": pc.parts_ms(),
        # the latest ones, for plotting; the percentiles above are over all of them
        "fault_latencies_ms": [round(t * 1000.0, 3) for t in pc.latencies_s[-LATENCY_SAMPLES:]],
        # when each of those waits began, on the same clock as total_time_ms
        "fault_latency_at_ms": [
            round((t - _dest_t0(session)) * 1000.0, 3) for t in pc.missed_at[-LATENCY_SAMPLES:]
        ],
        "blocktime_ms": round(sum(pc.latencies_s) * 1000.0, 3),
        "background_pages": pc.background_pages,
        "requested_pages": pc.requested_pages,
        "requests_on_urgent_connection": pc.urgent_asks,
        "rejected_pages": pc.rejected_pages,
        "duplicate_pages": pc.duplicate_pages,
        "pages_missing": pc.missing(),
        "recoveries": session.link.stats.resumes,
    }
