"""Configuration: YAML -> frozen dataclasses, validated once by `load()`.

Why: every other module takes plain, already-validated values; validation
reports *every* mistake with its path so an operator fixes a file in one pass
(README "Config walkthrough", docs/configuration.md).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from gateway import files
from gateway.analysis_config import AnalysisConfig, parse_analysis
from gateway.config_syntax import (
    consul_address,
    key_path,
    listen_address,
    load_yaml,
    match_host,
    path_prefix_problem,
    upstream_url,
    yaml_problem,
)
from gateway.errors import ConfigError
from gateway.retry import BUDGET_MIN, BUDGET_RATIO, DEFAULT_RETRIES, MAX_RETRIES
from gateway.rollout_config import RolloutConfig, parse_rollout
from gateway.segments import SegmentSet
from gateway.segments_config import parse_segments
from gateway.statedoc import is_number, weight_problem
from gateway.steering_config import (
    DEFAULT_LANES_TRUST,
    PrivacyConfig,
    check_services,
    parse_privacy,
    parse_release,
    parse_routing,
)
from gateway.tls_config import (
    ContextCache,
    ListenerTLS,
    UpstreamTLS,
    consul_tls,
    parse_listener_tls,
    with_upstream_tls,
)
from gateway.upstream_config import UpstreamLimits, parse_upstream_limits

DEFAULT_CONFIG_PATH = "config/gateway.yaml"
BALANCERS = ("p2c", "round_robin", "hash")
ENGINES = ("fast", "aiohttp")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Every timeout the gateway enforces, in seconds (docs/configuration.md#timeouts).

    `connect`, `read` and `total` are per upstream exchange and may be set per
    service; the rest are per client connection and set only at top level.
    """

    connect: float = 2.0  # opening an upstream connection -> 502 `connect`
    read: float = 30.0  # between reads of the upstream response -> 504 `timeout`
    total: float | None = None
    header: float = 30.0  # from a request's first byte to the end of its head -> 408
    body: float = 10.0  # window over which a request body must make progress -> 408
    body_min_rate: float = 240.0  # bytes/s the body must average over each `body` window
    idle: float = 75.0  # an idle keep-alive client connection is closed
    idle_park: float = 0.5  # idle this long, it is parked outside uvloop (fast engine); 0: never
    upstream_idle: float = 60.0  # an idle pooled upstream connection is closed


# Keys of `timeouts:` that only make sense per client connection (top level only).
_CLIENT_TIMEOUTS = ("header", "body", "body_min_rate", "idle", "idle_park", "upstream_idle")


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    """Retries in flight per release: `percent` % of its requests in flight, >= `min_concurrent`."""

    percent: float = BUDGET_RATIO * 100.0
    min_concurrent: int = BUDGET_MIN


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    weight: int = 1
    tls: bool = False  # https:// (README "TLS")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ConsulSelector:
    service: str
    tags: tuple[str, ...] = ()
    datacenter: str | None = None


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health check of each endpoint of a release (README.md, "Endpoint health")."""

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy: int = 2  # consecutive passes that bring a failed endpoint back
    unhealthy: int = 3  # consecutive failures that take it out


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Outlier ejection on consecutive 5xx answers, as Envoy's `consecutive_5xx`."""

    consecutive_5xx: int = 5  # 0 turns it off
    max_ejection_percent: float = 50.0  # never eject more of a release than this
    ejection_time: float = 30.0


@dataclass(frozen=True, slots=True)
class ReleaseConfig:
    name: str
    weight: float
    upstreams: tuple[Endpoint, ...] = ()
    consul: ConsulSelector | None = None
    baggage: tuple[tuple[str, str], ...] = ()
    health_check: HealthCheckConfig | None = None
    outlier: OutlierConfig = OutlierConfig()
    lanes: tuple[str, ...] = ()  # lanes this release serves (README "Segments")
    tag: tuple[tuple[str, str], ...] = ()  # the gray tag: baggage and span `gray.tag`
    upstream_tls: UpstreamTLS | None = None  # effective, for https:// endpoints (tls_config.py)


@dataclass(frozen=True, slots=True)
class MatchConfig:
    hosts: tuple[str, ...] = ()
    path_prefix: str = "/"


RULE_METRICS = (
    "error_rate",
    "latency_p95_ms",
    "latency_p99_ms",
    "latency_p95_delta_ms",
    "healthy_endpoints",
)
RULE_ACTIONS = ("pause", "rollback")
ALERT_FORMATS = ("json", "slack", "dingtalk", "wecom")
TOKEN_ROLES = ("read", "write")


@dataclass(frozen=True, slots=True)
class GuardRule:
    """One extra guard rule; `healthy_endpoints` breaches *below* `threshold`, the rest above."""

    metric: str
    threshold: float
    action: str = "rollback"
    window: float | None = None  # None: the guard's window
    hold: float | None = None  # YAML `for`; None: the guard's `for`


@dataclass(frozen=True, slots=True)
class AlertTarget:
    url: str
    format: str = "json"


