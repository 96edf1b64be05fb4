"""Runs the guard: evaluates every second and rolls a bad release back (SPEC §7).

Why through the state store: a trip is an ordinary weight change (release →
0) written by the control plane, so every worker and replica follows it and a
restart keeps it; the alert is one structured log line, a counter and an
optional webhook POST.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from gateway.control import ControlPlane
from gateway.guard import Guard, Trip
from gateway.metrics import Metrics
from gateway.rollout import CIRCUIT_BREAK, ROLLED_BACK
from gateway.state import Snapshot, SnapshotHolder

log = logging.getLogger("gateway.guard")


def alert_payload(trip: Trip, state_version: int, now: float) -> dict[str, Any]:
    """The JSON alert: what tripped, by how much, and what the gateway did."""
    return {
        "alert": "GrayReleaseRolledBack",
        "service": trip.service,
        "release": trip.release,
        "reason": trip.reason,
        "value": round(trip.value, 6),
        "threshold": trip.threshold,
        "window": {
            "requests": trip.stats.requests,
            "failures": trip.stats.failures,
            "error_rate": round(trip.stats.error_rate, 6),
            "p95_ms": trip.stats.p95_ms,
            "baseline_p95_ms": trip.baseline_p95_ms,
        },
        "action": {"weight": 0, "rollout_state": ROLLED_BACK, "via": CIRCUIT_BREAK},
        "state_version": state_version,
        "time": now,
    }


class Guardian:
    """One per data-path process: owns the guard windows and the evaluation loop."""

    def __init__(
        self,
        holder: SnapshotHolder,
        control: ControlPlane,
        metrics: Metrics,
        *,
        interval: float = 1.0,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.holder = holder
        self.control = control
        self.metrics = metrics
        self.interval = interval
        self.session_factory = session_factory or (
            lambda: aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        )
        self.wall = wall
        self.guard = Guard(clock)
        self._task: asyncio.Task[None] | None = None
        self.flush: Callable[[], None] | None = None  # the handler's batched accounting
        self._session: aiohttp.ClientSession | None = None
        self._configure(holder.current)
        holder.subscribe(self._configure)

    def _configure(self, snap: Snapshot) -> None:
        self.guard.configure({n: sv.guard.window for n, sv in snap.services.items()})

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="gateway-guard")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # the guard must outlive one bad evaluation
                log.exception("guard evaluation failed")

    async def check(self) -> list[Trip]:
        """Evaluate every service now; roll back each release that trips."""
        if self.flush is not None:
            self.flush()
        snap = self.holder.current
        tripped: list[Trip] = []
        for name, sv in snap.services.items():
            weights = {r: rv.raw_weight for r, rv in sv.releases.items()}
            for trip in self.guard.evaluate(name, sv.cfg.baseline, weights, sv.guard):
                await self._roll_back(trip, sv.guard.alert_webhook)
                tripped.append(trip)
        return tripped

    async def _roll_back(self, trip: Trip, webhook: str | None) -> None:
        self.metrics.set_rollout_state(trip.service, CIRCUIT_BREAK)
        doc = await self.control.trip(trip.service, trip.release, trip.reason)
        self.guard.reset(trip.service, trip.release)
        self.metrics.set_rollout_state(trip.service, ROLLED_BACK)
        self.metrics.guard_trips.labels(trip.service, trip.release, trip.reason).inc()
        payload = alert_payload(trip, doc.version, self.wall())
        log.error(json.dumps(payload, separators=(",", ":")))
        if webhook:
            await self._post(webhook, payload)

    async def _post(self, url: str, payload: dict[str, Any]) -> None:
        if self._session is None:
            self._session = self.session_factory()
        try:
            async with self._session.post(url, json=payload) as r:
                if r.status >= 300:
                    log.warning("alert webhook %s answered %d", url, r.status)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("alert webhook %s failed: %s", url, e)
