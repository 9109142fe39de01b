"""IRG against the Arm architecture's own pseudocode.

The reference below is transcribed from the AArch64 pseudocode (IRG, AArch64.RandomTag,
AArch64.NextRandomTagBit, AArch64.ChooseNonExcludedTag), bit lists and all, deliberately not in
the shift-and-mask style of common/guest/mte.py, so that the two are not copies of each other.
The hard-coded sequences were worked out by hand from the same pseudocode.

Register layout (the architecture's, as common/constants.py has it): RGSR_EL1.TAG is bits 3:0,
RGSR_EL1.SEED bits 23:8; GCR_EL1.Exclude is bits 15:0 (bit 16, RRND, is not an exclusion).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from common.guest.mte import choose_non_excluded_tag, irg
from common.guest.vcpu import VcpuState


# -- the reference, from the pseudocode -----------------------------------------------------
def bits(value: int, width: int) -> list[int]:
    """value<width-1:0> as a list, element i being bit i."""
    return [(value >> i) & 1 for i in range(width)]


def from_bits(b: list[int]) -> int:
    return sum(bit << i for i, bit in enumerate(b))


def next_random_tag_bit(seed: int) -> tuple[int, int]:
    """bit NextRandomTagBit(): lfsr = RGSR_EL1.SEED; top = lfsr<5> EOR lfsr<3> EOR lfsr<2> EOR
    lfsr<0>; RGSR_EL1.SEED = top:lfsr<15:1>; return top. Returns (top, new SEED)."""
    lfsr = bits(seed, 16)
    top = lfsr[5] ^ lfsr[3] ^ lfsr[2] ^ lfsr[0]
    new_seed = [*lfsr[1:16], top]  # bits 14..0 are lfsr<15:1>, bit 15 is top
    return top, from_bits(new_seed)


def random_tag(seed: int) -> tuple[int, int]:
    """bits(4) RandomTag(): for i = 0 to 3: tag<i> = NextRandomTagBit(). Returns (tag, SEED)."""
    tag = [0, 0, 0, 0]
    for i in range(4):
        tag[i], seed = next_random_tag_bit(seed)
    return from_bits(tag), seed


def choose_non_excluded(tag: int, offset: int, exclude: int) -> int:
    """AArch64.ChooseNonExcludedTag(tag, offset, exclude), 4-bit arithmetic wrapping."""
    excluded = bits(exclude, 16)
    if all(excluded):
        return 0
    if offset == 0:
        while excluded[tag]:
            tag = (tag + 1) % 16
    while offset != 0:
        offset = offset - 1
        tag = (tag + 1) % 16
        while excluded[tag]:
            tag = (tag + 1) % 16
    return tag


def reference_irg(rgsr: int, gcr: int, xm: int = 0) -> tuple[int, int]:
    """IRG Xd, Xn, Xm with GCR_EL1.RRND treated as 0. Returns (tag, new RGSR_EL1)."""
    exclude = from_bits(bits(xm, 16)) | from_bits(bits(gcr, 16))
    start = from_bits(bits(rgsr, 4))  # RGSR_EL1.TAG
    offset, seed = random_tag(from_bits(bits(rgsr >> 8, 16)))  # RGSR_EL1.SEED
    rtag = choose_non_excluded(start, offset, exclude)
    untouched = rgsr & ~(0xFFFF << 8) & ~0xF
    return rtag, untouched | (seed << 8) | rtag


def run_irg(rgsr: int, gcr: int, count: int, xm: int = 0) -> list[tuple[int, int]]:
    vcpu = VcpuState(gcr_el1=gcr, rgsr_el1=rgsr)
    out = []
    for _ in range(count):
        tag = irg(vcpu, xm)
        out.append((tag, vcpu.rgsr_el1))
    return out


# -- hand-worked sequences (no reference code involved) -------------------------------------
# SEED 0x0001: the LFSR yields RandomTag offsets 1, 0, 8, 6, 1 and SEEDs 0x1000, 0x0100,
# 0x8010, 0x6801, 0x1680 (0x0001: top = 0^0^0^1 = 1, SEED = 0x8000, then three 0s: offset 1;
# ...; 0x0100 gives three 0s, then bit 5 is reached: top 1, offset 8, SEED 0x8010).
HAND_SEED_1_NO_EXCLUDE = [  # RGSR.TAG starts at 0, each result starts the next: 1, 1, 9, 15, 0
    (0x1, 0x100001),
    (0x1, 0x010001),
    (0x9, 0x801009),
    (0xF, 0x68010F),
    (0x0, 0x168000),
]
# GCR_EL1.Exclude = 0x00FF: 0+1 skips 1..7 to 8; 8+0 stays; 8+8 wraps past 0..7 back to 8;
# 8+6 = 14; 14+1 = 15.
HAND_SEED_1_EXCLUDE_0_TO_7 = [
    (0x8, 0x100008),
    (0x8, 0x010008),
    (0x8, 0x801008),
    (0xE, 0x68010E),
    (0xF, 0x16800F),
]
# SEED 0xACE1: offsets 2 then 2 (SEEDs 0x2ACE, 0x22AC); tag 0 excluded: 0 -> 2 -> 4.
HAND_SEED_ACE1_EXCLUDE_0 = [(0x2, 0x2ACE02), (0x4, 0x22AC04)]


def test_irg_matches_hand_worked_sequences() -> None:
    assert run_irg(0x0001 << 8, gcr=0, count=5) == HAND_SEED_1_NO_EXCLUDE
    assert run_irg(0x0001 << 8, gcr=0x00FF, count=5) == HAND_SEED_1_EXCLUDE_0_TO_7
    assert run_irg(0xACE1 << 8, gcr=0x0001, count=2) == HAND_SEED_ACE1_EXCLUDE_0


def test_reference_agrees_with_the_hand_worked_sequences() -> None:
    """The transcription above is checked too, so a slip in it cannot hide a slip in the code."""
    for rgsr, gcr, expected in [
        (0x0001 << 8, 0, HAND_SEED_1_NO_EXCLUDE),
        (0x0001 << 8, 0x00FF, HAND_SEED_1_EXCLUDE_0_TO_7),
        (0xACE1 << 8, 0x0001, HAND_SEED_ACE1_EXCLUDE_0),
    ]:
        got = []
        for _ in expected:
            tag, rgsr = reference_irg(rgsr, gcr)
            got.append((tag, rgsr))
        assert got == expected


def test_first_random_bit_comes_from_taps_5_3_2_0() -> None:
    """With a single SEED bit set and nothing excluded, IRG's first result bit is that bit's
    tap: 1 exactly for SEED bits 0, 2, 3 and 5."""
    for k in range(16):
        ((tag, _),) = run_irg((1 << k) << 8, gcr=0, count=1)
        assert tag & 1 == (k in (0, 2, 3, 5)), k


def test_seed_shifts_right_and_feeds_the_top_bit() -> None:
    # SEED 0x0002: step 1 gives top 0 (bit 1 is no tap), SEED 0x0001; step 2 gives top 1 (bit 0
    # is a tap), SEED 0x8000; steps 3 and 4 give 0 and shift that bit to bit 13: SEED 0x2000.
    ((tag, rgsr),) = run_irg(0x0002 << 8, gcr=0, count=1)
    assert (rgsr >> 8) & 0xFFFF == 0x2000 and tag == 0b0010


def test_lfsr_is_maximal_length() -> None:
    """x^16 + x^14 + x^13 + x^11 + 1 (taps 5, 3, 2, 0 of a right shift) has period 65535: the
    SEED comes back after 65535 IRGs (4 steps each, coprime to 65535) and not before."""
    start = 0xACE1
    vcpu = VcpuState(rgsr_el1=start << 8)
    seen_start_at = None
    for n in range(1, 65536):
        irg(vcpu)
        if (vcpu.rgsr_el1 >> 8) & 0xFFFF == start:
            seen_start_at = n
            break
    assert seen_start_at == 65535


@settings(max_examples=300)
@given(
    seed=st.integers(0, 0xFFFF),
    start_tag=st.integers(0, 0xF),
    res0=st.sampled_from([0, 0xF0, 0xFFFF_FFFF_FF00_0000]),
    gcr=st.integers(0, 0x1FFFF),
    xm=st.integers(0, 0xFFFF_FFFF),
)
def test_irg_matches_the_reference(seed: int, start_tag: int, res0: int, gcr: int, xm: int) -> None:
    rgsr = res0 | seed << 8 | start_tag
    expected = []
    state = rgsr
    for _ in range(12):
        tag, state = reference_irg(state, gcr, xm)
        expected.append((tag, state))
    assert run_irg(rgsr, gcr, 12, xm) == expected


def test_all_excluded_gives_tag_0_and_still_advances_the_seed() -> None:
    for gcr, xm in [(0xFFFF, 0), (0x0F0F, 0xF0F0), (0, 0xFFFF)]:
        got = run_irg(0x0001 << 8 | 0x5, gcr=gcr, count=2, xm=xm)
        assert got == [(0, 0x100000), (0, 0x010000)]  # SEEDs as in HAND_SEED_1_NO_EXCLUDE


def test_rrnd_bit_of_gcr_is_not_an_exclusion() -> None:
    assert run_irg(0x0001 << 8, gcr=1 << 16, count=5) == HAND_SEED_1_NO_EXCLUDE


@settings(max_examples=500)
@given(tag=st.integers(0, 15), offset=st.integers(0, 15), exclude=st.integers(0, 0x1FFFF))
def test_choose_non_excluded_tag_matches_the_reference(tag: int, offset: int, exclude: int) -> None:
    assert choose_non_excluded_tag(tag, offset, exclude) == choose_non_excluded(tag, offset, exclude)


def test_choose_non_excluded_tag_examples() -> None:
    # offset 0 settles on the start tag or the first allowed one after it
    assert choose_non_excluded_tag(3, 0, 0) == 3
    assert choose_non_excluded_tag(3, 0, 0b1000) == 4
    # each step of the offset lands on an allowed tag, wrapping from 15 to 0
    assert choose_non_excluded_tag(14, 3, 0) == 1
    assert choose_non_excluded_tag(14, 1, 0x8001) == 1  # 15 and 0 excluded
    assert choose_non_excluded_tag(0, 2, 0b0110) == 4
    # only Exclude<15:0> counts: bit 16 set on top of an all-ones mask still means all excluded
    assert choose_non_excluded_tag(5, 2, 0x1FFFF) == 0
    assert choose_non_excluded_tag(5, 0, 0x10000) == 5
