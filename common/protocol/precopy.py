"""Precopy scheduling: what each round sends, when the guest stops, and how hard auto-converge
holds it back (QEMU's iterate / convergence loop in miniature). Pure: the session feeds it the
time and what the link measured, and acts on the verdict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from common.constants import DOWNTIME_AIM, PACKED_TAG_BYTES_PER_PAGE, PAGE_SIZE, ROUND_WORTH_IT
from common.guest.digest import DigestCache
from common.guest.dirtylog import DirtyLog, DirtyModel
from common.guest.memory import DirtySync, GuestMemory
from common.indices import union
from common.protocol.params import MigrationParameters
from common.protocol.stats import BandwidthMeter
from common.transfer import PagePass
from common.units import format_size


class Verdict(Enum):
    WAIT = "wait"  # something is in flight: decide when it has arrived
    NEXT_ROUND = "next-round"
    SWITCHOVER = "switchover"
    GIVE_UP = "give-up"  # not converging within the convergence timeout


@dataclass(frozen=True)
class RoundEnd:
    verdict: Verdict
    sync: DirtySync | None = None
    reason: str = ""


@dataclass(eq=False)
class Precopy:
    mem: GuestMemory
    digests: DigestCache
    model: DirtyModel = DirtyModel.KVM
    log: DirtyLog = field(init=False)
    round: int = 0
    pass_: PagePass | None = None
    throttle: float = 0.0
    expected_downtime_s: float | None = None
    # the progress a report showed last, where postcopy's progress starts (reports.py)
    shown_percent: float | None = None
    dirty_pages_rate: float = 0.0
    t_round: float = 0.0  # when the current round began
    _acked_at_round: int = 0  # the meter's total when the current round began
    # The fastest acknowledgement of a control message so far; the downtime holds two such
    # handshakes (verification, then commit and start) after its last page.
    round_trip_s: float = float("inf")
    # What the verification will spend inside the downtime beyond the round trips (hashing
    # the whole written memory again, with --verify-rehash); 0 by default.
    verify_cost_s: Callable[[], float] = lambda: 0.0

    def __post_init__(self) -> None:
        self.log = DirtyLog(self.model, self.mem, self.digests)

    def first_round(self, now: float) -> tuple[int, int]:
        """Round 1: every page ever written. Returns the never-written (zero) and never-tagged
        page counts: they are zero on both sides already and cost nothing at all."""
        self.round = 1
        self.t_round = now
        first = self.log.first()
        self.digests.mark(first.data_pages, first.tag_pages)
        self.pass_ = PagePass(first.data_pages, first.tag_pages)
        count = self.mem.page_count
        return count - int(first.data_pages.size), count - int(first.tag_pages.size)

    def give_up_reason(self, params: MigrationParameters) -> str:
        """Why precopy stops at the convergence timeout, with the latest round's figures."""
        if self.round == 1 and self.pass_ is not None and not self.pass_.done:
            # nothing measured yet: say how far round 1 got
            return (
                f"not converging after {params.convergence_timeout_s:.0f} s: round 1 did not finish, "
                f"{format_size(self.pass_.remaining_bytes)} of it still to send"
            )
        return (
            f"not converging after {params.convergence_timeout_s:.0f} s and {self.round} rounds: "
            f"{self.dirty_pages_rate:.0f} pages/s dirtied, expected downtime "
            f"{(self.expected_downtime_s or 0) * 1000:.0f} ms over the {params.downtime_limit_ms:.0f} ms limit"
            f" at throttle {self.throttle:.0%}" + self._rehash_part(params)
        )

    def _verify_cost_s(self, params: MigrationParameters) -> float:
        # a postcopy switchover proves pages by their manifest, with no verification to fit
        return 0.0 if params.postcopy_on_its_own else self.verify_cost_s()

    def _rehash_part(self, params: MigrationParameters) -> str:
        cost = self._verify_cost_s(params)
        return (
            f" ({cost * 1000:.0f} ms of it hashing the written memory again: --verify-rehash)" if cost else ""
        )

    def end_of_round(
        self,
        now: float,
        *,
        in_flight: int,
        active_for: float,
        meter: BandwidthMeter,
        params: MigrationParameters,
    ) -> RoundEnd:
        # Decide only once the destination has placed (and so hashed) everything: what is
        # still in flight would otherwise be downtime.
        if in_flight > 0 and active_for <= params.convergence_timeout_s:
            return RoundEnd(Verdict.WAIT)
        sync = self.log.sync()
        self.digests.mark(sync.data_pages, sync.tag_pages)
        elapsed = max(now - self.t_round, 1e-6)
        self.dirty_pages_rate = (sync.data_pages.size + sync.tag_pages.size) / elapsed
        remaining = sync.data_pages.size * PAGE_SIZE + sync.tag_pages.size * PACKED_TAG_BYTES_PER_PAGE
        # the acknowledged bandwidth already holds the destination's placing and hashing
        bandwidth = meter.rate() or (meter.total / max(active_for, 1e-6)) or None
        handover_s = 2 * self.round_trip_s if self.round_trip_s != float("inf") else 0.0
        handover_s += self._verify_cost_s(params)
        expected = remaining / bandwidth + handover_s if bandwidth else None
        previous, self.expected_downtime_s = self.expected_downtime_s, expected
        limit_s = params.downtime_limit_ms / 1000.0
        if remaining == 0:
            return RoundEnd(Verdict.SWITCHOVER, sync)
        # It fits: stop now only if it is well inside the limit, or another round would not
        # shrink it much, or time is running out. A round costs the guest little, and each one
        # that shrinks the rest shortens the downtime.
        if (
            expected is not None
            and expected <= limit_s
            and (
                params.postcopy_on_its_own  # the rest is pulled after the switchover, not in a downtime
                or expected <= limit_s * DOWNTIME_AIM
                or (previous is not None and expected > previous * ROUND_WORTH_IT)
                or active_for > params.convergence_timeout_s / 2
            )
        ):
            return RoundEnd(Verdict.SWITCHOVER, sync)
        if active_for > params.convergence_timeout_s:
            return RoundEnd(Verdict.GIVE_UP, sync, self.give_up_reason(params))
        # Auto-converge: a round that leaves more than half of what it sent dirty again means
        # the guest outruns the link; hold its vCPU back a little more each time.
        sent_this_round = meter.total - self._acked_at_round
        if self.round >= 2 and remaining > sent_this_round // 2:
            self.throttle = min(
                params.throttle_max,
                self.throttle + params.throttle_increment if self.throttle else params.throttle_initial,
            )
        self._acked_at_round = meter.total
        self.round += 1
        self.t_round = now
        self.pass_ = PagePass(sync.data_pages, sync.tag_pages)
        return RoundEnd(Verdict.NEXT_ROUND, sync)

    def final_pass(self, sync: DirtySync) -> None:
        """The switchover pass: what the deciding sync found, plus what the guest dirtied
        between that sync and its stop."""
        self.round += 1
        last = self.log.sync()
        self.digests.mark(last.data_pages, last.tag_pages)
        self.pass_ = PagePass(union(sync.data_pages, last.data_pages), union(sync.tag_pages, last.tag_pages))

    def repair_pass(self, data: np.ndarray, tags: np.ndarray) -> None:
        self.pass_ = PagePass(data, tags)
