"""A deterministic MTE workload whose whole state lives in guest RAM and vCPU registers.

Layout of guest RAM (page numbers):
  0                  control block: magic, parameters (seed, working set, knobs)
  1 .. 1+T           pointer table: one tagged pointer per heap slot (0 = free)
  heap               one 4 KiB slot per object; the last granule of a slot is a guard that
                     keeps tag 0, and tag 0 is excluded from IRG, so an overrun always faults
  arena              pages that tag-only steps retag (as a tagging allocator's pool would); the
                     first DEVICE_RING_PAGES of it are also a device's buffer ring, which the
                     device (common/guest/device.py) writes from the host side every
                     device_period steps
  the rest           idle memory, shaped by --fill

Registers: X19 step counter, X20 PRNG state, X21 tag-check faults taken, X22 a sum of the
device completions the driver consumed, X0 the last pointer made, X1 its tag. Because nothing lives outside the guest, two guests with equal RAM,
tags and registers that run the same number of further steps end equal: that is what makes
"migrated equals unmigrated" checkable.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import Enum

import numpy as np

from common.constants import (
    GRANULE_SIZE,
    MAX_DIRTY_PAGES_PER_STEP,
    PACKED_TAG_BYTES_PER_PAGE,
    PAGE_SIZE,
    TCF_ASYMMETRIC,
    TCF_ASYNC,
    TCF_NONE,
    TCF_SYNC,
)
from common.guest.device import DmaDevice
from common.guest.guest import Guest
from common.guest.memory import GuestMemory
from common.guest.mte import (
    TagCheckFault,
    checked_load,
    checked_store,
    irg,
    make_pointer,
    pointer_address,
)
from common.guest.vcpu import VcpuState
from common.units import exact_size

MAGIC = b"MTEWLOAD"
LAYOUT_VERSION = 2
_CONTROL = struct.Struct("<8sQQQQQdQQQQQQQ")

REG_LAST_POINTER = 0
REG_LAST_TAG = 1
REG_STEP = 19
REG_PRNG = 20
REG_FAULTS = 21
REG_DEVICE_SUM = 22

OBJECT_BYTES = PAGE_SIZE - GRANULE_SIZE  # the slot less its guard granule
STORE_BYTES = 64
# Every TCF mode is exercised, changing every TCF_PERIOD steps.
TCF_PERIOD = 64
TCF_ROTATION = (TCF_SYNC, TCF_ASYNC, TCF_ASYMMETRIC, TCF_NONE)
FREE_ONE_IN = 16  # of the steps that touch an allocated object
_TTBR1 = 1 << 55
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_MIXED_STRIPE_PAGES = 64
_RANDOM_CHUNK_PAGES = 16384  # 64 MiB
PC_LOOP = 0xFFFF_8000_0010_0000
DEVICE_RING_PAGES = 16
MAX_DEVICE_PERIOD = 1 << 20


class Fill(Enum):
    ZERO = "zero"
    RANDOM = "random"
    MIXED = "mixed"


@dataclass(frozen=True)
class WorkloadConfig:
    seed: int = 1
    working_set_bytes: int = 4 << 20
    dirty_pages_per_step: int = 16
    tag_only_share: float = 0.25
    steps_per_second: float = 0.0  # 0 = as fast as it can
    fill: Fill = Fill.MIXED
    device_period: int = 8  # steps between the device's writes; 0 = no device

    def check(self, ram_bytes: int) -> None:
        if not 0 <= self.device_period <= MAX_DEVICE_PERIOD:
            raise ValueError(f"--device-period {self.device_period} is outside 0 .. {MAX_DEVICE_PERIOD}")
        if not 0 <= self.seed < 1 << 63:
            raise ValueError(f"--seed {self.seed} is outside 0 .. 2^63-1")
        if not 0.0 <= self.tag_only_share <= 1.0:
            raise ValueError(f"--tag-only-share {self.tag_only_share} is outside 0 .. 1")
        if self.steps_per_second < 0:
            raise ValueError(f"--steps-per-second {self.steps_per_second} is negative")
        if not 1 <= self.dirty_pages_per_step <= MAX_DIRTY_PAGES_PER_STEP:
            raise ValueError(
                f"--dirty-pages-per-step {self.dirty_pages_per_step} is outside 1 .. {MAX_DIRTY_PAGES_PER_STEP}"
            )
        if self.working_set_bytes < 2 * PAGE_SIZE:
            raise ValueError(f"--working-set {exact_size(self.working_set_bytes)} is below two pages (8 KiB)")
        pages = _Layout.for_config(self, ram_bytes).end_page
        if pages > ram_bytes // PAGE_SIZE:
            raise ValueError(
                f"--working-set {exact_size(self.working_set_bytes)} does not fit in --ram "
                f"{exact_size(ram_bytes)} with its control block and pointer table"
            )


@dataclass(frozen=True)
class _Layout:
    table_page: int
    heap_page: int
    heap_slots: int
    arena_page: int
    arena_pages: int

    @classmethod
    def for_config(cls, config: WorkloadConfig, ram_bytes: int) -> _Layout:
        working = config.working_set_bytes // PAGE_SIZE
        heap_slots = max(1, working // 2)
        arena_pages = max(1, working - heap_slots)
        table_pages = (heap_slots * 8 + PAGE_SIZE - 1) // PAGE_SIZE
        heap_page = 1 + table_pages
        return cls(1, heap_page, heap_slots, heap_page + heap_slots, arena_pages)

    @property
    def end_page(self) -> int:
        return self.arena_page + self.arena_pages


def boot(ram_bytes: int, config: WorkloadConfig) -> Guest:
    """A fresh guest with the workload's control block, initial content and registers."""
    config.check(ram_bytes)
    guest = Guest.create(ram_bytes)
    layout = _Layout.for_config(config, ram_bytes)
    _fill(guest.memory, config, first_page=layout.heap_page)
    guest.memory.write(
        0,
        _CONTROL.pack(
            MAGIC,
            LAYOUT_VERSION,
            config.seed,
            config.working_set_bytes,
            config.dirty_pages_per_step,
            int(config.tag_only_share * (1 << 32)),
            config.steps_per_second,
            layout.table_page,
            layout.heap_page,
            layout.heap_slots,
            layout.arena_page,
            layout.arena_pages,
            list(Fill).index(config.fill),
            config.device_period,
        ),
    )
    vcpu = guest.vcpus[0]
    vcpu.x[REG_PRNG] = _splitmix(config.seed) or 1
    vcpu.gcr_el1 = 0x0001  # exclude tag 0: it marks free memory and guards
    vcpu.rgsr_el1 = ((_splitmix(config.seed ^ 0x5EED) & 0xFFFF) or 1) << 8
    vcpu.sp = 0xFFFF_8000_0080_0000
    vcpu.pc = PC_LOOP
    # The guest starts fresh: nothing is dirty until it runs.
    guest.memory.dirty_sync()
    return guest


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _fill(mem: GuestMemory, config: WorkloadConfig, first_page: int) -> None:
    rng = np.random.Generator(np.random.PCG64(config.seed))
    pages = mem.page_count
    if config.fill is Fill.ZERO or first_page >= pages:
        return
    if config.fill is Fill.RANDOM:
        _fill_random(mem, rng, first_page, pages)
        return
    text = np.frombuffer(
        (b"memory tagging extension; granule tags travel with pages. " * 80)[:PAGE_SIZE], dtype=np.uint8
    )
    for start in range(first_page, pages, _MIXED_STRIPE_PAGES):
        end = min(start + _MIXED_STRIPE_PAGES, pages)
        kind = (start // _MIXED_STRIPE_PAGES) % 4
        if kind == 1:
            _fill_random(mem, rng, start, end)
        elif kind == 2:
            mem.pages[start:end] = text
            mem.pages[start:end, :8] = np.arange(start, end, dtype="<u8").view(np.uint8).reshape(-1, 8)
            mem.data_populated[start:end] = True
            mem.set_tags(start * PAGE_SIZE, (end - start) * PAGE_SIZE, int(rng.integers(1, 16)))


def _fill_random(mem: GuestMemory, rng: np.random.Generator, start: int, end: int) -> None:
    """Pseudo-random, incompressible data and random tags on every granule.

    One 64 MiB random base, varied per chunk by a random per-page-offset key, fills a large
    guest ten times faster than drawing every byte; lz4's 64 KiB window cannot see the repeat.
    """
    chunk = _RANDOM_CHUNK_PAGES
    bits = rng.bit_generator
    base = bits.random_raw(min(chunk, end - start) * PAGE_SIZE // 8).view(np.uint8).reshape(-1, PAGE_SIZE)
    for a in range(start, end, chunk):
        b = min(a + chunk, end)
        key = bits.random_raw(PAGE_SIZE // 8).view(np.uint8)
        np.bitwise_xor(base[: b - a], key, out=mem.pages[a:b])
        tags = bits.random_raw((b - a) * PACKED_TAG_BYTES_PER_PAGE // 8).view(np.uint8)
        mem.page_tags[a:b] = tags.reshape(b - a, PACKED_TAG_BYTES_PER_PAGE)
    mem.data_populated[start:end] = True
    mem.tags_populated[start:end] = True


class NotAWorkloadGuest(ValueError):
    pass


class Workload:
    """Drives a booted guest one step at a time. Holds no state of its own beyond a parsed
    copy of the (immutable) control block."""

    def __init__(self, guest: Guest, *, device_marks_dirty: bool = True) -> None:
        """`device_marks_dirty`: the device marks its writes in the VMM's dirty bitmap, as
        QEMU's memory API does (False only in a test build: see common/guest/device.py)."""
        self.guest = guest
        self.mem = guest.memory
        self.vcpu: VcpuState = guest.vcpus[0]
        fields = _CONTROL.unpack(self.mem.read(0, _CONTROL.size))
        if fields[0] != MAGIC or fields[1] != LAYOUT_VERSION:
            raise NotAWorkloadGuest(f"guest RAM holds no workload control block of layout {LAYOUT_VERSION}")
        (
            _,
            _,
            self.seed,
            self.working_set_bytes,
            self.dirty_pages_per_step,
            self._tag_only_q32,
            self.steps_per_second,
            self._table_page,
            self._heap_page,
            self._heap_slots,
            self._arena_page,
            self._arena_pages,
            _fill_index,
            self.device_period,
        ) = fields
        problem = self._check_control_block()
        if problem is not None:
            # guest RAM is the guest's to write: a block no workload of ours wrote runs idle
            raise NotAWorkloadGuest(f"workload control block is unusable: {problem}")
        self.device = DmaDevice(
            self.mem,
            self._arena_page,
            min(DEVICE_RING_PAGES, self._arena_pages),
            self.device_period,
            self.seed,
            marks_dirty=device_marks_dirty,
        )

    def _check_control_block(self) -> str | None:
        pages = self.mem.page_count
        table_pages = -(-self._heap_slots * 8 // PAGE_SIZE)
        if not 1 <= self.dirty_pages_per_step <= MAX_DIRTY_PAGES_PER_STEP:
            return f"{self.dirty_pages_per_step} pages a step (at most {MAX_DIRTY_PAGES_PER_STEP})"
        if self.device_period > MAX_DEVICE_PERIOD:
            return f"a device period of {self.device_period} steps"
        if self._tag_only_q32 > 1 << 32:
            return "a tag-only share above 1"
        if not (math.isfinite(self.steps_per_second) and self.steps_per_second >= 0):
            return f"a pace of {self.steps_per_second} steps a second"
        regions = (
            ("pointer table", self._table_page, table_pages),
            ("heap", self._heap_page, self._heap_slots),
            ("arena", self._arena_page, self._arena_pages),
        )
        for name, first, count in regions:
            if first < 1 or count < 1 or first + count > pages:
                return f"its {name} (pages {first} .. {first + count - 1}) lies outside guest RAM of {pages} pages"
        return None

    @property
    def step_count(self) -> int:
        return self.vcpu.x[REG_STEP]

    @property
    def faults(self) -> int:
        return self.vcpu.x[REG_FAULTS]

    def _rand(self) -> int:
        x = self.vcpu.x[REG_PRNG]
        x ^= x >> 12
        x ^= (x << 25) & _U64
        x ^= x >> 27
        self.vcpu.x[REG_PRNG] = x
        return (x * 0x2545F4914F6CDD1D) & _U64

    def _fault(self) -> None:
        self.vcpu.x[REG_FAULTS] += 1

    def _take_async_faults(self) -> None:
        # Async faults are seen late, at the next entry, as the kernel sees TFSR on a switch;
        # so a sticky bit set just before a migration must travel in the vCPU state.
        vcpu = self.vcpu
        for name in ("tfsr_el1", "tfsre0_el1"):
            if getattr(vcpu, name):
                self._fault()
                setattr(vcpu, name, 0)

    def _load(self, pointer: int, length: int, el: int) -> None:
        try:
            checked_load(self.mem, self.vcpu, pointer, length, el)
        except TagCheckFault:
            self._fault()

    def _store(self, pointer: int, data: bytes, el: int) -> None:
        try:
            checked_store(self.mem, self.vcpu, pointer, data, el)
        except TagCheckFault:
            self._fault()

    def step(self) -> None:
        with self.mem.lock:
            vcpu = self.vcpu
            self._take_async_faults()
            n = vcpu.x[REG_STEP]
            mode = TCF_ROTATION[(n // TCF_PERIOD) % len(TCF_ROTATION)]
            vcpu.set_tcf(1, mode)
            vcpu.set_tcf(0, mode)
            el = 1 if n & 1 else 0
            if (self._rand() >> 32) < self._tag_only_q32:
                for _ in range(self.dirty_pages_per_step):
                    self._retag_arena_page(el)
            else:
                for _ in range(self.dirty_pages_per_step):
                    self._heap_access(el)
            self._driver(n)
            self.device.after_step(n)
            vcpu.x[REG_STEP] = n + 1

    def _driver(self, n: int) -> None:
        """The guest's driver consumes the device's last completion before the next request:
        what the device wrote flows into a register, so a page the device wrote and the
        migration missed shows in the guest's state from then on, as a lost block read would."""
        device = self.device
        if not device.period or n % device.period or n < device.period:
            return
        page = device.page_of(n // device.period - 1)
        word = self.mem.read_u64(page * PAGE_SIZE)
        self.vcpu.x[REG_DEVICE_SUM] = (self.vcpu.x[REG_DEVICE_SUM] * 31 + word) & _U64

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()

    def _retag_arena_page(self, el: int) -> None:
        r = self._rand()
        addr = (self._arena_page + r % self._arena_pages) * PAGE_SIZE
        half = PAGE_SIZE // 2
        self.mem.set_tags(addr, half, irg(self.vcpu))
        self.mem.set_tags(addr + half, half, irg(self.vcpu))
        # LDG gives the pointer its tag, as an allocator re-deriving a pointer would.
        probe = addr + ((r >> 40) % (PAGE_SIZE // GRANULE_SIZE)) * GRANULE_SIZE
        self._load(make_pointer(probe, self.mem.get_tag(probe)), GRANULE_SIZE, el)

    def _heap_access(self, el: int) -> None:
        r = self._rand()
        slot = r % self._heap_slots
        entry = self._table_page * PAGE_SIZE + slot * 8
        pointer = self.mem.read_u64(entry)
        base = (self._heap_page + slot) * PAGE_SIZE
        payload = (r ^ self.vcpu.x[REG_STEP]).to_bytes(8, "little") * (STORE_BYTES // 8)
        offset = ((r >> 24) % (OBJECT_BYTES // STORE_BYTES)) * STORE_BYTES
        if pointer == 0:
            tag = irg(self.vcpu)
            self.mem.set_tags(base, OBJECT_BYTES, tag)
            pointer = make_pointer(base | (_TTBR1 if el else 0), tag)
            self.mem.write_u64(entry, pointer)
            self.vcpu.x[REG_LAST_POINTER] = pointer
            self.vcpu.x[REG_LAST_TAG] = tag
            self._store(pointer + offset, payload, el)
            return
        action = (r >> 48) % FREE_ONE_IN
        if action == 0:
            # free: retag to the excluded tag, then a use after free that must fault
            self.mem.set_tags(pointer_address(pointer), OBJECT_BYTES, 0)
            self.mem.write_u64(entry, 0)
            self._load(pointer + offset, GRANULE_SIZE, el)
        elif action == 1:
            self._load(pointer + OBJECT_BYTES, GRANULE_SIZE, el)  # into the guard granule
        else:
            self._store(pointer + offset, payload, el)
