"""Postcopy through the pure sessions on the fake clock: the destination runs at once, pulls
what it touches, never shows a page without its tags, and ends as the unmigrated run does;
a broken link pauses both sides and recovers."""

from __future__ import annotations

import numpy as np
import pytest

from common.guest.guest import Guest
from common.guest.pagehash import row_digests
from common.guest.workload import Fill, Workload
from common.protocol.events import Finished
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from common.wire.codec import batch_arrays
from common.wire.framing import WireError
from tests.protocol_harness import Faults, Pair, busy_guest

DEST_STEPS = 600


def postcopy_pair(
    seed: int = 5,
    after_rounds: int | None = 0,
    dest_steps: int = DEST_STEPS,
    guest: Guest | None = None,
    to_dest: Faults | None = None,
    **params: object,
) -> Pair:
    return Pair(
        guest or busy_guest(seed=seed),
        params=MigrationParameters(postcopy=True, postcopy_after_rounds=after_rounds, **params),  # type: ignore[arg-type]
        to_dest=to_dest,
        guest_speed=2000,
        dest_steps=dest_steps,
    )


def run_to_end(pair: Pair, max_seconds: float = 120.0) -> Pair:
    pair.src.start(pair.now)

    def done() -> bool:
        runner = pair.dst_host.runner
        return pair.settled() and (runner is None or runner.finished)

    return pair.run_until(done, max_seconds)


def assert_equals_unmigrated(pair: Pair, seed_guest: Guest) -> None:
    """The oracle: the destination's guest equals a guest that ran the same steps unmigrated."""
    assert pair.src.phase is SourcePhase.COMPLETED, pair.src.failure
    assert pair.dst.phase is DestPhase.RUNNING and pair.dst.verified is True
    runner = pair.dst_host.runner
    assert runner is not None and runner.finished
    assert runner.step > pair.dst_host.started_at_step, "the destination ran the guest itself"
    Workload(seed_guest).run(runner.step)
    assert pair.dst.guest is not None
    assert pair.dst.guest.digests() == seed_guest.digests()
    assert pair.src_host.resumes == 0, "the source never runs the guest again"


@pytest.mark.parametrize("seed", [5, 11, 23])
@pytest.mark.parametrize("after_rounds", [0, 2])
def test_postcopy_ends_as_the_unmigrated_run(seed: int, after_rounds: int) -> None:
    pair = run_to_end(postcopy_pair(seed=seed, after_rounds=after_rounds))
    assert_equals_unmigrated(pair, busy_guest(seed=seed))
    report = pair.src.report(pair.now)
    # precopy rounds first, fewer when the guest converged earlier (then little is left to pull)
    assert report["mode"] == "postcopy" and min(1, after_rounds) <= report["rounds"] <= after_rounds
    dst = pair.dst.report(pair.now)
    assert dst["postcopy"]["pages_missing"] == 0
    assert dst["rounds"] == report["rounds"] + 1, "the switchover's pass is the destination's last round"
    assert dst["status"] == "completed" and dst["error"] is None and pair.dst.failure is None
    latencies = pair.dst.postcopy.latencies_s  # type: ignore[union-attr]
    assert dst["postcopy"]["blocktime_ms"] == round(sum(latencies) * 1000.0, 3), "the guest's total wait"
    finished = [e for e in pair.dst.take_events() if isinstance(e, Finished)]
    assert [(e.status, e.reason) for e in finished] == [("completed", None)]
    assert report["postcopy"]["pages_missing_at_destination"] == 0
    assert report["verification"]["ok"] is True
    assert report["verification"]["ram_digest"] == dst["verification"]["ram_digest"], "the manifest digest"
    events = [e["event"] for e in report["timeline"]]
    assert (
        events.index("postcopy started")
        < events.index("destination running")
        < events.index("verify request 1 sent")
    )
    # both sides count what crossed the wire alike, postcopy pages included
    assert report["ram"]["postcopy_bytes"] == dst["ram"]["postcopy_bytes"] > 0
    assert (
        report["ram"]["pages"] == dst["ram"]["pages"]
        and report["ram"]["wire_bytes"] == dst["ram"]["wire_bytes"]
    )
    if after_rounds == 0:
        assert dst["postcopy"]["requests"] > 0, "with nothing sent ahead, the guest asks"


