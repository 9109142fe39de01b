"""Every phase a migration can be in, the legal moves between them, and what each phase
expects from the peer: the protocol's state machine as data, in one place (as h11's _state.py).

A session moves only through `PhaseMachine.move`, which refuses a move the table does not list
before anything changes. A sequenced message whose kind the current phase does not expect is
a protocol error that fails the migration; it is never acted upon.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar


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
    # The commit went out and no answer came back before the link gave up: the guest is
    # stopped here and may run there. Only the destination, or an operator, can settle it.
    UNSETTLED = "unsettled"
    # Postcopy: the guest runs on the destination; this side serves the pages it lacks and
    # keeps every one until the end. Paused: the link broke, the source reconnects.
    POSTCOPY = "postcopy"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_VERIFYING = "postcopy-verifying"

    @property
    def terminal(self) -> bool:
        return not SOURCE_MOVES[self]

    @property
    def postcopy(self) -> bool:
        return self in (SourcePhase.POSTCOPY, SourcePhase.POSTCOPY_PAUSED, SourcePhase.POSTCOPY_VERIFYING)

    @property
    def ended(self) -> bool:
        """No more protocol traffic: terminal, or waiting only for an operator."""
        return self.terminal or self is SourcePhase.UNSETTLED


class DestPhase(Enum):
    WAITING = "waiting"  # no source yet
    RECEIVING = "receiving"
    AWAIT_COMMIT = "await-commit"  # verified; the source decides
    RUNNING = "running"  # the guest runs here; migration completed
    # Postcopy: the guest runs here while pages still arrive; never discarded from here on.
    POSTCOPY = "postcopy"
    FAILING = "failing"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (DestPhase.RUNNING, DestPhase.FAILED)


_S = SourcePhase
SOURCE_MOVES: Mapping[SourcePhase, frozenset[SourcePhase]] = {
    _S.IDLE: frozenset({_S.SETUP}),
    _S.SETUP: frozenset({_S.ACTIVE, _S.FAILING}),
    _S.ACTIVE: frozenset({_S.SWITCHOVER, _S.POSTCOPY, _S.FAILING}),
    # FAILING: only when the destination proves it never started the guest (it refused us
    # before it ever said it runs): then the guest runs here again
    _S.POSTCOPY: frozenset({_S.POSTCOPY_PAUSED, _S.POSTCOPY_VERIFYING, _S.UNSETTLED, _S.FAILING}),
    _S.POSTCOPY_PAUSED: frozenset({_S.POSTCOPY, _S.UNSETTLED, _S.FAILING}),
    _S.POSTCOPY_VERIFYING: frozenset({_S.POSTCOPY_PAUSED, _S.COMPLETED, _S.UNSETTLED}),
    _S.SWITCHOVER: frozenset({_S.VERIFYING, _S.FAILING}),
    _S.VERIFYING: frozenset({_S.SWITCHOVER, _S.COMMITTING, _S.FAILING}),  # back: a repair pass
    _S.COMMITTING: frozenset({_S.COMPLETED, _S.UNSETTLED, _S.FAILING}),
    # settled by the destination or by hand; after postcopy, `recover` tries the link again
    _S.UNSETTLED: frozenset({_S.COMPLETED, _S.FAILING, _S.POSTCOPY_PAUSED}),
    _S.FAILING: frozenset({_S.FAILED, _S.CANCELLED}),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}

_D = DestPhase
DEST_MOVES: Mapping[DestPhase, frozenset[DestPhase]] = {
    _D.WAITING: frozenset({_D.RECEIVING}),
    _D.RECEIVING: frozenset({_D.AWAIT_COMMIT, _D.POSTCOPY, _D.FAILING}),
    # A guest that runs here is never discarded, except when the source's operator says that
    # it runs there again ('ctl settle here', ERROR_GUEST_TAKEN_BACK): then this copy stops.
    _D.POSTCOPY: frozenset({_D.RUNNING, _D.FAILING}),
    _D.AWAIT_COMMIT: frozenset({_D.RUNNING, _D.FAILING}),
    _D.FAILING: frozenset({_D.FAILED}),
    _D.RUNNING: frozenset({_D.FAILING}),
    _D.FAILED: frozenset(),
}

# Sequenced messages each phase expects from the peer. Unsequenced ones (ack, heartbeat,
# resume, resume_ack) are link traffic, handled in any live phase.
SOURCE_EXPECTS: Mapping[SourcePhase, frozenset[str]] = {
    _S.SETUP: frozenset({"hello_ack", "abort"}),
    _S.ACTIVE: frozenset({"abort"}),
    _S.SWITCHOVER: frozenset({"abort"}),
    _S.VERIFYING: frozenset({"verify_result", "abort"}),
    _S.COMMITTING: frozenset({"started", "abort"}),
    _S.UNSETTLED: frozenset({"started"}),
    _S.POSTCOPY: frozenset({"page_request", "received_bitmap", "abort"}),
    _S.POSTCOPY_PAUSED: frozenset({"page_request", "received_bitmap", "abort"}),
    _S.POSTCOPY_VERIFYING: frozenset({"page_request", "received_bitmap", "verify_result", "abort"}),
}
_RECEIVING = frozenset(
    {
        "ram_pages",
        "tag_sections",
        "end_of_round",
        "device_state",
        "verify_request",
        "abort",
        "page_manifest",
        "postcopy_start",
        "link_timeouts",
    }
)
DEST_EXPECTS: Mapping[DestPhase, frozenset[str]] = {
    _D.RECEIVING: _RECEIVING,
    _D.POSTCOPY: frozenset({"postcopy_pages", "verify_request", "abort", "link_timeouts"}),
    _D.AWAIT_COMMIT: frozenset({"commit", "abort", "link_timeouts"}),
}

P = TypeVar("P", SourcePhase, DestPhase)


class ProtocolError(RuntimeError):
    """The code asked for a move the phase table does not allow: a bug, never the peer's doing."""


class PhaseMachine(Generic[P]):
    def __init__(
        self, initial: P, moves: Mapping[P, frozenset[P]], expects: Mapping[P, frozenset[str]]
    ) -> None:
        self.phase = initial
        self._moves = moves
        self._expects = expects

    def move(self, to: P) -> None:
        if to not in self._moves[self.phase]:
            raise ProtocolError(f"no move from {self.phase.value} to {to.value}")
        self.phase = to

    def expects(self, kind: str) -> bool:
        return kind in self._expects.get(self.phase, frozenset())


@dataclass(frozen=True)
class Failure:
    """The first error of a migration; later errors do not overwrite it."""

    code: int
    reason: str
    phase: str
