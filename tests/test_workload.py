"""The workload is deterministic and keeps all its state in the guest."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.constants import PAGE_SIZE, TCF_ASYMMETRIC, TCF_ASYNC, TCF_NONE, TCF_SYNC
from common.guest.guest import Guest
from common.guest.workload import Fill, NotAWorkloadGuest, Workload, WorkloadConfig, boot
from common.transfer import (
    PagePass,
    apply_device_state,
    apply_ram_pages,
    apply_tag_sections,
    device_state,
    encode_batch,
)
from common.wire import framing

RAM = 4 << 20
SESSION = b"snapshot"


def run(config: WorkloadConfig, steps: int) -> Guest:
    guest = boot(RAM, config)
    Workload(guest).run(steps)
    return guest


def test_same_seed_same_end_state_other_seed_differs() -> None:
    a = run(WorkloadConfig(seed=5, working_set_bytes=1 << 20), 300).digests()
    b = run(WorkloadConfig(seed=5, working_set_bytes=1 << 20), 300).digests()
    c = run(WorkloadConfig(seed=6, working_set_bytes=1 << 20), 300).digests()
    assert a == b
    assert a.ram != c.ram and a.tags != c.tags and a.vcpu != c.vcpu


def test_faults_are_provoked_in_every_checking_mode() -> None:
    guest = boot(RAM, WorkloadConfig(seed=2, working_set_bytes=256 << 10, tag_only_share=0.0))
    w = Workload(guest)
    taken: dict[int, int] = {}
    for _ in range(4):
        before = w.faults
        w.run(64)  # one TCF period per mode
        taken[guest.vcpus[0].tcf(1)] = w.faults - before
    assert set(taken) == {TCF_NONE, TCF_SYNC, TCF_ASYNC, TCF_ASYMMETRIC}
    # sync faults at the access, async ones at the next step, asymmetric both ways
    assert taken[TCF_SYNC] > 0 and taken[TCF_ASYNC] > 0 and taken[TCF_ASYMMETRIC] > 0
    # checking off: at most the one async fault still pending from the period before
    assert taken[TCF_NONE] <= 1


def test_tag_only_steps_change_tags_but_not_data() -> None:
    guest = boot(RAM, WorkloadConfig(seed=3, working_set_bytes=1 << 20, tag_only_share=1.0, device_period=0))
    guest.memory.dirty_sync()
    Workload(guest).run(20)
    sync = guest.memory.dirty_sync()
    assert sync.tag_pages.size > 0
    assert sync.data_pages.size == 0


def test_split_runs_equal_one_run() -> None:
    config = WorkloadConfig(seed=9, working_set_bytes=512 << 10)
    whole = run(config, 200)
    split = boot(RAM, config)
    Workload(split).run(120)
    Workload(split).run(80)  # a fresh driver: nothing was kept outside the guest
    assert whole.digests() == split.digests()


def snapshot_through_wire(src: Guest, use_lz4: bool) -> Guest:
    """Every page, tag section and the vCPU state through framed wire messages."""
    dst = Guest.create(src.memory.ram_bytes)
    everything = np.arange(src.memory.page_count, dtype=np.int64)
    whole = PagePass(everything, everything)
    seq = 0
    while chunks := whole.next_chunks(1):
        batch = encode_batch(src.memory, *chunks[0], use_lz4=use_lz4, round_no=1)
        seq += 1
        frames = framing.encode(framing.envelope(SESSION, seq, **{batch.kind: batch.body}), batch.payload)
        got = framing.decode([bytes(f) for f in frames])
        apply = apply_ram_pages if batch.kind == "ram_pages" else apply_tag_sections
        apply(dst.memory, getattr(got.envelope, batch.kind), got.payload)
    got = framing.decode(framing.encode(framing.envelope(SESSION, seq + 1, device_state=device_state(src))))
    apply_device_state(dst, got.envelope.device_state)
    return dst


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 1 << 32),
    before=st.integers(0, 150),
    after=st.integers(1, 150),
    fill=st.sampled_from(list(Fill)),
    use_lz4=st.booleans(),
)
def test_snapshot_through_wire_then_run_on_both_ends_equal(
    seed: int, before: int, after: int, fill: Fill, use_lz4: bool
) -> None:
    config = WorkloadConfig(seed=seed, working_set_bytes=512 << 10, fill=fill)
    src = run(config, before)
    dst = snapshot_through_wire(src, use_lz4)
    assert dst.digests() == src.digests()
    Workload(src).run(after)
    Workload(dst).run(after)
    assert dst.digests() == src.digests()
    assert dst.vcpus[0].x == src.vcpus[0].x


def test_async_fault_pending_at_snapshot_is_counted_after_it() -> None:
    config = WorkloadConfig(seed=4, working_set_bytes=256 << 10)
    src = run(config, 10)
    clean = snapshot_through_wire(src, use_lz4=False)
    src.vcpus[0].tfsr_el1 = 1  # a sticky async fault the guest has not seen yet
    dst = snapshot_through_wire(src, use_lz4=True)
    for guest in (src, dst, clean):
        Workload(guest).step()
    assert Workload(dst).faults == Workload(src).faults == Workload(clean).faults + 1


def test_fill_kinds_shape_memory() -> None:
    zero = boot(RAM, WorkloadConfig(working_set_bytes=1 << 20, fill=Fill.ZERO))
    rand = boot(RAM, WorkloadConfig(working_set_bytes=1 << 20, fill=Fill.RANDOM))
    mixed = boot(RAM, WorkloadConfig(working_set_bytes=1 << 20, fill=Fill.MIXED))
    populated = [int(g.memory.data_populated.sum()) for g in (zero, mixed, rand)]
    assert populated[0] < populated[1] < populated[2]
    last = rand.memory.page_count - 1
    assert rand.memory.pages[last].any() and rand.memory.page_tags[last].any()
    assert not zero.memory.pages[last].any()


def test_a_guest_without_control_block_is_refused() -> None:
    with pytest.raises(NotAWorkloadGuest, match="no workload control block"):
        Workload(Guest.create(RAM))


@pytest.mark.parametrize(
    "config, message",
    [
        (WorkloadConfig(tag_only_share=1.5), "tag-only-share"),
        (WorkloadConfig(working_set_bytes=8 << 20), "does not fit"),
        (WorkloadConfig(dirty_pages_per_step=0), "dirty-pages-per-step"),
        (WorkloadConfig(working_set_bytes=PAGE_SIZE), "below two pages"),
    ],
)
def test_bad_workload_configs_are_refused(config: WorkloadConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        boot(RAM, config)
