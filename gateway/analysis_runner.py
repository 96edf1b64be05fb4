"""Runs the analysis: queries Prometheus on each metric's interval and acts.

README "Progressive delivery" shows it at work.

Why here and not in the guard: the guard reads each data-path process's own
windows every second; analysis reads an outside Prometheus every
`interval`, once for the whole fleet. It runs in the process that drives
rollouts (the admin one) and acts through the control plane like the guard
does: a rollback is `ControlPlane.trip` (weight 0, `CircuitBreak`), a pause
a rollout move with `paused_by: analysis`, which the runner itself lifts at
the next conclusive success. Each action is one structured log line, an
alert to every target (queued) and an audit record with actor `analysis`.

One evaluator per service across replicas: a lease in the state document
(`extra["analysis"]["lease"]`: owner and expiry; gateway/lease.py), taken and
renewed with the store's compare-and-set write (Consul: `?cas=<ModifyIndex>`,
https://developer.hashicorp.com/consul/api-docs/kv#cas). It is the rollout
driver's lease too (one replica evaluates a service and drives its rollout,
docs/operations.md "Several replicas"). A replica only evaluates while it
holds the lease; the results go into the same document, so every replica's
`GET /admin/services/{s}` shows them. `min_requests` of a rollout step is the
fleet's count (the driver's `served_in_step`), not this replica's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from gateway import analysis, audit, periodic
from gateway import lease as lease_mod
from gateway import rollout as rollout_mod
from gateway.alerts import AlertSender, targets_for
from gateway.analysis import Evaluation, MetricRun, Reading
from gateway.analysis_config import MetricSpec
from gateway.control import ControlPlane
from gateway.errors import Conflict
from gateway.metrics import Metrics
from gateway.prometheus import PrometheusClient
from gateway.rollout_driver import owner_id, release_leases
from gateway.state import Snapshot
from gateway.store import ServiceState

log = logging.getLogger("gateway.analysis")

LEASE_MIN = 10.0  # seconds: `rollout.lease_ttl`'s default (gateway/rollout_config.py)

_ALERT_NAMES = {
    analysis.ROLLBACK: "AnalysisRolledBack",
    analysis.PAUSE: "AnalysisPaused",
    analysis.ALERT: "AnalysisFailed",
    "resume": "AnalysisResumed",
}

Query = Callable[[str], Awaitable[Reading]]


class _NotOwner(Exception):
    """Another replica holds the service's lease: nothing is written."""


@dataclass(slots=True)
class _Seen:
    weight: float
    at: float  # when this process first saw the weight


@dataclass(slots=True)
class _Outcome:
    """One due evaluation, waiting to be stored."""

    spec: MetricSpec
    release: str
    at: float
    evaluation: Evaluation | None  # None: skipped, waiting for traffic


@dataclass(slots=True)
class _Acts:
    """What the stored results ask the runner to do, per release."""

    todo: list[tuple[str, str, MetricSpec, MetricRun]] = field(default_factory=list)
    resume: set[str] = field(default_factory=set)
    version: int = 0


def lease_ttl(specs: tuple[MetricSpec, ...], configured: float = LEASE_MIN) -> float:
    return lease_mod.ttl(configured, tuple(s.interval for s in specs))


