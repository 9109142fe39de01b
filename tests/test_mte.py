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
    AccessResult,
    TagCheckFault,
    checked_load,
    checked_store,
    choose_non_excluded_tag,
    irg,
    make_pointer,
    pointer_address,
    pointer_tag,
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


MODES = {"none": TCF_NONE, "sync": TCF_SYNC, "async": TCF_ASYNC, "asymmetric": TCF_ASYMMETRIC}
# What a mismatched access does, per SCTLR_EL1.TCF/TCF0 value and access kind.
OUTCOME = {
    ("none", "load"): "ignored",
    ("none", "store"): "ignored",
    ("sync", "load"): "fault",
    ("sync", "store"): "fault",
    ("async", "load"): "recorded",
    ("async", "store"): "recorded",
    ("asymmetric", "load"): "fault",
    ("asymmetric", "store"): "recorded",
}
ALLOCATION_TAG = 0x5  # of the fixture's page 1
WRONG_TAG = 0xA


@pytest.mark.parametrize("upper_half", [False, True], ids=["ttbr0", "ttbr1"])
@pytest.mark.parametrize("el", [0, 1], ids=["el0", "el1"])
@pytest.mark.parametrize("mode_name, access_kind", list(OUTCOME))
def test_mismatch_outcome_per_mode_access_and_el(
    mem: GuestMemory, mode_name: str, access_kind: str, el: int, upper_half: bool
) -> None:
    """The exact outcome of a mismatched access: the TCF field of the access's EL decides;
    sync faults and leaves memory alone, async completes and sets exactly one sticky bit (TF0
    or TF1 by address bit 55) of exactly one register (TFSR_EL1 for EL1, TFSRE0_EL1 for EL0),
    asymmetric is sync on loads and async on stores, none completes and records nothing."""
    outcome = OUTCOME[(mode_name, access_kind)]
    is_write = access_kind == "store"
    vcpu = VcpuState()
    vcpu.set_tcf(el, MODES[mode_name])
    # the other EL's field asks for something else, so reading the wrong field shows
    vcpu.set_tcf(1 - el, TCF_NONE if outcome == "fault" else TCF_SYNC)
    address = PAGE_SIZE + 3 * GRANULE_SIZE
    mem.write(address, b"old!")
    pointer = make_pointer(address, WRONG_TAG) | (TTBR1 if upper_half else 0)

    def access() -> object:
        if is_write:
            return checked_store(mem, vcpu, pointer, b"new!", el=el)
        return checked_load(mem, vcpu, pointer, 4, el=el)

    if outcome == "fault":
        with pytest.raises(TagCheckFault) as info:
            access()
        fault = info.value
        assert (fault.pointer, fault.logical_tag, fault.allocation_tag) == (
            pointer,
            WRONG_TAG,
            ALLOCATION_TAG,
        )
        assert fault.is_write is is_write and access_kind in str(fault)
        assert mem.read(address, 4) == b"old!"  # a faulting store does not happen
        assert (vcpu.tfsr_el1, vcpu.tfsre0_el1) == (0, 0)
        return

    result = access()
    if is_write:
        assert result is True  # the mismatch is reported to the caller
        assert mem.read(address, 4) == b"new!"
    else:
        assert isinstance(result, AccessResult)
        assert result.data == b"old!" and result.tag_mismatch is True
    bit = TFSR_TF1 if upper_half else TFSR_TF0
    if outcome == "recorded":
        assert (vcpu.tfsr_el1, vcpu.tfsre0_el1) == ((bit, 0) if el == 1 else (0, bit))
    else:
        assert (vcpu.tfsr_el1, vcpu.tfsre0_el1) == (0, 0)


@pytest.mark.parametrize("el", [0, 1])
@pytest.mark.parametrize("mode_name", list(MODES))
def test_matching_access_does_nothing_but_the_access(mem: GuestMemory, mode_name: str, el: int) -> None:
    vcpu = VcpuState()
    vcpu.set_tcf(el, MODES[mode_name])
    pointer = make_pointer(PAGE_SIZE + 32, ALLOCATION_TAG) | TTBR1
    assert checked_store(mem, vcpu, pointer, b"abcd", el=el) is False
    loaded = checked_load(mem, vcpu, pointer, 4, el=el)
    assert loaded.data == b"abcd" and loaded.tag_mismatch is False
    assert (vcpu.tfsr_el1, vcpu.tfsre0_el1) == (0, 0)


@pytest.mark.parametrize("el", [0, 1])
def test_async_bits_are_sticky(mem: GuestMemory, el: int) -> None:
    vcpu = VcpuState()
    vcpu.set_tcf(el, TCF_ASYNC)
    checked_store(mem, vcpu, make_pointer(PAGE_SIZE, WRONG_TAG) | TTBR1, b"x", el=el)
    checked_load(mem, vcpu, make_pointer(PAGE_SIZE, WRONG_TAG), 1, el=el)
    checked_load(mem, vcpu, make_pointer(PAGE_SIZE, ALLOCATION_TAG), 1, el=el)  # a match clears nothing
    register = vcpu.tfsr_el1 if el == 1 else vcpu.tfsre0_el1
    assert register == TFSR_TF0 | TFSR_TF1


def test_fault_names_the_first_mismatched_granule(mem: GuestMemory) -> None:
    mem.set_tags(PAGE_SIZE + 2 * GRANULE_SIZE, GRANULE_SIZE, 0x3)
    mem.set_tags(PAGE_SIZE + 3 * GRANULE_SIZE, GRANULE_SIZE, 0x4)
    vcpu = vcpu_with(TCF_SYNC)
    pointer = make_pointer(PAGE_SIZE + GRANULE_SIZE, ALLOCATION_TAG)
    with pytest.raises(TagCheckFault) as info:
        checked_store(mem, vcpu, pointer, b"\xee" * (3 * GRANULE_SIZE))
    assert info.value.allocation_tag == 0x3
    assert "logical tag 0x5, allocation tag 0x3" in str(info.value)
    assert f"{pointer:#018x}" in str(info.value)
    assert mem.read(PAGE_SIZE + GRANULE_SIZE, 3 * GRANULE_SIZE) == bytes(3 * GRANULE_SIZE)


def test_pointer_layout() -> None:
    """Bits 59:56 carry the logical tag, bit 55 selects the upper half, the rest the address."""
    pointer = make_pointer(0x1234_5678 | TTBR1 | 0xAB << 56, 0x1C)
    assert pointer == 0x0C80_0000_1234_5678
    assert pointer_tag(pointer) == 0xC
    assert pointer_address(pointer) == 0x1234_5678
    assert pointer_address(0xFF80_0000_0000_1000) == 0x1000


def test_upper_half_pointer_reaches_the_same_guest_offset(mem: GuestMemory) -> None:
    vcpu = vcpu_with(TCF_SYNC)
    checked_store(mem, vcpu, make_pointer(PAGE_SIZE + 40, ALLOCATION_TAG) | TTBR1, b"hi")
    assert mem.read(PAGE_SIZE + 40, 2) == b"hi"
    assert checked_load(mem, vcpu, make_pointer(PAGE_SIZE + 40, ALLOCATION_TAG), 2).data == b"hi"


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