def busy(seed: int) -> Guest:
    return busy_guest(seed=seed, ram=16 << 20, working_set=4 << 20, dirty_pages_per_step=32)


def test_a_running_precopy_switched_over_by_the_operator() -> None:
    pair = postcopy_pair(guest=busy(7), after_rounds=1000, max_bandwidth=2 << 20, downtime_limit_ms=5)
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.elapsed > 0.3)
    assert pair.src.phase is SourcePhase.ACTIVE
    pair.src.start_postcopy(pair.now)
    assert pair.src.phase is SourcePhase.POSTCOPY
    pair.run_until(
        lambda: pair.settled() and pair.dst_host.runner is not None and pair.dst_host.runner.finished
    )
    # the source ran some steps before the switchover: the reference runs the same total
    assert_equals_unmigrated(pair, busy(7))
    assert pair.src.report(pair.now)["rounds"] >= 1


def test_a_slow_first_round_switches_to_postcopy_instead_of_failing_at_the_timeout() -> None:
    # round 1 takes about 2 s at 2 MiB/s, past the 1 s convergence timeout: postcopy is the
    # answer to a guest that does not converge in time, so the timeout does not end it
    pair = run_to_end(
        postcopy_pair(
            guest=busy_guest(seed=2, ram=4 << 20, fill=Fill.RANDOM),
            after_rounds=1,
            max_bandwidth=2 << 20,
            convergence_timeout_s=1.0,
        )
    )
    assert_equals_unmigrated(pair, busy_guest(seed=2, ram=4 << 20, fill=Fill.RANDOM))
    assert pair.src.t_stop is not None and pair.src.t_stop - pair.src.t_start > 1.0, "past the timeout"
    assert pair.src.report(pair.now)["rounds"] == 1


def test_requests_dominate_when_the_guest_touches_pages_at_random() -> None:
    guest = busy_guest(seed=3, ram=16 << 20, working_set=12 << 20, dirty_pages_per_step=16)
    # a link slow enough that the guest, not the background stream, decides what comes first
    pair = run_to_end(postcopy_pair(guest=guest, dest_steps=300, to_dest=Faults(bandwidth=50e6)))
    assert_equals_unmigrated(
        pair, busy_guest(seed=3, ram=16 << 20, working_set=12 << 20, dirty_pages_per_step=16)
    )
    dst = pair.dst.report(pair.now)["postcopy"]
    assert dst["requests"] >= 50
    assert dst["fault_latency_ms"]["p50"] is not None and dst["blocktime_ms"] > 0


def test_a_request_for_pages_out_of_range_is_cut_down_never_fatal() -> None:
    pair = postcopy_pair(seed=9, to_dest=Faults(bandwidth=5e6))  # slow: postcopy lasts a while
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase is DestPhase.POSTCOPY and pair.src.dest_missing is not None)
    count = pair.src.mem.page_count
    # what the destination said it lacked, last the source heard: no less than it lacks now
    assert count > pair.src.dest_missing >= pair.dst.postcopy.missing() > 0  # type: ignore[union-attr]
    pair.dst._send(pair.now, page_request=pb.PageRequest(page_index=[count, count + 7, 5]))
    pair.run_until(lambda: pair.src.refused_pages > 0 or pair.src.phase.ended)
    assert pair.src.refused_pages == 2 and pair.src.phase.postcopy, "two pages refused, the rest answered"
    pair.run_until(
        lambda: pair.settled() and pair.dst_host.runner is not None and pair.dst_host.runner.finished
    )
    assert pair.src.phase is SourcePhase.COMPLETED and pair.dst.verified is True


