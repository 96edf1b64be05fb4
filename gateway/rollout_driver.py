"""Drives rollouts forward: pre-check, step gates, hooks, confirm timeout, progress deadline.

Why apart from the control plane: the control plane only validates and stores
changes; this module decides *when* a rollout moves (README "Rollouts"). It
reads time from an injected clock, gathers what it needs to know about a
release (healthy endpoints, requests served in the step, guard breaches,
analysis, hook answers) into `rollout.Facts`, lets the pure
`rollout.drive` decide, and writes the result through the control plane's
`transition` (CAS on the state store, so every worker and replica follows and
one audit record names actor `rollout`). It runs in the one process that
serves the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from gateway import audit, periodic
from gateway import rollout as R
from gateway.alerts import AlertSender, targets_for
from gateway.errors import Conflict
from gateway.hooks import STEP_FAILURE_LIMIT, HookRunner, payload
from gateway.rollout_config import RolloutConfig
from gateway.store import StateDoc

log = logging.getLogger("gateway.rollout")

# (service, rollout) -> None when every analysis metric has a counted success in the
# step, else why the step waits (gateway/analysis.py's `step_gate`, when present).
AnalysisGate = Callable[[str, R.Rollout, float], str | None]


class ControlLike(Protocol):
    """The few control-plane methods the driver needs (gateway/control.py)."""

    @property
    def config(self) -> Any: ...

    @property
    def doc(self) -> StateDoc: ...

    def rollout_of(self, service: str) -> R.Rollout | None: ...

    def baseline_of(self, service: str) -> str: ...

    async def transition(self, service: str, fn: Callable[[R.Rollout], R.Rollout]) -> StateDoc: ...


StepKey = tuple[str, str, int, int]


def default_analysis_gate(control: Any) -> AnalysisGate | None:
    """gateway/analysis.py's `step_gate` over the control plane's stored results, when that
    module is there (README "Progressive delivery"); else no analysis gate.

    Every configured metric that is not `observe` needs a counted success in the step.
    """
    try:
        from gateway import analysis  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    gate: Any = getattr(analysis, "step_gate", None)
    if not callable(gate):
        return None

    def check(service: str, r: R.Rollout, now: float) -> str | None:
        specs = getattr(getattr(control.config, "analysis", None), "metrics_for", None)
        required = [m.name for m in specs(service) if m.action != "observe"] if specs else []
        if not required:
            return None
        results = getattr(control, "analysis_of", lambda s: None)(service)
        why: str | None = gate(results, r.step_started, r.release, required)
        return why

    return check


class RolloutDriver:
    """Steps every service's rollout once per `interval`; see the module docstring."""

    def __init__(
        self,
        control: ControlLike,
        *,
        clock: Callable[[], float] = time.time,
        healthy: Callable[[str, str], int] = lambda s, r: 0,
        served: Callable[[str, str], int] = lambda s, r: 0,
        breaching: Callable[[str, str], bool] = lambda s, r: False,
        analysis: AnalysisGate | None = None,
        hooks: HookRunner | None = None,
        alerts: AlertSender | None = None,
        interval: float = 1.0,
    ) -> None:
        self.control = control
        self.clock = clock
        self.healthy = healthy
        self.served = served
        self.breaching = breaching
        self.analysis = analysis
        self.hooks = hooks or HookRunner()
        self.alerts = alerts
        self.interval = interval
        self._base: dict[StepKey, int] = {}  # served count at step start
        self._seen: dict[str, tuple[str, str, int]] = {}  # service -> (release, state, step)
        self._epoch: dict[str, int] = {}  # bumped when a step begins (a new step, a retry)
        self._task: asyncio.Task[None] | None = None

    def _step_key(self, service: str, r: R.Rollout) -> StepKey:
        """One step of one rollout as this driver saw it begin: hook answers and the
        served count belong to it (a pause and resume keep it; a retry starts a new one)."""
        return (service, r.release, r.step, self._epoch.get(service, 0))

    @property
    def limits(self) -> RolloutConfig:
        cfg: RolloutConfig = self.control.config.rollout
        return cfg

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        for service in self.control.config.services:  # what is stored now is not news
            r = self.control.rollout_of(service)
            if r is not None:
                self._seen[service] = (r.release, r.state, r.step)
        if self.alerts is not None:
            self.alerts.start()
        self._task = asyncio.create_task(self._run(), name="gateway-rollouts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.hooks.stop()
        if self.alerts is not None:
            await self.alerts.stop()

    async def _run(self) -> None:
        await periodic.every(lambda: self.interval, self._step, "rollout step")

    async def _step(self) -> None:
        for service in await self.advance():
            r = self.control.rollout_of(service)
            log.info("rollout of %s: %s", service, r.to_json() if r else None)

    # ------------------------------------------------------------------ facts
    def _served_in_step(self, service: str, r: R.Rollout) -> int:
        count = self.served(service, r.release)
        return count - self._base.setdefault(self._step_key(service, r), count)

    def facts(self, service: str, r: R.Rollout, now: float) -> R.Facts:
        """Everything `rollout.drive` needs about the release, except the confirm hooks."""
        svc = self.control.config.services[service]
        g = svc.guard
        key = self._step_key(service, r)
        body = self._body(service, r, now)
        hooks: str | None = None
        analysis: str | None = None
        if r.state == R.PENDING:
            healthy = self.healthy(service, r.release)
            if healthy >= g.min_endpoints:
                hooks = self.hooks.gate(self.limits.hooks("pre_rollout"), key, body)
            return R.Facts(healthy=healthy, min_endpoints=g.min_endpoints, hooks=hooks)
        if r.state not in (R.PROGRESSING, R.PAUSED):
            return R.Facts()
        step_hooks = self.limits.hooks("step")
        if step_hooks:
            hooks = self.hooks.gate(step_hooks, key, body, STEP_FAILURE_LIMIT)
        if self.analysis is not None:
            try:
                analysis = self.analysis(service, r, now)
            except Exception:  # analysis is another module's: a bug there holds, never advances
                log.exception("analysis step gate failed for %s", service)
                analysis = "analysis: gate failed (see the log)"
        return R.Facts(
            healthy=self.healthy(service, r.release),
            min_endpoints=g.min_endpoints,
            served=self._served_in_step(service, r),
            min_requests=g.min_requests if g.enabled else 0,
            breaching=self.breaching(service, r.release),
            analysis=analysis,
            hooks=hooks,
        )

    def _confirm(self, service: str, r: R.Rollout, now: float, kind: str) -> str | None:
        return self.hooks.gate(
            self.limits.hooks(kind),
            ("confirm", *self._step_key(service, r)),
            self._body(service, r, now),
        )

    def _body(self, service: str, r: R.Rollout, now: float) -> Callable[[Any], Any]:
        baseline = self.control.baseline_of(service)
        return lambda h: payload(h, service, r.to_json(), baseline, now)

    def decide(self, service: str, r: R.Rollout, now: float) -> tuple[R.Rollout, str]:
        """The rollout's next state and the audit action naming why (pure but for hooks)."""
        lim = self.limits
        if R.overdue(r, now, lim.progress_deadline):
            nxt = R.miss_deadline(r, now, lim.progress_deadline_action, lim.confirm_timeout)
            return nxt, "rollout.progress_deadline"
        f = self.facts(service, r, now)
        if r.state == R.PROGRESSING:
            worst = self.hooks.failures(lim.hooks("step"), self._step_key(service, r))
            if worst is not None and worst[1] >= STEP_FAILURE_LIMIT:
                reason = f"hook:{worst[0]} failed {worst[1]} times in a row"
                return R.circuit_break(r, reason, now, lim.confirm_timeout), "rollout.hook_failed"
        nxt = R.drive(r, now, f)
        last = r.step + 1 >= len(r.steps) if r.step >= 0 else False
        moving = nxt.state == R.PROMOTED or (nxt.step != r.step and r.state == R.PROGRESSING)
        if moving or (r.state == R.PAUSED and r.paused_by == "hook"):
            final = nxt.state == R.PROMOTED or (r.state == R.PAUSED and last)
            kind = "confirm_promotion" if final else "confirm_step"
            waiting = self._confirm(service, r, now, kind)
            if waiting is not None:
                f = (
                    replace(f, confirm_promotion=waiting)
                    if final
                    else replace(f, confirm_step=waiting)
                )
                nxt = R.drive(r, now, f)
        if r.state == R.CIRCUIT_BREAK and nxt.state == R.ROLLED_BACK:
            return nxt, "rollout.confirm_timeout"
        if r.state == R.PENDING and nxt.state == R.PROGRESSING:
            return nxt, "rollout.precheck"
        if (nxt.state, nxt.step) == (r.state, r.step):
            return nxt, "rollout.wait"  # only the reason changed: why it holds
        return nxt, "rollout.step"

    # ------------------------------------------------------------------ acting
    def admit(self, service: str, now: float) -> Callable[[R.Rollout], R.Rollout]:
        """For `POST .../rollout`: a new plan starts at once when its pre-check passes."""

        def fn(r: R.Rollout) -> R.Rollout:
            r = R.pending(r, now)
            self._announce(service, r, now)
            nxt, _ = self.decide(service, r, now)
            self._announce(service, nxt, now)
            return nxt

        return fn

    async def advance(self, now: float | None = None) -> list[str]:
        """One pass over every rollout; returns the services whose rollout moved."""
        now = self.clock() if now is None else now
        moved: list[str] = []
        live: set[StepKey] = set()
        for service in list(self.control.doc.services):
            if service not in self.control.config.services:
                continue
            r = self.control.rollout_of(service)
            if r is None:
                continue
            self._announce(service, r, now)
            nxt, action = self.decide(service, r, now)
            live.add(self._step_key(service, r))
            if nxt == r:
                continue
            await self._write(service, r, nxt, action, now)
            moved.append(service)
            r2 = self.control.rollout_of(service)
            if r2 is not None:
                self._announce(service, r2, now)
                live.add(self._step_key(service, r2))
        self.hooks.forget(lambda k: _gate_live(k, live))
        for k in [k for k in self._base if k not in live]:
            del self._base[k]
        return moved

    async def _write(
        self, service: str, cur: R.Rollout, nxt: R.Rollout, action: str, now: float
    ) -> None:
        def fn(stored: R.Rollout) -> R.Rollout:
            if stored == cur:
                return nxt
            # Another replica or an operator moved it since we looked: this move is theirs
            # now (one write, one audit record, one alert); the next tick decides afresh.
            raise Conflict(f"the rollout of {service!r} changed meanwhile", "state")

        with audit.acting("rollout", "rollout", action, nxt.reason):
            try:
                await self.control.transition(service, fn)
            except Conflict:
                return
        if action == "rollout.progress_deadline":
            self._alert(service, cur, nxt, now)

    def _alert(self, service: str, cur: R.Rollout, nxt: R.Rollout, now: float) -> None:
        alert = {
            "alert": "RolloutProgressDeadline",
            "service": service,
            "release": cur.release,
            "reason": "progress_deadline",
            "value": round(now - (cur.held_since or now), 3),
            "threshold": self.limits.progress_deadline,
            "action": {
                "kind": self.limits.progress_deadline_action,
                "weight": None if nxt.state in (R.PENDING, R.PAUSED) else 0,
                "rollout_state": nxt.state,
            },
            "state_version": self.control.doc.version,
            "time": now,
            "detail": nxt.reason,
        }
        log.warning(json.dumps(alert, separators=(",", ":")))
        if self.alerts is not None:
            svc = self.control.config.services[service]
            g = svc.guard
            self.alerts.send(
                targets_for(self.control.config.alerts, g.alerts, g.alert_webhook), alert
            )

    def _announce(self, service: str, r: R.Rollout, now: float) -> None:
        """Notification hooks on every change of state or step, whoever made it."""
        seen = (r.release, r.state, r.step)
        before = self._seen.get(service)
        if before == seen:
            return
        self._seen[service] = seen
        if (
            before is None
            or before[0] != r.release
            or before[2] != r.step
            or before[1]
            in (
                R.CIRCUIT_BREAK,
                R.ROLLED_BACK,
                R.PROMOTED,
            )
        ):  # a step begins: its served count and hook answers start afresh
            self._epoch[service] = self._epoch.get(service, 0) + 1
            if r.state in (R.PROGRESSING, R.PAUSED):
                self._base[self._step_key(service, r)] = self.served(service, r.release)
        if before is None and r.state in (R.PROMOTED, R.ROLLED_BACK):
            return  # an old rollout this process learns about: no news
        lim = self.limits
        body = self._body(service, r, now)
        event = f"{r.release}: {before[1] if before else '-'} -> {r.state} at step {r.step}"
        self.hooks.notify(
            lim.hooks("event"),
            lambda h: {**body(h), "metadata": {"hook": h.name, "eventMessage": event}},
        )
        was = before[1] if before is not None else None
        if r.state == R.PROMOTED and was != R.PROMOTED:
            self.hooks.notify(lim.hooks("post_rollout"), body)
        if r.state in (R.CIRCUIT_BREAK, R.ROLLED_BACK) and was not in (
            R.CIRCUIT_BREAK,
            R.ROLLED_BACK,
        ):
            self.hooks.notify(lim.hooks("rollback"), body)


def _gate_live(key: object, live: set[StepKey]) -> bool:
    if isinstance(key, tuple) and key and key[0] == "confirm":
        key = key[1:]
    return key in live


def served_counter(
    metrics: Any, flush: Callable[[], None] | None = None
) -> Callable[[str, str], int]:
    """Requests a release has answered: the gateway's own count for `min_requests`.

    Read from `http_requests_total` (every worker's files when several processes serve).
    """

    def served(service: str, release: str) -> int:
        if flush is not None:
            flush()
        families: Any
        from gateway.metrics import multiprocess_dir

        mp = multiprocess_dir()
        if mp:
            from prometheus_client import multiprocess

            families = multiprocess.MultiProcessCollector(None, path=mp).collect()  # type: ignore[no-untyped-call]
        else:
            families = metrics.requests.collect()
        total = 0.0
        for fam in families:
            if fam.name != "http_requests":
                continue
            for s in fam.samples:
                labels: Mapping[str, str] = s.labels
                if (
                    s.name == "http_requests_total"
                    and labels.get("service") == service
                    and labels.get("release") == release
                ):
                    total += s.value
        return int(total)

    return served
