"""Postcopy on the destination: which pages the guest may see, and steps that restart on a miss.

A page is *present* when its data and its tags are both the source's switchover version (or
it was never written there). Every guest access goes through `PresenceGate.check`; an access
to a page that is not present raises `PageMissing` before it reads or writes anything.

Why a restartable step rather than a paused one: a workload step makes many accesses with
state changes between them, and the vCPU runs in slices on the daemon's own loop, so the loop
cannot wait inside a step. Like a CPU that restarts a faulting instruction, the step is undone
(its writes and registers restored from a journal) and run again from its start once the page
is placed. The workload is deterministic in RAM and registers, so the rerun makes the same
accesses up to the missing page and then goes on: the migrated run still equals the unmigrated
one, step for step, with no extra dependency (a greenlet would need a C extension).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from common.constants import PAGE_SIZE
from common.guest.guest import Guest
from common.guest.memory import GuestMemory
from common.guest.vcpu import VcpuState
from common.guest.workload import REG_STEP, NotAWorkloadGuest


class PageMissing(Exception):
    """The guest touched a page that is not present yet."""

    def __init__(self, page: int) -> None:
        super().__init__(f"page {page} is not present")
        self.page = page


@dataclass
class _Saved:
    data: npt.NDArray[np.uint8]
    tags: npt.NDArray[np.uint8]
    flags: tuple[bool, bool, bool, bool, bool]  # data/tag/device dirty, data/tags populated


@dataclass
class PresenceGate:
    """Guards a guest's memory while pages are still missing; `present` is shared with the
    migration, which sets a page's bit in the same step that places its data and tags."""

    mem: GuestMemory
    present: npt.NDArray[np.bool_]
    # test builds only: called for every access with the pages it touches, to count accesses
    # that saw a page not equal to the source's switchover version
    observer: Callable[[int, int, bool], None] | None = None
    _journal: dict[int, _Saved] = field(default_factory=dict)
    _vcpus: list[VcpuState] | None = None

    def check(self, addr: int, length: int, writing: bool) -> None:
        first = addr // PAGE_SIZE
        last = (addr + max(length, 1) - 1) // PAGE_SIZE
        present = self.present
        for page in range(first, last + 1):
            if not present[page]:
                raise PageMissing(page)
        if self.observer is not None:
            self.observer(first, last, writing)
        if writing and self._vcpus is not None:
            for page in range(first, last + 1):
                if page not in self._journal:
                    self._save(page)

    def _save(self, page: int) -> None:
        mem = self.mem
        self._journal[page] = _Saved(
            mem.pages[page].copy(),
            mem.page_tags[page].copy(),
            (
                bool(mem.data_dirty[page]),
                bool(mem.tag_dirty[page]),
                bool(mem.device_dirty[page]),
                bool(mem.data_populated[page]),
                bool(mem.tags_populated[page]),
            ),
        )

    # -- one restartable step -------------------------------------------------------------
    def begin(self, guest: Guest) -> None:
        self._journal.clear()
        self._vcpus = [replace(v, x=list(v.x)) for v in guest.vcpus]

    def commit(self) -> None:
        self._journal.clear()
        self._vcpus = None

    def undo(self, guest: Guest) -> None:
        """Put memory and registers back as they were when the step began."""
        mem = self.mem
        for page, saved in self._journal.items():
            mem.pages[page] = saved.data
            mem.page_tags[page] = saved.tags
            (
                mem.data_dirty[page],
                mem.tag_dirty[page],
                mem.device_dirty[page],
                mem.data_populated[page],
                mem.tags_populated[page],
            ) = saved.flags
        assert self._vcpus is not None
        # in place: the workload holds the live register objects
        for live, saved in zip(guest.vcpus, self._vcpus, strict=True):
            for f in fields(VcpuState):
                setattr(live, f.name, getattr(saved, f.name))
        self.commit()

    @property
    def missing(self) -> int:
        return int(self.present.size - np.count_nonzero(self.present))


class RestartableVcpu:
    """What the runner drives on a postcopy destination: the workload's step, run under the
    gate. A miss undoes the step, notes the page for the migration to request, and blocks the
    vCPU (only the vCPU: the daemon's loop goes on receiving and placing) until it is present."""

    def __init__(
        self,
        guest: Guest,
        gate: PresenceGate,
        make_workload: Callable[[Guest], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` stamps each miss (the start of the guest's wait): the protocol tests give
        their fake one."""
        self.guest = guest
        self.clock = clock
        self.gate = gate
        self._make = make_workload
        self.workload: Any = None
        self.blocked_on: int | None = None
        self.idle_reason: str | None = None  # the guest holds no workload: it runs idle
        self.misses: dict[int, float] = {}  # pages missed since the migration last took them, and when

    @property
    def steps_per_second(self) -> float:
        return float(self.workload.steps_per_second) if self.workload is not None else 0.0

    @property
    def step_count(self) -> int:
        return int(self.guest.vcpus[0].x[REG_STEP])

    @property
    def blocked(self) -> bool:
        if self.idle_reason is not None:
            return True
        return self.blocked_on is not None and not self.gate.present[self.blocked_on]

    def take_misses(self) -> dict[int, float]:
        out, self.misses = self.misses, {}
        return out

    def step(self) -> None:
        if self.blocked:
            return
        self.blocked_on = None
        # once every page arrived the gate is gone: no more journaling, and no miss can happen
        journaled = self.guest.memory.gate is not None
        if journaled:
            self.gate.begin(self.guest)
        try:
            self._ensure_workload()
            if self.workload is not None:
                self.workload.step()
        except PageMissing as miss:
            self.gate.undo(self.guest)
            self.blocked_on = miss.page
            self.misses.setdefault(miss.page, self.clock())
            return
        except Exception:
            if journaled:
                self.gate.undo(self.guest)  # a step the guest could not finish leaves no trace
            raise
        if journaled:
            self.gate.commit()

    def _ensure_workload(self) -> None:
        if self.workload is None and self.idle_reason is None:
            try:
                self.workload = self._make(self.guest)
            except NotAWorkloadGuest as exc:
                self.idle_reason = str(exc)
