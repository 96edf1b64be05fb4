"""Sliding-window health of each release (README.md "Guard rules") — pure.

Why buckets: a request is recorded in O(1) into a per-second bucket (count,
failures, a fixed log-scale latency histogram); evaluation sums the buckets
still inside the window. p95 comes from the histogram (≤ ~10 % relative
error, plenty to compare against a threshold in milliseconds) instead of
keeping every sample. Time is passed in, so windows are deterministic in tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from gateway.errors import ERR_CLIENT
from gateway.tally import Tally

# Latency bucket upper bounds in seconds: ~10 % apart from 0.5 ms to ~120 s.
_BOUNDS: Final[tuple[float, ...]] = tuple(0.0005 * (1.1**i) for i in range(131))
_NB: Final = len(_BOUNDS) + 1
_LOG_STEP: Final = math.log(1.1)
# The first and last bound as native floats (compiled, a read of a tuple item is a boxed float).
_FIRST: Final = _BOUNDS[0]
_LAST: Final = _BOUNDS[-1]
# The window of a service `configure` has not named (yet): the config's default
# `guard.window` (docs/configuration.md), so a record before the first configure is kept.
DEFAULT_WINDOW_S: Final = 300.0


class _Bucket:
    """One second of a release's exchanges.

    `lo`/`hi`: the histogram slots in use lie in `hist[lo:hi]` (empty when lo >= hi). A
    proxy's latencies fill a few of the 132 slots, and `ReleaseWindow.stats` sums every
    bucket of the window on each guard check: it reads only those.
    """

    __slots__ = ("second", "requests", "failures", "hist", "lo", "hi")

    def __init__(self) -> None:
        self.second = -1
        self.requests = 0
        self.failures = 0
        self.hist = [0] * _NB
        self.lo = _NB
        self.hi = 0

    def reset(self, second: int) -> None:
        self.second = second
        self.requests = 0
        self.failures = 0
        self.hist = [0] * _NB
        self.lo = _NB
        self.hi = 0

    def add(self, i: int) -> None:
        """One exchange in latency slot `i`."""
        self.hist[i] += 1
        if i < self.lo:
            self.lo = i
        if i >= self.hi:
            self.hi = i + 1


@dataclass(frozen=True, slots=True)
class WindowStats:
    requests: int
    failures: int
    p95_ms: float | None
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


class ReleaseWindow:
    """Requests, failures and latency of one release over the last `window` seconds."""

    __slots__ = ("window", "_buckets")

    def __init__(self, window: float) -> None:
        self.window = max(1, int(math.ceil(window)))
        self._buckets = [_Bucket() for _ in range(self.window)]

    def record(self, now: float, seconds: float, failed: bool) -> None:
        sec = int(now)
        b = self._buckets[sec % self.window]
        if b.second != sec:
            b.reset(sec)
        b.requests += 1
        if failed:
            b.failures += 1
        b.add(_bucket(seconds))

    def record_many(self, now: float, seconds: list[float], failures: int) -> None:
        """`record` for many exchanges that ended in the same second."""
        sec = int(now)
        b = self._buckets[sec % self.window]
        if b.second != sec:
            b.reset(sec)
        b.requests += len(seconds)
        b.failures += failures
        hist = b.hist
        lo = b.lo
        hi = b.hi
        for x in seconds:  # `b.add` per exchange, with the slot range kept in locals
            i = _bucket(x)
            hist[i] = hist[i] + 1  # compiled, `hist[i] += 1` is a generic in-place add
            if i < lo:
                lo = i
            if i >= hi:
                hi = i + 1
        b.lo = lo
        b.hi = hi

    def stats(self, now: float, span: int = 0) -> WindowStats:
        """Totals of the last `span` seconds (0 or more than the window: the whole window).

        A rule with a shorter window than the guard's reads the same buckets,
        so extra rules add nothing to the per-request cost.
        """
        since = int(now) - (span if 0 < span < self.window else self.window)
        req = fail = 0
        hist = [0] * _NB
        lo = _NB  # the slots any bucket uses: hist[lo:hi]
        hi = 0
        for b in self._buckets:
            if b.second > since and b.requests:
                req += b.requests
                fail += b.failures
                h = b.hist
                for i in range(b.lo, b.hi):
                    c = h[i]
                    if c:
                        hist[i] += c
                if b.lo < lo:
                    lo = b.lo
                if b.hi > hi:
                    hi = b.hi
        if not req:
            return WindowStats(req, fail, None, None)
        return WindowStats(
            req, fail, _quantile_ms(hist, lo, hi, req, 0.95), _quantile_ms(hist, lo, hi, req, 0.99)
        )


def _bucket(x: float) -> int:
    """`bisect.bisect_left(_BOUNDS, x)`, started from the log of x (the bounds are geometric).

    Why: compiled, a log and a step or two over the bounds is a few C operations, where
    bisect is a Python call with a boxed float per recorded exchange. The steps make it
    exact whatever the rounding of the estimate.
    """
    last = _NB - 2
    if not x > _FIRST:  # at or below the first bound, or NaN: bisect_left gives 0 too
        return 0
    if x > _LAST:
        return last + 1
    i = int(math.log(x / _FIRST) / _LOG_STEP)
    if i > last:
        i = last
    while i > 0 and _BOUNDS[i - 1] >= x:
        i -= 1
    while _BOUNDS[i] < x:
        i += 1
    return i


def _quantile_ms(hist: list[int], lo: int, hi: int, total: int, q: float) -> float:
    """The q-quantile's bucket bound in ms; every count of `hist` lies in `hist[lo:hi]`."""
    rank = math.ceil(q * total)
    acc = 0
    for i in range(lo, hi):
        acc += hist[i]
        if acc >= rank:
            return (_BOUNDS[i] if i < len(_BOUNDS) else _BOUNDS[-1]) * 1000.0
    return _BOUNDS[-1] * 1000.0


