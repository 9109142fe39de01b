"""Edges of the postcopy sides that the mutation run found unwatched: each test pins one
behaviour that a wrong comparison or a dropped statement in common/protocol would change, and
says why the behaviour matters to a user."""

from __future__ import annotations

import numpy as np
import pytest

from common.constants import PAGE_STATE_BYTES, REFUSAL_ANSWERS_PER_S
from common.protocol.dest import DestParameters
from common.protocol.events import Reconnect
from common.protocol.handshake import link_timeouts
from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from common.protocol.postcopy import BACKGROUND_WINDOW
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import (
    Faults,
    Pair,
    altered,
    bulk_numbering,
    busy_guest,
    capped_precopy,
    pageless_postcopy,
    running_postcopy,
)


def zero_source_digest(env: pb.Envelope) -> None:
    """The verify request says the source holds other content than it sent."""
    env.verify_request.source.ram_digest = bytes(len(env.verify_request.source.ram_digest or b"x" * 16))


def one_page_more_in_the_bitmap(env: pb.Envelope) -> None:
    env.received_bitmap.page_count += 1


def one_page_more_to_start(env: pb.Envelope) -> None:
    env.postcopy_start.page_count += 1


@pytest.mark.parametrize("phase", [SourcePhase.COMPLETED, SourcePhase.POSTCOPY, SourcePhase.FAILED])
def test_recover_is_refused_unless_postcopy_broke_its_link(phase: SourcePhase) -> None:
    pair = pageless_postcopy()
    pair.src.machine.phase = phase  # the guard alone, whatever led there
    with pytest.raises(RuntimeError, match=f"nothing to recover \\(phase {phase.value}\\)"):
        pair.src.recover(pair.now)


def test_recover_is_refused_to_a_precopy_left_unsettled_and_taken_in_postcopy() -> None:
    pair = Pair(busy_guest())
    pair.src.machine.phase = SourcePhase.UNSETTLED
    with pytest.raises(RuntimeError, match="nothing to recover"):
        pair.src.recover(pair.now)
    pair = pageless_postcopy()
    pair.src.machine.phase = SourcePhase.POSTCOPY_PAUSED
    pair.src.recover(pair.now)  # a resume goes out at once
    assert pair.src.phase is SourcePhase.POSTCOPY_PAUSED and pair.src.reconnector.next_at == pair.now


def test_a_withdrawal_the_destination_missed_is_said_again_when_it_speaks() -> None:
    """The first word that the guest was taken back is lost; the destination's next message
    gets it again, and it stops its copy."""
    pair = pageless_postcopy()
    cut = [True]
    pair.down.cut_when = lambda: cut[0]
    pair.src.withdraw(pair.now, "the guest was taken back by the node it came from")
    pair.run_until(lambda: False, 0.3)
    assert pair.dst.phase is DestPhase.POSTCOPY, "it did not hear"
    cut[0] = False
    pair.run_until(lambda: pair.dst.phase is DestPhase.FAILED, 5.0)
    assert pair.dst.phase is DestPhase.FAILED and pair.dst_host.discarded == 1


def test_a_postcopy_that_fails_verification_says_so_on_both_sides_and_nobody_calls_it_done() -> None:
    params = MigrationParameters(postcopy=True, postcopy_after_rounds=0)
    pair = Pair(
        busy_guest(seed=3),
        params,
        to_dest=Faults(tamper=altered("verify_request", zero_source_digest)),
        guest_speed=2000,
    )
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase.ended, max_seconds=20)
    dst = pair.dst.report(pair.now)
    assert dst["status"] == "failed" and "postcopy verification failed" in dst["error"]
    assert pair.dst.phase is DestPhase.RUNNING, "the guest runs on there: it is the only copy that runs"
    assert pair.src.phase is SourcePhase.UNSETTLED and pair.src_host.resumes == 0
    assert "the destination's manifest or vCPU state differs" in str(pair.src.failure)
    assert "'ctl recover' if the destination lives on" in str(pair.src.failure), "a postcopy's advice"


