"""What the reports say, checked against what happened on the wire and in the guest: every
number a user reads must be the one it claims to be."""

from __future__ import annotations

import numpy as np
import pytest

from common.constants import PAGE_SIZE
from common.guest.guest import Guest
from common.protocol.events import Finished, RoundStarted
from common.protocol.params import MigrationParameters
from common.protocol.phases import SourcePhase
from common.report import guest_summary
from tests.protocol_harness import CLOCK_START, Faults, Pair, busy_guest
from tests.test_protocol import assert_handed_over


def idle_pair() -> tuple[Pair, dict, dict]:
    guest = busy_guest(seed=12)
    pair = Pair(guest, to_dest=Faults(latency_s=0.001), to_source=Faults(latency_s=0.001, seed=1))
    stopped: list[float] = []
    stop = pair.src_host.stop_guest

    def timed_stop() -> None:
        stopped.append(pair.now)
        stop()

    pair.src_host.stop_guest = timed_stop  # type: ignore[method-assign]
    pair.run()
    assert_handed_over(pair)
    pair.stopped_at = stopped[0]  # type: ignore[attr-defined]
    return pair, pair.src.report(pair.now), pair.dst.report(pair.now)


def test_page_and_tag_counts_are_those_of_the_guest() -> None:
    pair, src, dst = idle_pair()
    mem = pair.guest.memory
    data = np.flatnonzero(mem.data_populated)
    tags = np.flatnonzero(mem.data_populated | mem.tags_populated)  # kvm: every backed page's tags
    zero_written = int(sum(not mem.pages[p].any() for p in data))
    untagged_written = int(sum(not mem.page_tags[p].any() for p in tags))
    assert src["ram"]["guest_bytes"] == mem.ram_bytes
    assert src["ram"]["pages"] == data.size == dst["ram"]["pages"]
    # both sides count what crossed the wire alike; only the source knows what it skipped
    assert src["ram"]["zero_pages"] == zero_written == dst["ram"]["zero_pages"]
    assert src["ram"]["skipped_pages"] == mem.page_count - data.size and dst["ram"]["skipped_pages"] is None
    assert src["tags"]["sections"] == tags.size == dst["tags"]["sections"]
    assert src["tags"]["untagged_pages"] == untagged_written == dst["tags"]["untagged_pages"]
    assert src["tags"]["skipped_pages"] == mem.page_count - tags.size and dst["tags"]["skipped_pages"] is None


def test_byte_counts_add_up_to_what_crossed_the_wire() -> None:
    pair, src, dst = idle_pair()
    ram, tags = src["ram"], src["tags"]
    # precopy and downtime bytes are everything the source sent after the hello
    assert ram["precopy_bytes"] + ram["downtime_bytes"] == pair.down.carried_bytes - pair.down.first_bytes
    assert ram["wire_bytes"] + tags["wire_bytes"] < ram["precopy_bytes"] + ram["downtime_bytes"]
    assert ram["wire_bytes"] > ram["pages"] * 0  # pages that are not zero cost bytes
    # both sides count whole messages: with nothing lost or resent, the same bytes
    assert dst["ram"]["wire_bytes"] == ram["wire_bytes"] > 0
    assert dst["tags"]["wire_bytes"] == tags["wire_bytes"] > 0
    assert dst["ram"]["precopy_bytes"] is None, "only the source knows when its guest stopped"
    total_s = src["total_time_ms"] / 1000
    assert src["throughput_bytes_per_s"] == pytest.approx(pair.down.carried_bytes / total_s, rel=1e-3)


def test_times_are_measured_where_they_say() -> None:
    pair, src, dst = idle_pair()
    order = [entry["event"] for entry in src["timeline"]]
    timeline = {entry["event"]: entry["at_ms"] for entry in src["timeline"]}
    expected = ["setup done", "round 1 sent", "guest stopped", "verify request 1 sent", "verify result 1: ok"]
    assert order[: len(expected)] == expected and order[-1] == "destination running"
    assert [entry["at_ms"] for entry in src["timeline"]] == sorted(timeline.values()), "in time order"
    stopped_ms = (pair.stopped_at - CLOCK_START) * 1000  # type: ignore[attr-defined]
    assert timeline["guest stopped"] == pytest.approx(stopped_ms, abs=1e-3)
    # one downtime on both sides: the source's stop to its Commit, and the Commit's arrival to
    # the guest running there; the Commit's trip (1 ms) and the Started's back (1 ms) are not in it
    assert src["downtime_ms"] == dst["downtime_ms"]
    assert src["downtime_ms"] == pytest.approx(timeline["destination running"] - stopped_ms - 2.0, abs=0.5)
    assert src["setup_time_ms"] == pytest.approx(timeline["setup done"], abs=1e-3)
    # a round trip of 1 ms latency each way, at the least
    assert src["setup_time_ms"] >= 2.0
    assert src["total_time_ms"] == pytest.approx(timeline["destination running"], abs=1e-2)
    assert src["expected_downtime_ms"] is not None and src["expected_downtime_ms"] >= 0


