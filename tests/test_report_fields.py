"""Each report field computed from known counters and times: the arithmetic, the units and the
rounding a user reads, without a migration in between (test_reports checks them against one)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from common.constants import PAGE_SIZE
from common.guest.dirtylog import DirtyCounts, DirtyModel
from common.guest.tag_ioctl import TagCopyCounters
from common.protocol.link import LinkStats
from common.protocol.phases import DestPhase, SourcePhase
from common.protocol.reports import dest_report, source_report
from common.protocol.stats import Downtime, TransferStats
from common.wire import mte_migration_pb2 as pb

# 3087503 bytes in two seconds are 1543751.5 bytes/s: the unit (bytes, not bits), the division
# by the time and the rounding to a whole byte (half to even: 1543752) are all pinned
EDGE_BYTES = 3_087_503
EDGE_RATE = 1_543_752


def source(**overrides: Any) -> Any:
    stats = TransferStats(ram_bytes=EDGE_BYTES - 1000, tag_bytes=600, other_bytes=400)
    # each side's part, the other's as it told it: the one sum both report
    stats.downtime = Downtime(source_s=0.4995, destination_s=0.0005)
    session = SimpleNamespace(
        t_start=100.0,
        t_setup_done=100.25,
        t_stop=101.5,
        t_end=102.0,
        phase=SourcePhase.COMPLETED,
        failure=None,
        precopy=SimpleNamespace(
            pass_=SimpleNamespace(remaining_bytes=5 * PAGE_SIZE + 100),
            expected_downtime_s=0.0421234,
            dirty_pages_rate=12.34,
            log=SimpleNamespace(
                counts=DirtyCounts(syncs=3, dirty_pages=40, tags_only=30, compare_s=0.0012345)
            ),
        ),
        meter=SimpleNamespace(rate=lambda: 2048.0),
        round_records=[],
        dest_missing=None,
        link=SimpleNamespace(epoch=3, stats=LinkStats(resent=4, resend_requests=5, corrupt=6, resumes=2)),
        channels=2,
        params=SimpleNamespace(downtime_limit_ms=300.0, postcopy=False, dirty_model=DirtyModel.KVM),
        postcopy=None,
        t_dest_running=None,
        round=7,
        throttle=0.12345,
        stats=stats,
        mem=SimpleNamespace(
            ram_bytes=1 << 30, tag_ioctl=SimpleNamespace(counters=TagCopyCounters(5, 1280, 0))
        ),
        timeline=[("setup done", 0.25), ("guest stopped", 0.0001234)],
        verified=True,
        verifier=SimpleNamespace(
            dest_digests={"ram": "aa"}, source_digests={"ram": "bb"}, repaired_pages=2, rehashed_pages=9
        ),
        mismatched_pages=[],
    )
    for name, value in overrides.items():
        setattr(session, name, value)
    return session


def test_the_source_report_computes_each_field() -> None:
    report = source_report(source(), now=500.0)
    assert report["status"] == "completed" and report["phase"] == "completed" and report["error"] is None
    assert report["total_time_ms"] == 2000.0  # from the start to the end, not to `now`
    assert report["setup_time_ms"] == 250.0
    assert report["downtime_ms"] == 500.0
    assert report["downtime_parts_ms"] == {"source": 499.5, "destination": 0.5}
    assert report["expected_downtime_ms"] == 42.123
    assert report["downtime_limit_ms"] == 300.0 and report["rounds"] == 7
    assert report["throttle"] == 0.123
    assert report["throughput_bytes_per_s"] == EDGE_RATE
    assert report["dirty_pages_rate"] == 12.3
    assert report["remaining_bytes"] == 0 and report["progress_percent"] == 100.0, "completed"
    assert report["ram"]["guest_bytes"] == 1 << 30
    assert report["link"] == {
        "epoch": 3,
        "reconnects": 2,
        "resent_messages": 4,
        "resend_requests": 5,
        "corrupt_received": 6,
        "channels": 2,
    }
    assert report["timeline"] == [
        {"event": "setup done", "at_ms": 250.0},
        {"event": "guest stopped", "at_ms": 0.123},
    ], "in the order it happened, as recorded"
    assert report["verification"]["ram_digest"] == "aa", "the destination's digests, once it answered"
    assert (report["verification"]["repaired_pages"], report["verification"]["rehashed_pages"]) == (2, 9)
    assert report["dirty_model"] == {
        "model": "kvm",
        "syncs": 3,
        "dirty_pages": 40,
        "changed_data_only": 0,
        "changed_tags_only": 30,
        "changed_both": 0,
        "changed_neither": 0,
        "compared_pages": 0,
        "compare_ms": 1.234,
    }
    assert report["tag_ioctl"] == {"calls": 5, "bytes_from_guest": 1280, "bytes_to_guest": 0}


def test_the_source_report_while_running_and_after_a_failure() -> None:
    running = source_report(
        source(phase=SourcePhase.ACTIVE, t_end=None, t_stop=None, t_setup_done=None, stats=TransferStats()),
        now=100.5,
    )
    assert running["status"] == "active" and running["total_time_ms"] == 500.0
    assert running["setup_time_ms"] is None and running["downtime_ms"] is None
    # 5 pages and 100 bytes of tags left of a 1 GiB guest: 99.99...% done, yet not "100 %"
    assert running["remaining_bytes"] == 5 * PAGE_SIZE + 100
    assert running["progress_percent"] == 99.9, "below 100 while anything is left"
    assert running["eta_s"] == round((5 * PAGE_SIZE + 100) / 2048.0, 3), "what is left at the measured rate"
    assert running["rate_bytes_per_s"] == 2048
    # a 1 MiB guest is 256 pages x (4096 + 128) bytes = 1081344; 5 pages and 100 bytes left of it
    small = source_report(
        source(
            phase=SourcePhase.ACTIVE,
            t_end=None,
            mem=SimpleNamespace(ram_bytes=1 << 20, tag_ioctl=SimpleNamespace(counters=TagCopyCounters())),
        ),
        now=100.5,
    )
    assert small["progress_percent"] == 98.0, "98.09...% rounded down"
    # stopped, the commit sent, never heard whether the destination started it
    unheard = TransferStats(downtime=Downtime(source_s=0.5))
    failed = source_report(
        source(phase=SourcePhase.FAILED, failure=SimpleNamespace(reason="lost"), stats=unheard), now=500.0
    )
    assert failed["status"] == "failed" and failed["error"] == "lost"
    assert failed["downtime_ms"] is None, "a failed migration had no downtime: the guest runs on"
    assert failed["remaining_bytes"] is None and failed["progress_percent"] is None, "it will not get there"
    assert failed["rate_bytes_per_s"] is None and failed["eta_s"] is None
    setup = source_report(source(phase=SourcePhase.SETUP, t_end=None), now=100.1)
    assert setup["remaining_bytes"] is None and setup["progress_percent"] is None, "not known before round 1"
    for phase, status in (
        (SourcePhase.CANCELLED, "cancelled"),
        (SourcePhase.UNSETTLED, "unsettled"),
        (SourcePhase.SWITCHOVER, "active"),
    ):
        assert source_report(source(phase=phase), now=500.0)["status"] == status
    asked = source(
        verifier=SimpleNamespace(
            dest_digests=None, source_digests={"ram": "bb"}, repaired_pages=0, rehashed_pages=0
        )
    )
    assert source_report(asked, now=500.0)["verification"]["ram_digest"] == "bb"
    nothing_left = source_report(
        source(
            precopy=SimpleNamespace(
                pass_=None,
                expected_downtime_s=None,
                dirty_pages_rate=0.0,
                log=SimpleNamespace(counts=DirtyCounts()),
            )
        ),
        now=500.0,
    )
    assert nothing_left["remaining_bytes"] == 0 and nothing_left["expected_downtime_ms"] is None
    instant = source_report(source(t_end=100.0), now=100.0)
    assert instant["throughput_bytes_per_s"] == 0, "no time, no rate (and no division by zero)"


def dest(**overrides: Any) -> Any:
    session = SimpleNamespace(
        t_start=50.0,
        t_hello=100.0,
        t_first_data=100.125,
        t_stop_seen=100.5,
        t_running=100.625,
        t_end=None,
        phase=DestPhase.RUNNING,
        failure=None,
        rounds=4,
        stats=TransferStats(
            ram_bytes=EDGE_BYTES - 600,
            tag_bytes=600,
            other_bytes=10_000,
            downtime=Downtime(source_s=0.1, destination_s=0.025),
        ),
        guest=SimpleNamespace(
            memory=SimpleNamespace(
                ram_bytes=1 << 30, tag_ioctl=SimpleNamespace(counters=TagCopyCounters(7, 0, 1792))
            )
        ),
        refused_messages=2,
        link=SimpleNamespace(
            epoch=2, stats=LinkStats(resent=1, resend_requests=2, corrupt=3, resumes=1, reordered=7)
        ),
        channels=3,
        channel_batches=[4, 5, 6],
        verified=True,
        my_digests={"ram": "cc", "tags": "dd", "vcpu": "ee"},
        mismatched_pages=[],
        postcopy_mode=False,
        postcopy=None,
        last_refusal=None,
    )
    for name, value in overrides.items():
        setattr(session, name, value)
    return session


def test_the_destination_report_computes_each_field() -> None:
    report = dest_report(dest(), now=102.0)
    assert report["status"] == "completed" and report["phase"] == "running"
    assert report["total_time_ms"] == 2000.0, "from the hello, not from when the daemon started"
    assert report["setup_time_ms"] == 125.0
    assert report["downtime_ms"] == 125.0 and report["downtime_parts_ms"] == {
        "source": 100.0,
        "destination": 25.0,
    }
    assert report["throughput_bytes_per_s"] == EDGE_RATE, "pages and tags only"
    assert report["remaining_bytes"] == 0 and report["progress_percent"] == 100.0 and report["eta_s"] is None
    assert report["rounds"] == 4 and report["refused_messages"] == 2
    assert report["ram"]["guest_bytes"] == 1 << 30
    assert report["link"] == {
        "epoch": 2,
        "resumes": 1,
        "resent_messages": 1,
        "resend_requests": 2,
        "corrupt_received": 3,
        "channels": 3,
        "channel_batches": [4, 5, 6],
        "reordered": 7,
    }
    assert report["verification"] == {
        "ok": True,
        "ram_digest": "cc",
        "tag_digest": "dd",
        "vcpu_digest": "ee",
        "mismatched_pages": [],
    }
    assert report["tag_ioctl"] == {"calls": 7, "bytes_from_guest": 0, "bytes_to_guest": 1792}


@pytest.mark.parametrize(
    ("phase", "failure", "status"),
    [
        (DestPhase.RUNNING, None, "completed"),
        (DestPhase.FAILED, SimpleNamespace(code=pb.ERROR_CANCELLED, reason="source aborted"), "cancelled"),
        (DestPhase.FAILED, SimpleNamespace(code=pb.ERROR_VERIFICATION_FAILED, reason="differs"), "failed"),
        (DestPhase.RECEIVING, None, "active"),
    ],
)
def test_the_destination_status(phase: DestPhase, failure: Any, status: str) -> None:
    report = dest_report(dest(phase=phase, failure=failure), now=101.0)
    assert report["status"] == status
    assert report["error"] == (failure.reason if failure else None)


def test_the_destination_report_before_the_guest_runs() -> None:
    early = dest(
        t_hello=None,
        t_first_data=None,
        t_stop_seen=100.5,
        t_running=None,
        t_end=51.0,
        guest=None,
        stats=TransferStats(),
    )
    report = dest_report(early, now=500.0)
    assert report["total_time_ms"] == 1000.0, "from the daemon's start while no hello came"
    assert report["setup_time_ms"] is None and report["downtime_ms"] is None
    assert report["ram"]["guest_bytes"] == 0
    no_stop = dest_report(dest(t_stop_seen=None, stats=TransferStats()), now=101.0)
    assert no_stop["downtime_ms"] is None
    no_data = dest_report(dest(t_first_data=None), now=101.0)
    assert no_data["setup_time_ms"] is None
    instant = dest_report(dest(t_end=100.0), now=100.0)
    assert instant["throughput_bytes_per_s"] == 0
