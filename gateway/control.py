"""The control plane: applies the state store and config reloads to the routing snapshot.

Why one owner: every accepted change follows the same order — validate,
write to the store (CAS), swap the snapshot, answer with the new version
(README "Admin API") — and every process (master, each worker) applies documents it
hears from the store watch the same way, so they converge within one poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from gateway import changes, live_segments, statedoc
from gateway import config as config_mod
from gateway import rollout as rollout_mod
from gateway.config import Config, Endpoint
from gateway.decide import tripped_releases
from gateway.discovery import merge_endpoints
from gateway.errors import BadRequest, ConfigError, Conflict, StateError
from gateway.state import Snapshot, SnapshotHolder, build_snapshot, static_endpoints
from gateway.store import EMPTY, ServiceState, StateDoc, StateStore, open_store

log = logging.getLogger("gateway.control")

# Compare-and-set attempts for one change when other writers keep winning the race: each
# lost race means another change landed first and this one is re-applied on top of it;
# losing five in a row is contention worth a 409 the caller can retry.
_RETRIES = 5
_ACTIONS: dict[str, Callable[[rollout_mod.Rollout, float], rollout_mod.Rollout]] = {
    "promote": rollout_mod.promote_step,
    "promote_full": rollout_mod.promote,
    "pause": rollout_mod.pause,
    "resume": rollout_mod.resume,
    "abort": lambda r, now: rollout_mod.abort(r),
    "confirm": rollout_mod.confirm,
    "retry": rollout_mod.retry,
}


class Journal(Protocol):
    """Who writes the audit record into the document making the change (gateway/audit.py)."""

    async def prepare(
        self, service: str, before: ServiceState | None, after: ServiceState | None, cur: StateDoc
    ) -> tuple[Mapping[str, Any], ...]: ...

    async def committed(self, records: tuple[Mapping[str, Any], ...]) -> None: ...


# Changing these needs new sockets, processes or a new store: a reload warns and keeps them.
_RESTART_ONLY = ("listen", "admin", "workers", "engine", "state", "consul")


def _unchanged(config: Config) -> Config:
    return config


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_admin_exposure(cfg: Config) -> None:
    """Refuse an admin listener reachable off-host without a token (README "Admin API")."""
    a = cfg.admin
    if a.token or a.tokens or is_loopback(a.listen.host):
        return
    how = (
        f"export {a.token_env}=<secret>"
        if a.token_env
        else "set admin.token_env to a variable holding a secret"
    )
    raise ConfigError(
        [
            (
                "admin.listen",
                f"{a.listen} is not a loopback address and no admin token is set: "
                f"{how}, or listen on 127.0.0.1",
            )
        ],
        cfg.source,
    )


EndpointMap = Mapping[tuple[str, str], tuple[Endpoint, ...]]


def endpoints_for(
    config: Config, previous: Snapshot | None, discovered: EndpointMap | None = None
) -> dict[tuple[str, str], tuple[Endpoint, ...]]:
    """Static endpoints from `config` first, then discovered ones not already listed.

    Without a discovery feed yet, releases without static endpoints keep the
    endpoints of the previous snapshot, so a weight change never drops them.
    """
    static = static_endpoints(config)
    if discovered is not None:
        return merge_endpoints(static, discovered)
    if previous is not None:
        for s in config.services.values():
            ps = previous.services.get(s.name)
            for r in s.releases.values():
                key = (s.name, r.name)
                if key not in static and ps is not None and (pr := ps.releases.get(r.name)):
                    if pr.endpoints:
                        static[key] = pr.endpoints
    return static


def with_baselines(config: Config, doc: StateDoc) -> Config:
    """The config with each `PUT .../baseline` applied (stored beside the weights)."""
    changed = {}
    for name, st in doc.services.items():
        b = st.extra.get("baseline")
        svc = config.services.get(name)
        if svc is not None and isinstance(b, str) and b in svc.releases and b != svc.baseline:
            changed[name] = replace(svc, baseline=b)
    if not changed:
        return config
    return replace(config, services={**config.services, **changed})


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    errors: tuple[tuple[str, str], ...] = ()  # (field path, message) when not ok
    warnings: tuple[str, ...] = ()


class ControlPlane:
    """Store + config -> snapshot, for one process; see the module docstring."""

    def __init__(
        self,
        config: Config,
        holder: SnapshotHolder,
        *,
        store: StateStore | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.holder = holder
        self.rng = rng or random.Random()
        self.doc: StateDoc = EMPTY
        self.reload_listeners: list[Callable[[], None]] = []
        self._store = store
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        self._discovered: EndpointMap | None = None
        self.journal: Journal | None = None  # the audit: its record is stored with the change
        # Applied to every config this process loads, e.g. `gateway run --port`'s override.
        self.adjust: Callable[[Config], Config] = _unchanged
        # Stored `PUT …/segments` lists, parsed once per change (gateway/live_segments.py).
        self.segments = live_segments.LiveSegments(os.environ)

    @property
    def store(self) -> StateStore:
        if self._store is None:
            raise StateError("the state store is not open (Gateway not started)", "state")
        return self._store

    # ------------------------------------------------------------------ lifecycle
    async def start(self, *, admin: bool, data: bool = True) -> None:
        """Open the store and apply it before serving; a corrupt store refuses to start."""
        if admin:
            check_admin_exposure(self.config)
        if self._store is None:
            self._store = open_store(self.config.state, self.config.consul)
        opener = getattr(self._store, "open", None)
        if opener is not None:
            await opener()
        if admin and not data and self.config.state.store == "memory":
            log.warning(
                "state.store: memory keeps admin changes in this process only; "
                "the workers will not see them (use store: file or consul)"
            )
        doc = self._store.load()
        self._apply(doc)
        log.info("state: %s store at version %d", self.config.state.store, doc.version)
        self._watcher = asyncio.create_task(self._watch(self._store), name="gateway-state-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._store is not None:
            await self._store.close()

    async def _watch(self, store: StateStore) -> None:
        while True:
            try:
                async for doc in store.watch():
                    if doc.version > self.doc.version:
                        self._apply(doc)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep watching: one bad read must not freeze this worker
                log.exception("state watch failed; retrying")
            await asyncio.sleep(self.config.state.poll_interval)

    # ------------------------------------------------------------------ applying
    def _apply(self, doc: StateDoc) -> None:
        self._warn_unknown(doc)
        snap = build_snapshot(
            self.segments.overlay(with_baselines(self.config, doc), doc),
            version=doc.version,
            overrides=doc.weights(),
            guard_overrides=doc.guards(),
            endpoints=endpoints_for(self.config, self.holder.current, self._discovered),
            previous=self.holder.current,
            rng=self.rng,
            tripped=tripped_releases(doc.services),
        )
        changed = doc.version != self.doc.version
        self.doc = doc
        self.holder.swap(snap)
        if changed:
            log.info("applied state version %d", doc.version)

    def set_discovered(self, endpoints: EndpointMap) -> None:
        """Discovery's callback: a complete {(service, release): endpoints} map.

        README "Consul discovery".

        Merged after the static endpoints; weights, guard thresholds and the
        state version stay those of the store.
        """
        self._discovered = dict(endpoints)
        self._apply(self.doc)

    def _warn_unknown(self, doc: StateDoc) -> None:
        for name, st in doc.services.items():
            svc = self.config.services.get(name)
            if svc is None:
                msg = f"state: service {name!r} is not in the config; its changes are ignored"
            else:
                gone = sorted(r for r in st.weights if r not in svc.releases)
                if not gone:
                    continue
                msg = (
                    f"state: release(s) {', '.join(gone)} of {name!r} are not in the config; "
                    "their stored weights are ignored"
                )
            if msg not in self._warned:
                self._warned.add(msg)
                log.warning("%s", msg)

    # ------------------------------------------------------------------ changes
    async def _change(
        self,
        service: str,
        edit: Callable[[ServiceState, Snapshot], ServiceState | None],
        if_match: int | None,
        *,
        quiet: bool = False,  # bookkeeping (analysis results): no audit record
    ) -> StateDoc:
        """Validate, CAS-write, then swap; on another writer's change, catch up and retry."""
        store = self.store
        async with self._lock:
            for _ in range(_RETRIES):
                cur = self.doc
                if if_match is not None:
                    stale = statedoc.stale_if_match(cur, service, if_match)
                    if stale is not None:
                        raise Conflict(stale, "If-Match")
                new_state = edit(cur.services.get(service, ServiceState()), self.holder.current)
                if new_state is not None and not quiet:
                    # The version this write makes: what If-Match is checked against.
                    new_state = replace(
                        new_state, extra={**new_state.extra, statedoc.CHANGED: cur.version + 1}
                    )
                new_doc = (
                    cur.without_service(service)
                    if new_state is None
                    else cur.with_service(service, new_state)
                )
                # The whole document, as the next start will read it (gateway/statedoc.py).
                try:
                    statedoc.check(replace(new_doc, version=cur.version + 1))
                except statedoc.InvalidDoc as e:
                    raise BadRequest(f"the resulting state is invalid: {e}", e.field) from None
                # For the audit; nothing stored yet: the config's weights were replaced.
                before = cur.services.get(service) or ServiceState(
                    weights=self.holder.current.weights.get(service, {})
                )
                if self.journal is not None and not quiet:  # the record is in the same write
                    records = await self.journal.prepare(service, before, new_state, cur)
                    new_doc = replace(new_doc, audit=records)
                try:
                    stored = await store.write(new_doc, cur.version)
                except Conflict:  # another writer: catch up; If-Match is checked again
                    try:
                        latest = store.load()
                    except StateError as e:  # unreadable now: the next try replaces it
                        log.warning("%s; retrying on state version %d", e.message, cur.version)
                        continue
                    if latest.version > self.doc.version:
                        self._apply(latest)
                    continue
                self._apply(stored)
                if self.journal is not None and not quiet:
                    await self.journal.committed(stored.audit)
                return stored
        raise Conflict("the state kept changing under this request; retry", "If-Match")

    async def set_weights(self, service: str, body: object, if_match: int | None) -> StateDoc:
        """PUT /admin/services/{service}/weights (README "Admin API")."""
        svc = self.config.services[service]

        def edit(st: ServiceState, snap: Snapshot) -> ServiceState:
            weights = changes.weights_change(svc, snap.weights.get(service, {}), body)
            return replace(st, weights=weights)

        return await self._change(service, edit, if_match)

    async def clear(self, service: str, if_match: int | None) -> StateDoc:
        """Forget stored weights and thresholds: back to what the config says."""

        def edit(st: ServiceState, snap: Snapshot) -> ServiceState | None:
            if st.extra:
                return ServiceState(extra=st.extra)
            return None

        return await self._change(service, edit, if_match)

    async def platform(
        self, service: str, body: Mapping[str, Any], if_match: int | None
    ) -> StateDoc:
        """POST /admin/weights, the release-platform payload (README "Admin API")."""
        svc = self.config.services[service]

        def edit(st: ServiceState, snap: Snapshot) -> ServiceState:
            weights, guard = changes.platform_change(svc, body)
            if weights is not None:
                st = replace(st, weights=weights)
            if guard is not None:
                st = replace(st, guard={**st.guard, **guard})
            return st

        return await self._change(service, edit, if_match)

    async def set_segments(self, service: str, body: object, if_match: int | None) -> StateDoc:
        """PUT /admin/services/{service}/segments: the whole list (README "Segments")."""
        svc = self.config.services[service]
        # Parsed (user files read) before the write, so a bad list changes nothing.
        # Off the event loop: a user file may hold a million keys.
        segs = await asyncio.to_thread(
            live_segments.parse, svc, body, self.config, self.segments.env
        )
        assert isinstance(body, list)
        self.segments.remember(service, body, segs)

        def edit(st: ServiceState, snap: Snapshot) -> ServiceState:
            return replace(st, extra={**st.extra, live_segments.KEY: body})

        return await self._change(service, edit, if_match)

    async def clear_segments(self, service: str, if_match: int | None) -> StateDoc:
        """DELETE /admin/services/{service}/segments: the config's list is in force again."""

        def edit(st: ServiceState, snap: Snapshot) -> ServiceState | None:
            extra = {k: v for k, v in st.extra.items() if k != live_segments.KEY}
            if not (st.weights or st.guard or extra):
                return None
            return replace(st, extra=extra)

        return await self._change(service, edit, if_match)

    # ------------------------------------------- rollouts (README "Guard and rollouts")
    def rollout_of(self, service: str) -> rollout_mod.Rollout | None:
        st = self.doc.services.get(service)
        raw = st.extra.get("rollout") if st is not None else None
        return rollout_mod.Rollout.from_json(raw) if isinstance(raw, Mapping) else None

    def baseline_of(self, service: str) -> str:
        """The baseline in force: `PUT .../baseline` when stored, else the config's."""
        st = self.doc.services.get(service)
        stored = st.extra.get("baseline") if st is not None else None
        svc = self.config.services[service]
        return stored if isinstance(stored, str) and stored in svc.releases else svc.baseline

    def _with_rollout(
        self, st: ServiceState, svc: Any, current: Mapping[str, float], r: rollout_mod.Rollout
    ) -> ServiceState:
        base = st.extra.get("baseline")
        baseline = base if isinstance(base, str) and base in svc.releases else svc.baseline
        weights = rollout_mod.weights_for(r, baseline, list(svc.releases), current)
        return replace(st, weights=weights, extra={**st.extra, "rollout": r.to_json()})

    async def rollout(
        self,
        service: str,
        action: str,
        body: object,
        if_match: int | None,
        now: float,
        *,
        admit: Callable[[rollout_mod.Rollout], rollout_mod.Rollout] | None = None,
        claim: Callable[[ServiceState], ServiceState] | None = None,
    ) -> StateDoc:
        """Start a step plan (Pending, then `admit`: the driver's pre-check), or
        promote/pause/resume/abort/confirm/retry the current one.

        `claim`: applied to a started plan's state in the same write (the driver's lease,
        gateway/lease.py), so the replica that admitted it is the one that drives it."""
        svc = self.config.services[service]
        limits = self.config.rollout

        def edit(st: ServiceState, snap: Snapshot) -> ServiceState:
            raw = st.extra.get("rollout")
            cur = rollout_mod.Rollout.from_json(raw) if isinstance(raw, Mapping) else None
            current = snap.weights.get(service, {})
            if action == "start":
                if cur is not None and cur.state in (rollout_mod.PENDING, *rollout_mod.ACTIVE):
                    raise Conflict(
                        f"a rollout of {cur.release!r} is {cur.state}; abort or promote it first",
                        "state",
                    )
                if not isinstance(body, Mapping):
                    raise BadRequest("body must be a JSON object {release, steps}", "body")
                for k in body:
                    if k not in ("release", "steps"):
                        raise BadRequest("unknown field (allowed: release, steps)", str(k))
                r = rollout_mod.parse_plan(body.get("release"), body.get("steps"))
                if r.release not in svc.releases:
                    raise BadRequest(
                        f"unknown release {r.release!r} (have: {', '.join(svc.releases)})",
                        "release",
                    )
                base = st.extra.get("baseline")
                if r.release == (base if isinstance(base, str) else svc.baseline):
                    raise BadRequest("the baseline cannot be rolled out", "release")
                rollout_mod.check_minimums(r, limits.min_first_pause, limits.min_pause)
                r = rollout_mod.pending(r, now)
                if admit is not None:
                    r = admit(r)
                if claim is not None:
                    return claim(self._with_rollout(st, svc, current, r))
            else:
                if cur is None:
                    raise Conflict(f"service {service!r} has no rollout", "state")
                r = _ACTIONS[action](cur, now)
            return self._with_rollout(st, svc, current, r)

        return await self._change(service, edit, if_match)

    def analysis_of(self, service: str) -> Mapping[str, Any] | None:
        st = self.doc.services.get(service)
        raw = st.extra.get("analysis") if st is not None else None
        return raw if isinstance(raw, Mapping) else None

    async def set_baseline(self, service: str, body: object, if_match: int | None) -> StateDoc:
        """PUT /admin/services/{service}/baseline: after a promotion, name the new baseline."""
        svc = self.config.services[service]

        def edit(st: ServiceState, snap: Snapshot) -> ServiceState:
            if not isinstance(body, Mapping):
                raise BadRequest('body must be a JSON object {"baseline": release}', "body")
            for k in body:
                if k != "baseline":
                    raise BadRequest("unknown field (allowed: baseline)", str(k))
            name = body.get("baseline")
            if not isinstance(name, str) or name not in svc.releases:
                raise BadRequest(
                    f"must name a release of {service!r} ({', '.join(svc.releases)})", "baseline"
                )
            raw = st.extra.get("rollout")
            cur = rollout_mod.Rollout.from_json(raw) if isinstance(raw, Mapping) else None
            if cur is not None and cur.state in (rollout_mod.PENDING, *rollout_mod.ACTIVE):
                raise Conflict(
                    f"a rollout of {cur.release!r} is {cur.state}; promote or abort it first",
                    "state",
                )
            extra = {k: v for k, v in st.extra.items() if k != "baseline"}
            if name != svc.baseline:  # the config's own: nothing to store
                extra["baseline"] = name
            return replace(st, extra=extra)

        return await self._change(service, edit, if_match)

    async def record_analysis(
        self, service: str, edit: Callable[[ServiceState, Snapshot], ServiceState]
    ) -> StateDoc:
        """Store analysis results and its lease (CAS; gateway/analysis_runner.py), unaudited."""
        return await self._change(service, edit, None, quiet=True)

    async def transition(
        self,
        service: str,
        fn: Callable[[rollout_mod.Rollout], rollout_mod.Rollout],
    ) -> StateDoc:
        """Apply one pure rollout move (a guard pause or resume); Conflict when none applies."""
        svc = self.config.services[service]

        def edit(st: ServiceState, snap: Snapshot) -> ServiceState:
            raw = st.extra.get("rollout")
            if not isinstance(raw, Mapping):
                raise Conflict(f"service {service!r} has no rollout", "state")
            nxt = fn(rollout_mod.Rollout.from_json(raw))
            return self._with_rollout(st, svc, snap.weights.get(service, {}), nxt)

        return await self._change(service, edit, None)

    async def trip(
        self,
        service: str,
        release: str,
        reason: str,
        *,
        now: float | None = None,
    ) -> StateDoc:
        """The guard's rollback: weight 0, rollout CircuitBreak (until confirm/retry), persisted."""
        svc = self.config.services[service]
        now = time.time() if now is None else now
        confirm_timeout = self.config.rollout.confirm_timeout

        def edit(st: ServiceState, snap: Snapshot) -> ServiceState:
            current = snap.weights.get(service, {})
            change = {release: 0.0}
            base = st.extra.get("baseline")
            baseline = base if isinstance(base, str) and base in svc.releases else svc.baseline
            if release != baseline and not any(
                w > 0 for r, w in current.items() if r != release and r in svc.releases
            ):
                change[baseline] = 100.0  # the only live release failed: back to baseline
            weights = changes.weights_change(svc, current, change)
            raw = st.extra.get("rollout")
            cur = rollout_mod.Rollout.from_json(raw) if isinstance(raw, Mapping) else None
            mine = cur is not None and cur.release == release
            if current.get(release, 0.0) <= 0 or (
                mine and cur is not None and cur.state == rollout_mod.CIRCUIT_BREAK
            ):  # another worker or replica rolled it back first
                raise Conflict(f"{release!r} of {service!r} is already rolled back", "state")
            if mine and cur is not None and cur.state in rollout_mod.ACTIVE:
                r = rollout_mod.circuit_break(cur, reason, now, confirm_timeout)
            else:
                # No rollout of it: a one-step plan at its old share, so `retry` restores it.
                pct = current.get(release, 0.0) / (sum(current.values()) or 1.0) * 100.0
                r = replace(
                    rollout_mod.Rollout(release, (rollout_mod.Step(min(100.0, pct), None),)),
                    state=rollout_mod.CIRCUIT_BREAK,
                    step=0,
                    reason=reason,
                    confirm_by=now + confirm_timeout,
                )
            return replace(st, weights=weights, extra={**st.extra, "rollout": r.to_json()})

        return await self._change(service, edit, None)

    # ------------------------------------------------------------------ reload
    def reload(self) -> ReloadResult:
        """SIGHUP / POST /admin/reload: validate the config file first, then swap."""
        source = self.config.source
        if source.startswith("<"):
            err = (
                "(file)",
                f"the running config came from {source}, not a file: nothing to re-read",
            )
            log.error("reload: %s: %s", *err)
            return ReloadResult(False, (err,))
        if _not_regular(source):  # a FIFO put in its place would hold this loop for good
            err = ("(file)", f"{source} is no longer a regular file: nothing to re-read")
            log.error("reload: %s: %s", *err)
            return ReloadResult(False, (err,))
        try:
            new = self.adjust(config_mod.load(source))
        except ConfigError as e:
            for path, msg in e.errors:
                log.error("reload: %s: %s: %s", source, path, msg)
            log.error("reload: %d error(s); the running config is kept", len(e.errors))
            return ReloadResult(False, tuple(e.errors))
        warnings = tuple(
            f"{f}: changed in {source}; takes effect on restart"
            for f in _RESTART_ONLY
            if getattr(new, f) != getattr(self.config, f)
        )
        for w in warnings:
            log.warning("reload: %s", w)
        keep = {f: getattr(self.config, f) for f in _RESTART_ONLY}
        self.config = replace(new, **keep)
        self._warned.clear()
        self.segments.forget()  # live lists re-read their user files too
        self._apply(self.doc)
        log.info("reload: %s applied (state version %d)", source, self.doc.version)
        for fn in self.reload_listeners:
            fn()
        return ReloadResult(True, (), warnings)


def _not_regular(path: str) -> bool:
    """Whether `path` names something other than a regular file (load() names a missing one)."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
