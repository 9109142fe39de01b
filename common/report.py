"""The JSON report both daemons write: one shape, built in one place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from common.constants import PAGE_SIZE
from common.guest.guest import Guest
from common.guest.workload import REG_FAULTS, REG_STEP


def guest_summary(
    guest: Guest, *, here: bool, running: bool, with_digests: bool = True, error: str | None = None
) -> dict[str, Any]:
    """`here`: the guest is this side's (exactly one side says so); `running`: its vCPU
    executes right now (not once stopped at --stop-at-step, nor while a migration holds it);
    `error`: why the guest stopped on its own, if it did (its memory made a step impossible)."""
    vcpu = guest.vcpus[0]
    summary: dict[str, Any] = {
        "step": vcpu.x[REG_STEP],
        "ram_digest": None,
        "tag_digest": None,
        "vcpu_digest": None,
        "tag_check_faults": vcpu.x[REG_FAULTS],
        "here": here,
        "running": running,
        "error": error,
    }
    if guest.foreign:
        summary["imported"] = (
            "from a QEMU migration stream: RAM, tags and device state travel; it does not execute here"
        )
    if with_digests:
        digests = guest.digests()
        summary.update(
            ram_digest=digests.ram.hex(),
            tag_digest=digests.tags.hex(),
            vcpu_digest=digests.vcpu.hex(),
            # pages ever written here, by the vCPU or by a migration: the guest RAM it touched
            populated_bytes=int(np.count_nonzero(guest.memory.data_populated)) * PAGE_SIZE,
        )
    return summary


def check_report_path(path: str | Path) -> None:
    """At start-up, not at the end: a report that cannot be written must not turn a completed
    migration into a failed exit status after the fact."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"report path {path} is a directory")
    if not target.parent.is_dir():
        raise ValueError(f"report path {path}: folder {target.parent} does not exist")
    probe = target.with_name(target.name + ".tmp")
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"report path {path} is not writable: {exc.strerror}") from None


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    tmp.replace(target)  # a reader never sees half a report