def test_a_postcopy_destination_asks_again_for_pages_that_never_come() -> None:
    """Every page is lost on the way: the pages the guest waits on are asked for again after a
    retransmission time, not waited on for good."""
    pair = pageless_postcopy()
    pair.run_until(lambda: False, 3.0)
    assert pair.dst.postcopy is not None and pair.dst.postcopy.retried_requests > 0


def test_recovering_an_unsettled_postcopy_starts_a_new_connection() -> None:
    pair = pageless_postcopy()
    src = pair.src
    epoch = src.link.epoch
    src._unsettled(pair.now, "no answer for a while", postcopy=True)  # its link still looks alive
    assert src.report(pair.now)["error"] is not None
    src.take_events()
    src.recover(pair.now)
    assert src.phase is SourcePhase.POSTCOPY_PAUSED and not src.connected
    assert src.report(pair.now)["error"] is None, "the trouble is history once recovering"
    assert src.link.epoch == epoch + 1
    reconnects = [(e.epoch, e.silent_for_s) for e in src.take_events() if isinstance(e, Reconnect)]
    assert reconnects == [(epoch + 1, 0.0)], "an operator's word, not a silence"


def test_a_withdrawal_is_said_at_once() -> None:
    pair = pageless_postcopy()
    pair.src.take_outgoing()
    pair.src.withdraw(pair.now, "the guest was taken back by the node it came from")
    told = [framing.decode(m.frames) for m in pair.src.take_outgoing()]
    assert [m.envelope.abort.code for m in told if m.kind == "abort"] == [pb.ERROR_GUEST_TAKEN_BACK]


def test_a_verified_postcopy_left_unsettled_may_be_settled_there() -> None:
    """Verification proved the destination holds the whole guest: 'settle there' is safe."""
    pair = pageless_postcopy()
    pair.src.machine.phase = SourcePhase.UNSETTLED
    pair.src.verifier.verified = True
    pair.src.settle(False, pair.now)
    assert pair.src.phase is SourcePhase.COMPLETED


def test_the_postcopy_background_stream_keeps_at_most_its_window_in_flight() -> None:
    params = MigrationParameters(postcopy=True, postcopy_after_rounds=0)
    guest = busy_guest(seed=5, ram=64 << 20)
    guest.memory.write(16 << 20, np.random.default_rng(5).integers(0, 256, 32 << 20, dtype=np.uint8))
    pair = Pair(guest, params, to_dest=Faults(latency_s=0.05), guest_speed=2000, dest_steps=100_000)
    pair.src.start(pair.now)
    most = 0
    while pair.src.phase is not SourcePhase.COMPLETED and pair.elapsed < 30:
        pair.turn()
        most = max(most, pair.src.in_flight)
        src = pair.src
        if src.phase is SourcePhase.POSTCOPY:
            assert src.precopy.pass_ is None, "no precopy batch goes out once the guest left"
            pc = src.postcopy
            if pc is not None and pc.background_left and src.in_flight < BACKGROUND_WINDOW:
                assert src.next_deadline(pair.now) <= pair.now, "room and pages to send: due at once"
            if pc is not None and not pc.urgent and src.in_flight >= BACKGROUND_WINDOW:
                assert src.next_deadline(pair.now) > pair.now, "a full window: nothing to do at once"
    assert pair.src.phase is SourcePhase.COMPLETED
    assert most == min(BACKGROUND_WINDOW, pair.src.params.window)
    placed = pair.dst.postcopy
    assert placed is not None and placed.background_pages > placed.requested_pages, (
        "the stream, not asked for"
    )


