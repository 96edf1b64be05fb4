"""Runs the guard: evaluates the rules every second and acts (README.md "Guard rules").

Why through the state store: a rollback is an ordinary weight change
(release → 0, rollout `CircuitBreak`) and a pause an ordinary rollout move,
written by the control plane, so every worker and replica follows and a
restart keeps it. Every action is one structured log line, a
`gateway_guard_trips_total` count, an alert to every target (queued, never
awaited) and an audit record (actor `guard`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from gateway import audit, periodic, rules
from gateway import rollout as rollout_mod
from gateway.alerts import ALERT_TIMEOUT_S, AlertSender, targets_for
from gateway.control import ControlPlane
from gateway.errors import Conflict
from gateway.guard import Guard, WindowStats
from gateway.metrics import Metrics
from gateway.state import ServiceView, Snapshot, SnapshotHolder

log = logging.getLogger("gateway.guard")

_ALERT_NAMES = {
    rules.ROLLBACK: "GrayReleaseRolledBack",
    rules.PAUSE: "GrayReleasePaused",
    "resume": "GrayReleaseResumed",
    "alert": "PromotedReleaseBreach",
}


def window_figures(stats: WindowStats, baseline: WindowStats) -> dict[str, Any]:
    """The rule window's figures, as the `window` block of the JSON alert."""
    return {
        "requests": stats.requests,
        "failures": stats.failures,
        "error_rate": round(stats.error_rate, 6),
        "p95_ms": stats.p95_ms,
        "p99_ms": stats.p99_ms,
        "baseline_p95_ms": baseline.p95_ms,
    }