def test_a_page_the_destination_wrote_is_never_overwritten_by_a_late_copy() -> None:
    pair = postcopy_pair(seed=9)
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase is DestPhase.POSTCOPY)
    pc, mem = pair.dst.postcopy, pair.dst.guest.memory  # type: ignore[union-attr]
    assert pc is not None
    page = int(np.flatnonzero(pc.present)[0])
    mem.pages[page, :8] = 0xAB  # the guest wrote it
    from common.wire.codec import PostcopyBatch

    stale = PostcopyBatch(
        np.array([page]), pair.src.mem.pages[[page]].copy(), pair.src.mem.page_tags[[page]].copy()
    )
    placed = pc.place(mem, stale, requested=False, now=pair.now)
    assert placed.duplicates == 1 and placed.pages.size == 0
    assert (mem.pages[page, :8] == 0xAB).all()


@pytest.mark.parametrize("encoding", [pb.PAGE_RAW, pb.PAGE_LZ4])
def test_a_damaged_copy_is_asked_for_again_never_shown(encoding: int) -> None:
    """A raw page with a flipped byte still decodes: only the manifest catches it. A flipped
    token in an lz4 page makes the batch malformed: it is refused and its pages asked again.
    Either way the checksum was made valid again, so the link layer cannot tell."""
    flipped: list[int] = []

    def damage_one_page(message: framing.Message) -> framing.Message | None:
        if message.kind != "postcopy_pages" or flipped:
            return None
        data = message.envelope.postcopy_pages.data
        offset = 0
        for page, kind, length in zip(*(a.tolist() for a in batch_arrays("", data)), strict=True):
            if kind == encoding:
                payload = bytearray(bytes(message.payload))
                # raw: a byte inside the page; lz4: its first token, so the stream no longer decodes
                # (a flipped literal byte would decode, and be caught as the raw page is)
                payload[offset + (length // 2 if encoding == pb.PAGE_RAW else 0)] ^= 0xFF
                flipped.append(int(page))
                return framing.Message(message.envelope, bytes(payload))
            offset += length
        return None

    pair = postcopy_pair(guest=busy_guest(seed=5, fill=Fill.MIXED), to_dest=Faults(tamper=damage_one_page))
    run_to_end(pair)
    assert flipped, "a page was damaged"
    assert_equals_unmigrated(pair, busy_guest(seed=5, fill=Fill.MIXED))
    report = pair.dst.report(pair.now)
    if encoding == pb.PAGE_RAW:
        assert report["postcopy"]["rejected_pages"] >= 1
    else:
        assert report["refused_messages"] >= 1


class AtomicityWatch:
    """Counts guest accesses on the destination that saw a page whose data and tags were not
    both the source's switchover version (before the guest itself wrote it)."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.bad = 0
        self.checked = 0
        self.written: set[int] = set()
        self.half_there = 0

    def __call__(self, first: int, last: int, writing: bool) -> None:
        pc = self.pair.dst.postcopy
        mem = self.pair.dst.guest.memory  # type: ignore[union-attr]
        assert pc is not None
        for page in range(first, last + 1):
            if page not in self.written:
                self.checked += 1
                ram = row_digests(mem.pages[page : page + 1])[0]
                tags = row_digests(mem.page_tags[page : page + 1])[0]
                if ram != pc.ram[page] or tags != pc.tags[page]:
                    self.bad += 1
            if writing:
                self.written.add(page)


def watched_run(split: bool) -> tuple[Pair, AtomicityWatch]:
    from common.protocol.dest import DestParameters

    # mostly retagging: many pages whose data came in precopy while their tags changed after
    guest = busy_guest(seed=13, tag_only_share=0.8, working_set=2 << 20)
    pair = Pair(
        guest,
        params=MigrationParameters(postcopy=True, postcopy_after_rounds=2),
        dest_params=DestParameters(split_placement=split),
        to_dest=Faults(latency_s=0.002, bandwidth=5e6),
        guest_speed=2000,
        dest_steps=DEST_STEPS,
    )
    watch = AtomicityWatch(pair)
    original = pair.dst_host.make_runner
    assert original is not None

    def make_runner(g, gate):  # type: ignore[no-untyped-def]
        gate.observer = watch
        # the adversarial premise: pages whose data is already the source's but whose tags are not
        pc = pair.dst.postcopy
        data_ok = row_digests(g.memory.pages) == pc.ram
        tags_ok = row_digests(g.memory.page_tags) == pc.tags
        watch.half_there = int(np.count_nonzero(data_ok & ~tags_ok))
        return original(g, gate)

    pair.dst_host.make_runner = make_runner
    run_to_end(pair)
    return pair, watch


def test_no_access_sees_a_page_without_its_tags() -> None:
    pair, watch = watched_run(split=False)
    assert watch.half_there > 50, "many pages arrived with their data but not their final tags"
    assert watch.checked > 20
    assert watch.bad == 0
    assert_equals_unmigrated(pair, busy_guest(seed=13, tag_only_share=0.8, working_set=2 << 20))


def test_the_atomicity_watch_catches_data_placed_before_its_tags() -> None:
    pair, watch = watched_run(split=True)
    assert watch.bad > 0, "with data and tags placed apart, an access sees the old tags"
    # the tags do catch up: only the moment differs, so the handover still verifies
    assert pair.dst.verified is True and pair.dst.postcopy is not None and not pair.dst.postcopy.late_tags


@pytest.mark.parametrize("at", [0.1, 0.5, 0.9])
def test_a_link_broken_during_postcopy_pauses_and_recovers(at: float) -> None:
    params = {"peer_timeout_s": 0.4, "heartbeat_interval_s": 0.1, "reconnect_timeout_s": 2.0}
    pair = postcopy_pair(seed=21, dest_steps=1500, **params)  # type: ignore[arg-type]
    broken: list[float] = []
    missing_at_start: list[int] = []

    def cut() -> bool:
        pc = pair.dst.postcopy
        if pc is None or not pc.started:
            return False
        if not missing_at_start:
            missing_at_start.append(pc.missing())
        done = 1 - pc.missing() / max(1, missing_at_start[0])
        if not broken and done >= at:
            broken.append(pair.now)
        return bool(broken) and pair.now < broken[0] + 1.2

    pair.up.cut_when = cut
    pair.down.cut_when = cut
    run_to_end(pair)
    assert broken, "the link broke during postcopy"
    assert pair.src.link.stats.resumes >= 1
    assert pair.src.report(pair.now)["postcopy"]["recoveries"] >= 1
    assert_equals_unmigrated(pair, busy_guest(seed=21))


def test_a_destination_that_never_returns_leaves_the_guest_there_and_a_reason_here() -> None:
    params = {
        "peer_timeout_s": 0.4,
        "heartbeat_interval_s": 0.1,
        "reconnect_timeout_s": 1.0,
        "postcopy_recover_timeout_s": 2.0,
    }
    pair = postcopy_pair(seed=21, dest_steps=100_000, **params)  # type: ignore[arg-type]
    gone: list[bool] = []

    def cut() -> bool:
        if pair.dst.postcopy is not None and pair.dst.postcopy.started and pair.dst.postcopy.missing() < 600:
            gone.append(True)
        return bool(gone)

    pair.up.cut_when = cut
    pair.down.cut_when = cut
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase is SourcePhase.UNSETTLED, 30.0)
    assert pair.src.phase is SourcePhase.UNSETTLED
    reason = pair.src.failure.reason  # type: ignore[union-attr]
    assert "postcopy paused" in reason and "ctl recover" in reason and "settle here" in reason
    assert "'ctl settle here' only if it is gone for good" in reason, "a postcopy's advice"
    lacked = pair.src.dest_missing
    assert lacked is not None and f"last said it lacked {lacked} pages, held only here" in reason
    assert pair.src_host.resumes == 0, "never resumed here on its own"
    assert pair.dst.phase is DestPhase.POSTCOPY and pair.dst_host.discarded == 0
    assert pair.dst_host.runner is not None and pair.dst_host.runner.running, "it runs there"
    # the link comes back; an operator's recover carries on to the end
    gone.clear()
    pair.up.cut_when = None
    pair.down.cut_when = None
    pair.src.recover(pair.now)
    assert pair.src.phase is SourcePhase.POSTCOPY_PAUSED
    pair.run_until(lambda: pair.src.phase is SourcePhase.COMPLETED, 30.0)
    assert pair.src.phase is SourcePhase.COMPLETED and pair.dst.verified is True
    # past trouble is history, not this migration's outcome: an orchestrator reads error != null
    # as a failure
    report = pair.src.report(pair.now)
    assert report["status"] == "completed" and report["error"] is None
    assert any("earlier trouble, since overcome: postcopy paused" in e["event"] for e in report["timeline"])


def test_postcopy_cannot_be_cancelled_from_either_side() -> None:
    pair = postcopy_pair(seed=5, to_dest=Faults(bandwidth=5e6))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase is DestPhase.POSTCOPY)
    with pytest.raises(RuntimeError, match="too late to cancel"):
        pair.src.cancel(pair.now)
    with pytest.raises(RuntimeError, match="too late to cancel"):
        pair.dst.cancel(pair.now)


def refusal(code: int = pb.ERROR_WRONG_SESSION) -> list:
    return framing.encode(framing.envelope(b"", 0, abort=pb.Abort(code=code, reason="no session of yours")))


def test_a_refusal_after_the_destination_ran_the_guest_never_resumes_it_here() -> None:
    pair = postcopy_pair(seed=5, to_dest=Faults(bandwidth=5e6))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.t_dest_running is not None)
    pair.src.receive(refusal(), pair.now)  # say, a stale resume answered by a restarted node
    assert pair.src.phase is SourcePhase.UNSETTLED and pair.src_host.resumes == 0
    assert "refused us" in pair.src.failure.reason  # type: ignore[union-attr]
    assert "'ctl recover' if the destination lives on" in pair.src.failure.reason  # type: ignore[union-attr]


def bitmap_never_arrives() -> Pair:
    """The destination's bitmap (its word that it runs the guest) never reaches the source."""
    pair = Pair(
        busy_guest(seed=5),
        params=MigrationParameters(postcopy=True, postcopy_after_rounds=0),
        to_source=Faults(drop_kinds=frozenset({"received_bitmap"}), seed=1),
        guest_speed=2000,
    )
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase is SourcePhase.POSTCOPY)
    return pair


def test_a_refusal_on_a_live_postcopy_link_never_resumes_the_guest_here() -> None:
    """Before its bitmap arrives the destination may already run the guest: a refusal on the
    live connection (forged, or a stray) is no proof that it does not."""
    pair = bitmap_never_arrives()
    assert pair.dst.phase is DestPhase.POSTCOPY, "the guest runs there"
    pair.src.receive(refusal(), pair.now)
    assert pair.src.phase is SourcePhase.UNSETTLED and pair.src_host.resumes == 0
    assert "refused us" in pair.src.failure.reason  # type: ignore[union-attr]


def test_a_resume_refused_by_a_node_without_the_session_resumes_the_guest_here() -> None:
    """Reconnecting, the source hears from a node that holds no session of its own (a restarted
    destination, whose guest went with the old process) and never said it ran the guest."""
    pair = bitmap_never_arrives()
    pair.down.faults = Faults(cut_after=0)
    pair.up.faults = Faults(cut_after=0)
    pair.run_until(lambda: pair.src.phase is SourcePhase.POSTCOPY_PAUSED, max_seconds=20)
    pair.src.take_outgoing()
    pair.src.receive(refusal(), pair.now)
    assert pair.src.phase is SourcePhase.FAILED and pair.src_host.resumes == 1
    assert pair.src.take_outgoing() == [], "a node that said it holds no session is not answered"
    assert "before it ran the guest" in pair.src.failure.reason  # type: ignore[union-attr]


def test_hostile_requests_and_an_early_verify_change_nothing() -> None:
    pair = postcopy_pair(seed=5, to_dest=Faults(bandwidth=5e6))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.t_dest_running is not None)
    src, dst = pair.src, pair.dst
    bogus = framing.envelope(
        src.session_id, dst.link.next_seq, page_request=pb.PageRequest(page_index=[10**9, 3])
    )
    bogus.epoch = src.link.epoch
    dst.link.next_seq += 1  # as if the destination had sent it: sequenced and in order
    src.receive(framing.encode(bogus), pair.now)
    assert src.phase is SourcePhase.POSTCOPY and src.refused_pages == 1
    with pytest.raises(WireError, match="pages are still missing"):
        dst.precopy_side.on_verify_request(pb.VerifyRequest(attempt=1), b"", pair.now)
    dst._fail(pb.ERROR_BAD_MESSAGE, "something odd", pair.now)  # what receive does with it
    assert dst.phase is DestPhase.POSTCOPY and "something odd" in (dst.last_refusal or "")
    assert dst.failure is None and pair.dst_host.discarded == 0
    pair.run_until(lambda: pair.src.phase is SourcePhase.COMPLETED)
    assert pair.dst.phase is DestPhase.RUNNING and pair.dst.verified is True


