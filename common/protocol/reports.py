"""The reports both sessions give: built in one place, from what the sessions counted."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.constants import PAGE_SIZE
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
    downtime = (
        (session.t_end - session.t_stop)
        if (
            session.t_stop is not None
            and session.t_end is not None
            and session.phase is SourcePhase.COMPLETED
        )
        else None
    )
    pc = session.postcopy
    if pc is not None:
        # the guest ran again as soon as the destination started it, not at the end
        downtime = (
            session.t_dest_running - session.t_stop
            if session.t_dest_running is not None and session.t_stop is not None
            else None
        )
    p = session.precopy.pass_
    link = session.link.stats
    return {
        "status": status,
        "phase": session.phase.value,
        "mode": "postcopy" if session.params.postcopy else "precopy",
        "error": session.failure.reason if session.failure else None,
        "total_time_ms": ms(total_s),
        "setup_time_ms": ms(session.t_setup_done - session.t_start)
        if session.t_setup_done is not None
        else None,
        "downtime_ms": ms(downtime),
        "expected_downtime_ms": ms(session.precopy.expected_downtime_s),
        "downtime_limit_ms": session.params.downtime_limit_ms,
        "rounds": session.round,
        "throttle": round(session.throttle, 3),
        "ram": session.stats.ram_section(session.mem.ram_bytes),
        "tags": session.stats.tags_section(),
        "throughput_mbps": round(session.stats.total_bytes * 8 / 1e6 / total_s, 1) if total_s > 0 else 0.0,
        "dirty_pages_rate": round(session.precopy.dirty_pages_rate, 1),
        "pages_remaining": p.remaining_bytes // PAGE_SIZE if p else 0,
        "link": {
            "epoch": session.link.epoch,
            "reconnects": link.resumes,
            "resent_messages": link.resent,
            "resend_requests": link.resend_requests,
            "corrupt_received": link.corrupt,
        },
        "timeline_ms": {event: round(at * 1000, 3) for event, at in session.timeline},
        "postcopy": None
        if pc is None
        else {
            "requests": pc.requests,
            "requests_per_s": round(pc.requests / (end - session.t_dest_running), 1)
            if session.t_dest_running is not None and end > session.t_dest_running
            else 0.0,
            "background_pages": pc.background_pages,
            "pages_missing_at_destination": session.dest_missing,
            "pages_not_yet_sent": pc.missing(),
            "refused_pages": session.refused_pages,
            "recoveries": pc.recoveries,
        },
        "verification": verification_section(
            session.verified,
            session.verifier.dest_digests or session.verifier.source_digests,
            session.mismatched_pages,
        ),
    }


def dest_report(session: DestSession, now: float) -> dict[str, Any]:
    """The destination's report, in the same vocabulary as the source's."""
    end = session.t_end if session.t_end is not None else now
    status = {DestPhase.RUNNING: "completed", DestPhase.FAILED: "failed"}.get(session.phase, "active")
    if session.phase is DestPhase.RUNNING and session.verified is False:
        status = "failed"
    if session.failure and session.failure.code == pb.ERROR_CANCELLED:
        status = "cancelled"
    downtime = (
        session.t_running - session.t_stop_seen
        if session.t_running is not None and session.t_stop_seen is not None
        else None
    )
    total = end - (session.t_hello if session.t_hello is not None else session.t_start)
    link = session.link.stats
    return {
        "status": status,
        "phase": session.phase.value,
        "mode": "postcopy" if session.postcopy_mode else "precopy",
        "error": session.failure.reason if session.failure else None,
        "total_time_ms": ms(total),
        # what this side sees of setup: from the hello to the first page batch
        "setup_time_ms": ms(session.t_first_data - session.t_hello)
        if session.t_hello is not None and session.t_first_data is not None
        else None,
        "downtime_ms": ms(downtime),
        "expected_downtime_ms": None,
        "rounds": session.rounds,
        "ram": session.stats.ram_section(session.guest.memory.ram_bytes if session.guest else 0),
        "tags": session.stats.tags_section(),
        "throughput_mbps": round((session.stats.ram_bytes + session.stats.tag_bytes) * 8 / 1e6 / total, 1)
        if total > 0
        else 0.0,
        "dirty_pages_rate": None,
        "refused_messages": session.refused_messages,
        "last_refusal": session.last_refusal,
        "link": {
            "epoch": session.link.epoch,
            "resumes": link.resumes,
            "resent_messages": link.resent,
            "resend_requests": link.resend_requests,
            "corrupt_received": link.corrupt,
        },
        "verification": verification_section(session.verified, session.my_digests, session.mismatched_pages),
        "postcopy": None if session.postcopy is None else _dest_postcopy(session, end),
    }


def _dest_postcopy(session: DestSession, end: float) -> dict[str, Any]:
    pc = session.postcopy
    assert pc is not None
    return {
        "requests": len(pc.latencies_s),
        "fault_latency_ms": pc.latency_ms(),
        "blocktime_ms": round(sum(pc.latencies_s) * 1000.0, 3),
        "background_pages": pc.background_pages,
        "requested_pages": pc.requested_pages,
        "rejected_pages": pc.rejected_pages,
        "duplicate_pages": pc.duplicate_pages,
        "pages_missing": pc.missing(),
        "recoveries": session.link.stats.resumes,
    }
