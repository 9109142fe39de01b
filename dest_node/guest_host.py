"""The guest on a destination node, as the sessions steer it: the arriving guest's memory (from a
preallocation or fresh), its prefault, the vCPU thread once it runs here, and its stop when a
source takes it back. The incoming session calls it as its DestHost, an onward migration as its
SourceHost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from common.guest.guest import Guest
from common.guest.prefault import Preallocation, Prefaulter
from common.guest.presence import PresenceGate, RestartableVcpu
from common.guest.runner import GuestRunner, Inert
from common.guest.workload import NotAWorkloadGuest, Workload
from common.units import format_size


class GuestHost:
    def __init__(
        self,
        log: Any,
        *,
        stop_at_step: int | None,
        preallocate_bytes: int | None,
        keep_preallocating: bool,
        arrived_pages: Callable[[], Callable[[], int]],
        on_taken_back: Callable[[], None],
    ) -> None:
        self.log = log
        self.stop_at_step = stop_at_step
        self.preallocate_bytes = preallocate_bytes
        self.keep_preallocating = keep_preallocating  # a daemon that takes another source after this
        # the current session's count of arrived pages (what a prefault may run ahead of)
        self._arrived_pages = arrived_pages
        self._on_taken_back = on_taken_back
        self.runner: GuestRunner | None = None
        self.vcpu: RestartableVcpu | None = None
        self.running_guest: Guest | None = None
        self.prefaulter: Prefaulter | None = None
        self.last_prefault: dict[str, Any] | None = None
        self.preallocation: Preallocation | None = None
        self._preallocated_guest: Guest | None = None
        self._prealloc_logged: Preallocation | None = None  # the last one whose time was logged
        self._guest_error_logged: GuestRunner | None = None  # the runner whose error was logged
        self.preallocate()

    def preallocate(self) -> None:
        size = self.preallocate_bytes
        if size is not None and (self.preallocation is None or self.preallocation.backing is None):
            if self.preallocation is not None:
                self.preallocation.stop()  # still committing the memory of a discarded guest
            self.preallocation = Preallocation(size)
            self.preallocation.start()

    # -- what the incoming session asks for ------------------------------------------------------
    def create_guest(self, ram_bytes: int, vcpu_count: int) -> Guest:
        prealloc = self.preallocation
        backing = prealloc.take(ram_bytes) if prealloc is not None else None
        guest = Guest.create(ram_bytes, vcpu_count, backing)
        if prealloc is not None:
            if backing is None:
                self.log.warning(
                    "guest larger than the preallocation: its memory is committed as pages arrive",
                    ram=format_size(ram_bytes),
                    preallocated=format_size(prealloc.ram_bytes),
                )
            else:
                self._preallocated_guest = guest
        return guest

    def start_guest(self, guest: Guest, gate: PresenceGate | None = None) -> None:
        self._stop_prefault()
        self.running_guest = guest
        if guest.foreign:
            # a QEMU guest: its pages are placed and checked here; only QEMU executes it
            self.runner = GuestRunner(Inert(), stop_at_step=0)
            self.log.info(
                "guest from QEMU arrived; it does not execute here (dest-node --to-qemu hands it back)"
            )
            return
        if gate is not None:
            # postcopy: steps restart when they touch a page that has not arrived
            self.vcpu = RestartableVcpu(guest, gate, Workload)
            self.runner = GuestRunner(self.vcpu, stop_at_step=self.stop_at_step)
            self.runner.start()
            self.log.info(
                "guest running (postcopy)",
                step=self.vcpu.step_count,
                missing_pages=gate.missing,
                stop_at_step=self.stop_at_step,
            )
            self._warn_if_past_stop(self.vcpu.step_count)
            return
        try:
            workload = Workload(guest)
        except NotAWorkloadGuest as exc:
            self.log.warning("guest holds no workload; it runs idle", reason=str(exc))
            return
        self.runner = GuestRunner(workload, stop_at_step=self.stop_at_step)
        self.runner.start()
        self.log.info("guest running", step=workload.step_count, stop_at_step=self.stop_at_step)
        self._warn_if_past_stop(workload.step_count)

    def _warn_if_past_stop(self, step: int) -> None:
        if self.stop_at_step is not None and step >= self.stop_at_step:
            self.log.warning(
                "the guest arrived past this node's --stop-at-step: it stays stopped here",
                step=step,
                stop_at_step=self.stop_at_step,
            )

    def take_page_misses(self) -> dict[int, float]:
        return self.vcpu.take_misses() if self.vcpu is not None else {}

    def discard_guest(self, guest: Guest) -> None:
        self._stop_prefault()
        if guest is self.running_guest:
            # it ran here (postcopy, or handed over) until the source took it back: it stops now,
            # and so does any copy this node was sending on
            self._on_taken_back()
            if self.runner is not None:
                self.runner.pause()
            self.runner = None
            self.vcpu = None
            self.running_guest = None
            self.log.warning("guest stopped here: the source runs it again")
        self.log.info("incoming guest discarded")
        if guest is self._preallocated_guest:
            self._preallocated_guest = None
            if self.keep_preallocating:
                self.preallocate()  # for the next source; this guest's memory goes with it

    def prefault(self, guest: Guest, pages: np.ndarray) -> None:
        if guest is self._preallocated_guest:
            return  # committed already
        self._stop_prefault()
        self.prefaulter = Prefaulter(guest.memory, pages, arrived=self._arrived_pages())
        self.prefaulter.start()

    def _stop_prefault(self) -> None:
        if self.prefaulter is not None:
            self.prefaulter.stop()
            self.last_prefault = {
                "faulted_pages": self.prefaulter.faulted_pages,
                "held_back": self.prefaulter.held_back,
            }
            self.log.info(
                "prefault done",
                faulted_pages=self.prefaulter.faulted_pages,
                # it waited for pages to arrive: the hint named more than the source sent yet
                held_back=self.prefaulter.held_back,
            )
            self.prefaulter = None

    # -- what an onward migration asks for: the guest that runs here ------------------------------
    def stop_guest(self) -> None:
        if self.runner is not None:
            self.runner.pause()

    def resume_guest(self) -> None:
        if self.runner is not None:
            self.runner.resume()

    def set_throttle(self, share: float) -> None:
        if self.runner is not None:
            self.runner.throttle = share

    def guest_quiet(self) -> bool:
        return self.runner is None or not self.runner.running

    def migrated_away(self) -> None:
        self.runner = None
        self.running_guest = None  # its memory goes with the last reference

    # -- what the daemon's loop and status read ---------------------------------------------------
    def run_slice(self) -> None:
        runner = self.runner
        if runner is None:
            return
        runner.run_slice()
        if runner.error is not None and runner is not self._guest_error_logged:
            self._guest_error_logged = runner
            self.log.error("guest stopped by an error of its own", reason=runner.error)

    def seconds_until_due(self, now: float) -> float | None:
        return self.runner.seconds_until_due(now) if self.runner is not None else None

    @property
    def stopped_for_good(self) -> bool:
        return self.runner is not None and self.runner.stopped_for_good

    def log_preallocation(self) -> None:
        prealloc = self.preallocation
        if prealloc is not None and prealloc.seconds is not None and prealloc is not self._prealloc_logged:
            self._prealloc_logged = prealloc
            self.log.info(
                "memory preallocated",
                size=format_size(prealloc.ram_bytes),
                seconds=round(prealloc.seconds, 3),
                rate=f"{prealloc.committed_bytes / max(prealloc.seconds, 1e-9) / (1 << 30):.1f} GiB/s",
            )

    def memory_report(self) -> dict[str, Any]:
        prealloc = self.preallocation
        prefaulter = self.prefaulter
        return {
            "preallocation": None
            if prealloc is None
            else {
                "bytes": prealloc.ram_bytes,
                "committed_bytes": prealloc.committed_bytes,
                "seconds": prealloc.seconds,
            },
            "prefault": {"faulted_pages": prefaulter.faulted_pages, "held_back": prefaulter.held_back}
            if prefaulter is not None
            else self.last_prefault,
        }

    def close(self) -> None:
        if self.preallocation is not None:
            self.preallocation.stop()
        prefaulter = self.prefaulter
        self._stop_prefault()
        if prefaulter is not None:
            prefaulter.join()
        if self.runner is not None:
            self.runner.pause()
