"""What the benchmark runs: scenarios, their probes and targets.

Scenarios that share a ``group`` run interleaved with each other (one repeat
of every cell, then the next repeat), so ratios between them are fair; the
trace_* scenarios share c50_1k's group and take their nginx/direct reference
from it.
"""

from __future__ import annotations

from dataclasses import dataclass

TARGETS = ("direct", "nginx", "haproxy", "gateway")


@dataclass(frozen=True)
class Probe:
    """One way of loading a target, and the figure its ratios compare."""

    # "wrk" (throughput), "c1" (wrk, one connection), "hey" (fixed rate, bursty),
    # "paced" (wrk at a fixed rate with Poisson-like arrivals), "idle"
    kind: str
    conns: int = 50
    path: str = "/1k"

    @property
    def label(self) -> str:
        return {
            "wrk": f"wrk c{self.conns}",
            "c1": "wrk c1",
            "hey": "hey 5k/s",
            "paced": "wrk paced 5k/s",
            "idle": f"idle {self.conns}",
        }[self.kind]

    @property
    def tool(self) -> str | None:
        return {"wrk": "wrk", "c1": "wrk", "hey": "hey", "paced": "wrk"}.get(self.kind)

    @property
    def metric(self) -> str:
        """The figure ratios are taken on: throughput for load runs, latency for paced ones."""
        return {
            "wrk": "rps",
            "c1": "p50_ms",
            "hey": "p99_ms",
            "paced": "p99_ms",
            "idle": "kib_per_conn",
        }[self.kind]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    probes: tuple[Probe, ...]
    group: str = ""
    targets: tuple[str, ...] = TARGETS
    workers: int = 1
    tracing: str = "prop"
    fresh: bool = False  # start the forwarder anew for every run (memory figures)
    tls: bool = False  # the forwarders terminate HTTPS (benchmarks/tlsbench.py)
    rollout: bool = False  # the gateway runs a rollout with analysis configured (servers.py)
    segments: bool = False  # the service has policy.segments_case's 10 segments (1M-id list)

    @property
    def group_key(self) -> str:
        return self.group or self.name


_C50 = (Probe("wrk", 50, "/1k"),)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("c50_1k", "50 connections, 1 KiB body, max throughput", _C50, group="c50_1k"),
        Scenario(
            "trace_off",
            "gateway, tracing SDK disabled (OTEL_SDK_DISABLED=true)",
            _C50,
            group="c50_1k",
            targets=("gateway",),
            tracing="off",
        ),
        Scenario(
            "trace_prop",
            "gateway, propagation only, nothing sampled (always_off)",
            _C50,
            group="c50_1k",
            targets=("gateway",),
            tracing="prop",
        ),
        Scenario(
            "trace_sampled",
            "gateway, every request sampled, exported over OTLP/HTTP to a local sink",
            _C50,
            group="c50_1k",
            targets=("gateway",),
            tracing="sampled",
        ),
        Scenario(
            "rollout_on",
            "gateway with a rollout running and Prometheus analysis evaluating every second "
            "(its result writes reach the data path only as state-document changes)",
            _C50,
            group="c50_1k",
            targets=("gateway",),
            rollout=True,
        ),
        Scenario(
            "segments_on",
            "gateway with 10 user segments of every kind, one a 1,000,000-id list, that the "
            "benchmark's random users fall through (every request tests all 10)",
            _C50,
            group="c50_1k",
            targets=("gateway",),
            segments=True,
        ),
        Scenario("c50_100k", "50 connections, 100 KiB body", (Probe("wrk", 50, "/100k"),)),
        Scenario("c1000_1k", "1000 connections, 1 KiB body", (Probe("wrk", 1000, "/1k"),)),
        Scenario(
            "rate5k",
            "latency at a fixed 5k req/s (hey -c20 -q250: bursts; wrk paced: Poisson-like "
            "arrivals over 100 connections) and per-hop at one connection",
            (Probe("hey", 20, "/1k"), Probe("paced", 100, "/1k"), Probe("c1", 1, "/1k")),
        ),
        Scenario(
            "workers2",
            "gateway --workers 2 vs nginx worker_processes 2 vs haproxy nbthread 2",
            _C50,
            workers=2,
        ),
        Scenario(
            "tls_c50_1k",
            "HTTPS to the forwarder (one certificate for both), 50 keep-alive connections, 1 KiB",
            _C50,
            targets=("nginx", "gateway"),
            tls=True,
        ),
        Scenario(
            "idle10k",
            "RSS per idle keep-alive connection, 10,000 connections, fresh servers",
            (Probe("idle", 10000, "/1k"),),
            targets=("nginx", "haproxy", "gateway"),
            fresh=True,
        ),
    )
}

QUICK = ("c50_1k", "rate5k")


def select(names: list[str] | None) -> list[Scenario]:
    """The named scenarios in canonical order; unknown names are an error naming the choices."""
    if not names:
        return list(SCENARIOS.values())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    return [s for s in SCENARIOS.values() if s.name in names]
