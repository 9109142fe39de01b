"""Every phase a migration can be in, the legal moves between them, and what each phase
expects from the peer: the protocol's state machine as data, in one place (as h11's _state.py).

A session moves only through `PhaseMachine.move`, which refuses a move the table does not list
before anything changes. A sequenced message whose kind the current phase does not expect is
a protocol error that fails the migration; it is never acted upon.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    # COMPLETED: the destination says, on reconnecting, that its verdict matched
    _S.POSTCOPY_PAUSED: frozenset(
        {_S.POSTCOPY, _S.POSTCOPY_VERIFYING, _S.COMPLETED, _S.UNSETTLED, _S.FAILING}
    ),
    # FAILING: only when the guest was taken back upstream (withdraw)
    _S.POSTCOPY_VERIFYING: frozenset({_S.POSTCOPY_PAUSED, _S.COMPLETED, _S.UNSETTLED, _S.FAILING}),
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

# What each phase acts on, and which phases each trigger may lead to: the protocol's transitions
# with their causes, as data (h11's _state.py is the model). A trigger is a message kind from the
# peer (sequenced ones; "ack", "resume", "resume_ack" are link traffic; "refusal" is an answer
# from outside the session), or a timer (named as in the sessions' timers()). The session
# dispatches every trigger through this table: a message the phase does not list is a protocol
# error, a timer it does not list is never armed, and a move the trigger does not list raises
# before anything changes. Failing is always open (the failure phases below), so the table lists
# progress alone. Operator verbs (cancel, settle, recover, postcopy-start) check their own
# phase and say why not.
_LINK = {"ack": (), "resume_ack": (), "refusal": (), "retransmit": (), "send-heartbeat": ()}
_SETUP_LINK = {"ack": (), "refusal": (), "retransmit": ()}  # the hello, resent, is the heartbeat
_TIMED = {"give-up": (), "link-broken": (), "send-resume": ()}
_STREAM = {"page_request": (), "received_bitmap": (), "abort": (), "send": ()}


def _table(rows: dict[P, dict[str, tuple[P, ...]]]) -> Mapping[P, Mapping[str, frozenset[P]]]:
    return {
        phase: {trigger: frozenset(leads) for trigger, leads in row.items()} for phase, row in rows.items()
    }


SOURCE_TRIGGERS = _table(
    {
        _S.SETUP: {
            **_SETUP_LINK, "hello_ack": (_S.ACTIVE, _S.POSTCOPY), "abort": (),
            "setup-timeout": (), "ask-hello-answer": (),
        },
        _S.ACTIVE: {
            **_LINK, **_TIMED, "abort": (), "convergence": (),
            "send": (_S.SWITCHOVER, _S.VERIFYING, _S.POSTCOPY),
            "round-end": (_S.SWITCHOVER, _S.VERIFYING, _S.POSTCOPY),
        },
        _S.SWITCHOVER: {**_LINK, **_TIMED, "abort": (), "send": (_S.VERIFYING,)},
        _S.VERIFYING: {**_LINK, **_TIMED, "abort": (), "verify_result": (_S.COMMITTING, _S.SWITCHOVER)},
        _S.COMMITTING: {
            **_LINK, **_TIMED, "abort": (), "started": (_S.COMPLETED,),
            "ack": (_S.COMPLETED,), "resume_ack": (_S.COMPLETED,),
        },
        _S.UNSETTLED: {
            "started": (_S.COMPLETED,), "ack": (_S.COMPLETED,), "resume_ack": (_S.COMPLETED,), "refusal": (),
        },
        _S.POSTCOPY: {
            **_LINK, **_TIMED, **_STREAM, "received_bitmap": (_S.POSTCOPY_VERIFYING,),
            "link-broken": (_S.POSTCOPY_PAUSED,),
        },
        _S.POSTCOPY_PAUSED: {
            **_LINK, **_TIMED, **_STREAM, "resume_ack": (_S.POSTCOPY, _S.POSTCOPY_VERIFYING, _S.COMPLETED),
        },
        _S.POSTCOPY_VERIFYING: {
            **_LINK, **_TIMED, **_STREAM, "verify_result": (_S.COMPLETED,),
            "link-broken": (_S.POSTCOPY_PAUSED,),
        },
    }
)  # fmt: skip
# Where any trigger may end a source: failing (the guest resumes here before the commit), or
# unsettled (after it, or in postcopy: the guest is kept as it was, for the destination or an
# operator to settle).
SOURCE_FAILURES = frozenset({_S.FAILING, _S.FAILED, _S.CANCELLED, _S.UNSETTLED})

_DEST_LINK = {"ack": (), "resume": (), "retransmit": (), "send-heartbeat": (), "reorder-gap": ()}
_BEFORE_RUNNING = {**_DEST_LINK, "abort": (), "link_timeouts": (), "source-silent": (), "taken-back": ()}
DEST_TRIGGERS = _table(
    {
        _D.WAITING: {"hello": (_D.RECEIVING,)},
        _D.RECEIVING: {
            **_BEFORE_RUNNING, "ram_pages": (), "tag_sections": (), "end_of_round": (),
            "device_state": (), "page_manifest": (), "verify_request": (_D.AWAIT_COMMIT,),
            "postcopy_start": (_D.POSTCOPY,),
        },
        _D.AWAIT_COMMIT: {**_BEFORE_RUNNING, "commit": (_D.RUNNING,)},
        # a postcopy guest runs here: the source's silence is a broken link, never a failure
        _D.POSTCOPY: {
            **_DEST_LINK, "abort": (), "link_timeouts": (), "postcopy_pages": (),
            "verify_request": (_D.RUNNING,), "taken-back": (), "late-tags": (), "ask-again": (),
            "bitmap-again": (), "postcopy-stalled": (),
        },
        # the handover is done: Started is sent again until the source has it, and the source's
        # operator may still take the guest back
        _D.RUNNING: {"ack": (), "resume": (), "retransmit": (), "taken-back": ()},
    }
)  # fmt: skip
DEST_FAILURES = frozenset({_D.FAILING, _D.FAILED})

P = TypeVar("P", SourcePhase, DestPhase)


class ProtocolError(RuntimeError):
    """The code asked for a move the phase table does not allow: a bug, never the peer's doing."""


