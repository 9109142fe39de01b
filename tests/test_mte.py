"""Tag-check semantics in every TCF mode, IRG and the GCR exclude mask."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.constants import (
    GRANULE_SIZE,
    PAGE_SIZE,
    TCF_ASYMMETRIC,
    TCF_ASYNC,
    TCF_NONE,
    TCF_SYNC,
    TFSR_TF0,
    TFSR_TF1,
)
from common.guest.memory import GuestMemory
from common.guest.mte import (
    TagCheckFault,
    checked_load,
    checked_store,
    choose_non_excluded_tag,
    irg,
    make_pointer,
)
from common.guest.vcpu import VcpuState

TTBR1 = 1 << 55


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory(1 << 20)
    m.set_tags(PAGE_SIZE, PAGE_SIZE, 0x5)
    return m


def vcpu_with(mode: int, el: int = 1) -> VcpuState:
    v = VcpuState()
    v.set_tcf(el, mode)
    return v


def test_matching_tag_passes_in_every_mode(mem: GuestMemory) -> None:
    for mode in (TCF_NONE, TCF_SYNC, TCF_ASYNC, TCF_ASYMMETRIC):
        v = vcpu_with(mode)
        ptr = make_pointer(PAGE_SIZE + 32, 0x5)
        assert checked_store(mem, v, ptr, b"abcd") is False
        assert checked_load(mem, v, ptr, 4).data == b"abcd"
        assert v.tfsr_el1 == 0


def test_sync_mismatch_faults_and_does_not_store(mem: GuestMemory) -> None:
    v = vcpu_with(TCF_SYNC)
    ptr = make_pointer(PAGE_SIZE + 64, 0x6)
    with pytest.raises(TagCheckFault) as info:
        checked_store(mem, v, ptr, b"\xff" * 8)
    assert info.value.logical_tag == 6 and info.value.allocation_tag == 5
    assert mem.read(PAGE_SIZE + 64, 8) == bytes(8)
    with pytest.raises(TagCheckFault):
        checked_load(mem, v, ptr, 8)


def test_async_mismatch_sets_sticky_bit_and_completes(mem: GuestMemory) -> None:
    v = vcpu_with(TCF_ASYNC)
    assert checked_store(mem, v, make_pointer(PAGE_SIZE, 0x7), b"\x01") is True
    assert mem.read(PAGE_SIZE, 1) == b"\x01"
    assert v.tfsr_el1 == TFSR_TF0
    checked_load(mem, v, make_pointer(PAGE_SIZE, 0x7) | TTBR1, 1)
    assert v.tfsr_el1 == TFSR_TF0 | TFSR_TF1


def test_asymmetric_is_sync_on_loads_async_on_stores(mem: GuestMemory) -> None:
    v = vcpu_with(TCF_ASYMMETRIC)
    ptr = make_pointer(PAGE_SIZE, 0x9)
    with pytest.raises(TagCheckFault):
        checked_load(mem, v, ptr, 4)
    assert v.tfsr_el1 == 0
    checked_store(mem, v, ptr, b"zz")
    assert v.tfsr_el1 == TFSR_TF0 and mem.read(PAGE_SIZE, 2) == b"zz"


def test_none_ignores_mismatch(mem: GuestMemory) -> None:
    v = vcpu_with(TCF_NONE)
    assert checked_store(mem, v, make_pointer(PAGE_SIZE, 0x1), b"q") is True
    assert v.tfsr_el1 == 0 and v.tfsre0_el1 == 0


def test_el0_uses_tcf0_and_tfsre0(mem: GuestMemory) -> None:
    v = vcpu_with(TCF_ASYNC, el=0)
    v.set_tcf(1, TCF_SYNC)
    checked_store(mem, v, make_pointer(PAGE_SIZE, 0x2), b"x", el=0)
    assert v.tfsre0_el1 == TFSR_TF0 and v.tfsr_el1 == 0
    with pytest.raises(TagCheckFault):
        checked_store(mem, v, make_pointer(PAGE_SIZE, 0x2), b"x", el=1)


def test_access_spanning_granules_checks_each(mem: GuestMemory) -> None:
    mem.set_tags(PAGE_SIZE + GRANULE_SIZE, GRANULE_SIZE, 0x3)
    v = vcpu_with(TCF_SYNC)
    checked_load(mem, v, make_pointer(PAGE_SIZE, 0x5), GRANULE_SIZE)
    with pytest.raises(TagCheckFault) as info:
        checked_load(mem, v, make_pointer(PAGE_SIZE + 8, 0x5), GRANULE_SIZE)
    assert info.value.allocation_tag == 3


@given(seed=st.integers(1, 0xFFFF), exclude=st.integers(0, 0xFFFF))
def test_irg_never_returns_an_excluded_tag(seed: int, exclude: int) -> None:
    v = VcpuState(gcr_el1=exclude, rgsr_el1=seed << 8)
    tags = [irg(v) for _ in range(32)]
    if exclude == 0xFFFF:
        assert set(tags) == {0}
    else:
        assert all(not (exclude >> t) & 1 for t in tags)


@given(seed=st.integers(1, 0xFFFF))
def test_irg_is_reproducible_from_rgsr(seed: int) -> None:
    a = VcpuState(gcr_el1=1, rgsr_el1=seed << 8)
    b = VcpuState(gcr_el1=1, rgsr_el1=seed << 8)
    assert [irg(a) for _ in range(16)] == [irg(b) for _ in range(16)]
    assert a.rgsr_el1 == b.rgsr_el1


def test_irg_uses_many_tags_and_advances_seed() -> None:
    v = VcpuState(gcr_el1=1, rgsr_el1=0xACE1 << 8)
    tags = {irg(v) for _ in range(200)}
    assert 0 not in tags and len(tags) >= 12
    assert v.rgsr_el1 != 0xACE1 << 8


@given(tag=st.integers(0, 15), exclude=st.integers(0, 0xFFFE))
def test_choose_non_excluded_tag_picks_the_next_allowed(tag: int, exclude: int) -> None:
    chosen = choose_non_excluded_tag(tag, 0, exclude)
    assert not (exclude >> chosen) & 1
    # every tag between the start and the chosen one (cyclically) is excluded
    t = tag
    while t != chosen:
        assert (exclude >> t) & 1
        t = (t + 1) & 0xF
