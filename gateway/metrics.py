"""Prometheus metrics with the fixed names of README "Tracing & metrics".

Why children are cached: `Counter.labels(...)` costs ~1 µs per call, a kept
child ~0.25 µs (CPython 3.11), so the per-request path looks children up in a
dict keyed by plain tuples. Label values come from closed sets only (service,
release, status code, error kind), never paths or user ids.
With `--workers N` every process writes prometheus_client multiprocess files
and the admin listener aggregates them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_mp

from gateway.errors import ERR_CLIENT
from gateway.rollout import STATES as ROLLOUT_STATES
from gateway.tally import Tally

if TYPE_CHECKING:  # a plain int at run time; an unboxed int64 in the compiled build
    from mypy_extensions import i64

# The duration histogram's bucket bounds, seconds. One Final per bound: compiled, each is a
# C double (`bucket_index` compares with them); a Final tuple of floats would be too, but
# this mypyc reads such a tuple through a broken "was it set" check (NameError).
_LE0: Final = 0.001
_LE1: Final = 0.0025
_LE2: Final = 0.005
_LE3: Final = 0.01
_LE4: Final = 0.025
_LE5: Final = 0.05
_LE6: Final = 0.1
_LE7: Final = 0.25
_LE8: Final = 0.5
_LE9: Final = 0.8
_LE10: Final = 1.0
_LE11: Final = 2.5
_LE12: Final = 5.0
_LE13: Final = 10.0
_LE14: Final = 30.0
BUCKETS: Final[tuple[float, ...]] = (
    _LE0,
    _LE1,
    _LE2,
    _LE3,
    _LE4,
    _LE5,
    _LE6,
    _LE7,
    _LE8,
    _LE9,
    _LE10,
    _LE11,
    _LE12,
    _LE13,
    _LE14,
)
# The bounds of a child of our histogram, +Inf last (prometheus_client's `_upper_bounds`).
_UPPER_BOUNDS: Final = [*BUCKETS, math.inf]


def bucket_index(v: float) -> int:
    """`bisect.bisect_left(_UPPER_BOUNDS, v)`: the bucket `Histogram.observe` counts `v` in.

    Why four compares with the bounds' constants: compiled, each compare is of two C
    doubles, where a scan over the list of bounds (or a bisect call) unboxes a float per
    step. `bound < v` on every branch, as bisect_left tests: a value on a bound falls in
    that bound's bucket (v <= le), and NaN in the first, as observe puts it.
    """
    if _LE7 < v:  # over 0.25 s
        if _LE11 < v:
            if _LE13 < v:
                return 15 if _LE14 < v else 14
            return 13 if _LE12 < v else 12
        if _LE9 < v:
            return 11 if _LE10 < v else 10
        return 9 if _LE8 < v else 8
    if _LE3 < v:
        if _LE5 < v:
            return 7 if _LE6 < v else 6
        return 5 if _LE4 < v else 4
    if _LE1 < v:
        return 3 if _LE2 < v else 2
    return 1 if _LE0 < v else 0


def _observe_many(child: Any, values: list[float]) -> None:
    """Histogram.observe for many values with one update per bucket."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(values) < 4:
        for v in values:
            child.observe(v)
        return
    ub: list[float] = bounds
    nb = len(ub)
    per: list[int] = [0] * nb
    if ub == _UPPER_BOUNDS:  # our histogram's: the bucket by compares, the sum in the same pass
        acc = 0.0  # added in order, as one `observe` per value would add them
        # Runs of values in one bucket (a proxy's latencies keep to a few) are counted in a
        # native int and added to `per` once a run ends: compiled, each `per[i]` update
        # unboxes, adds and boxes again.
        run_i = -1
        run_n: i64 = 0
        for v in values:
            i = bucket_index(v)
            if i == run_i:
                run_n += 1
            else:
                if run_n:
                    per[run_i] = per[run_i] + run_n
                run_i = i
                run_n = 1
            acc += v
        if run_n:
            per[run_i] = per[run_i] + run_n
    else:
        for v in values:
            # bisect_left (observe's rule: v <= bound) as a scan from the smallest bound:
            # a proxy's latencies sit in the first few buckets, and compiled this is a
            # C loop, where a bisect call per value is a Python call with a boxed float.
            i = 0
            while i < nb and ub[i] < v:
                i += 1
            per[i] += 1
        acc = sum(values)
    for i, n in enumerate(per):
        if n:
            buckets[i].inc(n)
    total.inc(acc)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric object of one process, with cached labelled children."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess_dir() is not None
        if registry is None:
            # process_* (CPU, RSS, fds) and python_info of the process serving /metrics
            self.registry.register(PROCESS_COLLECTOR)
            self.registry.register(PLATFORM_COLLECTOR)
        r = self.registry
        self.requests = Counter(
            "http_requests_total",
            "Requests answered, by service, release and status code.",
            ["service", "release", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Time from request head to end of response, by service and release.",
            ["service", "release"],
            buckets=BUCKETS,
            registry=r,
        )
        gauge_mode: dict[str, Any] = (
            {"multiprocess_mode": "mostrecent"} if self.multiprocess else {}
        )
        self.weight = Gauge(
            "gateway_release_weight",
            "Normalized weight of a release in percent.",
            ["service", "release"],
            registry=r,
            **gauge_mode,
        )
        self.endpoints = Gauge(
            "gateway_upstream_endpoints",
            "Healthy endpoints per release.",
            ["service", "release"],
            registry=r,
            **gauge_mode,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Upstream failures by kind (connect, reset, timeout, protocol, tls).",
            ["service", "release", "kind"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "gateway_upstream_retries_total",
            "Failed upstream attempts retried on another endpoint, by failure kind.",
            ["service", "release", "reason"],
            registry=r,
        )
        self.guard_trips = Counter(
            "gateway_guard_trips_total",
            "Automatic rollbacks decided by the guard.",
            ["service", "release", "reason"],
            registry=r,
        )
        self.rollout_state = Gauge(
            "gateway_rollout_state",
            "1 for the current rollout state of a service.",
            ["service", "state"],
            registry=r,
            **gauge_mode,
        )
        self.state_version = Gauge(
            "gateway_state_version",
            "Version of the applied routing state.",
            registry=r,
            **gauge_mode,
        )
        self.segment_requests = Counter(
            "gateway_segment_requests_total",
            "Requests a user segment chose the release for, by the release that served them.",
            ["service", "segment", "release"],
            registry=r,
        )
        # Analysis (gateway/analysis_runner.py): set by the process that drives rollouts.
        self.analysis_value = Gauge(
            "gateway_analysis_value",
            "Last value of an analysis metric's query for a release.",
            ["service", "release", "metric"],
            registry=r,
            **gauge_mode,
        )
        self.analysis_threshold = Gauge(
            "gateway_analysis_threshold",
            "The bound an analysis metric's last value was held to.",
            ["service", "release", "metric"],
            registry=r,
            **gauge_mode,
        )
        self.analysis_runs = Counter(
            "gateway_analysis_runs_total",
            "Counted analysis evaluations by result (success, failure, inconclusive).",
            ["service", "release", "metric", "result"],
            registry=r,
        )
        self._seg: dict[tuple[str, str, str], Any] = {}
        self._req: dict[tuple[str, str, int], Any] = {}
        self._dur: dict[tuple[str, str], Any] = {}
        self._err: dict[tuple[str, str, str], Any] = {}

    def observe(self, service: str, release: str, code: int, seconds: float) -> None:
        """One finished exchange (the data path batches through `observe_batch`)."""
        self.observe_batch(((service, release, code, seconds, None),))

    def observe_batch(self, items: Sequence[tuple[str, str, int, float, str | None]]) -> None:
        """Many finished exchanges at once: sorted into tallies, one update per label set.

        Why: each prometheus_client update takes a lock (~0.25-0.5 µs); summing
        first keeps the per-request cost to a tally update.
        """
        tallies: dict[tuple[str, str], Tally] = {}
        for service, release, status, seconds, error in items:
            t = tallies.get((service, release))
            if t is None:
                t = tallies[(service, release)] = Tally(service, release)
            t.add(status, seconds, error)
        for t in tallies.values():
            self.observe_tally(t)

    def observe_tally(self, t: Tally) -> None:
        """One release's exchanges since the last flush: one update per label set."""
        service, release = t.service, t.release
        codes, seconds = t.codes, t.seconds
        if t.odd:  # rare: engine errors (counted by kind), answers sent before one
            codes, seconds = dict(codes), list(seconds)
            for status, sec, error in t.odd:
                if error is not None and error != ERR_CLIENT:
                    self.upstream_error(service, release, error)
                if status:
                    codes[status] = codes.get(status, 0) + 1
                    seconds.append(sec)
        for code, n in codes.items():
            k = (service, release, code)
            c = self._req.get(k)
            if c is None:
                c = self._req[k] = self.requests.labels(service, release, str(code))
            c.inc(n)
        if seconds:
            k2 = (service, release)
            h = self._dur.get(k2)
            if h is None:
                h = self._dur[k2] = self.duration.labels(service, release)
            _observe_many(h, seconds)

    def segment_request(self, service: str, segment: str, release: str) -> None:
        """One request routed by a segment; labels are configured names only."""
        k = (service, segment, release)
        c = self._seg.get(k)
        if c is None:
            c = self._seg[k] = self.segment_requests.labels(service, segment, release)
        c.inc()

    def upstream_error(self, service: str, release: str, kind: str) -> None:
        k = (service, release, kind)
        c = self._err.get(k)
        if c is None:
            c = self._err[k] = self.upstream_errors.labels(service, release, kind)
        c.inc()

    def retried(self, service: str, release: str, reason: str) -> None:
        """One failover to another endpoint (rare: a failed attempt, so no cached child)."""
        self.upstream_retries.labels(service, release, reason).inc()

    def set_weights(self, shares: dict[str, dict[str, float]]) -> None:
        for svc, rel_shares in shares.items():
            for rel, share in rel_shares.items():
                self.weight.labels(svc, rel).set(round(share * 100.0, 6))

    def set_endpoints(self, counts: dict[tuple[str, str], int]) -> None:
        for (svc, rel), n in counts.items():
            self.endpoints.labels(svc, rel).set(n)

    def set_rollout_state(self, service: str, state: str) -> None:
        for s in ROLLOUT_STATES:
            self.rollout_state.labels(service, s).set(1 if s == state else 0)

    def served(self, service: str, release: str) -> float:
        """Requests the release has answered so far, over every worker (analysis min_requests).

        Read from the counters, not on the data path: the analysis runner asks
        once per evaluation.
        """
        mp = multiprocess_dir()
        if mp:
            reg = CollectorRegistry()
            prom_mp.MultiProcessCollector(reg, path=mp)  # type: ignore[no-untyped-call]
            families = reg.collect()
        else:
            families = self.requests.collect()
        total = 0.0
        for fam in families:
            if fam.name != "http_requests":
                continue
            for s in fam.samples:
                if (
                    s.name == "http_requests_total"
                    and s.labels.get("service") == service
                    and s.labels.get("release") == release
                ):
                    total += s.value
        return total

    def exposition(self) -> bytes:
        """The text format for /metrics: all workers' files in multiprocess mode."""
        mp = multiprocess_dir()
        if mp:
            reg = CollectorRegistry()
            prom_mp.MultiProcessCollector(reg, path=mp)  # type: ignore[no-untyped-call]
            reg.register(PROCESS_COLLECTOR)  # the master's own process figures
            return generate_latest(reg)
        return generate_latest(self.registry)
