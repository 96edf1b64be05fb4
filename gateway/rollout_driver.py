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

One driver per service across replicas (docs/operations.md "Several
replicas"): only the replica holding the service's lease (gateway/lease.py;
the same lease the analysis runner evaluates under) advances, pauses or
rolls back its rollout and calls its hooks; the others serve the weights
they read from the store, count what their release served in the step and
publish that count (at most every `rollout.publish_interval`, and only while
the step still waits for traffic), so `min_requests` is the fleet's. Admin
commands may reach any replica: they write the document and the holder acts
on them. When the holder dies its lease runs out after `rollout.lease_ttl`
and another replica carries on from the stored step. Guarantees: a step is
never repeated (every move is a compare-and-set on the stored rollout); each
notification hook (`event`, `post_rollout`, `rollback`) is called once per
change, and at least once across a failover (the holder records what it
announced once the calls finished; the next holder calls what is not
recorded); gate hooks (`pre_rollout`, `step`, `confirm_*`) are asked again
by a new holder for the step in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol

from gateway import audit, periodic
from gateway import lease as L
from gateway import rollout as R
from gateway.alerts import AlertSender, targets_for
from gateway.errors import Conflict
from gateway.hooks import STEP_FAILURE_LIMIT, HookRunner, payload
from gateway.rollout_config import RolloutConfig
from gateway.store import ServiceState, StateDoc

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

    async def record_analysis(
        self, service: str, edit: Callable[[ServiceState, Any], ServiceState]
    ) -> StateDoc: ...


StepKey = tuple[str, str, int, int]
RELEASE_TIMEOUT = 2.0  # seconds a stopping replica tries to hand its leases back
# States a holder drives (the others only wait for an operator's `retry` or a new plan).
DRIVEN = (R.PENDING, R.PROGRESSING, R.PAUSED, R.CIRCUIT_BREAK)


class _NotHolder(Exception):
    """Another replica holds the service's lease: nothing is written."""


