"""Migration parameters: one frozen object, checked once, passed in explicitly."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from common.constants import (
    DEFAULT_DOWNTIME_LIMIT_MS,
    HEARTBEAT_INTERVAL_S,
    INITIAL_CREDIT,
    PEER_DEAD_AFTER_S,
    SOURCE_DIGEST_BUDGET_PAGES,
)


@dataclass(frozen=True)
class MigrationParameters:
    downtime_limit_ms: float = DEFAULT_DOWNTIME_LIMIT_MS
    max_bandwidth: int = 0  # bytes per second; 0 = unlimited
    use_lz4: bool = True
    auth_token: bytes = b""
    window: int = INITIAL_CREDIT  # data messages in flight before an ack
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    peer_timeout_s: float = PEER_DEAD_AFTER_S
    # Auto-converge, as QEMU's cpu-throttle-initial / -increment / max-cpu-throttle.
    throttle_initial: float = 0.20
    throttle_increment: float = 0.10
    throttle_max: float = 0.99
    # Give up when the guest has not converged after this long, even fully throttled.
    convergence_timeout_s: float = 60.0
    # Pages hashed per loop turn while the guest runs: small enough not to stall the stream.
    digest_budget_pages: int = SOURCE_DIGEST_BUDGET_PAGES

    def check(self) -> MigrationParameters:
        if self.downtime_limit_ms <= 0:
            raise ValueError(f"downtime limit {self.downtime_limit_ms} ms must be positive")
        if self.max_bandwidth < 0:
            raise ValueError(f"max bandwidth {self.max_bandwidth} is negative")
        if not 1 <= self.window <= 1024:
            raise ValueError(f"window {self.window} is outside 1 .. 1024")
        if not 0 < self.heartbeat_interval_s < self.peer_timeout_s:
            raise ValueError("heartbeat interval must be positive and below the peer timeout")
        if not 0 <= self.throttle_initial <= self.throttle_max < 1:
            raise ValueError("throttle settings must satisfy 0 <= initial <= max < 1")
        if self.convergence_timeout_s <= 0:
            raise ValueError("convergence timeout must be positive")
        if self.digest_budget_pages < 1:
            raise ValueError("the digest budget must be at least one page")
        return self

    def updated(self, changes: dict[str, Any]) -> MigrationParameters:
        """set-parameters: only the tunables a running migration may change."""
        allowed = {"downtime_limit_ms", "max_bandwidth", "convergence_timeout_s"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(
                f"cannot set {', '.join(sorted(unknown))}; settable: {', '.join(sorted(allowed))}"
            )
        types = {f.name: f.type for f in fields(self)}
        converted = {k: (int(v) if types[k] == "int" else float(v)) for k, v in changes.items()}
        return replace(self, **converted).check()