def test_status_verification_and_link_sections() -> None:
    pair, src, dst = idle_pair()
    digests = pair.guest.digests()
    for report in (src, dst):
        assert report["status"] == "completed" and report["error"] is None and report["mode"] == "precopy"
        v = report["verification"]
        assert {k: v[k] for k in ("ok", "ram_digest", "tag_digest", "vcpu_digest", "mismatched_pages")} == {
            "ok": True,
            "ram_digest": digests.ram.hex(),
            "tag_digest": digests.tags.hex(),
            "vcpu_digest": digests.vcpu.hex(),
            "mismatched_pages": [],
        }
    assert (src["verification"]["repaired_pages"], src["verification"]["rehashed_pages"]) == (0, 0)
    assert src["phase"] == "completed" and dst["phase"] == "running"
    assert src["rounds"] == 2 == dst["rounds"]  # round 1 and the switchover pass
    assert src["remaining_bytes"] == 0 and src["progress_percent"] == 100.0 and src["throttle"] == 0
    assert src["downtime_limit_ms"] == MigrationParameters().downtime_limit_ms
    assert src["link"] == {
        "epoch": 1,
        "reconnects": 0,
        "resent_messages": 0,
        "resend_requests": 0,
        "corrupt_received": 0,
        "channels": 1,
    }
    assert dst["link"] == {
        "epoch": 1,
        "resumes": 0,
        "resent_messages": 0,
        "resend_requests": 0,
        "corrupt_received": 0,
        "channels": 1,
        "channel_batches": dst["link"]["channel_batches"],
        "reordered": 0,
    }
    [batches] = dst["link"]["channel_batches"]
    assert batches > 0, "every batch came over the one connection"
    assert dst["refused_messages"] == 0


def test_a_failed_migration_reports_why_and_where() -> None:
    params = MigrationParameters(max_bandwidth=1 << 20)
    pair = Pair(busy_guest(), params=params, guest_speed=1000)
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.elapsed > 0.3)
    pair.src.cancel(pair.now, "because the test says so")
    pair.run_until(pair.settled)
    src, dst = pair.src.report(pair.now), pair.dst.report(pair.now)
    assert src["status"] == "cancelled" and src["error"] == "because the test says so"
    assert src["phase"] == "cancelled" and src["downtime_ms"] is None
    assert dst["status"] == "cancelled" and dst["error"] == "source aborted: because the test says so"
    assert src["verification"]["ok"] is None and dst["verification"]["ok"] is None
    assert src["remaining_bytes"] is None and src["progress_percent"] is None, "nothing more will be sent"
    assert pair.src.phase is SourcePhase.CANCELLED


def test_events_tell_the_daemon_each_round_and_the_end() -> None:
    idle = busy_guest(seed=3)
    idle_rounds = [
        (e.round, e.data_pages, e.tag_pages) for e in Pair(idle).run().events if isinstance(e, RoundStarted)
    ]
    backed = int((idle.memory.data_populated | idle.memory.tags_populated).sum())
    assert idle_rounds == [(1, int(idle.memory.data_populated.sum()), backed)]
    pair = Pair(
        busy_guest(seed=3, dirty_pages_per_step=8),
        params=MigrationParameters(downtime_limit_ms=5, max_bandwidth=8 << 20),
        guest_speed=2000,
    )
    pair.run()
    assert_handed_over(pair)
    rounds = [e for e in pair.events if isinstance(e, RoundStarted)]
    assert len(rounds) >= 2 and [r.round for r in rounds] == list(range(1, len(rounds) + 1))
    report = pair.src.report(pair.now)
    sent = [entry["event"] for entry in report["timeline"] if entry["event"].endswith(" sent")]
    # each round is logged under its own number, and the switchover pass is the one after
    assert sent[: len(rounds)] == [f"round {r.round} sent" for r in rounds]
    assert pair.dst.rounds == len(rounds) + 1 == pair.src.round
    # each precopy round in the report, as the plot draws it: bytes, rates, throttle, in order
    detail = report["rounds_detail"]
    assert [r["round"] for r in detail] == [r.round for r in rounds]
    assert all(r["duration_ms"] > 0 and r["pages"] > 0 and r["ram_wire_bytes"] > 0 for r in detail)
    assert sum(r["ram_wire_bytes"] for r in detail) <= report["ram"]["wire_bytes"]
    assert [r["start_ms"] for r in detail] == sorted(r["start_ms"] for r in detail)
    assert all(r["dirty_pages_rate"] is not None for r in detail)
    finished = [e for e in pair.src.take_events() + pair.events if isinstance(e, Finished)]
    assert [f.status for f in finished] == ["completed"]


def test_the_guest_summary_counts_the_ram_written_on_this_side() -> None:
    guest = Guest.create(1 << 20)
    guest.memory.write(0, b"x")
    guest.memory.write(5 * PAGE_SIZE - 1, b"yz")  # the last byte of page 4 and the first of 5
    summary = guest_summary(guest, here=True, running=False)
    assert summary["populated_bytes"] == 3 * PAGE_SIZE
    assert "populated_bytes" not in guest_summary(guest, here=True, running=True, with_digests=False)
