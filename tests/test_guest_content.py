"""Guest memory is the guest's to write: whatever it holds, a daemon that runs the guest lives.
A control block no workload of ours wrote runs idle; a step that its memory makes impossible
stops the guest with a guest-level error in the report, as a real vCPU takes an abort."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from common.constants import MAX_DIRTY_PAGES_PER_STEP, PAGE_SIZE
from common.guest.guest import Guest
from common.guest.mte import make_pointer
from common.guest.presence import PresenceGate, RestartableVcpu
from common.guest.runner import GuestRunner
from common.guest.workload import NotAWorkloadGuest, Workload, WorkloadConfig, boot
from common.protocol.dest import DestParameters
from dest_node.daemon import DestDaemon, DestOptions

# (field index in the control block, value, what the refusal says)
_CONTROL = struct.Struct("<8sQQQQQdQQQQQQQ")


def guest_with_control(index: int, value: float | int) -> Guest:
    guest = boot(1 << 20, WorkloadConfig(seed=3, working_set_bytes=64 << 10))
    fields = list(_CONTROL.unpack(guest.memory.read(0, _CONTROL.size)))
    fields[index] = value
    guest.memory.write(0, _CONTROL.pack(*fields))
    return guest


@pytest.mark.parametrize(
    "index, value, words",
    [
        (4, 2**63, f"pages a step (at most {MAX_DIRTY_PAGES_PER_STEP})"),
        (4, 0, "0 pages a step"),
        (5, 2**40, "tag-only share above 1"),
        (6, float("nan"), "a pace of nan"),
        (6, -1.0, "a pace of -1.0"),
        (7, 10**6, "pointer table"),
        (8, 0, "heap"),
        (9, 2**40, "pointer table"),
        (10, 255, "arena"),
        (11, 2**62, "arena"),
    ],
)
def test_a_control_block_no_workload_wrote_is_refused_with_its_reason(
    index: int, value: float, words: str
) -> None:
    """2^63 dirty pages a step looped inside one step, past every slice budget: the destination's
    loop hung for good."""
    guest = guest_with_control(index, value)
    with pytest.raises(NotAWorkloadGuest, match="workload control block is unusable") as refused:
        Workload(guest)
    assert words in str(refused.value)


def guest_with_wild_pointers() -> Guest:
    """Every slot of the pointer table points past the end of guest RAM."""
    guest = boot(1 << 20, WorkloadConfig(seed=3, working_set_bytes=64 << 10, tag_only_share=0.0))
    workload = Workload(guest)
    wild = make_pointer(guest.memory.ram_bytes + 7 * PAGE_SIZE, 5)
    for slot in range(workload._heap_slots):
        guest.memory.write_u64(workload._table_page * PAGE_SIZE + slot * 8, wild)
    return guest


def test_a_step_its_memory_makes_impossible_stops_the_guest_not_the_loop() -> None:
    guest = guest_with_wild_pointers()
    runner = GuestRunner(Workload(guest), stop_at_step=100)
    runner.start()
    assert runner.run_slice() == 0
    assert runner.error is not None and "the guest stopped at step 0" in runner.error
    assert not runner.running and runner.stopped_for_good and not runner.finished
    assert runner.run_slice() == 0 and runner.seconds_until_due(0.0) is None, "it stays stopped"


def test_a_postcopy_vcpu_that_cannot_finish_a_step_leaves_no_trace_of_it() -> None:
    guest = guest_with_wild_pointers()
    before = guest.memory.pages.copy()
    present = np.ones(guest.memory.page_count, dtype=np.bool_)
    present[-1] = False  # a gate in force: every access is journaled
    gate = PresenceGate(guest.memory, present)
    guest.memory.gate = gate
    runner = GuestRunner(RestartableVcpu(guest, gate, Workload), stop_at_step=100)
    runner.start()
    runner.run_slice()
    assert runner.error is not None and runner.stopped_for_good
    assert np.array_equal(guest.memory.pages, before), "the failed step was undone"


def test_the_destination_daemon_lives_and_reports_a_guest_that_stopped_itself(tmp_path: Path) -> None:
    dest = DestDaemon(DestOptions(listen=f"ipc://{tmp_path}/dest.sock", params=DestParameters()))
    try:
        dest.host.start_guest(guest_with_wild_pointers())
        assert dest.host.runner is not None
        dest.host.run_slice()
        guest = dest.status()["guest"]
        assert guest["running"] is False and "the guest stopped at step 0" in guest["error"]
        # a control block it cannot run: idle, with the reason logged, never a dead loop
        dest.host.runner = None
        dest.host.start_guest(guest_with_control(4, 2**63))
        assert dest.host.runner is None
    finally:
        dest.sock.close(linger=0)
        dest.ctx.term()


def test_a_destination_whose_guest_is_taken_back_withdraws_the_copy_it_sends_on(tmp_path: Path) -> None:
    """The node's incoming guest is discarded (taken back upstream) while it sends that guest on:
    the onward migration is withdrawn too, or the next node would run it beside the source."""
    from types import SimpleNamespace

    from common.protocol.phases import SourcePhase

    dest = DestDaemon(DestOptions(listen=f"ipc://{tmp_path}/dest.sock", params=DestParameters()))
    withdrawn: list[str] = []
    try:
        guest = boot(1 << 20, WorkloadConfig(seed=3, working_set_bytes=64 << 10))
        dest.host.start_guest(guest)
        session = SimpleNamespace(
            phase=SourcePhase.ACTIVE, withdraw=lambda now, reason: withdrawn.append(reason)
        )
        dest.outgoing = SimpleNamespace(session=session, after_call=lambda: None)  # type: ignore[assignment]
        dest.host.discard_guest(guest)
        assert withdrawn == ["the guest was taken back by the node it came from"]
        assert dest.host.runner is None and dest.host.running_guest is None
    finally:
        dest.outgoing = None
        dest.sock.close(linger=0)
        dest.ctx.term()
