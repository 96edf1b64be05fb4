"""At most N log lines per second per key, and a count of what was held back.

Why: one line per 502/503/504 answered tells an operator what happened, but a
dead release under load would answer thousands a second; like nginx's
``limit_req_log_level`` or a token bucket on a logger, the first lines of each
second are written and the next written line says how many were suppressed.
Pure: the caller passes the time.
"""

from __future__ import annotations

from typing import Final

DEFAULT_PER_SECOND: Final = 5


class RateLimiter:
    """Per-key one-second windows: `allow` says drop (None) or how many were dropped before."""

    __slots__ = ("per_second", "_windows")

    def __init__(self, per_second: int = DEFAULT_PER_SECOND) -> None:
        self.per_second = per_second
        # key -> [window start, lines written in it, lines suppressed since the last written]
        self._windows: dict[tuple[str, ...], list[float]] = {}

    def allow(self, key: tuple[str, ...], now: float) -> int | None:
        """None when this line must be dropped, else how many were dropped before it."""
        w = self._windows.get(key)
        if w is None:
            self._windows[key] = [now, 1.0, 0.0]
            return 0
        if now - w[0] >= 1.0:
            w[0] = now
            w[1] = 0.0
        if w[1] >= self.per_second:
            w[2] += 1.0
            return None
        w[1] += 1.0
        suppressed = int(w[2])
        w[2] = 0.0
        return suppressed