class PhaseMachine(Generic[P]):
    def __init__(
        self,
        initial: P,
        moves: Mapping[P, frozenset[P]],
        triggers: Mapping[P, Mapping[str, frozenset[P]]],
        failures: frozenset[P],
    ) -> None:
        self.phase = initial
        self._moves = moves
        self._triggers = triggers
        self._failures = failures
        self._firing: tuple[P, str, frozenset[P]] | None = None  # the trigger being acted on

    def handles(self, trigger: str) -> bool:
        return trigger in self._triggers.get(self.phase, {})

    def fire(self, trigger: str, act: Callable[[], None]) -> None:
        """Act on a trigger the current phase handles; its moves are held to what the table
        says it leads to (or to failing)."""
        leads = self._triggers.get(self.phase, {}).get(trigger)
        if leads is None:
            raise ProtocolError(f"{trigger} is not handled in phase {self.phase.value}")
        outer, self._firing = self._firing, (self.phase, trigger, leads)
        try:
            act()
        finally:
            self._firing = outer

    def move(self, to: P) -> None:
        if to not in self._moves[self.phase]:
            raise ProtocolError(f"no move from {self.phase.value} to {to.value}")
        if self._firing is not None and to not in self._firing[2] and to not in self._failures:
            origin, trigger, _ = self._firing
            raise ProtocolError(f"{trigger} in phase {origin.value} may not lead to {to.value}")
        self.phase = to


@dataclass(frozen=True)
class Failure:
    """The first error of a migration; later errors do not overwrite it."""

    code: int
    reason: str
    phase: str
