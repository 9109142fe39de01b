"""Tag-checked loads and stores and IRG, as the architecture defines them for one vCPU."""

from __future__ import annotations

from dataclasses import dataclass

from common.constants import (
    ADDRESS_MASK,
    GCR_EXCLUDE_MASK,
    POINTER_TAG_SHIFT,
    RGSR_SEED_MASK,
    RGSR_SEED_SHIFT,
    TAG_MASK,
    TCF_ASYMMETRIC,
    TCF_ASYNC,
    TCF_NONE,
    TCF_SYNC,
    TFSR_TF0,
    TFSR_TF1,
)
from common.guest.memory import GuestMemory
from common.guest.vcpu import VcpuState

_TTBR1_BIT = 1 << 55
# Our guest addresses are offsets into guest RAM; bits 63:56 hold the tag, bit 55 the half.
_OFFSET_MASK = ADDRESS_MASK & ~_TTBR1_BIT
# RGSR_EL1.TAG, bits 3:0: the tag the last IRG produced, where the next one starts.
_RGSR_TAG = TAG_MASK


class TagCheckFault(Exception):
    """A synchronous tag-check fault: the access did not happen."""

    def __init__(self, pointer: int, allocation_tag: int, is_write: bool) -> None:
        self.pointer = pointer
        self.logical_tag = pointer_tag(pointer)
        self.allocation_tag = allocation_tag
        self.is_write = is_write
        kind = "store" if is_write else "load"
        super().__init__(
            f"tag check fault on {kind} at {pointer:#018x}: logical tag {self.logical_tag:#x}, "
            f"allocation tag {allocation_tag:#x}"
        )


@dataclass(frozen=True)
class AccessResult:
    data: bytes
    tag_mismatch: bool  # True when an async (or ignored) mismatch happened


def make_pointer(address: int, tag: int) -> int:
    return ((tag & TAG_MASK) << POINTER_TAG_SHIFT) | (address & ADDRESS_MASK)


def pointer_tag(pointer: int) -> int:
    return (pointer >> POINTER_TAG_SHIFT) & TAG_MASK


def pointer_address(pointer: int) -> int:
    return pointer & _OFFSET_MASK


def _check(mem: GuestMemory, vcpu: VcpuState, pointer: int, length: int, is_write: bool, el: int) -> bool:
    """Compare the logical tag with every touched granule; fault or record per TCF."""
    address = pointer_address(pointer)
    logical = pointer_tag(pointer)
    tags = mem.granule_tags(address, length)
    mismatched = tags != logical
    if not mismatched.any():
        return False
    mode = vcpu.tcf(el)
    if mode == TCF_NONE:
        return True
    if mode == TCF_SYNC or (mode == TCF_ASYMMETRIC and not is_write):
        raise TagCheckFault(pointer, int(tags[mismatched.argmax()]), is_write)
    if mode in (TCF_ASYNC, TCF_ASYMMETRIC):
        bit = TFSR_TF1 if pointer & _TTBR1_BIT else TFSR_TF0
        if el == 1:
            vcpu.tfsr_el1 |= bit
        else:
            vcpu.tfsre0_el1 |= bit
    return True


def checked_load(mem: GuestMemory, vcpu: VcpuState, pointer: int, length: int, el: int = 1) -> AccessResult:
    mismatch = _check(mem, vcpu, pointer, length, is_write=False, el=el)
    return AccessResult(mem.read(pointer_address(pointer), length), mismatch)


def checked_store(mem: GuestMemory, vcpu: VcpuState, pointer: int, data: bytes, el: int = 1) -> bool:
    mismatch = _check(mem, vcpu, pointer, len(data), is_write=True, el=el)
    mem.write(pointer_address(pointer), data)
    return mismatch


def _next_random_tag_bit(vcpu: VcpuState) -> int:
    # The architecture's 16-bit LFSR over RGSR_EL1.SEED (taps 5, 3, 2, 0).
    seed = (vcpu.rgsr_el1 >> RGSR_SEED_SHIFT) & RGSR_SEED_MASK
    top = ((seed >> 5) ^ (seed >> 3) ^ (seed >> 2) ^ seed) & 1
    seed = (top << 15) | (seed >> 1)
    vcpu.rgsr_el1 = (vcpu.rgsr_el1 & ~(RGSR_SEED_MASK << RGSR_SEED_SHIFT)) | (seed << RGSR_SEED_SHIFT)
    return top


def choose_non_excluded_tag(tag: int, offset: int, exclude: int) -> int:
    """The architecture's ChooseNonExcludedTag: step forward past excluded tags."""
    exclude &= GCR_EXCLUDE_MASK
    if exclude == GCR_EXCLUDE_MASK:
        return 0
    if offset == 0:
        while exclude >> tag & 1:
            tag = (tag + 1) & TAG_MASK
    while offset:
        offset -= 1
        tag = (tag + 1) & TAG_MASK
        while exclude >> tag & 1:
            tag = (tag + 1) & TAG_MASK
    return tag


def _random_tag(vcpu: VcpuState) -> int:
    """The architecture's RandomTag: four LFSR bits, the first one drawn in bit 0."""
    tag = 0
    for i in range(4):
        tag |= _next_random_tag_bit(vcpu) << i
    return tag


def irg(vcpu: VcpuState, extra_exclude: int = 0) -> int:
    """IRG: step from RGSR_EL1.TAG by RandomTag() past the tags excluded by GCR_EL1 (or by the
    register operand, as IRG Xd, Xn, Xm allows); the result becomes RGSR_EL1.TAG. The LFSR
    advances even when every tag is excluded, as the architecture's pseudocode has it."""
    offset = _random_tag(vcpu)
    tag = choose_non_excluded_tag(vcpu.rgsr_el1 & _RGSR_TAG, offset, vcpu.gcr_el1 | extra_exclude)
    vcpu.rgsr_el1 = (vcpu.rgsr_el1 & ~_RGSR_TAG) | tag
    return tag
