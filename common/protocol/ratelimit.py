"""The bandwidth cap: a token bucket over a short window, so that a changed cap takes effect at
once (an average over the whole migration would stall sending after the cap is lowered)."""

from __future__ import annotations

# The window the cap is measured over: bursts longer than this are smoothed out.
WINDOW_S = 0.05


class TokenBucket:
    def __init__(self, rate: int, now: float, *, min_burst: int) -> None:
        self.rate = rate  # bytes per second; 0 = unlimited
        self.min_burst = min_burst  # one message must always fit
        self.tokens = float(self.burst)
        self.t = now

    @property
    def burst(self) -> int:
        return max(int(self.rate * WINDOW_S), self.min_burst)

    def set_rate(self, rate: int, now: float) -> None:
        self._refill(now)
        self.rate = rate
        self.tokens = min(self.tokens, float(self.burst))

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.t)  # a clock read late never refills backwards
        self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
        self.t += elapsed

    def ready_at(self, now: float) -> float | None:
        """None: send now. Otherwise when the bucket holds enough for a message again."""
        if not self.rate:
            return None
        self._refill(now)
        if self.tokens > -1.0:  # within a byte: float rounding must not keep a sender waiting
            return None
        return now + -self.tokens / self.rate

    def spend(self, size: int, now: float) -> None:
        """Take what a sent message cost; the bucket may go into debt by one message."""
        if self.rate:
            self._refill(now)
            self.tokens -= size


class PerSecond:
    """At most `limit` events in any one-second window starting at the first of them: how a
    daemon bounds what strangers can make it do (log lines, answers to hellos)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._window_start = float("-inf")
        self._used = 0

    def take(self, now: float) -> bool:
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._used = 0
        if self._used >= self.limit:
            return False
        self._used += 1
        return True