def test_a_taken_back_guest_is_recalled_a_few_times_a_second_and_only_to_its_session() -> None:
    pair = pageless_postcopy()
    src = pair.src
    src.machine.phase = SourcePhase.UNSETTLED
    src.settle(True, pair.now)
    src.take_outgoing()
    heartbeat = framing.envelope(src.session_id, 0, heartbeat=pb.Heartbeat())
    heartbeat.epoch = src.link.epoch
    stranger = framing.envelope(b"other-session", 0, heartbeat=pb.Heartbeat())
    for _ in range(3 * REFUSAL_ANSWERS_PER_S):
        src.receive(framing.encode(stranger), pair.now + 0.5)
    assert src.take_outgoing() == [], "another session's messages are not ours to answer"
    for _ in range(3 * REFUSAL_ANSWERS_PER_S):
        src.receive(framing.encode(heartbeat), pair.now + 0.5)
    told = [framing.decode(m.frames) for m in src.take_outgoing()]
    assert len(told) == REFUSAL_ANSWERS_PER_S
    assert {m.envelope.abort.code for m in told} == {pb.ERROR_GUEST_TAKEN_BACK}


def test_a_postcopy_page_on_the_urgent_connection_during_precopy_is_ignored() -> None:
    pair = capped_precopy(lambda pair: pair.dst.phase is DestPhase.RECEIVING)
    dst = pair.dst
    stray = framing.envelope(dst.session_id, 0, postcopy_pages=pb.PostcopyPages())
    stray.epoch = dst.link.epoch
    dst.receive(pair.peer + b"-urgent", framing.encode(stray), pair.now)
    assert dst.phase is DestPhase.RECEIVING and dst.failure is None
    pair.run_until(pair.settled)
    assert pair.src.phase is SourcePhase.COMPLETED


def test_the_blocktime_is_the_sum_of_the_guests_waits_in_milliseconds() -> None:
    pair = running_postcopy(seed=5, to_dest=Faults(latency_s=0.01))
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase is SourcePhase.COMPLETED, 30.0)
    waits = pair.dst.postcopy.latencies_s  # type: ignore[union-attr]
    assert waits and max(waits) >= 0.01, "a wait for a page on its way covers the link's latency"
    report = pair.dst.report(pair.now)["postcopy"]
    assert report["blocktime_ms"] == round(sum(waits) * 1000.0, 3)
    assert report["fault_latencies_ms"] == [round(t * 1000.0, 3) for t in waits]
    assert pair.dst.postcopy.requested_pages > 0, "answers to the guest's misses count as asked for"  # type: ignore[union-attr]


def test_a_postcopy_destination_that_hears_its_source_but_gets_no_page_says_again_what_it_holds() -> None:
    """A source that lost track of what the destination holds sends nothing useful; the
    destination repeats its bitmap every retransmission time, and the source sends the rest."""
    pair = pageless_postcopy(dest_params=DestParameters(heartbeat_interval_s=0.1))
    pair.up.faults = Faults(tamper=lambda message: None, seed=1)  # the link reads each kind
    pair.run_until(lambda: False, 5.0)
    assert pair.up.kinds.count("resume_ack") == 0, "the link stayed up: no reconnect explains them"
    assert 4 <= pair.up.kinds.count("received_bitmap") <= 6, "one per retransmission time (1 s)"


def test_a_protocol_error_in_postcopy_leaves_the_guest_unsettled_never_resumed_here() -> None:
    """The destination runs the guest and only this side holds the pages it lacks: an error
    is no reason to run a second copy here, nor to give up the pages."""
    pair = pageless_postcopy()
    src = pair.src
    wrong = framing.envelope(src.session_id, src.link.received + 1, verify_request=pb.VerifyRequest())
    wrong.epoch = src.link.epoch
    src.receive(framing.encode(wrong), pair.now)
    assert src.phase is SourcePhase.UNSETTLED and pair.src_host.resumes == 0
    assert src.failure is not None and "unexpected verify_request" in src.failure.reason


