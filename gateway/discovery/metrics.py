"""Prometheus metrics of the discovery watches (new names; README "Tracing & metrics" unchanged).

Why per (service, release): the same closed label set as the data-path metrics, so
an operator can join "no healthy endpoints" with "its watch is failing".
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.metrics import multiprocess_dir

ERROR_KINDS = ("connect", "timeout", "http", "acl", "protocol", "acl_filtered")


class DiscoveryMetrics:
    """`gateway_discovery_errors_total{service,release,kind}` and `gateway_discovery_up`.

    Create one per registry (e.g. next to gateway.metrics.Metrics): prometheus_client
    refuses to register the same name twice.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        mode: dict[str, Any] = {"multiprocess_mode": "livemin"} if multiprocess_dir() else {}
        self.errors = Counter(
            "gateway_discovery_errors_total",
            "Failed or ACL-filtered Consul health queries, by kind.",
            ["service", "release", "kind"],
            registry=registry,
        )
        self.up = Gauge(
            "gateway_discovery_up",
            "1 while the release's Consul watch gets good answers, else 0.",
            ["service", "release"],
            registry=registry,
            **mode,
        )

    def watch_ok(self, releases: tuple[tuple[str, str], ...]) -> None:
        for svc, rel in releases:
            self.up.labels(svc, rel).set(1)

    def watch_error(self, releases: tuple[tuple[str, str], ...], kind: str) -> None:
        for svc, rel in releases:
            self.errors.labels(svc, rel, kind).inc()
            if kind != "acl_filtered":
                self.up.labels(svc, rel).set(0)
