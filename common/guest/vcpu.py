"""vCPU register state: what the workload needs plus the MTE system registers that the
original KVM series saves and restores."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields

import xxhash

from common.constants import SCTLR_TCF0_SHIFT, SCTLR_TCF_SHIFT

GENERAL_REGISTERS = 31
_U64 = 0xFFFF_FFFF_FFFF_FFFF


@dataclass
class VcpuState:
    index: int = 0
    x: list[int] = field(default_factory=lambda: [0] * GENERAL_REGISTERS)
    sp: int = 0
    pc: int = 0
    pstate: int = 0
    sctlr_el1: int = 0
    gcr_el1: int = 0
    rgsr_el1: int = 0
    tfsr_el1: int = 0
    tfsre0_el1: int = 0

    def tcf(self, el: int) -> int:
        """SCTLR_EL1.TCF for EL1 accesses, SCTLR_EL1.TCF0 for EL0 ones."""
        shift = SCTLR_TCF_SHIFT if el == 1 else SCTLR_TCF0_SHIFT
        return (self.sctlr_el1 >> shift) & 0b11

    def set_tcf(self, el: int, mode: int) -> None:
        shift = SCTLR_TCF_SHIFT if el == 1 else SCTLR_TCF0_SHIFT
        self.sctlr_el1 = (self.sctlr_el1 & ~(0b11 << shift)) | ((mode & 0b11) << shift)

    def scalars(self) -> list[int]:
        return [getattr(self, name) for name in SCALARS]

    def to_bytes(self) -> bytes:
        values = [self.index, *self.x, *self.scalars()]
        return struct.pack(f"<{len(values)}Q", *(v & _U64 for v in values))

    def digest(self) -> bytes:
        return xxhash.xxh3_128_digest(self.to_bytes())


# The registers beside X0..X30, in the order the digest packs them; the proto uses the same names.
SCALARS = tuple(f.name for f in fields(VcpuState) if f.name not in ("index", "x"))


def vcpus_digest(vcpus: list[VcpuState]) -> bytes:
    return xxhash.xxh3_128_digest(b"".join(v.to_bytes() for v in vcpus))