@dataclass(frozen=True, slots=True)
class GuardConfig:
    error_rate: float = 0.01
    latency_p95_ms: float = 800.0
    latency_p95_delta_ms: float = 200.0
    window: float = 300.0
    min_requests: int = 100
    min_endpoints: int = 1
    alert_webhook: str | None = None
    enabled: bool = True
    hold: float = 30.0  # YAML `for`: how long a breach must last before the guard acts
    rules: tuple[GuardRule, ...] = ()
    alerts: tuple[AlertTarget, ...] = ()


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str
    token: str
    role: str = "write"


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    releases: Mapping[str, ReleaseConfig]
    match: MatchConfig = MatchConfig()
    baseline: str = "stable"
    balancer: str = "p2c"
    timeouts: Timeouts = Timeouts()
    retries: int = DEFAULT_RETRIES  # failover attempts on other endpoints (README "Failover")
    salt: str = ""
    guard: GuardConfig = GuardConfig()
    segments: SegmentSet | None = None  # user segments, in order (gateway/segments.py)
    upstream: UpstreamLimits = UpstreamLimits()  # connection cap per endpoint (upstream_config.py)
    upstream_tls: UpstreamTLS | None = None  # as written; releases hold the effective one


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    stage_header: str = "X-Release-Stage"
    stage_cookie: str = "release_stage"
    user_header: str = "X-User-ID"
    user_cookie: str = "uid"
    sticky_cookie: bool = False
    sticky_cookie_max_age: int = 365 * 24 * 3600
    # True: trust every client; False: nobody; tuple: clients in these networks.
    trust_overrides: bool | tuple[Network, ...] = True
    # Who may steer and how (gateway/steering_config.py, README "Segments").
    trusted_proxies: tuple[Network, ...] = ()
    lanes_trust: tuple[Network, ...] = DEFAULT_LANES_TRUST
    tag_header: str = "X-Traffic-Tag"
    tags: tuple[tuple[str, str], ...] = ()  # tag header value -> release
    lanes: bool = False
    lane_fallback: str = "baseline"  # baseline | reject


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: HostPort = HostPort("127.0.0.1", 9901)
    token_env: str | None = "GATEWAY_ADMIN_TOKEN"
    token: str | None = None  # resolved from token_env at load time
    tokens_file: str | None = None
    tokens: tuple[AdminToken, ...] = ()  # named tokens read from tokens_file at load time


@dataclass(frozen=True, slots=True)
class StateConfig:
    store: str = "file"
    path: str = "var/gateway-state.json"
    poll_interval: float = 0.25


@dataclass(frozen=True, slots=True)
class ConsulConfig:
    address: str = "http://127.0.0.1:8500"
    kv_prefix: str = "gateway/default"
    token: str | None = None
    poll_wait: float = 30.0
    # Discovery's request pacing per watch (README.md, "Consul discovery").
    watch_rate: float = 2.0  # requests per second once the burst is spent
    watch_burst: float = 4.0
    # From the Consul CLI's TLS variables (gateway/tls_config.py); None: aiohttp's defaults.
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Config:
    services: Mapping[str, ServiceConfig]
    listen: HostPort = HostPort("0.0.0.0", 8080)
    admin: AdminConfig = AdminConfig()
    workers: int = 1
    engine: str = "fast"
    drain_timeout: float = 30.0
    access_log: bool = False
    state: StateConfig = StateConfig()
    consul: ConsulConfig = ConsulConfig()
    routing: RoutingConfig = RoutingConfig()
    timeouts: Timeouts = Timeouts()
    retries: int = DEFAULT_RETRIES  # the default for services that set none
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    alerts: tuple[AlertTarget, ...] = ()
    rollout: RolloutConfig = RolloutConfig()
    upstream: UpstreamLimits = UpstreamLimits()  # the default for services that set none
    privacy: PrivacyConfig = PrivacyConfig()
    tls: ListenerTLS | None = None  # the data listener speaks HTTPS (README "TLS")
    analysis: AnalysisConfig = AnalysisConfig()  # gateway/analysis_config.py
    source: str = field(default="<memory>", compare=False)


# --------------------------------------------------------------------------- parsing helpers


class _Errors:
    """Collects every problem with its dotted path instead of stopping at the first."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))


def parse_duration(value: object) -> float | None:
    """'2s' / '300ms' / '5m' / 3 -> seconds; None when malformed."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value >= 0 and math.isfinite(value) else None
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    return None


def _listen(
    m: Mapping[str, Any], key: str, default: HostPort, path: str, errs: _Errors
) -> HostPort:
    if key not in m:
        return default
    host, port, problem = listen_address(m[key])
    if problem is not None:
        errs.add(key_path(path, key), problem)
        return default
    return HostPort(host, port)


def _is_number(v: object) -> bool:
    return is_number(v)  # no OverflowError on a 400-digit integer


def _mapping(v: object, path: str, errs: _Errors) -> Mapping[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        errs.add(path, "must be a mapping")
        return {}
    return v


def _unknown(m: Mapping[str, Any], allowed: set[str], path: str, errs: _Errors) -> None:
    for k in m:
        if k not in allowed:
            near = difflib.get_close_matches(str(k), sorted(allowed), n=1)
            hint = (
                f"did you mean {near[0]!r}?" if near else f"allowed: {', '.join(sorted(allowed))}"
            )
            errs.add(key_path(path, k), f"unknown field ({hint})")


def _duration(
    m: Mapping[str, Any],
    key: str,
    default: float,
    path: str,
    errs: _Errors,
    *,
    positive: bool = False,
) -> float:
    if key not in m:
        return default
    d = parse_duration(m[key])
    if d is None:
        errs.add(key_path(path, key), "must be a duration such as 2s, 300ms or 5m")
        return default
    if positive and d <= 0:
        errs.add(key_path(path, key), "must be a positive duration such as 2s or 300ms, not 0")
        return default
    return d


def _string_number_hint(v: object) -> str | None:
    """Why a number field got a string that looks like a number, and how to write it.

    YAML 1.1 (what PyYAML reads) only takes a float with a dot and a signed
    exponent (`1.0e+3`); `1e3` is read as the string '1e3'.
    """
    if not isinstance(v, str):
        return None
    try:
        f = float(v.strip())
    except ValueError:
        return None
    if not math.isfinite(f):
        return None
    plain = str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)
    return (
        f"YAML read {v!r} as a string, not a number (YAML 1.1 needs a dot and a "
        f"signed exponent, e.g. 1.0e+3): write {plain}"
    )


