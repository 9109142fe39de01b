"""Every phase a migration can be in, and the record of why it failed."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class SourcePhase(Enum):
    IDLE = "idle"
    SETUP = "setup"  # hello sent, waiting for the destination's answer
    ACTIVE = "active"  # precopy rounds while the guest runs
    SWITCHOVER = "switchover"  # guest stopped; last pages, tags and vCPU state
    VERIFYING = "verifying"  # digests sent, waiting for the destination's verdict
    COMMITTING = "committing"  # commit sent; the guest belongs to the destination
    COMPLETED = "completed"
    FAILING = "failing"  # cleanup under way; no new migration may start
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (SourcePhase.COMPLETED, SourcePhase.FAILED, SourcePhase.CANCELLED)


class DestPhase(Enum):
    WAITING = "waiting"  # no source yet
    RECEIVING = "receiving"
    VERIFYING = "verifying"
    AWAIT_COMMIT = "await-commit"
    RUNNING = "running"  # the guest runs here; migration completed
    FAILING = "failing"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (DestPhase.RUNNING, DestPhase.FAILED)


@dataclass(frozen=True)
class Failure:
    """The first error of a migration; later errors do not overwrite it."""

    code: int
    reason: str
    phase: str
