"""Postcopy's guest side on its own: a step that touches a missing page is undone and run again
once the page is placed, and the run ends exactly as the unmigrated one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.guest.guest import Guest
from common.guest.presence import PageMissing, PresenceGate, RestartableVcpu
from common.guest.runner import GuestRunner
from common.guest.workload import Workload, WorkloadConfig, boot


def snapshot_copy(guest: Guest) -> Guest:
    """A second guest equal to this one (RAM, tags, populated bits, registers)."""
    copy = Guest.create(guest.memory.ram_bytes, len(guest.vcpus))
    copy.memory.pages[:] = guest.memory.pages
    copy.memory.page_tags[:] = guest.memory.page_tags
    copy.memory.data_populated[:] = guest.memory.data_populated
    copy.memory.tags_populated[:] = guest.memory.tags_populated
    for mine, theirs in zip(copy.vcpus, guest.vcpus, strict=True):
        for name, value in vars(theirs).items():
            setattr(mine, name, list(value) if isinstance(value, list) else value)
    return copy


def postcopy_copy(source: Guest, present: np.ndarray) -> tuple[Guest, PresenceGate]:
    """The destination at switchover: registers and the present pages only."""
    dest = snapshot_copy(source)
    missing = np.flatnonzero(~present)
    dest.memory.pages[missing] = 0xEE  # garbage where the page has not arrived
    dest.memory.page_tags[missing] = 0x55
    gate = PresenceGate(dest.memory, present.copy())
    dest.memory.gate = gate
    return dest, gate


def place(dest: Guest, gate: PresenceGate, source: Guest, page: int) -> None:
    dest.memory.pages[page] = source.memory.pages[page]
    dest.memory.page_tags[page] = source.memory.page_tags[page]
    gate.present[page] = True


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**20), share=st.floats(0.0, 0.9), steps=st.integers(1, 60))
def test_a_migrated_run_with_missing_pages_equals_the_unmigrated_one(
    seed: int, share: float, steps: int
) -> None:
    config = WorkloadConfig(seed=seed, working_set_bytes=256 << 10, dirty_pages_per_step=4)
    source = boot(2 << 20, config)
    Workload(source).run(5)
    rng = np.random.default_rng(seed)
    present = rng.random(source.memory.page_count) >= share
    dest, gate = postcopy_copy(source, present)
    vcpu = RestartableVcpu(dest, gate, Workload)
    reference = snapshot_copy(source)
    Workload(reference).run(steps)
    misses = 0
    while vcpu.step_count < 5 + steps:
        vcpu.step()
        for page in vcpu.take_misses():
            misses += 1
            assert not gate.present[page], "only a missing page is asked for"
            place(dest, gate, source, page)
    for page in np.flatnonzero(~gate.present):  # what the background stream brings
        place(dest, gate, source, int(page))
    assert dest.digests() == reference.digests()
    if share == 0.0:
        assert misses == 0


def test_a_miss_undoes_the_step_and_blocks_until_the_page_is_placed() -> None:
    source = boot(2 << 20, WorkloadConfig(seed=3, working_set_bytes=256 << 10))
    present = np.ones(source.memory.page_count, dtype=bool)
    heap = Workload(source)._heap_page
    present[heap : heap + 40] = False
    dest, gate = postcopy_copy(source, present)
    before = snapshot_copy(dest)
    vcpu = RestartableVcpu(dest, gate, Workload)
    runner = GuestRunner(vcpu, clock=lambda: 0.0)
    runner.start()
    for _ in range(50):
        runner.run_slice()
        if runner.waiting_for_page:
            break
    assert runner.waiting_for_page and vcpu.blocked_on is not None
    assert runner.seconds_until_due(0.0) is None, "a blocked vCPU asks for no slice"
    at = vcpu.step_count
    assert runner.run_slice() == 0 and vcpu.step_count == at
    (page,) = vcpu.take_misses()
    # the undone step left nothing behind: memory outside the steps that completed is as it was
    assert not dest.memory.pages[page].any() or (dest.memory.pages[page] == 0xEE).all()
    place(dest, gate, source, page)
    assert not runner.waiting_for_page
    for _ in range(40):  # a step may find several pages missing, one after another
        runner.run_slice()
        for missed in vcpu.take_misses():
            place(dest, gate, source, missed)
        if vcpu.step_count > at:
            break
    assert vcpu.step_count > at
    assert before.memory.ram_bytes == dest.memory.ram_bytes


def test_the_gate_refuses_before_it_touches_anything() -> None:
    guest = Guest.create(1 << 20)
    present = np.ones(guest.memory.page_count, dtype=bool)
    present[3] = False
    guest.memory.gate = PresenceGate(guest.memory, present)
    with pytest.raises(PageMissing) as missed:
        guest.memory.write(3 * 4096 - 4, b"12345678")  # straddles pages 2 and 3
    assert missed.value.page == 3
    assert not guest.memory.pages[2].any() and not guest.memory.data_dirty[2]
    for touch in (
        lambda: guest.memory.read(3 * 4096, 1),
        lambda: guest.memory.get_tag(3 * 4096 + 16),
        lambda: guest.memory.set_tags(3 * 4096, 32, 5),
        lambda: guest.memory.granule_tags(2 * 4096, 4097),
    ):
        with pytest.raises(PageMissing):
            touch()
    guest.memory.write(2 * 4096, b"ok")  # a present page is untouched by the gate
    assert guest.memory.read(2 * 4096, 2) == b"ok"
