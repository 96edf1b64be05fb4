"""Configuration: YAML -> frozen dataclasses, validated once by `load()`.

Why: every other module takes plain, already-validated values; validation
reports *every* mistake with its path so an operator fixes a file in one pass
(SPEC §5).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from gateway.errors import ConfigError
from gateway.retry import BUDGET_MIN, BUDGET_RATIO, DEFAULT_RETRIES, MAX_RETRIES

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
    connect: float = 2.0
    read: float = 30.0
    total: float | None = None


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

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ConsulSelector:
    service: str
    tags: tuple[str, ...] = ()
    datacenter: str | None = None


@dataclass(frozen=True, slots=True)
class ReleaseConfig:
    name: str
    weight: float
    upstreams: tuple[Endpoint, ...] = ()
    consul: ConsulSelector | None = None
    baggage: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class MatchConfig:
    hosts: tuple[str, ...] = ()
    path_prefix: str = "/"


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


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: HostPort = HostPort("127.0.0.1", 9901)
    token_env: str | None = "GATEWAY_ADMIN_TOKEN"
    token: str | None = None  # resolved from token_env at load time


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


def parse_hostport(value: object) -> HostPort | None:
    if not isinstance(value, str):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]") or "0.0.0.0"
    p = int(port)
    return HostPort(host, p) if 0 <= p <= 65535 else None


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


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
            errs.add(f"{path}.{k}" if path else str(k), "unknown field")


def _duration(m: Mapping[str, Any], key: str, default: float, path: str, errs: _Errors) -> float:
    if key not in m:
        return default
    d = parse_duration(m[key])
    if d is None:
        errs.add(f"{path}.{key}" if path else key, "must be a duration such as 2s, 300ms or 5m")
        return default
    return d


def _number(
    m: Mapping[str, Any], key: str, default: float, path: str, errs: _Errors, *, minimum: float = 0
) -> float:
    if key not in m:
        return default
    v = m[key]
    if not _is_number(v) or v < minimum:
        errs.add(f"{path}.{key}", f"must be a number >= {minimum:g}")
        return default
    return float(v)


def _string(m: Mapping[str, Any], key: str, default: str, path: str, errs: _Errors) -> str:
    if key not in m:
        return default
    v = m[key]
    if not isinstance(v, str) or not v:
        errs.add(f"{path}.{key}" if path else key, "must be a non-empty string")
        return default
    return v


def _bool(m: Mapping[str, Any], key: str, default: bool, path: str, errs: _Errors) -> bool:
    if key not in m:
        return default
    v = m[key]
    if not isinstance(v, bool):
        errs.add(f"{path}.{key}", "must be true or false")
        return default
    return v


def parse_endpoint(value: object) -> Endpoint | None:
    """'http://host:port' (or 'host:port') -> Endpoint; only plain HTTP upstreams."""
    weight = 1
    if isinstance(value, Mapping):
        w = value.get("weight", 1)
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            return None
        weight = w
        value = value.get("url")
    if not isinstance(value, str):
        return None
    text = value if "://" in value else f"http://{value}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        return None
    return Endpoint(parts.hostname, port or 80, weight)


def _timeouts(v: object, path: str, errs: _Errors, base: Timeouts) -> Timeouts:
    m = _mapping(v, path, errs)
    _unknown(m, {"connect", "read", "total"}, path, errs)
    total = base.total
    if "total" in m and m["total"] is not None:
        total = _duration(m, "total", 0.0, path, errs) or None
    return Timeouts(
        connect=_duration(m, "connect", base.connect, path, errs),
        read=_duration(m, "read", base.read, path, errs),
        total=total,
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
        window=_duration(m, "window", d.window, path, errs),
        min_requests=min_req,
        min_endpoints=min_ep,
        alert_webhook=hook,
        enabled=_bool(m, "enabled", True, path, errs),
    )


def _release(name: str, v: object, path: str, errs: _Errors) -> ReleaseConfig:
    m = _mapping(v, path, errs)
    _unknown(m, {"weight", "upstreams", "consul", "baggage"}, path, errs)
    if not _NAME_RE.match(name):
        errs.add(path, "release name must be letters, digits, '.', '_' or '-'")
    weight = 0.0
    if "weight" not in m:
        errs.add(f"{path}.weight", "is required (a number >= 0)")
    else:
        weight = _number(m, "weight", 0.0, path, errs)
    ups: list[Endpoint] = []
    raw_ups = m.get("upstreams")
    if raw_ups is not None:
        if not isinstance(raw_ups, list):
            errs.add(f"{path}.upstreams", "must be a list of http://host:port URLs")
        else:
            for i, u in enumerate(raw_ups):
                ep = parse_endpoint(u)
                if ep is None:
                    errs.add(f"{path}.upstreams[{i}]", f"not an http://host:port URL: {u!r}")
                else:
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
                errs.add(f"{path}.baggage.{k}", "must be token: string")
            else:
                baggage.append((k, str(bv)))
    return ReleaseConfig(name, weight, tuple(ups), consul, tuple(baggage))


def _retries(m: Mapping[str, object], path: str, errs: _Errors, default: int) -> int:
    """`retries`: failover attempts after the first, an integer 0..10 (README "Failover")."""
    v = m.get("retries", default)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_RETRIES:
        errs.add(
            f"{path}.retries" if path else "retries",
            f"must be an integer between 0 and {MAX_RETRIES}",
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
        errs.add("retry_budget.percent", "must be a number between 0 and 100")
        pct = d.percent
    mc = m.get("min_concurrent", d.min_concurrent)
    if not isinstance(mc, int) or isinstance(mc, bool) or not 0 <= mc <= 10000:
        errs.add("retry_budget.min_concurrent", "must be an integer between 0 and 10000")
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
        {"match", "baseline", "balancer", "timeouts", "retries", "releases", "guard", "salt"},
        path,
        errs,
    )
    mm = _mapping(m.get("match"), f"{path}.match", errs)
    _unknown(mm, {"hosts", "path_prefix"}, f"{path}.match", errs)
    hosts = mm.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        errs.add(f"{path}.match.hosts", "must be a list of host names")
        hosts = []
    prefix = mm.get("path_prefix", "/")
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        errs.add(f"{path}.match.path_prefix", "must be a path starting with '/'")
        prefix = "/"
    releases: dict[str, ReleaseConfig] = {}
    rm = _mapping(m.get("releases"), f"{path}.releases", errs)
    if not rm:
        errs.add(f"{path}.releases", "at least one release is required")
    for rname, rv in rm.items():
        releases[str(rname)] = _release(str(rname), rv, f"{path}.releases.{rname}", errs)
    baseline = _string(m, "baseline", "stable", path, errs)
    if releases and baseline not in releases:
        errs.add(f"{path}.baseline", f"names no release (have: {', '.join(releases)})")
    if releases and all(r.weight == 0 for r in releases.values()):
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
        match=MatchConfig(tuple(h.lower() for h in hosts), prefix),
        baseline=baseline,
        balancer=balancer,
        timeouts=_timeouts(m.get("timeouts"), f"{path}.timeouts", errs, base_t),
        retries=_retries(m, path, errs, base_retries),
        salt=salt,
        guard=_guard(m.get("guard"), f"{path}.guard", errs),
    )


def _routing(v: object, errs: _Errors) -> RoutingConfig:
    m = _mapping(v, "routing", errs)
    d = RoutingConfig()
    _unknown(m, {f for f in RoutingConfig.__dataclass_fields__}, "routing", errs)
    names = {}
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
        errs.add("routing.sticky_cookie_max_age", "must be an integer >= 0 (seconds)")
        max_age = d.sticky_cookie_max_age
    return RoutingConfig(
        sticky_cookie=_bool(m, "sticky_cookie", False, "routing", errs),
        sticky_cookie_max_age=max_age,
        trust_overrides=trust,
        **names,
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
        },
        "",
        errs,
    )
    listen = HostPort("0.0.0.0", 8080)
    if "listen" in m:
        hp = parse_hostport(m["listen"])
        if hp is None:
            errs.add("listen", "must be host:port")
        else:
            listen = hp
    am = _mapping(m.get("admin"), "admin", errs)
    _unknown(am, {"listen", "token_env"}, "admin", errs)
    admin_listen = AdminConfig().listen
    if "listen" in am:
        hp = parse_hostport(am["listen"])
        if hp is None:
            errs.add("admin.listen", "must be host:port")
        else:
            admin_listen = hp
    token_env = am.get("token_env", "GATEWAY_ADMIN_TOKEN")
    if token_env is not None and (not isinstance(token_env, str) or not token_env):
        errs.add("admin.token_env", "must be an environment variable name or null")
        token_env = None
    token = env.get(token_env) if token_env else None
    admin = AdminConfig(admin_listen, token_env, token or None)

    workers = m.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 256:
        errs.add("workers", "must be an integer between 1 and 256")
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
        poll_interval=_duration(sm, "poll_interval", 0.25, "state", errs),
    )
    cm = _mapping(m.get("consul"), "consul", errs)
    _unknown(cm, {"address", "kv_prefix", "token", "poll_wait"}, "consul", errs)
    consul = ConsulConfig(
        address=env.get("CONSUL_HTTP_ADDR")
        or _string(cm, "address", ConsulConfig().address, "consul", errs),
        kv_prefix=_string(cm, "kv_prefix", ConsulConfig().kv_prefix, "consul", errs),
        token=env.get("CONSUL_HTTP_TOKEN") or cm.get("token"),
        poll_wait=_duration(cm, "poll_wait", 30.0, "consul", errs),
    )
    if consul.address and "://" not in consul.address:
        consul = ConsulConfig(
            f"http://{consul.address}", consul.kv_prefix, consul.token, consul.poll_wait
        )
    base_t = _timeouts(m.get("timeouts"), "timeouts", errs, Timeouts())
    base_retries = _retries(m, "", errs, DEFAULT_RETRIES)
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
            if not _NAME_RE.match(str(name)):
                errs.add(
                    f"services.{name}", "service name must be letters, digits, '.', '_' or '-'"
                )
            services[str(name)] = _service(
                str(name), v, f"services.{name}", errs, base_t, base_retries
            )
    routing = _routing(m.get("routing"), errs)
    drain = _duration(m, "drain_timeout", 30.0, "", errs)
    access_log = _bool(m, "access_log", False, "", errs)
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
    except OSError as e:
        raise ConfigError([("(file)", f"cannot read {p}: {e.strerror or e}")], p) from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([("(yaml)", f"not valid YAML: {e}")], p) from e
    return build(raw, env=env, source=p)