def _number(
    m: Mapping[str, Any], key: str, default: float, path: str, errs: _Errors, *, minimum: float = 0
) -> float:
    if key not in m:
        return default
    v = m[key]
    if not _is_number(v) or v < minimum:
        errs.add(key_path(path, key), _string_number_hint(v) or f"must be a number >= {minimum:g}")
        return default
    return float(v)


def _string(m: Mapping[str, Any], key: str, default: str, path: str, errs: _Errors) -> str:
    if key not in m:
        return default
    v = m[key]
    if not isinstance(v, str) or not v:
        errs.add(key_path(path, key), "must be a non-empty string")
        return default
    return v


def _bool(m: Mapping[str, Any], key: str, default: bool, path: str, errs: _Errors) -> bool:
    if key not in m:
        return default
    v = m[key]
    if not isinstance(v, bool):
        errs.add(key_path(path, key), f"must be true or false, not {v!r}")
        return default
    return v


def parse_endpoint(value: object) -> Endpoint | None:
    """'http://host:port' (or 'host:port') -> Endpoint; only plain HTTP upstreams."""
    errs = _Errors()
    ep = _upstream(value, "", errs)
    return None if errs.items else ep


def _upstream(value: object, path: str, errs: _Errors) -> Endpoint | None:
    """One `upstreams` entry: a URL string or `{url, weight}`."""
    weight = 1
    url = value
    if isinstance(value, Mapping):
        _unknown(value, {"url", "weight"}, path, errs)
        w = value.get("weight", 1)
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            errs.add(
                key_path(path, "weight"),
                _string_number_hint(w) or f"upstream weight must be an integer >= 1, not {w!r}",
            )
            return None
        weight = w
        if "url" not in value:
            errs.add(key_path(path, "url"), "is required (an http://host:port URL)")
            return None
        url = value["url"]
        path = key_path(path, "url")
    if not isinstance(url, str):
        errs.add(path, f"must be an http://host:port URL string, not {url!r}")
        return None
    host, port, problem = upstream_url(url)
    if problem is not None:
        errs.add(path, problem)
        return None
    return Endpoint(host, port, weight, url.startswith("https://"))


def _timeouts(
    v: object, path: str, errs: _Errors, base: Timeouts, *, top: bool = False
) -> Timeouts:
    m = _mapping(v, path, errs)
    allowed = {"connect", "read", "total"}
    if top:
        allowed.update(_CLIENT_TIMEOUTS)
    else:
        for k in _CLIENT_TIMEOUTS:
            if k in m:
                errs.add(
                    key_path(path, k), "only settable in the top-level timeouts (per connection)"
                )
        allowed.update(k for k in _CLIENT_TIMEOUTS if k in m)
    _unknown(m, allowed, path, errs)

    def dur(key: str, default: float) -> float:
        return _duration(m, key, default, path, errs, positive=True)

    total = base.total
    if "total" in m and m["total"] is not None:
        total = dur("total", 1.0)
    if not top:
        return Timeouts(
            connect=dur("connect", base.connect),
            read=dur("read", base.read),
            total=total,
            header=base.header,
            body=base.body,
            body_min_rate=base.body_min_rate,
            idle=base.idle,
            idle_park=base.idle_park,
            upstream_idle=base.upstream_idle,
        )
    return Timeouts(
        connect=dur("connect", base.connect),
        read=dur("read", base.read),
        total=total,
        header=dur("header", base.header),
        body=dur("body", base.body),
        body_min_rate=_number(m, "body_min_rate", base.body_min_rate, path, errs),
        idle=dur("idle", base.idle),
        idle_park=_duration(m, "idle_park", base.idle_park, path, errs),  # 0: never park
        upstream_idle=dur("upstream_idle", base.upstream_idle),
    )


def _guard(v: object, path: str, errs: _Errors) -> GuardConfig:
    m = _mapping(v, path, errs)
    _unknown(
        m,
        {
            "error_rate",
            "latency_p95_ms",
            "latency_p95_delta_ms",
            "window",
            "min_requests",
            "min_endpoints",
            "alert_webhook",
            "enabled",
            "for",
            "rules",
            "alerts",
        },
        path,
        errs,
    )
    d = GuardConfig()
    error_rate = _number(m, "error_rate", d.error_rate, path, errs)
    if error_rate > 1:
        errs.add(f"{path}.error_rate", "must be a fraction between 0 and 1")
    hook = m.get("alert_webhook")
    if hook is not None and (
        not isinstance(hook, str) or not hook.startswith(("http://", "https://"))
    ):
        errs.add(f"{path}.alert_webhook", "must be an http(s) URL or null")
        hook = None
    min_req = m.get("min_requests", d.min_requests)
    if not isinstance(min_req, int) or isinstance(min_req, bool) or min_req < 1:
        errs.add(f"{path}.min_requests", "must be an integer >= 1")
        min_req = d.min_requests
    min_ep = m.get("min_endpoints", d.min_endpoints)
    if not isinstance(min_ep, int) or isinstance(min_ep, bool) or min_ep < 0:
        errs.add(f"{path}.min_endpoints", "must be an integer >= 0")
        min_ep = d.min_endpoints
    return GuardConfig(
        error_rate=error_rate,
        latency_p95_ms=_number(m, "latency_p95_ms", d.latency_p95_ms, path, errs),
        latency_p95_delta_ms=_number(m, "latency_p95_delta_ms", d.latency_p95_delta_ms, path, errs),
        window=_duration(m, "window", d.window, path, errs, positive=True),
        min_requests=min_req,
        min_endpoints=min_ep,
        alert_webhook=hook,
        enabled=_bool(m, "enabled", True, path, errs),
        hold=_duration(m, "for", d.hold, path, errs),
        rules=_rules(m.get("rules"), f"{path}.rules", errs),
        alerts=_alerts(m.get("alerts"), f"{path}.alerts", errs),
    )


