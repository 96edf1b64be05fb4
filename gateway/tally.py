"""Finished exchanges of one (service, release), gathered between two accounting flushes.

Why: metrics and guard windows are updated every 50 ms (gateway/app.py), not per request
(a labelled prometheus_client counter update costs ~0.25-1 µs and takes a lock). The data path adds
each finished exchange to its release's tally — a counter bump and a list append, no tuple or
key built per request — and the flush hands whole tallies to `Metrics` and `Guard`.
"""

from __future__ import annotations


class Tally:
    """One release's exchanges since the last flush."""

    __slots__ = ("service", "release", "n", "status", "count", "_codes", "seconds", "failed", "odd")

    def __init__(self, service: str, release: str) -> None:
        self.service = service
        self.release = release
        self.n = 0  # exchanges in this tally (0: not queued for a flush)
        # Answered without an engine error, by status: the first status since the last
        # flush in two native fields (most answers share it: an int compare instead of a
        # dict update per request), any other in `_codes`; `codes` shows them together.
        self.status = 0
        self.count = 0
        self._codes: dict[int, int] = {}
        self.seconds: list[float] = []  # durations of those
        self.failed = 0  # of those, 5xx (guard failures, README "Guard and rollouts")
        self.odd: list[tuple[int, float, str | None]] = []  # (status or 0, seconds, error kind)

    @property
    def codes(self) -> dict[int, int]:
        """status -> count, answered without an engine error (a new dict)."""
        out = dict(self._codes)
        if self.count:
            out[self.status] = self.count
        return out

    def add(self, status: int, seconds: float, error: str | None) -> None:
        self.n += 1
        if error is None and status:
            if status == self.status:
                self.count += 1
            elif not self.count:
                self.status = status
                self.count = 1
            else:
                codes = self._codes
                codes[status] = codes.get(status, 0) + 1
            self.seconds.append(seconds)
            if status >= 500:
                self.failed += 1
        else:
            self.odd.append((status, seconds, error))

    def clear(self) -> None:
        self.n = 0
        self.count = 0
        if self._codes:
            self._codes = {}
        self.seconds = []
        self.failed = 0
        if self.odd:
            self.odd = []