def test_a_silent_source_does_not_make_the_destination_pile_up_messages() -> None:
    params = {"peer_timeout_s": 0.4, "heartbeat_interval_s": 0.1, "reconnect_timeout_s": 1.0}
    pair = postcopy_pair(seed=21, dest_steps=100_000, to_dest=Faults(bandwidth=5e6), **params)  # type: ignore[arg-type]
    silent: list[float] = []

    def cut() -> bool:
        if pair.dst.postcopy is not None and pair.dst.postcopy.started and not silent:
            silent.append(pair.now)
        return bool(silent) and pair.now < silent[0] + 6.0

    pair.up.cut_when = cut
    pair.down.cut_when = cut
    pair.src.start(pair.now)
    pair.run_until(lambda: bool(silent) and pair.now > silent[0] + 5.5, 30.0)
    assert pair.dst.phase is DestPhase.POSTCOPY
    assert len(pair.dst.link.unacked) <= 10, "requests and bitmaps do not pile up while nobody listens"


@pytest.mark.parametrize("rounds", [2])
def test_a_guest_that_does_not_converge_switches_after_exactly_its_rounds(rounds: int) -> None:
    guest = busy(17)
    pair = postcopy_pair(guest=guest, after_rounds=rounds, max_bandwidth=2 << 20, downtime_limit_ms=1)
    run_to_end(pair)
    report = pair.src.report(pair.now)
    assert report["rounds"] == rounds
    rounds_sent = [event for event, _ in pair.src.timeline if event.startswith("round ")]
    assert rounds_sent == [f"round {n} sent" for n in range(1, rounds + 1)]
    assert_equals_unmigrated(pair, busy(17))


def test_postcopy_allowed_but_never_started_completes_as_a_precopy_does() -> None:
    """--postcopy-after-rounds never (QEMU's postcopy-ram without migrate-start-postcopy): a
    guest that converges stops and is verified as in precopy; the reports say what it became."""
    pair = run_to_end(postcopy_pair(seed=5, after_rounds=None))
    assert pair.src.phase is SourcePhase.COMPLETED and pair.src.postcopy is None
    assert pair.dst.phase is DestPhase.RUNNING and pair.dst.verified is True and pair.dst.postcopy is None
    for report in (pair.src.report(pair.now), pair.dst.report(pair.now)):
        assert report["mode"] == "precopy" and report["postcopy_allowed"] is True
        assert report["postcopy"] is None and report["verification"]["ok"] is True
    assert pair.dst.guest is not None and pair.dst_host.runner is not None
    seed_guest = busy_guest(seed=5)
    Workload(seed_guest).run(pair.dst_host.runner.step)
    assert pair.dst.guest.digests() == seed_guest.digests()