def test_a_postcopy_destination_that_receives_pages_does_not_repeat_its_bitmap() -> None:
    """Pages arriving are progress: the bitmap is repeated only after a quiet retransmission
    time, so a long postcopy on a slow link does not fill it with repeats."""
    guest = busy_guest(seed=5, ram=32 << 20)
    guest.memory.write(16 << 20, np.random.default_rng(5).integers(0, 256, 8 << 20, dtype=np.uint8))
    pair = Pair(
        guest,
        MigrationParameters(postcopy=True, postcopy_after_rounds=0),
        DestParameters(heartbeat_interval_s=0.1),
        to_dest=Faults(bandwidth=2.5e6),  # about 4 s of pages
        guest_speed=100,  # the guests barely run: this is about the link
        dest_steps=100_000,
    )
    pair.up.faults = Faults(tamper=lambda message: None, seed=1)
    outbound_seqs_match = bulk_numbering(pair)
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase is SourcePhase.COMPLETED, 30.0)
    assert pair.src.phase is SourcePhase.COMPLETED and pair.elapsed > 3.0
    assert pair.up.kinds.count("received_bitmap") <= 3
    assert outbound_seqs_match and all(outbound_seqs_match), "each batch names its own number to the edge"


def test_timeouts_beyond_what_the_wire_holds_are_sent_as_its_largest_value() -> None:
    huge = MigrationParameters(postcopy=True, reconnect_timeout_s=1e9, postcopy_recover_timeout_s=1e9)
    timeouts = link_timeouts(huge)
    assert timeouts.reconnect_timeout_ms == timeouts.postcopy_recover_timeout_ms == 2**32 - 1
    usual = link_timeouts(MigrationParameters(postcopy=True, postcopy_recover_timeout_s=60.0))
    assert usual.postcopy_recover_timeout_ms == 60_000
    assert (
        link_timeouts(MigrationParameters(postcopy_recover_timeout_s=60.0)).postcopy_recover_timeout_ms == 0
    )


def test_a_resent_postcopy_batch_goes_out_again_as_bulk() -> None:
    pair = running_postcopy(seed=5, to_dest=Faults(latency_s=0.05))
    pair.src.start(pair.now)
    while not any(e.kind == "postcopy_pages" for e in pair.src.link.unacked) and pair.elapsed < 10:
        pair.turn()
    src = pair.src
    src.take_outgoing()
    pending = [e for e in src.link.unacked if e.kind == "postcopy_pages"]
    assert pending
    src.link_side.resend(pending, pair.now)
    again = [m for m in src.take_outgoing() if framing.decode(m.frames).kind == "postcopy_pages"]
    assert len(again) == len(pending) and all(m.bulk for m in again)
    asked_for = [framing.decode(m.frames).envelope.postcopy_pages.requested for m in again]
    assert not any(asked_for), "background pages stay background when sent again"


def test_a_throttled_guest_runs_at_full_speed_once_postcopy_takes_over() -> None:
    params = MigrationParameters(
        max_bandwidth=2 << 20, downtime_limit_ms=20, postcopy=True, postcopy_after_rounds=4
    )
    guest = busy_guest(seed=8, ram=8 << 20, working_set=2 << 20, dirty_pages_per_step=16)
    pair = Pair(guest, params, guest_speed=2000, dest_steps=100)
    pair.src.start(pair.now)
    throttled = []
    while pair.src.phase is not SourcePhase.POSTCOPY and pair.elapsed < 60:
        pair.turn()
        throttled.append(pair.src_host.throttle)
    assert pair.src.phase is SourcePhase.POSTCOPY and max(throttled) > 0
    assert pair.src_host.throttle == 0.0, "the source's guest is stopped: nothing left to hold back"


def test_a_link_lost_while_verifying_a_postcopy_resumes_the_verification() -> None:
    pair = pageless_postcopy()
    src = pair.src
    src.machine.phase = SourcePhase.POSTCOPY_VERIFYING
    src.link_side._link_broken(pair.now)
    assert src.phase is SourcePhase.POSTCOPY_PAUSED
    pair.run_until(lambda: src.connected, 5.0)
    assert src.connected and src.phase is SourcePhase.POSTCOPY_VERIFYING


def test_a_postcopy_start_before_the_switchover_ends_the_incoming_migration() -> None:
    params = MigrationParameters(postcopy=True, postcopy_after_rounds=3, max_bandwidth=1 << 20)
    pair = Pair(busy_guest(seed=3, working_set=4 << 20), params)
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase is DestPhase.RECEIVING and pair.dst.link.received >= 2)
    dst = pair.dst
    early = framing.envelope(dst.session_id, dst.link.received + 1, postcopy_start=pb.PostcopyStart())
    early.epoch = dst.link.epoch
    dst.receive(pair.peer, framing.encode(early), pair.now)
    assert dst.phase is DestPhase.FAILED
    assert "postcopy start before the switchover and its manifest" in str(dst.failure)