def owner_id() -> str:
    """This replica's name in a lease: host, process and a random part (a restart is new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def release_leases(control: ControlLike, owner: str, now: float) -> None:
    """On a clean stop, hand back every lease `owner` holds (it runs out `now`), so another
    replica takes over at its next tick instead of after the TTL. Best effort."""
    for service, st in list(control.doc.services.items()):
        held = L.read(st.extra)
        if held is None or held.owner != owner or held.until <= now:
            continue

        def edit(st: ServiceState, _snap: Any) -> ServiceState:
            cur = L.read(st.extra)
            if cur is None or cur.owner != owner:
                raise _NotHolder
            return replace(st, extra=L.with_lease(st.extra, owner, now))

        try:
            await asyncio.wait_for(control.record_analysis(service, edit), RELEASE_TIMEOUT)
        except (_NotHolder, Conflict):
            pass
        except Exception as e:  # a dead store: the lease runs out by itself
            log.warning("could not hand back the lease of %s: %s", service, e)


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
        owner: str | None = None,
    ) -> None:
        self.owner = owner or owner_id()  # this replica's name in the lease
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
        # As holder: changes announced whose notification calls may still run, in order,
        # and the last one whose calls all finished (stored as `announced`).
        self._notes: dict[str, list[tuple[L.Seen, list[asyncio.Task[Any]]]]] = {}
        self._done: dict[str, L.Seen | None] = {}
        self._published: dict[str, float] = {}  # service -> when this replica last wrote

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
        if self.alerts is not None:
            self.alerts.start()
        self._task = asyncio.create_task(self._run(), name="gateway-rollouts")

    async def stop(self, grace: float = 0.0) -> None:
        """Stop driving: hook notifications in flight get up to `grace` seconds, then the
        leases are handed back, then alerts get what is left of `grace` (docs/operations.md
        "Drain")."""
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        running = self._task is not None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.hooks.stop(grace)
        if running:
            await self._release()
        if self.alerts is not None:
            await self.alerts.stop(max(0.0, until - loop.time()))

    async def _run(self) -> None:
        await periodic.every(lambda: self.interval, self._step, "rollout step")

    async def _step(self) -> None:
        for service in await self.advance():
            r = self.control.rollout_of(service)
            log.info("rollout of %s: %s", service, r.to_json() if r else None)

    # ------------------------------------------------------------------ facts
    def _own_in_step(self, key: StepKey) -> int:
        count = self.served(key[0], key[1])
        return count - self._base.setdefault(key, count)

    def served_in_step(self, service: str, r: R.Rollout) -> int:
        """The fleet's count: ours live, the other replicas' as they published it."""
        key = self._step_key(service, r)
        own = self._own_in_step(key)
        st = self.control.doc.services.get(service)
        if st is None:
            return own
        return L.fleet_served(L.driver(st.extra), key[1:], self.owner, own)

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
            served=self.served_in_step(service, r),
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
            if not self.holds(service, now):
                return r  # the holder's next tick pre-checks it
            self._become_holder(service)
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
            if r is None or not await self._lead(service, r, now, live):
                continue
            r = self.control.rollout_of(service)  # as the lease write left it
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
                # a replica that counted it as a follower keeps its count
                self._base.setdefault(self._step_key(service, r), self.served(service, r.release))
        calls: list[asyncio.Task[Any]] = []
        self._notes.setdefault(service, []).append((seen, calls))
        if before is None and r.state in (R.PROMOTED, R.ROLLED_BACK):
            return  # an old rollout this process learns about: no news
        lim = self.limits
        body = self._body(service, r, now)
        event = f"{r.release}: {before[1] if before else '-'} -> {r.state} at step {r.step}"
        calls += self.hooks.notify(
            lim.hooks("event"),
            lambda h: {**body(h), "metadata": {"hook": h.name, "eventMessage": event}},
        )
        was = before[1] if before is not None else None
        if r.state == R.PROMOTED and was != R.PROMOTED:
            calls += self.hooks.notify(lim.hooks("post_rollout"), body)
        if r.state in (R.CIRCUIT_BREAK, R.ROLLED_BACK) and was not in (
            R.CIRCUIT_BREAK,
            R.ROLLED_BACK,
        ):
            calls += self.hooks.notify(lim.hooks("rollback"), body)

    # ------------------------------------------------------------------ one driver per service
    def _ttl(self, service: str) -> float:
        analysis = getattr(self.control.config, "analysis", None)
        specs = getattr(analysis, "metrics_for", None)
        intervals = tuple(float(m.interval) for m in specs(service)) if specs else ()
        return L.ttl(self.limits.lease_ttl, intervals)

    def _needed(self, service: str) -> int:
        """Requests a step waits for: the guard's `min_requests` and every analysis metric's."""
        svc = self.control.config.services[service]
        analysis = getattr(self.control.config, "analysis", None)
        specs = getattr(analysis, "metrics_for", None)
        counts = [int(m.min_requests) for m in specs(service)] if specs else []
        return max([svc.guard.min_requests if svc.guard.enabled else 0, *counts])

    def status(self, service: str, now: float) -> dict[str, Any]:
        """The `driver` block of the rollout status: which replica drives it, and the fleet's
        requests in the step as the replicas published them (docs/operations.md)."""
        st = self.control.doc.services.get(service)
        held = L.read(st.extra) if st is not None else None
        d = L.driver(st.extra) if st is not None else L.Driver()
        r = self.control.rollout_of(service)
        served: int | None = None
        if r is not None and r.state in R.ACTIVE and d.step is not None:
            if (d.step[0], d.step[1]) == (r.release, r.step):
                served = sum(n for s, n in d.served.values() if s == d.step)
        return {
            "replica": held.owner if held is not None and held.until > now else None,
            "served_in_step": served,
            "min_requests": self._needed(service),
        }

    def holds(self, service: str, now: float) -> bool:
        """No other replica holds the service's lease now (this one does, or nobody)."""
        st = self.control.doc.services.get(service)
        return st is None or not L.held_by_other(L.read(st.extra), self.owner, now)

    def claim(self, service: str, now: float) -> Callable[[ServiceState], ServiceState]:
        """For `POST .../rollout`: the lease, when free, goes to the replica that admitted
        the plan, in the same write (gateway/control.py's `rollout(claim=...)`)."""

        def fn(st: ServiceState) -> ServiceState:
            if L.held_by_other(L.read(st.extra), self.owner, now):
                return st
            return self._bookkeeping(service, st, now)

        return fn

    def _become_holder(self, service: str) -> None:
        """Start acting for a service from what the last holder recorded (a takeover)."""
        if service in self._done:
            return
        st = self.control.doc.services.get(service)
        d = L.driver(st.extra) if st is not None else L.Driver()
        r = self.control.rollout_of(service)
        self._seen.pop(service, None)
        if d.announced is not None:
            self._seen[service] = d.announced
        self._done[service] = d.announced
        self._notes[service] = []
        epoch = d.step[2] if d.step is not None else 0
        if (
            r is not None
            and d.step is not None
            and (d.step[0], d.step[1]) == (r.release, r.step)
            and r.state in R.ACTIVE
            and (d.announced is None or (d.announced[0], d.announced[2]) != (r.release, r.step))
        ):
            # The last holder began this step and recorded it, but not its announcement:
            # announcing it here begins the same step (same epoch, the fleet's count kept).
            epoch -= 1
        self._epoch[service] = epoch

    def _step_down(self, service: str) -> None:
        """Another replica acts for the service now: forget what this one announced."""
        for d in (self._seen, self._epoch, self._done, self._notes):
            d.pop(service, None)

    def _finished(self, service: str) -> L.Seen | None:
        """The last announced change whose notification calls all finished."""
        notes = self._notes.get(service, [])
        while notes and all(t.done() for t in notes[0][1]):
            self._done[service] = notes.pop(0)[0]
        return self._done.get(service)

    def _bookkeeping(self, service: str, st: ServiceState, now: float) -> ServiceState:
        """`st` with the lease ours for another TTL and the driver block brought up to date."""
        d = L.driver(st.extra)
        raw = st.extra.get("rollout")
        r = R.Rollout.from_json(raw) if isinstance(raw, Mapping) else None
        seen = self._seen.get(service)
        step = d.step
        served = d.served
        if r is not None and r.state in R.ACTIVE:
            if seen is not None and (seen[0], seen[2]) == (r.release, r.step):
                key = self._step_key(service, r)
                step = key[1:]
                served = L.publish(
                    replace(d, step=step), self.owner, step, self._own_in_step(key)
                ).served
        else:
            served = {}
        done = self._finished(service)
        d = L.Driver(step, done if done is not None else d.announced, served)
        extra = L.with_lease(st.extra, self.owner, now + self._ttl(service))
        return replace(st, extra=L.with_driver(extra, d))

    async def _lead(self, service: str, r: R.Rollout, now: float, live: set[StepKey]) -> bool:
        """Whether this replica acts for `service` now: it holds the lease (taking or
        renewing it when due), or it follows the holder (counting what it serves)."""
        st = self.control.doc.services[service]
        held = L.read(st.extra)
        d = L.driver(st.extra)
        if L.held_by_other(held, self.owner, now):
            self._step_down(service)
            await self._follow(service, r, d, now, live)
            return False
        current = (r.release, r.state, r.step)
        if service not in self._done:
            if r.state not in DRIVEN and d.announced == current:
                return False  # over and fully announced: nobody needs to act
            self._become_holder(service)
        elif r.state not in DRIVEN and self._finished(service) == current == d.announced:
            return True  # over and recorded: the lease runs out by itself
        seen = self._seen.get(service)
        key = self._step_key(service, r)
        # the step in force is the one this replica announced (its epoch is known)
        in_step = (
            r.state in R.ACTIVE and seen is not None and (seen[0], seen[2]) == (r.release, r.step)
        )
        new_step = in_step and d.step != key[1:]
        publish = in_step and L.publish_due(
            d,
            self.owner,
            key[1:],
            self._own_in_step(key),
            self._needed(service),
            self._published.get(service, -math.inf),
            now,
            self.limits.publish_interval,
        )
        if not (L.renewal_due(held, self.owner, now, self._ttl(service)) or new_step or publish):
            return True

        def edit(st: ServiceState, _snap: Any) -> ServiceState:
            if L.held_by_other(L.read(st.extra), self.owner, now):
                raise _NotHolder
            return self._bookkeeping(service, st, now)

        self._published[service] = now
        try:
            await self.control.record_analysis(service, edit)
        except _NotHolder:
            self._step_down(service)
            return False
        except Conflict:  # the store kept changing: the lease is tried again next tick
            return held is not None and held.owner == self.owner
        except Exception as e:  # a dead store: act only while the lease we hold lasts
            log.warning("rollout of %s: could not write the lease: %s", service, e)
            return held is not None and held.owner == self.owner and held.until > now
        return True

    async def _follow(
        self, service: str, r: R.Rollout, d: L.Driver, now: float, live: set[StepKey]
    ) -> None:
        """Not the holder: count what this replica's release serves in the step the holder
        recorded, and publish it while the step waits for traffic (bounded write rate)."""
        step = d.step
        if r.state not in R.ACTIVE or step is None or (step[0], step[1]) != (r.release, r.step):
            return
        key: StepKey = (service, *step)
        live.add(key)
        own = self._own_in_step(key)
        last = self._published.get(service, -math.inf)
        interval = self.limits.publish_interval
        if not L.publish_due(d, self.owner, step, own, self._needed(service), last, now, interval):
            return

        def edit(st: ServiceState, _snap: Any) -> ServiceState:
            cur = L.driver(st.extra)
            if cur.step != step:
                raise _NotHolder  # the step is over: nothing to publish
            return replace(st, extra=L.with_driver(st.extra, L.publish(cur, self.owner, step, own)))

        self._published[service] = now
        try:
            await self.control.record_analysis(service, edit)
        except (_NotHolder, Conflict):
            pass
        except Exception as e:  # a dead store: the next publish tries again
            log.warning("rollout of %s: could not publish the step's count: %s", service, e)

    async def _release(self) -> None:
        await release_leases(self.control, self.owner, self.clock())


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
