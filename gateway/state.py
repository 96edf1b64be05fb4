"""The routing table as one immutable snapshot, swapped atomically.

Why: a weight change, a new endpoint set or a config reload builds a complete
new `Snapshot`; a request reads `holder.current` once, so it sees the old or
the new table, never a mix (README "Admin API": applied whole). Everything a request needs
is precomputed here, not per request.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.balancer import Pool, SlotRegistry
from gateway.config import Config, Endpoint, GuardConfig, ServiceConfig
from gateway.propagation import build_baggage
from gateway.routing import ServiceMatcher, TrustPolicy, WeightTable
from gateway.tls_config import UpstreamTLS

EndpointMap = Mapping[tuple[str, str], tuple[Endpoint, ...]]


@dataclass(frozen=True, slots=True)
class ReleaseView:
    name: str
    raw_weight: float
    share: float
    endpoints: tuple[Endpoint, ...]
    pool: Pool
    baggage: tuple[tuple[str, str], ...]  # extra members besides release.stage
    extra_baggage: tuple[tuple[str, str], ...]  # release.stage + the extras, in order
    stage_h: tuple[bytes, bytes]  # (configured stage header, name): to the upstream and client
    baggage_h: tuple[bytes, bytes]  # the whole baggage field when the client sent none
    tls: UpstreamTLS | None = None  # for its https:// endpoints (gateway/tls_config.py)


@dataclass(frozen=True, slots=True)
class ServiceView:
    cfg: ServiceConfig
    table: WeightTable
    releases: Mapping[str, ReleaseView]
    available: frozenset[str]  # releases with at least one healthy endpoint
    guard: GuardConfig
    pools: tuple[Pool, ...] = ()  # every release's pool, for the per-request health check

    @property
    def name(self) -> str:
        return self.cfg.name


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    config: Config
    services: Mapping[str, ServiceView]
    matcher: ServiceMatcher
    trust: TrustPolicy
    stage_l: bytes
    user_l: bytes
    weights: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # Live endpoint state (in flight, health), handed from each snapshot to the next.
    slots: SlotRegistry = field(default_factory=SlotRegistry)


def live_releases(sv: ServiceView, now: float) -> frozenset[str]:
    """Releases that can serve now: with endpoints, and not all of them ejected.

    Why here: the data path and `explain` both decide with this set, so the
    baseline fallback (README "How routing decides") covers passive-health ejections too. If every
    release is out, all of them are probed rather than the request refused.
    """
    for pool in sv.pools:
        if pool.group.down_until > now:
            break
    else:
        return sv.available  # the common case: nothing ejected
    live = frozenset(r for r in sv.available if sv.releases[r].pool.live(now) != ())
    return live or sv.available


def static_endpoints(config: Config) -> dict[tuple[str, str], tuple[Endpoint, ...]]:
    """Endpoints listed in the config (Consul-discovered ones come from discovery)."""
    return {
        (s.name, r.name): r.upstreams
        for s in config.services.values()
        for r in s.releases.values()
        if r.upstreams
    }


def effective_weights(
    config: Config, overrides: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """Config weights with the state store's accepted changes laid over them."""
    out: dict[str, dict[str, float]] = {}
    for s in config.services.values():
        w = {r.name: r.weight for r in s.releases.values()}
        for rel, v in overrides.get(s.name, {}).items():
            if rel in w:
                w[rel] = float(v)
        if not any(v > 0 for v in w.values()):
            # A stored change that would zero a service (e.g. a release removed
            # from config) must not black-hole it: the baseline serves.
            w[s.baseline] = 1.0
        out[s.name] = w
    return out


def build_snapshot(
    config: Config,
    *,
    version: int = 0,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    guard_overrides: Mapping[str, Mapping[str, float]] | None = None,
    endpoints: EndpointMap | None = None,
    previous: Snapshot | None = None,
    rng: random.Random | None = None,
) -> Snapshot:
    """Assemble a complete routing table; pools share live endpoint state with the previous one."""
    rng = rng or random.Random()
    registry = previous.slots if previous is not None else SlotRegistry()
    live: dict[tuple[str, str], frozenset[str]] = {}
    eps = static_endpoints(config) if endpoints is None else endpoints
    weights = effective_weights(config, overrides or {})
    rc = config.routing
    stage_name_b = rc.stage_header.encode()
    services: dict[str, ServiceView] = {}
    for s in config.services.values():
        table = WeightTable.build(s.salt or s.name, weights[s.name])
        releases: dict[str, ReleaseView] = {}
        for r in s.releases.values():
            e = tuple(eps.get((s.name, r.name), ()))
            group = registry.group(s.name, r.name)
            live[(s.name, r.name)] = frozenset(x.address for x in e)
            old = None
            if previous is not None and (ps := previous.services.get(s.name)) is not None:
                if (pr := ps.releases.get(r.name)) is not None and pr.pool.kind == s.balancer:
                    old = pr.pool
            if (
                old is not None
                and old.group is group
                and old.outlier == r.outlier
                and old_eps_equal(old, e)
            ):
                pool = old
            else:
                pool = Pool(e, s.balancer, rng, group, r.outlier)
            releases[r.name] = ReleaseView(
                name=r.name,
                raw_weight=weights[s.name][r.name],
                share=table.shares[r.name],
                endpoints=e,
                pool=pool,
                baggage=r.baggage,
                extra_baggage=(extra := (("release.stage", r.name), *r.baggage)),
                stage_h=(stage_name_b, r.name.encode()),
                baggage_h=(b"baggage", (build_baggage((), extra) or "").encode("latin-1")),
                tls=r.upstream_tls,
            )
        guard = s.guard
        go = (guard_overrides or {}).get(s.name)
        if go:
            fields: dict[str, Any] = {k: v for k, v in go.items() if hasattr(guard, k)}
            guard = replace(guard, **fields)
        services[s.name] = ServiceView(
            cfg=s,
            table=table,
            releases=releases,
            available=frozenset(n for n, rv in releases.items() if rv.endpoints),
            guard=guard,
            pools=tuple(rv.pool for rv in releases.values()),
        )
    registry.prune(live)
    return Snapshot(
        version=version,
        config=config,
        services=services,
        matcher=ServiceMatcher(
            (s.name, s.match.hosts, s.match.path_prefix) for s in config.services.values()
        ),
        trust=TrustPolicy(rc.trust_overrides),
        stage_l=rc.stage_header.lower().encode(),
        user_l=rc.user_header.lower().encode(),
        weights=weights,
        slots=registry,
    )


def old_eps_equal(pool: Pool, eps: tuple[Endpoint, ...]) -> bool:
    return tuple(s.endpoint for s in pool.slots) == eps


class SnapshotHolder:
    """The one mutable reference to the current snapshot; listeners hear every swap."""

    __slots__ = ("current", "_listeners")

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot
        self._listeners: list[Callable[[Snapshot], None]] = []

    def swap(self, snapshot: Snapshot) -> None:
        self.current = snapshot
        for fn in self._listeners:
            fn(snapshot)

    def subscribe(self, fn: Callable[[Snapshot], None]) -> None:
        self._listeners.append(fn)
