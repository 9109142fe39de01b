"""Per-direction sequence numbers: the one rule both sessions apply to what they receive."""

from __future__ import annotations

from enum import Enum


class Arrival(Enum):
    NEXT = "next"  # the one expected: handle it
    REPEAT = "repeat"  # already handled: ignore it (resends are idempotent)
    GAP = "gap"  # something before it was lost


class Sequence:
    def __init__(self, last: int = 0) -> None:
        self.last = last

    def arrive(self, seq: int) -> Arrival:
        if seq <= self.last:
            return Arrival.REPEAT
        if seq != self.last + 1:
            return Arrival.GAP
        self.last = seq
        return Arrival.NEXT

    def gap_reason(self, seq: int, sender: str) -> str:
        return f"messages from the {sender} were lost (expected {self.last + 1}, got {seq})"
