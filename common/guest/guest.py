"""A guest: memory plus vCPUs, and the digests that prove two guests equal."""

from __future__ import annotations

from dataclasses import dataclass, field

import xxhash

from common.guest.digest import MemoryDigests, memory_digests
from common.guest.memory import Backing, GuestMemory
from common.guest.vcpu import VcpuState, vcpus_digest


@dataclass(frozen=True)
class GuestDigests:
    memory: MemoryDigests
    vcpu: bytes

    @property
    def ram(self) -> bytes:
        return self.memory.ram

    @property
    def tags(self) -> bytes:
        return self.memory.tags


@dataclass
class Guest:
    memory: GuestMemory
    vcpus: list[VcpuState] = field(default_factory=lambda: [VcpuState()])
    # A guest imported from QEMU (common/qemu/guest_io.py): its state outside RAM and tags,
    # serialized, carried whole and never interpreted here; such a guest does not execute here.
    foreign: bytes = b""

    def state_digest(self) -> bytes:
        """What the verification compares beside RAM and tags: the vCPUs, and a foreign state."""
        if not self.foreign:
            return vcpus_digest(self.vcpus)
        return xxhash.xxh3_128_digest(vcpus_digest(self.vcpus) + b"foreign" + self.foreign)

    @classmethod
    def create(cls, ram_bytes: int, vcpu_count: int = 1, backing: Backing | None = None) -> Guest:
        return cls(GuestMemory(ram_bytes, backing), [VcpuState(index=i) for i in range(vcpu_count)])

    def digests(self) -> GuestDigests:
        with self.memory.lock:
            return GuestDigests(memory_digests(self.memory), self.state_digest())
