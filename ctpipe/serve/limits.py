"""Per-caller rate limits: a token bucket for each caller (AE title or API token name)."""

from __future__ import annotations

import threading
import time


class RateLimit:
    """At most ``per_minute`` calls a minute for each caller, in bursts of up to that many."""

    def __init__(self, per_minute: int) -> None:
        self.rate, self.burst = per_minute / 60.0, float(per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, time)
        self.lock = threading.Lock()

    def allow(self, caller: str) -> bool:
        now = time.monotonic()
        with self.lock:
            tokens, then = self.buckets.get(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            allowed = tokens >= 1
            self.buckets[caller] = (tokens - 1 if allowed else tokens, now)
        return allowed