def _rules(v: object, path: str, errs: _Errors) -> tuple[GuardRule, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        errs.add(path, "must be a list of {metric, above, window, action, for}")
        return ()
    out: list[GuardRule] = []
    for i, item in enumerate(v):
        p = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            errs.add(p, "must be a mapping {metric, above, window, action, for}")
            continue
        _unknown(item, {"metric", "above", "below", "window", "action", "for"}, p, errs)
        metric = item.get("metric")
        if metric not in RULE_METRICS:
            errs.add(f"{p}.metric", f"must be one of {', '.join(RULE_METRICS)}")
            continue
        key, other = ("below", "above") if metric == "healthy_endpoints" else ("above", "below")
        if other in item:
            errs.add(f"{p}.{other}", f"{metric} rules take `{key}`, not `{other}`")
        if key not in item:
            errs.add(f"{p}.{key}", f"is required for {metric} (a number >= 0)")
            continue
        threshold = _number(item, key, 0.0, p, errs)
        if metric == "error_rate" and threshold > 1:
            errs.add(f"{p}.{key}", "must be a fraction between 0 and 1")
        action = item.get("action", "rollback")
        if action not in RULE_ACTIONS:
            errs.add(f"{p}.action", f"must be one of {', '.join(RULE_ACTIONS)}")
            action = "rollback"
        window = _duration(item, "window", 0.0, p, errs) if "window" in item else None
        if window is not None and window < 1:
            errs.add(f"{p}.window", "must be at least 1s")
            window = None
        hold = _duration(item, "for", 0.0, p, errs) if "for" in item else None
        out.append(GuardRule(metric, threshold, action, window, hold))
    return tuple(out)


def _alerts(v: object, path: str, errs: _Errors) -> tuple[AlertTarget, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        errs.add(path, "must be a list of {url, format}")
        return ()
    out: list[AlertTarget] = []
    for i, item in enumerate(v):
        p = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            errs.add(p, "must be a mapping {url, format}")
            continue
        _unknown(item, {"url", "format"}, p, errs)
        url = item.get("url")
        if not isinstance(url, str) or not _http_url(url):
            errs.add(f"{p}.url", "must be an http(s) URL")
            continue
        fmt = item.get("format", "json")
        if fmt not in ALERT_FORMATS:
            errs.add(f"{p}.format", f"must be one of {', '.join(ALERT_FORMATS)}")
            continue
        out.append(AlertTarget(url, fmt))
    return tuple(out)


def _http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def read_tokens_file(path: str, errs: _Errors) -> tuple[AdminToken, ...]:
    """`name token [read|write]` per line; `#` comments and blank lines are skipped."""
    f = "admin.tokens_file"
    try:
        text = files.read_text(path)
    except (OSError, UnicodeDecodeError) as e:
        errs.add(f, f"cannot read {path!r}: {getattr(e, 'strerror', None) or e}")
        return ()
    out: list[AdminToken] = []
    names: set[str] = set()
    secrets: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        where = f"{path!r} line {n}"
        if len(parts) not in (2, 3):
            errs.add(f, f"{where}: expected `name token [read|write]`")
            continue
        name, token = parts[0], parts[1]
        role = parts[2] if len(parts) == 3 else "write"
        if not _NAME_RE.match(name):
            errs.add(f, f"{where}: name {name!r} must be letters, digits, '.', '_' or '-'")
        elif name in names:
            errs.add(f, f"{where}: name {name!r} is listed twice")
        elif role not in TOKEN_ROLES:
            errs.add(f, f"{where}: role {role!r} must be read or write")
        elif token in secrets:
            errs.add(f, f"{where}: the token of {name!r} is also another name's token")
        else:
            names.add(name)
            secrets.add(token)
            out.append(AdminToken(name, token, role))
    if not out and not any(p == f for p, _ in errs.items):
        errs.add(f, f"{path!r} lists no tokens")
    return tuple(out)


def _release(name: str, v: object, path: str, errs: _Errors) -> ReleaseConfig:
    m = _mapping(v, path, errs)
    _unknown(
        m,
        {
            "weight",
            "upstreams",
            "consul",
            "baggage",
            "health_check",
            "outlier",
            "upstream_tls",
            "lanes",
            "tag",
        },
        path,
        errs,
    )
    if not _NAME_RE.match(name):
        errs.add(path, "release name must be letters, digits, '.', '_' or '-'")
    weight = 0.0
    if "weight" not in m:
        errs.add(f"{path}.weight", "is required (a number >= 0)")
    else:
        weight = _number(m, "weight", 0.0, path, errs)
        if (why := weight_problem(weight)) is not None:  # bounds shared with the admin API
            errs.add(f"{path}.weight", why)
    ups: list[Endpoint] = []
    raw_ups = m.get("upstreams")
    if raw_ups is not None:
        if not isinstance(raw_ups, list):
            errs.add(f"{path}.upstreams", "must be a list of http://host:port URLs")
        else:
            for i, u in enumerate(raw_ups):
                ep = _upstream(u, f"{path}.upstreams[{i}]", errs)
                if ep is not None:
                    ups.append(ep)
    consul = None
    if m.get("consul") is not None:
        cp = f"{path}.consul"
        cm = _mapping(m["consul"], cp, errs)
        _unknown(cm, {"service", "tags", "datacenter"}, cp, errs)
        svc = cm.get("service")
        if not isinstance(svc, str) or not svc:
            errs.add(f"{cp}.service", "is required (the Consul service name)")
            svc = ""
        tags = cm.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            errs.add(f"{cp}.tags", "must be a list of non-empty strings")
            tags = []
        dc = cm.get("datacenter")
        if dc is not None and not isinstance(dc, str):
            errs.add(f"{cp}.datacenter", "must be a string")
            dc = None
        consul = ConsulSelector(svc, tuple(tags), dc)
    if raw_ups is None and consul is None:
        errs.add(path, "needs `upstreams` or `consul`")
    baggage: list[tuple[str, str]] = []
    if m.get("baggage") is not None:
        bm = _mapping(m["baggage"], f"{path}.baggage", errs)
        for k, bv in bm.items():
            if not isinstance(k, str) or not _HEADER_RE.match(k) or not isinstance(bv, str | int):
                errs.add(key_path(f"{path}.baggage", k), "must be token: string")
            else:
                baggage.append((k, str(bv)))
    hc = _health_check(m.get("health_check"), f"{path}.health_check", errs)
    outlier = _outlier(m.get("outlier"), f"{path}.outlier", errs)
    return ReleaseConfig(
        name,
        weight,
        tuple(ups),
        consul,
        tuple(baggage),
        hc,
        outlier,
        **parse_release(m, path, errs.add),
    )


def _count(m: Mapping[str, Any], key: str, default: int, path: str, errs: _Errors, lo: int) -> int:
    v = m.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= 1000:
        errs.add(f"{path}.{key}", f"must be a whole number from {lo} to 1000")
        return default
    return v


def _bounded(
    m: Mapping[str, Any], key: str, default: float, path: str, errs: _Errors, lo: float, hi: float
) -> float:
    v = m.get(key, default)
    if not _is_number(v) or not lo <= v <= hi:
        errs.add(f"{path}.{key}", f"must be a number from {lo:g} to {hi:g}")
        return default
    return float(v)


def _health_check(v: object, path: str, errs: _Errors) -> HealthCheckConfig | None:
    if v is None:
        return None
    m = _mapping(v, path, errs)
    d = HealthCheckConfig()
    _unknown(m, set(HealthCheckConfig.__dataclass_fields__), path, errs)
    hc_path = m.get("path", d.path)
    if not isinstance(hc_path, str) or not hc_path.startswith("/") or not hc_path.isprintable():
        errs.add(f"{path}.path", "must be an absolute path such as /healthz")
        hc_path = d.path
    elif any(c in hc_path for c in " #"):
        errs.add(f"{path}.path", "must not contain spaces or '#'")
        hc_path = d.path
    interval = _duration(m, "interval", d.interval, path, errs)
    timeout = _duration(m, "timeout", d.timeout, path, errs)
    if not 0 < interval <= 3600:
        errs.add(f"{path}.interval", "must be more than 0s and at most 1h")
    if not 0 < timeout <= interval:
        errs.add(f"{path}.timeout", "must be more than 0s and at most the interval")
    return HealthCheckConfig(
        hc_path,
        interval,
        timeout,
        _count(m, "healthy", d.healthy, path, errs, 1),
        _count(m, "unhealthy", d.unhealthy, path, errs, 1),
    )


def _outlier(v: object, path: str, errs: _Errors) -> OutlierConfig:
    d = OutlierConfig()
    if v is None:
        return d
    m = _mapping(v, path, errs)
    _unknown(m, set(OutlierConfig.__dataclass_fields__), path, errs)
    pct = _number(m, "max_ejection_percent", d.max_ejection_percent, path, errs)
    if pct > 100:
        errs.add(f"{path}.max_ejection_percent", "must be a number from 0 to 100")
        pct = d.max_ejection_percent
    ejection = _duration(m, "ejection_time", d.ejection_time, path, errs)
    if not 0 < ejection <= 3600:
        errs.add(f"{path}.ejection_time", "must be more than 0s and at most 1h")
    return OutlierConfig(
        _count(m, "consecutive_5xx", d.consecutive_5xx, path, errs, 0), pct, ejection
    )


def _retries(m: Mapping[str, object], path: str, errs: _Errors, default: int) -> int:
    """`retries`: failover attempts after the first, an integer 0..10 (README "Failover")."""
    v = m.get("retries", default)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_RETRIES:
        errs.add(
            f"{path}.retries" if path else "retries",
            f"must be an integer between 0 and {MAX_RETRIES}, not {v!r}",
        )
        return default
    return v


def _retry_budget(v: object, errs: _Errors) -> RetryBudgetConfig:
    """`retry_budget: {percent, min_concurrent}` (README "Failover")."""
    m = _mapping(v, "retry_budget", errs)
    _unknown(m, {"percent", "min_concurrent"}, "retry_budget", errs)
    d = RetryBudgetConfig()
    pct = m.get("percent", d.percent)
    if (
        not isinstance(pct, int | float)
        or isinstance(pct, bool)
        or not math.isfinite(pct)
        or not 0 <= pct <= 100
    ):
        errs.add("retry_budget.percent", f"must be a number between 0 and 100, not {pct!r}")
        pct = d.percent
    mc = m.get("min_concurrent", d.min_concurrent)
    if not isinstance(mc, int) or isinstance(mc, bool) or not 0 <= mc <= 10000:
        errs.add(
            "retry_budget.min_concurrent", f"must be an integer between 0 and 10000, not {mc!r}"
        )
        mc = d.min_concurrent
    return RetryBudgetConfig(float(pct), mc)


def _service(
    name: str,
    v: object,
    path: str,
    errs: _Errors,
    base_t: Timeouts,
    base_retries: int = DEFAULT_RETRIES,
) -> ServiceConfig:
    m = _mapping(v, path, errs)
    _unknown(
        m,
        {
            "match",
            "baseline",
            "balancer",
            "timeouts",
            "retries",
            "releases",
            "guard",
            "salt",
            "segments",
            "upstream",
            "upstream_tls",
            "analysis",  # gateway/analysis_config.py
        },
        path,
        errs,
    )
    mm = _mapping(m.get("match"), f"{path}.match", errs)
    _unknown(mm, {"hosts", "path_prefix"}, f"{path}.match", errs)
    hosts = _match_hosts(mm.get("hosts", []), f"{path}.match.hosts", errs)
    prefix = mm.get("path_prefix", "/")
    if not isinstance(prefix, str):
        errs.add(f"{path}.match.path_prefix", f"must be a path starting with '/', not {prefix!r}")
        prefix = "/"
    elif (problem := path_prefix_problem(prefix)) is not None:
        errs.add(f"{path}.match.path_prefix", problem)
        prefix = "/"
    releases: dict[str, ReleaseConfig] = {}
    rm = _mapping(m.get("releases"), f"{path}.releases", errs)
    if not rm:
        errs.add(f"{path}.releases", "at least one release is required")
    for rname, rv in rm.items():
        releases[str(rname)] = _release(str(rname), rv, key_path(f"{path}.releases", rname), errs)
    baseline = _string(m, "baseline", "stable", path, errs)
    if releases and baseline not in releases:
        have = ", ".join(repr(r) for r in releases)
        errs.add(f"{path}.baseline", f"{baseline!r} names no release (have: {have})")
    weight_paths = {key_path(f"{path}.releases", r) + ".weight" for r in rm}
    refused = any(p in weight_paths for p, _ in errs.items)  # that error is the cause
    if releases and not refused and all(r.weight == 0 for r in releases.values()):
        errs.add(f"{path}.releases", "all weights are zero; at least one must be > 0")
    balancer = _string(m, "balancer", "p2c", path, errs)
    if balancer not in BALANCERS:
        errs.add(f"{path}.balancer", f"must be one of {', '.join(BALANCERS)}")
    salt = m.get("salt", name)
    if not isinstance(salt, str):
        errs.add(f"{path}.salt", "must be a string")
        salt = name
    return ServiceConfig(
        name=name,
        releases=releases,
        match=MatchConfig(hosts, prefix),
        baseline=baseline,
        balancer=balancer,
        timeouts=_timeouts(m.get("timeouts"), f"{path}.timeouts", errs, base_t),
        retries=_retries(m, path, errs, base_retries),
        salt=salt,
        guard=_guard(m.get("guard"), f"{path}.guard", errs),
    )


def _match_hosts(v: object, path: str, errs: _Errors) -> tuple[str, ...]:
    if not isinstance(v, list):
        errs.add(path, f"must be a list of host names, not {v!r}")
        return ()
    hosts: list[str] = []
    for i, h in enumerate(v):
        if not isinstance(h, str):
            errs.add(f"{path}[{i}]", f"must be a host name string, not {h!r}")
            continue
        host, problem = match_host(h)
        if problem is not None:
            errs.add(f"{path}[{i}]", problem)
        elif host not in hosts:
            hosts.append(host)
    return tuple(hosts)


def _routing(v: object, errs: _Errors) -> RoutingConfig:
    m = _mapping(v, "routing", errs)
    d = RoutingConfig()
    _unknown(m, {f for f in RoutingConfig.__dataclass_fields__}, "routing", errs)
    names: dict[str, Any] = {}
    for key in ("stage_header", "stage_cookie", "user_header", "user_cookie"):
        val = _string(m, key, getattr(d, key), "routing", errs)
        if not _HEADER_RE.match(val):
            errs.add(f"routing.{key}", "must be a valid header/cookie name")
        names[key] = val
    trust: bool | tuple[Network, ...] = True
    raw = m.get("trust_overrides", True)
    if isinstance(raw, bool):
        trust = raw
    elif isinstance(raw, list):
        nets: list[Network] = []
        for i, c in enumerate(raw):
            try:
                nets.append(ipaddress.ip_network(str(c), strict=False))
            except ValueError:
                errs.add(f"routing.trust_overrides[{i}]", f"not a CIDR: {c!r}")
        trust = tuple(nets)
    else:
        errs.add("routing.trust_overrides", "must be true, false or a list of CIDRs")
    max_age = m.get("sticky_cookie_max_age", d.sticky_cookie_max_age)
    if not isinstance(max_age, int) or isinstance(max_age, bool) or max_age < 0:
        errs.add(
            "routing.sticky_cookie_max_age",
            _string_number_hint(max_age) or "must be an integer >= 0 (seconds)",
        )
        max_age = d.sticky_cookie_max_age
    return RoutingConfig(
        sticky_cookie=_bool(m, "sticky_cookie", False, "routing", errs),
        sticky_cookie_max_age=max_age,
        trust_overrides=trust,
        **names,
        **parse_routing(m, errs.add),
    )


def _with_segments(
    svc: ServiceConfig,
    m: Mapping[str, Any],
    path: str,
    errs: _Errors,
    env: Mapping[str, str],
    source: str,
) -> ServiceConfig:
    """`services.<s>.segments`, compiled once here (user files resolved next to the config)."""
    base_dir = Path(source).parent if source != "<memory>" else Path.cwd()
    segs = parse_segments(
        m["segments"],
        f"{path}.segments",
        errs.add,
        service=svc.name,
        releases=tuple(svc.releases),
        base_dir=base_dir,
        env=env,
    )
    return replace(svc, segments=segs)


_ANY_HOST = ("0.0.0.0", "::")


def _listeners_clash(data: HostPort, admin: HostPort) -> str | None:
    """Why `admin` cannot listen beside `data`, or None (port 0 never clashes)."""
    if data.port != admin.port or data.port == 0:
        return None
    if data.host == admin.host or data.host in _ANY_HOST or admin.host in _ANY_HOST:
        return (
            f"{str(admin)!r} overlaps the data listener {str(data)!r} (same port): "
            f"give the admin listener a port of its own"
        )
    return None


def _consul_address(cm: Mapping[str, Any], env: Mapping[str, str], errs: _Errors) -> str:
    """`consul.address`, overridden by CONSUL_HTTP_ADDR as Consul's own CLI does."""
    address = _string(cm, "address", ConsulConfig().address, "consul", errs)
    url, problem = consul_address(address)
    if problem is not None:
        errs.add("consul.address", problem)
    from_env = env.get("CONSUL_HTTP_ADDR")
    if from_env:
        env_url, problem = consul_address(from_env)
        if problem is not None:
            errs.add("CONSUL_HTTP_ADDR", f"(environment, overrides consul.address) {problem}")
        return env_url
    return url


def _match_collisions(services: Mapping[str, ServiceConfig], errs: _Errors) -> None:
    """Refuse two services with the same (host, path prefix): the second could never match.

    Hosts are already lower-cased (RFC 9110 §7.2: host names compare case-insensitively).
    """
    owner: dict[tuple[str, str], str] = {}
    refused = tuple(path for path, _ in errs.items)
    for s in services.values():
        prefix = s.match.path_prefix
        base = key_path("services", s.name) + ".match"
        if any(p.startswith(base) for p in refused):
            continue  # its match is not what the file says: a clash would be a guess
        keys = [(h, f"{base}.hosts[{i}]") for i, h in enumerate(s.match.hosts)] or [
            ("", f"{base}.path_prefix")
        ]
        for host, path in keys:
            first = owner.setdefault((host, prefix), s.name)
            if first == s.name:
                continue
            on = f"host {host!r}" if host else "no hosts (any host)"
            errs.add(
                path,
                f"{on} with path_prefix {prefix!r} is already matched by service {first!r}, "
                f"so service {s.name!r} would never be chosen (hosts compare case-insensitively)",
            )


def build(raw: object, *, env: Mapping[str, str] | None = None, source: str = "<memory>") -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    errs = _Errors()
    m = _mapping(raw, "", errs) if raw is not None else {}
    if raw is not None and not isinstance(raw, Mapping):
        errs.items = [("(root)", "must be a mapping")]
    _unknown(
        m,
        {
            "listen",
            "admin",
            "workers",
            "engine",
            "drain_timeout",
            "access_log",
            "state",
            "consul",
            "routing",
            "timeouts",
            "retries",
            "retry_budget",
            "services",
            "alerts",
            "rollout",
            "upstream",
            "privacy",
            "tls",
            "analysis",
        },
        "",
        errs,
    )
    listen = _listen(m, "listen", HostPort("0.0.0.0", 8080), "", errs)
    am = _mapping(m.get("admin"), "admin", errs)
    _unknown(am, {"listen", "token_env", "tokens_file"}, "admin", errs)
    admin_listen = _listen(am, "listen", AdminConfig().listen, "admin", errs)
    if (clash := _listeners_clash(listen, admin_listen)) is not None:
        errs.add("admin.listen", clash)
    token_env = am.get("token_env", "GATEWAY_ADMIN_TOKEN")
    if token_env is not None and (not isinstance(token_env, str) or not token_env):
        errs.add("admin.token_env", "must be an environment variable name or null")
        token_env = None
    token = env.get(token_env) if token_env else None
    tokens_file = am.get("tokens_file")
    tokens: tuple[AdminToken, ...] = ()
    if tokens_file is not None:
        if not isinstance(tokens_file, str) or not tokens_file:
            errs.add("admin.tokens_file", "must be a file path or null")
            tokens_file = None
        else:
            tokens = read_tokens_file(tokens_file, errs)
            if token and any(t.name == "admin" for t in tokens):
                errs.add("admin.tokens_file", "the name 'admin' is taken by the token_env token")
    admin = AdminConfig(admin_listen, token_env, token or None, tokens_file, tokens)

    workers = m.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 256:
        errs.add("workers", _string_number_hint(workers) or "must be an integer between 1 and 256")
        workers = 1
    engine = _string(m, "engine", "fast", "", errs)
    if engine not in ENGINES:
        errs.add("engine", f"must be one of {', '.join(ENGINES)}")
    sm = _mapping(m.get("state"), "state", errs)
    _unknown(sm, {"store", "path", "poll_interval"}, "state", errs)
    store = _string(sm, "store", "file", "state", errs)
    if store not in ("file", "consul", "memory"):
        errs.add("state.store", "must be file, consul or memory")
    state = StateConfig(
        store=store,
        path=_string(sm, "path", StateConfig().path, "state", errs),
        poll_interval=_duration(sm, "poll_interval", 0.25, "state", errs, positive=True),
    )
    cm = _mapping(m.get("consul"), "consul", errs)
    _unknown(
        cm,
        {"address", "kv_prefix", "token", "poll_wait", "watch_rate", "watch_burst"},
        "consul",
        errs,
    )
    consul_url, consul_ssl = consul_tls(_consul_address(cm, env, errs), env, errs.add)
    consul = ConsulConfig(
        address=consul_url,
        kv_prefix=_string(cm, "kv_prefix", ConsulConfig().kv_prefix, "consul", errs),
        token=env.get("CONSUL_HTTP_TOKEN") or cm.get("token"),
        poll_wait=_duration(cm, "poll_wait", 30.0, "consul", errs, positive=True),
        watch_rate=_bounded(cm, "watch_rate", ConsulConfig().watch_rate, "consul", errs, 0.01, 100),
        watch_burst=_bounded(cm, "watch_burst", ConsulConfig().watch_burst, "consul", errs, 1, 100),
        tls=consul_ssl,
    )
    base_dir = Path(source).parent if source != "<memory>" else Path.cwd()
    listener_tls = parse_listener_tls(m.get("tls"), errs.add, base_dir)
    tls_cache = ContextCache()
    base_t = _timeouts(m.get("timeouts"), "timeouts", errs, Timeouts(), top=True)
    base_retries = _retries(m, "", errs, DEFAULT_RETRIES)
    base_up = parse_upstream_limits(
        m.get("upstream"), "upstream", errs.add, UpstreamLimits(), parse_duration
    )
    retry_budget = _retry_budget(m.get("retry_budget"), errs)
    services: dict[str, ServiceConfig] = {}
    sv = m.get("services")
    if sv is None:
        errs.add("services", "is required: at least one service")
    else:
        svm = _mapping(sv, "services", errs)
        if isinstance(sv, Mapping) and not svm:
            errs.add("services", "at least one service is required")
        for name, v in svm.items():
            spath = key_path("services", name)
            if not _NAME_RE.match(str(name)):
                errs.add(spath, "service name must be letters, digits, '.', '_' or '-'")
            services[str(name)] = _service(str(name), v, spath, errs, base_t, base_retries)
            if isinstance(v, Mapping) and v.get("segments") is not None:
                services[str(name)] = _with_segments(
                    services[str(name)], v, spath, errs, env, source
                )
            sup = v.get("upstream") if isinstance(v, Mapping) else None
            services[str(name)] = replace(
                services[str(name)],
                upstream=parse_upstream_limits(
                    sup, f"{spath}.upstream", errs.add, base_up, parse_duration
                ),
            )
            if isinstance(v, Mapping):
                services[str(name)] = with_upstream_tls(
                    services[str(name)], v, spath, errs.add, base_dir, tls_cache
                )
        _match_collisions(services, errs)
    routing = _routing(m.get("routing"), errs)
    drain = _duration(m, "drain_timeout", 30.0, "", errs, positive=True)
    access_log = _bool(m, "access_log", False, "", errs)
    alerts = _alerts(m.get("alerts"), "alerts", errs)
    rollout = parse_rollout(m.get("rollout"), errs.add)
    privacy = parse_privacy(m.get("privacy"), env, errs.add)
    check_services(services, routing.tags, errs.add)
    svm_raw = m.get("services")
    analysis = parse_analysis(
        m.get("analysis"),
        {
            str(n): (v.get("analysis") if isinstance(v, Mapping) else None)
            for n, v in (svm_raw.items() if isinstance(svm_raw, Mapping) else ())
        },
        errs.add,
        env,
    )
    if errs.items:
        raise ConfigError(errs.items, source)
    return Config(
        services=services,
        listen=listen,
        admin=admin,
        workers=workers,
        engine=engine,
        drain_timeout=drain,
        access_log=access_log,
        state=state,
        consul=consul,
        routing=routing,
        timeouts=base_t,
        retries=base_retries,
        retry_budget=retry_budget,
        alerts=alerts,
        rollout=rollout,
        upstream=base_up,
        privacy=privacy,
        tls=listener_tls,
        analysis=analysis,
        source=source,
    )


def resolve_path(path: str | None, env: Mapping[str, str] | None = None) -> str:
    """Explicit -c wins, then GATEWAY_CONFIG, then the default path."""
    env = os.environ if env is None else env
    return path or env.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH


def load(path: str | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file."""
    p = resolve_path(path, env)
    try:
        text = Path(p).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not UTF-8 text ({e.reason})"
        raise ConfigError([("(file)", f"cannot read {p}: {why or e}")], p) from e
    return loads(text, env=env, source=p)


def loads(text: str, *, env: Mapping[str, str] | None = None, source: str = "<memory>") -> Config:
    """Parse and validate YAML text; duplicate keys are refused with everything else."""
    p = source
    try:
        raw, duplicates = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError([("(yaml)", yaml_problem(e))], p) from e
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError([("(yaml)", "not valid YAML: nested too deeply")], p) from None
    if not duplicates:
        return build(raw, env=env, source=p)
    try:  # report the duplicates together with everything else that is wrong
        build(raw, env=env, source=p)
    except ConfigError as e:
        raise ConfigError([*duplicates, *e.errors], p) from None
    raise ConfigError(duplicates, p)
