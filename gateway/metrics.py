"""Prometheus metrics with the fixed names of README "Tracing & metrics".

Why children are cached: `Counter.labels(...)` costs ~1 µs per call, a kept
child ~0.25 µs (CPython 3.11), so the per-request path looks children up in a
dict keyed by plain tuples. Label values come from closed sets only (service,
release, status code, error kind), never paths or user ids.
With `--workers N` every process writes prometheus_client multiprocess files
and the admin listener aggregates them.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from typing import Any, Final

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

BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.8,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def _observe_many(child: Any, values: list[float]) -> None:
    """Histogram.observe for many values with one update per bucket."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(values) < 4:
        for v in values:
            child.observe(v)
        return
    per = [0] * len(bounds)
    bisect_left = bisect.bisect_left  # one module lookup, not one per value
    for v in values:
        per[bisect_left(bounds, v)] += 1  # same rule as observe: v <= bound
    for i, n in enumerate(per):
        if n:
            buckets[i].inc(n)
    total.inc(sum(values))


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
