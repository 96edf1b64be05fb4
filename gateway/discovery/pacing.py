"""Pacing for watch loops: a token bucket for the request rate, capped backoff for errors.

Pure: both take the time and randomness they need as arguments, so they are
tested with tables and the watch loop only decides how long to sleep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Pacing:
    """How fast a watch may loop: a token bucket, capped backoff, client timeout slack.

    Why these defaults: an edge gateway must follow an instance that leaves or
    returns within a second (README.md, "Consul discovery"), so a watch may loop at up to
    `rate` = 2 requests per second after a burst of 4. A change is then seen at
    most 1/rate = 0.5 s plus one round trip after it happens, and a watch makes
    at most `burst + rate * t` requests in any t seconds however fast Consul
    churns: at most 2 per second per watch per replica once the burst is spent
    (`consul.watch_rate` and `consul.watch_burst` in the config; the defaults match).
    Consul's blocking-query guide asks clients to rate-limit the loop rather than
    sleep, and its example (burst 2, one per 15 s) suits a config watcher, not a
    data path. Errors back off from 0.5 s to 10 s with jitter; the client timeout
    adds `slack` to `wait + wait/16` (the server's jitter ceiling).
    """

    rate: float = 2.0
    burst: float = 4.0
    backoff_base: float = 0.5
    backoff_cap: float = 10.0
    slack: float = 5.0

    def bound(self, seconds: float) -> float:
        """The most requests one watch can make in any window of `seconds`."""
        return self.burst + self.rate * seconds


class TokenBucket:
    """Burst-limited rate limiter that reserves a token and says how long to wait for it.

    Why reserve instead of refuse: a watch loop must make its next request
    eventually; it sleeps the returned delay, so requests never exceed `rate` on
    average while idle periods refill up to `burst`.
    """

    __slots__ = ("rate", "burst", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def delay(self, now: float) -> float:
        """Take one token; the seconds to wait before using it (0.0 when one is ready)."""
        elapsed = max(0.0, now - self._stamp)
        self._stamp = max(self._stamp, now)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class Backoff:
    """Capped exponential backoff with jitter in [d/2, d]; `reset()` after a success.

    Why jitter: replicas that lost Consul together must not return in lockstep.
    """

    __slots__ = ("base", "cap", "rng", "attempts")

    def __init__(self, base: float, cap: float, rng: random.Random) -> None:
        self.base = base
        self.cap = cap
        self.rng = rng
        self.attempts = 0

    def next(self) -> float:
        d = min(self.cap, self.base * (2.0 ** min(self.attempts, 60)))
        self.attempts += 1
        return self.rng.uniform(d / 2, d)

    def reset(self) -> None:
        self.attempts = 0