def test_a_postcopy_start_for_another_guest_size_ends_the_incoming_migration() -> None:
    params = MigrationParameters(postcopy=True, postcopy_after_rounds=0)
    pair = Pair(
        busy_guest(seed=3), params, to_dest=Faults(tamper=altered("postcopy_start", one_page_more_to_start))
    )
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase is DestPhase.FAILED, 10.0)
    pages = pair.dst.guest.memory.page_count if pair.dst.guest is not None else 2048
    assert f"postcopy start for {pages + 1} pages" in str(pair.dst.failure)


def test_a_postcopy_destination_reports_what_it_still_lacks() -> None:
    pair = pageless_postcopy()
    pc = pair.dst.postcopy
    assert pc is not None and pc.missing() > 0
    assert pair.dst.report(pair.now)["remaining_bytes"] == pc.missing() * PAGE_STATE_BYTES


def test_postcopy_after_a_negative_number_of_rounds_is_refused() -> None:
    with pytest.raises(ValueError, match="postcopy after -1 rounds: must be 0 or more"):
        MigrationParameters(postcopy=True, postcopy_after_rounds=-1).check()


def test_a_recover_long_after_the_last_word_gets_its_full_recover_time() -> None:
    pair = pageless_postcopy()
    src = pair.src
    src._unsettled(pair.now, "no answer for a while", postcopy=True)
    later = pair.now + 100.0
    src.recover(later)
    src.poll(later + 0.5)
    assert src.phase is SourcePhase.POSTCOPY_PAUSED, "not given up at once for the old silence"


def test_a_recover_timeout_shorter_than_the_peer_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="postcopy"):
        MigrationParameters(postcopy_recover_timeout_s=1.0, peer_timeout_s=2.0).check()
    assert MigrationParameters(postcopy_recover_timeout_s=2.0, peer_timeout_s=2.0).check()


def test_a_slow_postcopy_that_keeps_placing_pages_is_not_a_stall() -> None:
    """The stall bound is for a source that is heard and sends nothing; pages that trickle in
    are progress, however long the whole takes."""
    params = MigrationParameters(postcopy=True, postcopy_after_rounds=0)
    pair = Pair(
        busy_guest(seed=3),
        params,
        DestParameters(max_source_wait_s=1.0),
        to_dest=Faults(bandwidth=1e6),  # about 4 s for the guest's pages
        guest_speed=100,
        dest_steps=100_000,
    )
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase.ended, 30.0)
    assert pair.src.phase is SourcePhase.COMPLETED and pair.dst.failure is None and pair.elapsed > 2.0


def test_a_postcopy_destination_in_its_recover_time_only_once_the_source_stopped() -> None:
    """Before the switchover the source can always resume its own guest: the destination keeps
    the session for the reconnect timeout, not for the longer postcopy recovery."""
    pair = Pair(
        busy_guest(seed=3, working_set=4 << 20),
        MigrationParameters(
            postcopy=True, postcopy_after_rounds=3, max_bandwidth=1 << 20, postcopy_recover_timeout_s=90.0
        ),
    )
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase is DestPhase.RECEIVING)
    assert pair.dst.keep_for_s == pair.src.params.reconnect_timeout_s


def test_a_received_bitmap_for_another_guest_size_is_an_error_never_a_resume() -> None:
    params = MigrationParameters(postcopy=True, postcopy_after_rounds=0)
    pair = Pair(
        busy_guest(seed=3),
        params,
        to_source=Faults(tamper=altered("received_bitmap", one_page_more_in_the_bitmap), seed=1),
        guest_speed=100,
    )
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.src.phase.ended, 10.0)
    assert "received bitmap for" in str(pair.src.failure) and pair.src_host.resumes == 0
