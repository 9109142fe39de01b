"""Migration parameters: one frozen object, checked once, passed in explicitly."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from common.constants import (
    DEFAULT_DOWNTIME_LIMIT_MS,
    HEARTBEAT_INTERVAL_S,
    INITIAL_CREDIT,
    MAX_CHANNELS,
    PEER_DEAD_AFTER_S,
    RECONNECT_TIMEOUT_S,
    RETRANSMIT_AFTER_S,
)
from common.guest.dirtylog import DirtyModel
from common.units import parse_size

# What set-parameters may change while a migration runs, and the unit each is given in; in
# the order of the reports' JSON (sorted), so that every listing of them reads alike.
SETTABLE_UNITS = {
    "convergence_timeout_s": "seconds",
    "downtime_limit_ms": "milliseconds",
    "max_bandwidth": "bytes per second, sizes allowed (20MiB); 0 = unlimited",
    "max_postcopy_bandwidth": "bytes per second for postcopy's background pages, sizes allowed; 0 = unlimited",
    "reconnect_timeout_s": "seconds",
}
SETTABLE = tuple(SETTABLE_UNITS)
# The settable ones given in bytes per second: sizes are taken (20MiB) and shown exactly.
SIZE_PARAMETERS = ("max_bandwidth", "max_postcopy_bandwidth")
# Slower, one background message of postcopy (128 pages) takes minutes, and a destination
# that hears its source but gets no page stops the copy (max_source_wait_s, 120 s).
MIN_POSTCOPY_BANDWIDTH = 16 << 10


def describe_parameters() -> str:
    return "; ".join(f"{name} in {unit}" for name, unit in SETTABLE_UNITS.items())


@dataclass(frozen=True)
class MigrationParameters:
    downtime_limit_ms: float = DEFAULT_DOWNTIME_LIMIT_MS
    max_bandwidth: int = 0  # bytes per second; 0 = unlimited
    # After a postcopy switchover the cap is this one (QEMU's max-postcopy-bandwidth): it paces
    # the background stream only; answers to the guest's page requests never wait on it.
    max_postcopy_bandwidth: int = 0
    use_lz4: bool = True
    auth_token: bytes = b""
    window: int = INITIAL_CREDIT  # data messages in flight before an ack
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    # Silence after which the link is presumed broken: setup gives up, later the source reconnects.
    peer_timeout_s: float = PEER_DEAD_AFTER_S
    # How long after the link broke the source goes on reconnecting before it fails.
    reconnect_timeout_s: float = RECONNECT_TIMEOUT_S
    retransmit_after_s: float = RETRANSMIT_AFTER_S
    # Auto-converge, as QEMU's cpu-throttle-initial / -increment / max-cpu-throttle.
    throttle_initial: float = 0.20
    throttle_increment: float = 0.10
    throttle_max: float = 0.99
    # Give up when the guest has not converged after this long, even fully throttled.
    convergence_timeout_s: float = 60.0
    # Postcopy allowed (QEMU's postcopy-ram capability): the destination runs the guest after
    # this many precopy rounds (0: at once; None: only when an operator says, ctl
    # postcopy-start, and a guest that converges first completes as a precopy does).
    postcopy: bool = False
    postcopy_after_rounds: int | None = 1
    # After the switchover a broken link pauses both sides; the source reconnects this long
    # before it stops trying and leaves the handover to an operator (ctl recover / settle).
    postcopy_recover_timeout_s: float = 60.0
    # Connections that carry page and tag batches (QEMU's multifd channels); that many batches
    # at a time are encoded side by side in as many threads. 1: everything on one connection.
    channels: int = 1
    # What the source's host lets it see of dirty pages (common/guest/dirtylog.py).
    dirty_model: DirtyModel = DirtyModel.KVM
    # The verification hashes the source's whole memory at the stop instead of trusting what
    # the dirty log said changed: it catches writes no dirty log saw (a device that forgot to
    # mark them), at the cost of hashing every written page inside the downtime.
    verify_rehash: bool = False

    def check(self) -> MigrationParameters:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, not {value}")
        if self.downtime_limit_ms <= 0:
            raise ValueError(f"downtime limit {self.downtime_limit_ms} ms must be positive")
        if self.max_bandwidth < 0:
            raise ValueError(f"max bandwidth {self.max_bandwidth} is negative")
        if self.max_postcopy_bandwidth < 0:
            raise ValueError(f"max postcopy bandwidth {self.max_postcopy_bandwidth} is negative")
        if 0 < self.max_postcopy_bandwidth < MIN_POSTCOPY_BANDWIDTH:
            raise ValueError(
                f"max postcopy bandwidth {self.max_postcopy_bandwidth} B/s is below {MIN_POSTCOPY_BANDWIDTH} B/s: "
                "a background message would take longer than a destination waits for its source (0 = unlimited)"
            )
        if not 1 <= self.window <= 1024:
            raise ValueError(f"window {self.window} is outside 1 .. 1024")
        if not 0 < self.heartbeat_interval_s < self.peer_timeout_s:
            raise ValueError(
                f"peer timeout {self.peer_timeout_s} s must exceed the heartbeat interval "
                f"({self.heartbeat_interval_s} s), so that a live peer is never taken for dead"
            )
        if self.reconnect_timeout_s < self.peer_timeout_s:
            raise ValueError(
                f"reconnect timeout {self.reconnect_timeout_s} s must be at least the peer timeout "
                f"({self.peer_timeout_s} s): reconnecting starts only once the peer was silent that long"
            )
        if self.retransmit_after_s <= 0:
            raise ValueError("the retransmission timeout must be positive")
        if not 0 <= self.throttle_initial <= self.throttle_max < 1:
            raise ValueError("throttle settings must satisfy 0 <= initial <= max < 1")
        if self.convergence_timeout_s <= 0:
            raise ValueError("convergence timeout must be positive")
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise ValueError(f"channels {self.channels} is outside 1 .. {MAX_CHANNELS}")
        if self.postcopy_after_rounds is not None and self.postcopy_after_rounds < 0:
            raise ValueError(f"postcopy after {self.postcopy_after_rounds} rounds: must be 0 or more")
        if self.postcopy_recover_timeout_s < self.peer_timeout_s:
            raise ValueError(
                f"postcopy recover timeout {self.postcopy_recover_timeout_s} s must be at least the "
                f"peer timeout ({self.peer_timeout_s} s)"
            )
        return self

    def updated(self, changes: dict[str, Any]) -> MigrationParameters:
        """set-parameters: only the tunables a running migration may change."""
        unknown = set(changes) - set(SETTABLE)
        if unknown:
            raise ValueError(f"cannot set {', '.join(sorted(unknown))}; settable: {', '.join(SETTABLE)}")
        converted = {name: _convert(name, value) for name, value in changes.items()}
        return replace(self, **converted).check()

    @property
    def postcopy_on_its_own(self) -> bool:
        """Postcopy starts without an operator's word (after its rounds, or on converging)."""
        return self.postcopy and self.postcopy_after_rounds is not None

    def settable(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SETTABLE}


def _convert(name: str, value: Any) -> int | float:
    if isinstance(value, bool):
        raise ValueError(f"{name}: {value!r} is not a number")
    if name in SIZE_PARAMETERS:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not a size in bytes per second (e.g. 20MiB)") from None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not a number") from None