def is_failure(status: int, error: str | None) -> bool:
    """5xx answers and upstream failures count; a client hanging up does not."""
    if error is not None:
        return error != ERR_CLIENT
    return status >= 500


class Guard:
    """Windows for every (service, release); `record` is the data path's observer hook."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._windows: dict[tuple[str, str], ReleaseWindow] = {}
        self._sizes: dict[str, float] = {}

    def configure(self, windows: Mapping[str, float]) -> None:
        """Window length per service; a changed length starts that service afresh."""
        for svc, w in windows.items():
            if self._sizes.get(svc) != w:
                self._sizes[svc] = w
                for key in [k for k in self._windows if k[0] == svc]:
                    del self._windows[key]

    def _window(self, service: str, release: str) -> ReleaseWindow:
        key = (service, release)
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = ReleaseWindow(self._sizes.get(service, DEFAULT_WINDOW_S))
        return w

    def record(
        self, service: str, release: str, status: int, seconds: float, error: str | None
    ) -> None:
        """One finished exchange (the data path hands over whole tallies instead)."""
        self._window(service, release).record(self.clock(), seconds, is_failure(status, error))

    def record_tally(self, t: Tally) -> None:
        """One release's exchanges since the last flush (every 50 ms, and before each tick)."""
        w = self._window(t.service, t.release)
        now = self.clock()  # one read per tally: it is 50 ms old at most (app.py)
        if t.seconds:
            w.record_many(now, t.seconds, t.failed)
        for status, seconds, error in t.odd:
            w.record(now, seconds, is_failure(status, error))

    def stats(self, service: str, release: str, span: int = 0) -> WindowStats:
        w = self._windows.get((service, release))
        return w.stats(self.clock(), span) if w is not None else WindowStats(0, 0, None)

    def reset(self, service: str, release: str) -> None:
        self._windows.pop((service, release), None)