class AnalysisRunner:
    """One per process that drives rollouts; see the module docstring."""

    def __init__(
        self,
        control: ControlPlane,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        tick: float = 1.0,
        query: Query | None = None,
        served: Callable[[str, str], float] | None = None,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        owner: str | None = None,
        fleet: Callable[[str, rollout_mod.Rollout], int] | None = None,
    ) -> None:
        self.control = control
        # The fleet's requests in a rollout's step (gateway/rollout_driver.py), when wired.
        self.fleet = fleet
        self.metrics = metrics
        self.clock = clock
        self.tick = tick
        self.owner = owner or owner_id()
        self._session_factory = session_factory
        self._client: PrometheusClient | None = None
        self._query = query
        self.served = served or metrics.served
        self.alerts = AlertSender(
            session_factory
            or (lambda: aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)))
        )
        self._task: asyncio.Task[None] | None = None
        self._due: dict[tuple[str, str, str], float] = {}  # (service, release, metric) -> time
        self._seen: dict[tuple[str, str], _Seen] = {}
        # Releases that left analysis (rolled back, rollout over): counters restart when back.
        self._fresh: set[tuple[str, str]] = set()
        self._step_base: dict[tuple[str, str], tuple[object, float]] = {}  # step -> count then

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.alerts.start()
        self._task = asyncio.create_task(self._loop(), name="gateway-analysis")

    async def stop(self, grace: float = 0.0) -> None:
        """Stop evaluating and hand the leases back; alerts not yet sent get up to `grace` s."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            await release_leases(self.control, self.owner, self.clock())
        if self._client is not None:
            await self._client.close()
        await self.alerts.stop(grace)

    async def _loop(self) -> None:
        await periodic.every(lambda: self.tick, self.run_once, "analysis evaluation")

    async def query(self, promql: str) -> Reading:
        if self._query is not None:
            return await self._query(promql)
        prom = self.control.config.analysis.prometheus
        if self._client is None or self._client.config != prom:  # a reload may move it
            if self._client is not None:
                await self._client.close()
            self._client = PrometheusClient(prom, self._session_factory)
        return await self._client.query(promql)

    # ------------------------------------------------------------------ one pass
    async def run_once(self) -> None:
        """Evaluate every metric that is due now, for every service under analysis."""
        now = self.clock()
        snap = self.control.holder.current
        cfg = self.control.config
        for name in cfg.services:
            specs = cfg.analysis.metrics_for(name)
            if specs:
                await self._service(name, specs, snap, now)

    def _targets(self, service: str, snap: Snapshot) -> tuple[list[str], Any]:
        """Releases under analysis: the active rollout's, or (always) every live one."""
        r = self.control.rollout_of(service)
        if r is not None and r.state in rollout_mod.ACTIVE:
            return [r.release], r
        if self.control.config.analysis.always:
            svc = self.control.config.services[service]
            weights = snap.weights.get(service, {})
            return [n for n, w in weights.items() if n != svc.baseline and w > 0], r
        return [], r

    async def _service(
        self, service: str, specs: tuple[MetricSpec, ...], snap: Snapshot, now: float
    ) -> None:
        targets, ro = self._targets(service, snap)
        weights = snap.weights.get(service, {})
        for gone in [k for k in self._seen if k[0] == service and k[1] not in targets]:
            self._leave(gone)
        for rel in targets:
            w = weights.get(rel, 0.0)
            seen = self._seen.get((service, rel))
            if seen is None or seen.weight != w:
                self._seen[(service, rel)] = _Seen(w, now)
        if not targets:
            return
        st = self.control.doc.services.get(service)
        lease = lease_mod.read(st.extra) if st is not None else None
        if lease_mod.held_by_other(lease, self.owner, now):
            self._forget(service)
            return  # another replica evaluates this service
        outcomes: list[_Outcome] = []
        jobs: list[Awaitable[None]] = []
        for rel in targets:
            for spec in specs:
                due = (service, rel, spec.name)
                if self._due.get(due, 0.0) > now:
                    continue
                self._due[due] = now + spec.interval
                jobs.append(self._evaluate(service, rel, spec, ro, now, outcomes))
        ttl = lease_ttl(specs, self.control.config.rollout.lease_ttl)
        if not jobs and not lease_mod.renewal_due(lease, self.owner, now, ttl):
            return
        await asyncio.gather(*jobs)
        acts = _Acts()
        baseline = self.control.config.services[service].baseline

        def edit(st: ServiceState, _snap: Snapshot) -> ServiceState:
            acts.todo.clear()
            acts.resume.clear()
            cur = st.extra.get("analysis")
            cur = cur if isinstance(cur, Mapping) else {}
            if lease_mod.held_by_other(lease_mod.read(st.extra), self.owner, now):
                raise _NotOwner
            releases = cur.get("releases")
            releases = dict(releases) if isinstance(releases, Mapping) else {}
            out: dict[str, Any] = {}
            for rel in targets:
                out[rel] = self._merge(service, rel, specs, releases.get(rel), outcomes, acts)
            return replace(
                st,
                extra={
                    **st.extra,
                    "analysis": {
                        "lease": {"owner": self.owner, "until": now + ttl},
                        "baseline": baseline,
                        "releases": out,
                    },
                },
            )

        try:
            doc = await self.control.record_analysis(service, edit)
        except _NotOwner:
            self._forget(service)
            return
        self._fresh.difference_update((service, rel) for rel in targets)
        acts.version = doc.version
        self._publish(service, outcomes)
        await self._act(service, specs, acts, now)

    def _leave(self, key: tuple[str, str]) -> None:
        """A release is no longer analysed: next time it starts afresh (a retry resets counters)."""
        self._seen.pop(key, None)
        self._fresh.add(key)

    def _forget(self, service: str) -> None:
        for k in [k for k in self._due if k[0] == service]:
            del self._due[k]

    async def _evaluate(
        self,
        service: str,
        release: str,
        spec: MetricSpec,
        ro: rollout_mod.Rollout | None,
        now: float,
        out: list[_Outcome],
    ) -> None:
        if spec.min_requests > 0 and self._waiting_for_traffic(service, release, spec, ro, now):
            out.append(_Outcome(spec, release, now, None))
            return
        svc = self.control.config.services[service]

        def q(rel: str) -> Awaitable[Reading]:
            return self.query(
                analysis.render(
                    spec.query,
                    service=service,
                    release=rel,
                    baseline=svc.baseline,
                    interval=spec.interval,
                )
            )

        if spec.compare == "baseline":
            mine, base = await asyncio.gather(q(release), q(svc.baseline))
            e = analysis.evaluate(spec, mine, base)
        else:
            e = analysis.evaluate(spec, await q(release))
        out.append(_Outcome(spec, release, now, e))

    def _waiting_for_traffic(
        self,
        service: str,
        release: str,
        spec: MetricSpec,
        ro: rollout_mod.Rollout | None,
        now: float,
    ) -> bool:
        """Fewer than `min_requests` served since the step (or the weight) changed."""
        if ro is not None and ro.release == release and ro.state in rollout_mod.ACTIVE:
            if self.fleet is not None:
                return self.fleet(service, ro) < spec.min_requests
            step: object = (ro.step, ro.step_started)
        else:
            seen = self._seen.get((service, release))
            step = ("weight", seen.weight if seen else None)
        count = self.served(service, release)
        base = self._step_base.get((service, release))
        if base is None or base[0] != step:
            self._step_base[(service, release)] = (step, count)
            return True
        return count - base[1] < spec.min_requests

    def _merge(
        self,
        service: str,
        release: str,
        specs: tuple[MetricSpec, ...],
        stored: object,
        outcomes: list[_Outcome],
        acts: _Acts,
    ) -> dict[str, Any]:
        """The stored block of one release with this pass's outcomes recorded."""
        prev = stored if isinstance(stored, Mapping) else {}
        seen = self._seen.get((service, release))
        weight = seen.weight if seen else 0.0
        weight_at = seen.at if seen else 0.0
        old_w = prev.get("weight")
        old_at = prev.get("weight_at")
        if old_w == weight and isinstance(old_at, int | float):
            weight_at = min(weight_at, float(old_at))  # a replica that took over keeps it
        # A new rollout or a retry: the counters restart (README "Progressive delivery").
        fresh = (
            not isinstance(old_w, int | float) or old_w <= 0 or (service, release) in self._fresh
        )
        old_metrics = prev.get("metrics")
        old_metrics = old_metrics if isinstance(old_metrics, Mapping) else {}
        metrics: dict[str, Any] = {}
        for spec in specs:
            run = MetricRun.from_json(old_metrics.get(spec.name))
            if fresh:
                run = replace(run, failed_in_row=0, inconclusive_in_row=0, success_at=None)
            run = replace(run, action=spec.action)
            for o in outcomes:
                if o.release != release or o.spec.name != spec.name or o.evaluation is None:
                    continue
                counted = analysis.counts(o.at, weight_at, spec)
                run = analysis.record(run, spec, o.evaluation, o.at, counted)
                kind = analysis.decide(run, spec, counted)
                if kind != analysis.NOTHING:
                    acts.todo.append((kind, release, spec, run))
                elif counted and o.evaluation.result != analysis.INCONCLUSIVE:
                    acts.resume.add(release)
            metrics[spec.name] = run.to_json()
        if any(
            analysis.holds(MetricRun.from_json(metrics[s.name]), s) for s in specs
        ):  # another metric still holds the pause
            acts.resume.discard(release)
        return {"weight": weight, "weight_at": weight_at, "metrics": metrics}

    def _publish(self, service: str, outcomes: list[_Outcome]) -> None:
        for o in outcomes:
            e = o.evaluation
            if e is None:
                continue
            labels = (service, o.release, o.spec.name)
            if e.value is not None:
                self.metrics.analysis_value.labels(*labels).set(e.value)
            if e.threshold is not None:
                self.metrics.analysis_threshold.labels(*labels).set(e.threshold)
            seen = self._seen.get((service, o.release))
            if analysis.counts(o.at, seen.at if seen else 0.0, o.spec):
                self.metrics.analysis_runs.labels(*labels, e.result).inc()

    # ------------------------------------------------------------------ acting
    async def _act(
        self, service: str, specs: tuple[MetricSpec, ...], acts: _Acts, now: float
    ) -> None:
        done: set[tuple[str, str]] = set()
        for kind, release, spec, run in acts.todo:
            if (release, kind) in done or (release, analysis.ROLLBACK) in done:
                continue
            reason = f"analysis: {spec.name} {run.result}" + (f" ({run.why})" if run.why else "")
            if kind == analysis.ROLLBACK:
                if await self._roll_back(service, release, spec, reason, now):
                    done.add((release, kind))
                    self._announce(service, release, spec, run, kind, acts.version, now)
            elif kind == analysis.PAUSE:
                r = self.control.rollout_of(service)
                if r is not None and r.release == release and r.state == rollout_mod.PROGRESSING:
                    if await self._move(
                        service,
                        "pause",
                        reason,
                        functools.partial(analysis.analysis_pause, now=now, reason=reason),
                    ):
                        done.add((release, kind))
                        self._announce(service, release, spec, run, kind, acts.version, now)
                elif r is None or r.release != release or r.state not in rollout_mod.ACTIVE:
                    # no rollout to hold (analysis.always): the pause is an alert, once a streak
                    done.add((release, kind))
                    if run.failed_in_row == spec.failure_limit or (
                        run.inconclusive_in_row == spec.inconclusive_limit
                    ):
                        self._announce(service, release, spec, run, kind, acts.version, now)
            else:  # an observe metric reached a limit
                self._announce(service, release, spec, run, kind, acts.version, now)
        r = self.control.rollout_of(service)
        if (
            r is not None
            and r.release in acts.resume
            and r.state == rollout_mod.PAUSED
            and r.paused_by == "analysis"
            and (r.release, analysis.PAUSE) not in done
        ):
            if await self._move(
                service,
                "resume",
                "analysis: conclusive success",
                lambda x: analysis.analysis_resume(x, now),
            ):
                spec = specs[0]
                run = MetricRun(action=spec.action, result=analysis.SUCCESS)
                self._announce(service, r.release, spec, run, "resume", acts.version, now)

    async def _roll_back(
        self, service: str, release: str, spec: MetricSpec, reason: str, now: float
    ) -> bool:
        with audit.acting("analysis", "analysis", "analysis.rollback", reason):
            try:
                await self.control.trip(service, release, f"analysis:{spec.name}", now=now)
            except Conflict:  # already rolled back (by the guard, or a replica)
                return False
        self.metrics.set_rollout_state(service, rollout_mod.CIRCUIT_BREAK)
        self._leave((service, release))
        return True

    async def _move(
        self,
        service: str,
        kind: str,
        reason: str,
        fn: Callable[[rollout_mod.Rollout], rollout_mod.Rollout],
    ) -> bool:
        with audit.acting("analysis", "analysis", f"analysis.{kind}", reason):
            try:
                await self.control.transition(service, fn)
            except Conflict:  # someone moved it first
                return False
        r = self.control.rollout_of(service)
        if r is not None:
            self.metrics.set_rollout_state(service, r.state)
        return True

    def _announce(
        self,
        service: str,
        release: str,
        spec: MetricSpec,
        run: MetricRun,
        kind: str,
        version: int,
        now: float,
    ) -> None:
        r = self.control.rollout_of(service)
        payload = {
            "alert": _ALERT_NAMES[kind],
            "service": service,
            "release": release,
            "reason": f"analysis:{spec.name}",
            "metric": spec.name,
            "result": run.result,
            "why": run.why,
            "value": run.value,
            "baseline_value": run.baseline_value,
            "threshold": run.threshold,
            "failed_in_row": run.failed_in_row,
            "inconclusive_in_row": run.inconclusive_in_row,
            "action": {
                "kind": kind,
                "weight": 0 if kind == analysis.ROLLBACK else None,
                "rollout_state": r.state if r is not None else None,
                "metric_action": spec.action,
            },
            "state_version": version,
            "time": now,
        }
        line = json.dumps(payload, separators=(",", ":"))
        if kind == analysis.ROLLBACK:
            log.error(line)
        else:
            log.warning(line)
        cfg = self.control.config
        svc = cfg.services.get(service)
        if svc is not None:
            self.alerts.send(
                targets_for(cfg.alerts, svc.guard.alerts, svc.guard.alert_webhook), payload
            )
