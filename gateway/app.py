"""Wiring: one `Gateway` object owns the snapshot, engine, admin listener and store.

Why one owner: every long-lived resource is opened in `start()` and closed in
`stop()` in reverse order, so tests run the real thing in-process and the
CLI runs the same object per worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from typing import Any, Final

from aiohttp import ClientTimeout, web

from gateway import audit
from gateway.alerts import ALERT_TIMEOUT_S, AlertSender
from gateway.analysis_runner import AnalysisRunner
from gateway.config import Config, HostPort
from gateway.control import ControlPlane
from gateway.discovery import ConsulDiscovery, Pacing, consul_selectors
from gateway.discovery.metrics import DiscoveryMetrics
from gateway.engine.aio import AiohttpEngine
from gateway.engine.api import Engine, Limits
from gateway.guardian import Guardian, healthy_endpoints
from gateway.handler import ProxyHandler
from gateway.healthcheck import HealthChecker
from gateway.hooks import HookRunner
from gateway.metrics import Metrics
from gateway.readiness import unready_releases
from gateway.rollout_driver import RolloutDriver, default_analysis_gate, served_counter
from gateway.state import Snapshot, SnapshotHolder, build_snapshot
from gateway.telemetry import Telemetry
from gateway.upstream_config import engine_limits
from gateway.version import build_version

log = logging.getLogger("gateway")

# The kernel's accept queue for the data listener (capped by net.core.somaxconn): deep
# enough that a burst of new connections waits for the next accept batch instead of
# being refused while the loop is busy.
LISTEN_BACKLOG: Final = 4096
# How long finished exchanges wait in their tallies before metrics and the guard get
# them (ProxyHandler.flush). Every reader that needs them current flushes first (the
# /metrics scrape, the guard's tick, the rollout's served count, shutdown), so the
# delay is never seen; at c50 a flush per loop turn (~17 requests) cost ~2.5k
# instructions per request in prometheus_client's interpreted code, one per 50 ms
# costs a few dozen (benchmarks/RESULTS.md).
ACCOUNTING_INTERVAL: Final = 0.05
# On a clean stop, hook notifications and alerts still in flight may take the drain's
# time left, and at least this much: within the 5 s the master gives a worker past
# `drain_timeout` before it kills it (docs/operations.md "Drain").
STOP_GRACE_MIN_S: Final = 2.0


def bind_socket(
    addr: HostPort, *, reuse_port: bool = True, backlog: int = LISTEN_BACKLOG
) -> socket.socket:
    """A listening socket; SO_REUSEPORT lets N worker processes share the port."""
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port and hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((addr.host, addr.port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def site_port(site: web.BaseSite) -> int:
    """The port a started site is bound to (useful when configured as port 0)."""
    server = site._server
    socks = getattr(server, "sockets", None)
    assert socks
    return int(socks[0].getsockname()[1])


def make_engine(config: Config, handler: ProxyHandler) -> Engine:
    tls = config.tls.context if config.tls is not None else None  # README "TLS"
    if config.engine == "fast":
        try:
            from gateway.engine.fast import FastEngine
        except ImportError:  # pragma: no cover - fast engine always ships
            log.warning("fast engine unavailable; using the aiohttp engine")
        else:
            t = config.timeouts
            return FastEngine(
                handler,
                upstream_limits=Limits(*engine_limits(config)),
                keepalive_timeout=t.idle,
                header_timeout=t.header,
                body_timeout=t.body,
                body_min_rate=t.body_min_rate,
                upstream_idle_timeout=t.upstream_idle,
                tls=tls,
                park_after=t.idle_park,
            )
    return AiohttpEngine(
        handler,
        timeouts=config.timeouts,
        tls=tls,
        upstream_limits=Limits(*engine_limits(config)),
    )


class Gateway:
    """A running gateway process: data-path listener plus (unless a worker) admin."""

    def __init__(
        self,
        config: Config,
        *,
        admin: bool = True,
        data: bool = True,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
        version: str | None = None,
        telemetry: Telemetry | None = None,
        guard_interval: float = 1.0,
        rollout_interval: float = 1.0,
        consul_pacing: Pacing | None = None,
    ) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.version = version or build_version()
        self.metrics = metrics or Metrics()
        # OTEL_* / GATEWAY_ENV (README "Tracing & metrics"), or injected by tests;
        # owned and shut down here.
        self.telemetry = telemetry or Telemetry.from_env(os.environ, version=self.version)
        self.holder = SnapshotHolder(build_snapshot(config, rng=self.rng))
        # The control plane applies the state store, reloads and discovery to `holder`.
        self.control = ControlPlane(config, self.holder, rng=self.rng)
        # Audit trail beside the state store: every stored change, with who made it.
        self.auditor = audit.Auditor(audit.open_audit(config.state, config.consul))
        self.control.journal = self.auditor
        self.auditor.pending = lambda: self.control.doc.audit
        if admin:  # workers reload too, on the master's signal: audit the reload once
            self.control.reload_listeners.append(self._audit_reload)
        # Consul discovery (README "Consul discovery"): complete endpoint maps go to
        # the control plane, which merges them with static upstreams; a dead Consul keeps the last
        # good set.
        selectors = consul_selectors(config)
        self.discovery = (
            ConsulDiscovery(
                config.consul,
                selectors,
                self.control.set_discovered,
                rng=self.rng,
                metrics=DiscoveryMetrics(self.metrics.registry),
                pacing=consul_pacing
                or Pacing(rate=config.consul.watch_rate, burst=config.consul.watch_burst),
                # Consul calls traced by the aiohttp-client instrumentation
                # (README "Tracing & metrics");
                # same settings as discovery's default session.
                session_factory=lambda: self.telemetry.client_session(
                    timeout=ClientTimeout(total=None), trust_env=False
                ),
            )
            if selectors
            else None
        )
        # Guard (README "Guard and rollouts"): every data-path process watches its
        # share of traffic and rolls a bad release back through the control plane (so all processes
        # follow).
        self.guardian = Guardian(
            self.holder,
            self.control,
            self.metrics,
            interval=guard_interval,
            # alert webhooks are the gateway's own calls: traced like Consul's
            # (README "Tracing & metrics")
            session_factory=lambda: self.telemetry.client_session(
                timeout=ClientTimeout(total=ALERT_TIMEOUT_S)
            ),
        )
        # Prometheus analysis (README "Progressive delivery"): in the process that drives rollouts.
        self.analysis = (
            AnalysisRunner(
                self.control,
                self.metrics,
                session_factory=lambda: self.telemetry.client_session(
                    timeout=ClientTimeout(total=None), trust_env=False
                ),
            )
            if admin
            else None
        )
        self.handler = ProxyHandler(
            self.holder,
            metrics=self.metrics,
            version=self.version,
            ready=self.is_ready,
            access_log=config.access_log,
            rng=rng,  # None: the handler's trace ids come from OpenSSL (propagation.IdMint)
            tracer=self.telemetry.tracer,
            sampler=self.telemetry.sampler,
            observers=[self.guardian.guard],
            defer=lambda fn: asyncio.get_running_loop().call_later(ACCOUNTING_INTERVAL, fn),
        )
        self.guardian.flush = self.handler.flush
        # Rollout driver (README "Rollouts"): in the admin process only, it moves rollouts
        # through the control plane; hooks and alerts are its own background calls.
        self.driver = RolloutDriver(
            self.control,
            clock=time.time,
            healthy=self._healthy,
            served=served_counter(self.metrics, self.handler.flush),
            breaching=self.guardian.holds.breached,
            analysis=default_analysis_gate(self.control),
            hooks=HookRunner(
                lambda: self.telemetry.client_session(timeout=ClientTimeout(total=None))
            ),
            alerts=AlertSender(
                lambda: self.telemetry.client_session(timeout=ClientTimeout(total=5))
            ),
            interval=rollout_interval,
            # one lease per service for analysis and driving (gateway/lease.py)
            owner=self.analysis.owner if self.analysis is not None else None,
        )
        if self.analysis is not None:  # a rollout step's min_requests: the fleet's count
            self.analysis.fleet = self.driver.served_in_step
        # Active health checks and the ejected/returned log, per data-path process.
        self.health = HealthChecker(
            self.holder,
            clock=self.handler.clock,
            on_change=lambda: self._publish_endpoints(self.holder.current),
        )
        self.engine = make_engine(config, self.handler)
        # upstream.max_connections / queue_timeout follow a reload (docs/configuration.md).
        self.control.reload_listeners.append(
            lambda: self.engine.upstream_limits.set(*engine_limits(self.control.config))
        )
        self.control.reload_listeners.append(self._reload_tls)
        self.with_admin = admin
        self.with_data = data
        self.draining = False
        self.sock: socket.socket | None = None
        self.admin_runner: web.AppRunner | None = None
        self.admin_port: int | None = None
        self.port: int | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.holder.subscribe(self._publish_gauges)
        self._publish_gauges(self.holder.current)

    def _audit_reload(self) -> None:
        """A reload is a change too: audited by whoever asked (SIGHUP: `reload`)."""
        ctx = audit.current()
        actor = ctx.actor if ctx is not None else "reload"
        source = ctx.source if ctx is not None else "signal"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a reload called outside the event loop (tests): log only
            log.info("reload by %s not audited: no event loop", actor)
            return
        task = loop.create_task(
            self.auditor.record(
                action="reload",
                service=None,
                before=None,
                after={"config": self.control.config.source},
                state_version=self.holder.current.version,
                actor=actor,
                source=source,
            )
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _healthy(self, service: str, release: str) -> int:
        sv = self.holder.current.services.get(service)
        return 0 if sv is None else healthy_endpoints(sv, release, self.handler.clock())

    def _reload_tls(self) -> None:
        """A reload read the certificate files again: new connections get them (README "TLS")."""
        new = self.control.config.tls
        if (new is None) != (self.config.tls is None):
            log.warning("reload: tls: turning HTTPS on or off takes effect on restart")
        elif new is not None and new.context is not None:
            self.engine.set_tls(new.context)
            log.info("reload: tls: new connections use %s", new.cert)

    def is_ready(self) -> bool:
        """Ready while no release with weight > 0 lacks endpoints (gateway/readiness.py)."""
        return not unready_releases(self.holder.current)

    def begin_drain(self) -> None:
        """SIGTERM: `/healthz` on both listeners answers 503 draining from now on."""
        self.draining = True
        self.handler.draining = True

    def _publish_gauges(self, snap: Snapshot) -> None:
        self.metrics.set_weights(
            {n: {r: rv.share for r, rv in sv.releases.items()} for n, sv in snap.services.items()}
        )
        self._publish_endpoints(snap)
        self.metrics.state_version.set(snap.version)
        for name in snap.services:
            r = self.control.rollout_of(name)
            if r is not None:
                self.metrics.set_rollout_state(name, r.state)

    def _publish_endpoints(self, snap: Snapshot) -> None:
        # gateway_upstream_endpoints counts the endpoints that can serve: ejected ones do not.
        now = self.handler.clock()
        self.metrics.set_endpoints(
            {
                (n, r): rv.pool.healthy(now)
                for n, sv in snap.services.items()
                for r, rv in sv.releases.items()
            }
        )

    async def start(self, sock: socket.socket | None = None) -> None:
        # Store first: a corrupt state file or an unsafe admin listener refuses to start.
        await self.control.start(admin=self.with_admin, data=self.with_data)
        if self.with_admin:  # a copy to the trail a crash cut short (gateway/audit.py)
            await self.auditor.copy(self.control.doc.audit)
        if self.discovery is not None:
            await self.discovery.start()
        if self.with_data:
            self.sock = sock or bind_socket(self.config.listen, reuse_port=True)
            self.port = self.sock.getsockname()[1]
            await self.engine.serve(self.sock)
            await self.guardian.start()
            await self.health.start()
        if self.analysis is not None:
            await self.analysis.start()
        if self.with_admin:
            # One process steps rollouts forward: the admin one (single process or master).
            await self.driver.start()
            from gateway.admin import build_admin_app

            app = build_admin_app(self)
            self.admin_runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await self.admin_runner.setup()
            a = self.config.admin.listen
            site = web.TCPSite(self.admin_runner, a.host, a.port, reuse_address=True)
            await site.start()
            self.admin_port = site_port(site)
        log.info("gateway %s %s", self.version, self.listening())

    def listening(self) -> str:
        """Where this process serves, for the startup log: the data and/or admin address.

        Why both: a newcomer needs the admin address to use the admin API, and a
        `--workers N` master serves only the admin listener (its workers log the data one).
        """
        parts = []
        if self.with_data and self.port is not None:
            data = HostPort(self.config.listen.host, self.port)
            parts.append(f"listening on {data} (engine {self.config.engine})")
        if self.with_admin and self.admin_port is not None:
            admin = HostPort(self.config.admin.listen.host, self.admin_port)
            parts.append(f"admin API on http://{admin}")
        return ", ".join(parts) or "serving nothing"

    def request_reload(self) -> None:
        """SIGHUP: re-read and validate the config; on errors keep the running one.

        README "Running it".
        """
        log.info("reload requested")
        self.control.reload()

    async def stop(self, drain_timeout: float | None = None) -> None:
        d = self.config.drain_timeout if drain_timeout is None else drain_timeout
        loop = asyncio.get_running_loop()
        until = loop.time() + d

        def left() -> float:
            """The drain's time still left; hook calls and alerts in flight get at least
            STOP_GRACE_MIN_S even after a drain that took it all (docs/operations.md "Drain")."""
            return max(STOP_GRACE_MIN_S, until - loop.time())

        self.begin_drain()
        if self.with_data:
            await self.health.stop()
            # the guard stops judging at once; its alerts go out while requests finish
            await asyncio.gather(self.guardian.stop(left()), self.engine.shutdown(d))
            self.handler.flush()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
            self.admin_runner = None
        if self.with_admin:
            await self.driver.stop(left())
        if self.discovery is not None:
            await self.discovery.stop()
        if self.analysis is not None:
            await self.analysis.stop(left())
        await self.control.stop()
        for task in list(self._background):
            await task
        await self.auditor.store.close()
        # Flushing exporters blocks (OTLP over HTTP), so keep it off the event loop.
        await asyncio.to_thread(self.telemetry.shutdown)
