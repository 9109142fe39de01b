"""Edges of the two sessions that the mutation run found unwatched: each test pins one behaviour
that a wrong comparison or a dropped statement in common/protocol would change, and says why
the behaviour matters to a user."""

from __future__ import annotations

from dataclasses import replace

import pytest

from common.protocol.params import MigrationParameters
from common.protocol.phases import DestPhase, SourcePhase
from common.wire import framing
from common.wire import mte_migration_pb2 as pb
from tests.protocol_harness import Faults, Pair, busy_guest, pageless_postcopy


def test_only_a_finished_or_operator_bound_source_phase_has_ended() -> None:
    """`ended` decides whether a daemon may exit while an onward migration runs: a phase that
    still talks to its destination has not ended."""
    ended = {phase for phase in SourcePhase if phase.ended}
    assert ended == {phase for phase in SourcePhase if phase.terminal} | {SourcePhase.UNSETTLED}
    assert SourcePhase.COMPLETED.ended is True and SourcePhase.ACTIVE.ended is False


def test_each_batch_is_counted_on_the_channel_it_came_over_and_nothing_else_is() -> None:
    seen = Faults(tamper=lambda message: None)  # the link reads every message's kind
    pair = Pair(busy_guest(seed=3), to_dest=seen).run()
    assert pair.src.phase is SourcePhase.COMPLETED
    batches = sum(kind in framing.BATCH_KINDS for kind in pair.down.kinds)
    assert batches > 0 and pair.dst.channel_batches == [batches]


def test_one_batch_always_fits_the_bandwidth_cap() -> None:
    """A cap below 20 MiB/s makes a window of the rate smaller than a batch: the bucket still
    holds one whole batch, or the first batch of every window would wait."""
    pair = Pair(busy_guest(), MigrationParameters(max_bandwidth=1 << 20))
    assert pair.src.bucket.burst == 1 << 20


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


def test_changing_only_the_bandwidth_tells_the_destination_no_new_timeouts() -> None:
    """The destination is told the reconnect timeouts again only when they change, and only
    while the migration still talks to it."""
    seen = Faults(tamper=lambda message: None)
    guest = busy_guest(seed=3, working_set=4 << 20)
    pair = Pair(guest, MigrationParameters(max_bandwidth=1 << 20), to_dest=seen)
    pair.src.start(pair.now)
    pair.run_until(lambda: pair.dst.phase is DestPhase.RECEIVING)
    pair.src.set_parameters(replace(pair.src.params, max_bandwidth=2 << 20), pair.now)
    pair.run_until(lambda: False, 0.2)
    assert "link_timeouts" not in pair.down.kinds
    pair.src.set_parameters(replace(pair.src.params, reconnect_timeout_s=33.0), pair.now)
    pair.run_until(lambda: False, 0.2)
    assert pair.down.kinds.count("link_timeouts") == 1
    pair.run_until(pair.settled)
    assert pair.src.phase is SourcePhase.COMPLETED
    pair.src.set_parameters(replace(pair.src.params, reconnect_timeout_s=44.0), pair.now)
    assert pair.src.take_outgoing() == [], "after the end nobody is listening"


class FailingStop(Exception):
    pass


def test_a_host_error_at_the_switchover_fails_the_migration_and_the_guest_runs_here() -> None:
    pair = Pair(busy_guest(seed=3))

    def stop_fails() -> None:
        raise FailingStop("the vCPU thread did not stop")

    pair.src_host.stop_guest = stop_fails  # type: ignore[method-assign]
    pair.run()
    failure = pair.src.failure
    assert pair.src.phase is SourcePhase.FAILED and failure is not None
    assert failure.code == pb.ERROR_INTERNAL and "the source failed handling" in failure.reason
    assert "the vCPU thread did not stop" in failure.reason
    assert pair.src_host.running, "the guest never left this side"


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
