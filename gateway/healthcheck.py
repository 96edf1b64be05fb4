"""Active health checks, and one log line when an endpoint is ejected or returns.

Why active checks beside passive health (README.md, "Endpoint health"): passive
health only learns that an endpoint died from the requests that fail on it; a
probe of `health_check.path` every `interval` takes a dead or draining endpoint
out before clients pay for it, and brings it back only after `healthy` passes in
a row (nginx's `health_check`, Envoy's `health_checks`). Verdicts go into the
endpoint's shared `balancer.Slot`, so every snapshot's pool sees them at once.

Why a watcher for the log: ejections end by the clock, with no event to hook, so
a one-second scan of the live endpoint state reports each change once, capped
per scan so a mass ejection cannot flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from gateway.config import HealthCheckConfig
from gateway.state import Snapshot, SnapshotHolder
from gateway.tls_config import UpstreamTLS

log = logging.getLogger("gateway.health")

TargetKey = tuple[str, str, str]  # (service, release, host:port)


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    cfg: HealthCheckConfig
    tls: UpstreamTLS | None = None  # an https:// endpoint is checked over TLS (README "TLS")


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(trust_env=False, auto_decompress=False)


class HealthChecker:
    """Probes every endpoint of releases with `health_check`; logs endpoint state changes."""

    def __init__(
        self,
        holder: SnapshotHolder,
        *,
        clock: Callable[[], float] = time.perf_counter,
        session_factory: Callable[[], aiohttp.ClientSession] = _session,
        report_interval: float = 1.0,
        log_limit: int = 10,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.holder = holder
        self.on_change = on_change  # after a scan that saw an endpoint leave or return
        self.clock = clock
        self.report_interval = report_interval
        self.log_limit = log_limit
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._probes: dict[TargetKey, tuple[_Target, asyncio.Task[None]]] = {}
        self._reporter: asyncio.Task[None] | None = None
        self._down: dict[TargetKey, bool] = {}
        holder.subscribe(self._on_swap)

    async def start(self) -> None:
        if self._session is not None:
            return
        self._session = self._session_factory()
        self._reconcile(self.holder.current)
        self._reporter = asyncio.create_task(self._report_loop(), name="gateway-health-report")

    async def stop(self) -> None:
        tasks = [t for _, t in self._probes.values()]
        if self._reporter is not None:
            tasks.append(self._reporter)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._probes.clear()
        self._reporter = None
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # ------------------------------------------------------------------ probes
    def _on_swap(self, snap: Snapshot) -> None:
        if self._session is not None:
            self._reconcile(snap)

    @staticmethod
    def targets(snap: Snapshot) -> dict[TargetKey, _Target]:
        """Every endpoint that has an active check in `snap`."""
        out: dict[TargetKey, _Target] = {}
        for name, sv in snap.services.items():
            for rel, rv in sv.releases.items():
                hc = sv.cfg.releases[rel].health_check
                if hc is None:
                    continue
                for s in rv.pool.slots:
                    tls = rv.tls if s.endpoint.tls else None
                    out[(name, rel, s.endpoint.address)] = _Target(s.host, s.port, hc, tls)
        return out

    def _reconcile(self, snap: Snapshot) -> None:
        want = self.targets(snap)
        for key in [k for k, (t, _) in self._probes.items() if want.get(k) != t]:
            self._probes.pop(key)[1].cancel()
        for key, target in want.items():
            if key not in self._probes:
                task = asyncio.create_task(self._probe_loop(key, target), name=f"health {key}")
                self._probes[key] = (target, task)

    async def _probe_loop(self, key: TargetKey, t: _Target) -> None:
        passes = fails = 0
        while True:
            ok = await self.probe(t)
            passes, fails = (passes + 1, 0) if ok else (0, fails + 1)
            group = self.holder.current.slots.groups.get((key[0], key[1]))
            slot = group.by_address.get(key[2]) if group is not None else None
            if group is not None and slot is not None:
                if not ok and fails >= t.cfg.unhealthy and not slot.checked_down:
                    group.set_checked(slot, False)
                elif ok and passes >= t.cfg.healthy and slot.checked_down:
                    group.set_checked(slot, True)
            await asyncio.sleep(t.cfg.interval)

    async def probe(self, t: _Target) -> bool:
        """One check: any 2xx or 3xx answer within the timeout passes."""
        assert self._session is not None
        host = f"[{t.host}]" if ":" in t.host else t.host
        tls = t.tls
        url = f"{'https' if tls else 'http'}://{host}:{t.port}{t.cfg.path}"
        try:
            async with asyncio.timeout(t.cfg.timeout):
                async with self._session.get(
                    url,
                    allow_redirects=False,
                    headers={"User-Agent": "gray-gateway-health"},
                    ssl=tls.context if tls is not None and tls.context is not None else True,
                    server_hostname=tls.server_name if tls is not None else None,
                ) as r:
                    await r.read()
                    return 200 <= r.status < 400
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    # ------------------------------------------------------------------ the log
    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.report_interval)
            try:
                self.report()
            except Exception:  # a failed scan must never stop the watcher
                log.exception("endpoint state scan failed")

    def report(self) -> list[str]:
        """Log each endpoint that was ejected or returned since the last call; return the lines."""
        now = self.clock()
        seen: dict[TargetKey, bool] = {}
        lines: list[str] = []
        for (svc, rel), group in self.holder.current.slots.groups.items():
            for addr, s in group.by_address.items():
                key = (svc, rel, addr)
                down = s.down_until > now
                seen[key] = down
                if down == self._down.get(key, False):
                    continue
                if not down:
                    lines.append(f"endpoint {addr} of {svc}/{rel} returned to service")
                elif s.checked_down:
                    lines.append(f"endpoint {addr} of {svc}/{rel} ejected: health check failing")
                else:
                    lines.append(
                        f"endpoint {addr} of {svc}/{rel} ejected for "
                        f"{s.down_until - now:.0f}s: connect failures, timeouts or 5xx in a row"
                    )
        self._down = seen
        for line in lines[: self.log_limit]:
            log.warning(line)
        if len(lines) > self.log_limit:
            log.warning("... and %d more endpoint state changes", len(lines) - self.log_limit)
        if lines and self.on_change is not None:
            self.on_change()
        return lines