def alert_payload(
    v: rules.Verdict,
    kind: str,
    rollout_state: str | None,
    state_version: int,
    now: float,
    window: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON alert: what breached, by how much, for how long, and what the gateway did."""
    return {
        "alert": _ALERT_NAMES[kind],
        "service": v.service,
        "release": v.release,
        "reason": v.rule.metric,
        "rule": v.rule.key,
        "value": None if v.value is None else round(v.value, 6),
        "threshold": v.rule.threshold,
        "for_s": v.rule.hold,
        "held_s": round(v.held, 3),
        "window_s": v.rule.window,
        "window": window,
        "action": {
            "kind": kind,
            "weight": 0 if kind == rules.ROLLBACK else None,
            "rollout_state": rollout_state,
        },
        "state_version": state_version,
        "time": now,
    }


def healthy_endpoints(sv: ServiceView, release: str, now: float) -> int:
    """Endpoints of the release that passive (or active) health has not taken out."""
    rv = sv.releases.get(release)
    if rv is None:
        return 0
    return sum(1 for s in rv.pool.slots if s.down_until <= now)


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
        health_clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.holder = holder
        self.control = control
        self.metrics = metrics
        self.interval = interval
        self.clock = clock
        self.wall = wall
        self.health_clock = health_clock  # the handler's clock for ejection deadlines
        self.guard = Guard(clock)
        self.holds = rules.Holds()
        self.alerts = AlertSender(
            session_factory
            or (lambda: aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ALERT_TIMEOUT_S)))
        )
        self._task: asyncio.Task[None] | None = None
        self.flush: Callable[[], None] | None = None  # the handler's batched accounting
        self._idle: set[tuple[str, str]] = set()  # releases last seen at weight 0
        self._alerted: set[tuple[str, str, str]] = set()  # promoted releases' alerted rules
        self._rules: dict[str, tuple[rules.Rule, ...]] = {}
        self._configure(holder.current)
        holder.subscribe(self._configure)

    def _configure(self, snap: Snapshot) -> None:
        self._rules = {n: rules.rules_of(sv.guard) for n, sv in snap.services.items()}
        # One window per service, as long as its longest rule's: shorter rules read part of it.
        self.guard.configure(
            {
                n: max([sv.guard.window, *(r.window for r in self._rules[n])])
                for n, sv in snap.services.items()
            }
        )

    async def start(self) -> None:
        self.alerts.start()
        self._task = asyncio.create_task(self._loop(), name="gateway-guard")

    async def stop(self, grace: float = 0.0) -> None:
        """Stop evaluating; alerts not yet sent get up to `grace` seconds."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.alerts.stop(grace)

    async def _loop(self) -> None:
        await periodic.every(lambda: self.interval, self.check, "guard evaluation")

    async def check(self) -> list[rules.Verdict]:
        """Evaluate every rule of every guarded release now; act on what is due."""
        if self.flush is not None:
            self.flush()
        snap = self.holder.current
        now = self.clock()
        health_now = self.health_clock()
        acted: list[rules.Verdict] = []
        for name, sv in snap.services.items():
            if not sv.guard.enabled:
                continue
            ro = self.control.rollout_of(name)
            base = sv.cfg.baseline
            for rel, rv in sv.releases.items():
                if rel == base:
                    continue
                key = (name, rel)
                if rv.raw_weight <= 0:
                    self._idle.add(key)
                    continue
                if key in self._idle:  # back from weight 0 (a retry): start afresh
                    self._idle.discard(key)
                    self.guard.reset(name, rel)
                    self.holds.forget(name, rel)
                mine = ro if ro is not None and ro.release == rel else None
                if mine is not None and mine.state == rollout_mod.CIRCUIT_BREAK:
                    continue  # waiting for confirm, retry or the confirm timeout
                verdicts = rules.evaluate(
                    name,
                    rel,
                    self._rules.get(name, ()),
                    self._reader(name, rel),
                    self._reader(name, base),
                    healthy_endpoints(sv, rel, health_now),
                    sv.guard.min_requests,
                    self.holds,
                    now,
                )
                if mine is not None and mine.state == rollout_mod.PROMOTED:
                    self._alert_only(sv, verdicts)  # promoted: it alerts, it no longer acts
                    continue
                done = await self._act(sv, mine, verdicts)
                if done is not None:
                    acted.append(done)
        return acted

    def _alert_only(self, sv: ServiceView, verdicts: list[rules.Verdict]) -> None:
        """One alert per breach that lasted its `for`; again only after it cleared."""
        for v in verdicts:
            key = (v.service, v.release, v.rule.key)
            if not v.breached:
                self._alerted.discard(key)
            elif v.due and key not in self._alerted:
                self._alerted.add(key)
                version = self.holder.current.version
                self._announce(sv, v, "alert", rollout_mod.PROMOTED, version, self._figures(sv, v))

    def _figures(self, sv: ServiceView, v: rules.Verdict) -> dict[str, Any]:
        read = self._reader(v.service, v.release)
        return window_figures(
            read(v.rule.window), self._reader(v.service, sv.cfg.baseline)(v.rule.window)
        )

    def _reader(self, service: str, release: str) -> Callable[[float], WindowStats]:
        return lambda window: self.guard.stats(service, release, int(math.ceil(window)))

    async def _act(
        self, sv: ServiceView, ro: rollout_mod.Rollout | None, verdicts: list[rules.Verdict]
    ) -> rules.Verdict | None:
        v = rules.first_due(verdicts, rules.ROLLBACK)
        if v is not None:
            return v if await self._roll_back(sv, v) else None
        if ro is None:
            return None
        v = rules.first_due(verdicts, rules.PAUSE)
        if v is not None and ro.state == rollout_mod.PROGRESSING:
            reason = f"guard: {v.rule.describe(v.value)}"
            if await self._move(
                sv,
                v,
                rules.PAUSE,
                reason,
                lambda r: rollout_mod.guard_pause(r, self.wall(), reason),
            ):
                return v
            return None
        if (
            ro.state == rollout_mod.PAUSED
            and ro.paused_by == "guard"
            and rules.pauses_clear(verdicts)
        ):
            # (no pause rule left after a reload: nothing holds it any more)
            held = next((x for x in verdicts if x.rule.action == rules.PAUSE), None) or (
                verdicts[0] if verdicts else None
            )
            if held is not None and await self._move(
                sv,
                held,
                "resume",
                "guard: pause rules held again",
                lambda r: rollout_mod.guard_resume(r, self.wall()),
            ):
                return held
        return None

    async def _move(
        self,
        sv: ServiceView,
        v: rules.Verdict,
        kind: str,
        reason: str,
        fn: Callable[[rollout_mod.Rollout], rollout_mod.Rollout],
    ) -> bool:
        with audit.acting("guard", "guard", f"guard.{kind}", reason):
            try:
                doc = await self.control.transition(sv.name, fn)
            except Conflict:  # another worker moved it first
                return False
        r = self.control.rollout_of(sv.name)
        self._announce(sv, v, kind, r.state if r else None, doc.version, self._figures(sv, v))
        return True

    async def _roll_back(self, sv: ServiceView, v: rules.Verdict) -> bool:
        reason = v.rule.metric
        with audit.acting("guard", "guard", "guard.rollback", f"guard: {v.rule.describe(v.value)}"):
            try:
                doc = await self.control.trip(v.service, v.release, reason, now=self.wall())
            except Conflict:  # another worker or replica acted first: one action, one alert
                return False
        self.metrics.set_rollout_state(v.service, rollout_mod.CIRCUIT_BREAK)
        figures = self._figures(sv, v)  # before the reset below empties the window
        self.guard.reset(v.service, v.release)
        self.holds.forget(v.service, v.release)
        self._announce(sv, v, rules.ROLLBACK, rollout_mod.CIRCUIT_BREAK, doc.version, figures)
        return True

    def _announce(
        self,
        sv: ServiceView,
        v: rules.Verdict,
        kind: str,
        state: str | None,
        version: int,
        window: dict[str, Any],
    ) -> None:
        if kind not in ("resume", "alert"):  # actions count; notices do not
            self.metrics.guard_trips.labels(v.service, v.release, v.rule.metric).inc()
        payload = alert_payload(v, kind, state, version, self.wall(), window)
        line = json.dumps(payload, separators=(",", ":"))
        if kind == rules.ROLLBACK:
            log.error(line)
        else:
            log.warning(line)
        cfg = self.control.config
        self.alerts.send(targets_for(cfg.alerts, sv.guard.alerts, sv.guard.alert_webhook), payload)
