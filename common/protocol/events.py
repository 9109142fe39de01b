"""What a session tells its daemon: typed events, taken after each call, instead of attributes
the daemon would have to poll and compare."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseChanged:
    phase: str


@dataclass(frozen=True)
class RoundStarted:
    round: int
    data_pages: int  # pages whose data the round will send
    tag_pages: int  # pages whose tags it will send


@dataclass(frozen=True)
class Reconnect:
    """The link is presumed broken: open a new connection for this epoch; the session's next
    messages (a Resume first) go on it."""

    epoch: int
    silent_for_s: float


@dataclass(frozen=True)
class LinkRestored:
    epoch: int
    resent: int


@dataclass(frozen=True)
class PostcopyStarted:
    """The destination runs the guest with this many pages still to come."""

    missing_pages: int


@dataclass(frozen=True)
class Finished:
    status: str  # completed, failed, cancelled, unsettled
    reason: str | None


@dataclass(frozen=True)
class Refused:
    """The destination refused a peer's hello or message (the session, if any, goes on)."""

    peer: bytes
    reason: str
    hello: bool


Event = PhaseChanged | RoundStarted | Reconnect | LinkRestored | PostcopyStarted | Finished | Refused
