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
from gateway.config import Config, Endpoint, GuardConfig, RoutingConfig, ServiceConfig
from gateway.headers import Field, ReleaseLines
from gateway.propagation import GRAY_TAG_KEY, build_baggage, gray_tag
from gateway.routing import ServiceMatcher, TrustPolicy, WeightTable
from gateway.segments import SegmentSet
from gateway.tls_config import UpstreamTLS

EndpointMap = Mapping[tuple[str, str], tuple[Endpoint, ...]]
PRIVACY_KEEP = 0
PRIVACY_HASH = 1
PRIVACY_DROP = 2
_PRIVACY_MODES = {"keep": PRIVACY_KEEP, "hash": PRIVACY_HASH, "drop": PRIVACY_DROP}


@dataclass(frozen=True, slots=True)
class ReleaseView:
    name: str
    raw_weight: float
    share: float
    endpoints: tuple[Endpoint, ...]
    pool: Pool
    baggage: tuple[tuple[str, str], ...]  # extra members besides release.stage
    extra_baggage: tuple[tuple[str, str], ...]  # release.stage + the extras, in order
    stage_h: Field  # (configured stage header, name): to the upstream and client
    baggage_h: Field  # the whole baggage field when the client sent none
    lines: ReleaseLines  # stage_h and baggage_h rendered for the upstream head
    gray_tag: str | None = None  # the release's `tag:` as `k=v;k2=v2` (span attribute)
    tls: UpstreamTLS | None = None  # for its https:// endpoints (gateway/tls_config.py)


@dataclass(frozen=True, slots=True)
class ServiceView:
    cfg: ServiceConfig
    table: WeightTable
    releases: dict[str, ReleaseView]
    available: frozenset[str]  # releases with at least one healthy endpoint
    guard: GuardConfig
    # `cfg` fields every request reads, copied here: a native attribute in the
    # compiled build, where `cfg.x` (a plain dataclass) is a generic attribute lookup.
    baseline: str
    segments: SegmentSet | None
    connect_timeout: float
    read_timeout: float
    total_timeout: float  # 0.0: none
    retries: int
    pools: tuple[Pool, ...] = ()  # every release's pool, for the per-request health check
    # README "Segments", precomputed: colouring tag -> release (this service's only),
    # lane -> release, releases a tripped rollout took out of tags/lanes/segments.
    tags: Mapping[str, str] = field(default_factory=dict)
    lanes: Mapping[str, str] = field(default_factory=dict)
    tripped: frozenset[str] = frozenset()
    lane_reject: bool = False

    @property
    def name(self) -> str:
        return self.cfg.name


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    config: Config
    services: dict[str, ServiceView]
    matcher: ServiceMatcher
    trust: TrustPolicy
    stage_l: bytes
    user_l: bytes
    routing: RoutingConfig  # config.routing; its fields every request reads, copied:
    stage_cookie: str
    user_cookie: str
    sticky_cookie: bool
    weights: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    proxies: TrustPolicy = field(default_factory=lambda: TrustPolicy(()))  # trusted_proxies
    proxies_on: bool = False  # any trusted proxy configured
    lanes_trust: TrustPolicy = field(default_factory=lambda: TrustPolicy(()))
    tag_l: bytes = b"x-traffic-tag"
    privacy_mode: int = 0  # PRIVACY_KEEP | PRIVACY_HASH | PRIVACY_DROP (privacy.user_id)
    privacy_salt: str = ""
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
    tripped: Mapping[str, frozenset[str]] | None = None,
) -> Snapshot:
    """Assemble a complete routing table; pools share live endpoint state with the previous one.

    `tripped`: per service, the releases whose rollout is in CircuitBreak or
    RolledBack (gateway/decide.py's `tripped_releases`).
    """
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
            gt = gray_tag(r.tag) if r.tag else None
            extra = (("release.stage", r.name), *r.baggage)
            if gt is not None:
                extra = (*extra, (GRAY_TAG_KEY, gt))
            stage_h = Field(stage_name_b, r.name.encode())
            baggage_h = Field(b"baggage", (build_baggage((), extra) or "").encode("latin-1"))
            releases[r.name] = ReleaseView(
                name=r.name,
                raw_weight=weights[s.name][r.name],
                share=table.shares[r.name],
                endpoints=e,
                pool=pool,
                baggage=r.baggage,
                extra_baggage=extra,
                stage_h=stage_h,
                baggage_h=baggage_h,
                lines=ReleaseLines(stage_h, baggage_h),
                gray_tag=gt,
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
            baseline=s.baseline,
            segments=s.segments,
            connect_timeout=s.timeouts.connect,
            read_timeout=s.timeouts.read,
            total_timeout=s.timeouts.total or 0.0,
            retries=s.retries,
            pools=tuple(rv.pool for rv in releases.values()),
            tags={v: r for v, r in rc.tags if r in releases},
            lanes={
                **{n: n for n in releases if n != s.baseline},
                **{lane: r.name for r in s.releases.values() for lane in r.lanes},
            },
            tripped=(tripped or {}).get(s.name, frozenset()),
            lane_reject=rc.lane_fallback == "reject",
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
        routing=rc,
        stage_cookie=rc.stage_cookie,
        user_cookie=rc.user_cookie,
        sticky_cookie=rc.sticky_cookie,
        weights=weights,
        slots=registry,
        proxies=TrustPolicy(rc.trusted_proxies),
        proxies_on=bool(rc.trusted_proxies),
        lanes_trust=TrustPolicy(rc.lanes_trust),
        tag_l=rc.tag_header.lower().encode(),
        privacy_mode=_PRIVACY_MODES[config.privacy.user_id],
        privacy_salt=config.privacy.salt,
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
