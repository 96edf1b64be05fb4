"""The `analysis:` config section: Prometheus queries that gate a rollout.

README "Progressive delivery" shows it at work.

Why its own module: config.py is already long; this section only needs the
field-naming error callback it is given, and is hooked in there with a few
lines. Every problem names the field (`gateway check` exits 2 with it).

Semantics follow Argo Rollouts' analysis
(https://argo-rollouts.readthedocs.io/en/stable/features/analysis/) where
it and Flagger agree; the defaults are in docs/configuration.md.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gateway.config_syntax import key_path

ACTIONS = ("rollback", "pause", "observe")
PLACEHOLDERS = ("service", "release", "baseline", "interval")
PLACEHOLDER_RE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Fields a template may carry (a metric adds `name` and `template`).
_FIELDS = (
    "query",
    "compare",
    "max",
    "min",
    "max_drop",
    "max_increase",
    "interval",
    "initial_delay",
    "failure_limit",
    "inconclusive_limit",
    "min_requests",
    "action",
)
MAX_LIMIT = 1000
MAX_INTERVAL = 86400.0

AddError = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One analysis metric, resolved (template merged, defaults applied)."""

    name: str
    query: str
    compare: str | None = None  # "baseline": the condition is on release - baseline
    max: float | None = None
    min: float | None = None
    max_drop: float | None = None
    max_increase: float | None = None
    interval: float = 30.0
    initial_delay: float = 30.0  # default: the interval
    failure_limit: int = 2
    inconclusive_limit: int = 3
    min_requests: int = 100
    action: str = "rollback"


@dataclass(frozen=True, slots=True)
class PrometheusConfig:
    address: str = "http://127.0.0.1:9090"
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class AnalysisConfig:
    prometheus: PrometheusConfig = PrometheusConfig()
    always: bool = False
    # Per service, the metrics in force (top-level ones, or the service's own).
    services: Mapping[str, tuple[MetricSpec, ...]] = field(default_factory=dict)

    def metrics_for(self, service: str) -> tuple[MetricSpec, ...]:
        return self.services.get(service, ())


def _duration(v: object) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v) if v >= 0 and math.isfinite(v) else None
    if isinstance(v, str):
        m = _DURATION_RE.match(v)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    return None


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _mapping(v: object, path: str, add: AddError) -> Mapping[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        add(path, "must be a mapping")
        return {}
    return v


def _unknown(m: Mapping[str, Any], allowed: tuple[str, ...], path: str, add: AddError) -> None:
    for k in m:
        if k not in allowed:
            add(key_path(path, k), f"unknown field (allowed: {', '.join(sorted(allowed))})")


def query_problem(query: str) -> str | None:
    """Why a query template is refused (an unknown `{{placeholder}}`), or None."""
    for m in PLACEHOLDER_RE.finditer(query):
        if m.group(1) not in PLACEHOLDERS:
            names = ", ".join("{{" + p + "}}" for p in PLACEHOLDERS)
            return f"unknown placeholder {m.group(0)!r} (known: {names})"
    return None


def _fields(m: Mapping[str, Any], path: str, add: AddError) -> dict[str, Any]:
    """Validate every field present; the valid ones, by name."""
    out: dict[str, Any] = {}
    for k in _FIELDS:
        if k not in m:
            continue
        v, p = m[k], key_path(path, k)
        if k == "query":
            if not isinstance(v, str) or not v.strip():
                add(p, "must be a non-empty PromQL query")
            elif (problem := query_problem(v)) is not None:
                add(p, problem)
            else:
                out[k] = v
        elif k == "compare":
            if v != "baseline":
                add(p, f"must be 'baseline', not {v!r}")
            else:
                out[k] = v
        elif k in ("max", "min"):
            if (n := _number(v)) is None:
                add(p, "must be a finite number")
            else:
                out[k] = n
        elif k in ("max_drop", "max_increase"):
            if (n := _number(v)) is None or n < 0:
                add(p, "must be a finite number >= 0 (in the query's own unit)")
            else:
                out[k] = n
        elif k in ("interval", "initial_delay"):
            d = _duration(v)
            if d is None or d > MAX_INTERVAL:
                add(p, "must be a duration such as 30s, 500ms or 5m (at most 24h)")
            elif k == "interval" and d <= 0:
                add(p, "must be a positive duration such as 30s, not 0")
            else:
                out[k] = d
        elif k in ("failure_limit", "inconclusive_limit", "min_requests"):
            lo = 0 if k == "min_requests" else 1
            hi = 10**9 if k == "min_requests" else MAX_LIMIT
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                add(p, f"must be an integer between {lo} and {hi}")
            else:
                out[k] = v
        elif k == "action":
            if v not in ACTIONS:
                add(p, f"must be one of {', '.join(ACTIONS)}, not {v!r}")
            else:
                out[k] = v
    return out


def _metric(
    v: object,
    path: str,
    templates: Mapping[str, dict[str, Any]],
    bad_templates: set[str],
    add: AddError,
) -> MetricSpec | None:
    if not isinstance(v, Mapping) or not v:
        add(path, "must be a mapping with at least name and query (or template)")
        return None
    m = v
    _unknown(m, ("name", "template", *_FIELDS), path, add)
    before = [0]

    def counted(p: str, msg: str) -> None:
        before[0] += 1
        add(p, msg)

    name = m.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        counted(
            key_path(path, "name"),
            "is required: letters, digits, '.', '_' or '-' (at most 63 characters)",
        )
    base: dict[str, Any] = {}
    if "template" in m:
        t = m["template"]
        if not isinstance(t, str) or (t not in templates and t not in bad_templates):
            have = ", ".join(sorted(templates)) or "none defined"
            counted(key_path(path, "template"), f"unknown template {t!r} (have: {have})")
        elif t in bad_templates:
            before[0] += 1  # already reported at analysis.templates
        else:
            base = templates[t]
    own = _fields(m, path, counted)
    if before[0]:
        return None
    f = {**base, **own}
    if "query" not in f:
        add(key_path(path, "query"), "is required (or a template that has one)")
        return None
    compare = f.get("compare")
    for k in ("max_drop", "max_increase"):
        if k in f and compare is None:
            add(key_path(path, k), "needs compare: baseline (it is a difference to the baseline)")
            return None
    if compare is not None and "max_drop" not in f and "max_increase" not in f:
        add(key_path(path, "compare"), "compare: baseline needs max_drop or max_increase")
        return None
    if not any(k in f for k in ("max", "min", "max_drop", "max_increase")):
        add(path, "needs a condition: max, min, or compare: baseline with max_drop/max_increase")
        return None
    if "max" in f and "min" in f and f["min"] > f["max"]:
        add(key_path(path, "min"), f"must not be above max ({f['max']:g}): nothing could pass")
        return None
    interval = f.get("interval", 30.0)
    return MetricSpec(
        name=str(name),
        query=f["query"],
        compare=compare,
        max=f.get("max"),
        min=f.get("min"),
        max_drop=f.get("max_drop"),
        max_increase=f.get("max_increase"),
        interval=interval,
        initial_delay=f.get("initial_delay", interval),
        failure_limit=f.get("failure_limit", 2),
        inconclusive_limit=f.get("inconclusive_limit", 3),
        min_requests=f.get("min_requests", 100),
        action=f.get("action", "rollback"),
    )


def _metrics(
    v: object,
    path: str,
    templates: Mapping[str, dict[str, Any]],
    bad_templates: set[str],
    add: AddError,
) -> list[MetricSpec]:
    if v is None:
        return []
    if not isinstance(v, list):
        add(path, "must be a list of metrics")
        return []
    out: list[MetricSpec] = []
    for i, item in enumerate(v):
        spec = _metric(item, f"{path}[{i}]", templates, bad_templates, add)
        if spec is not None:
            out.append(spec)
    return out


def _duplicates(specs: list[MetricSpec], paths: list[str], add: AddError) -> None:
    seen: set[str] = set()
    for spec, p in zip(specs, paths, strict=True):
        if spec.name in seen:
            add(key_path(p, "name"), f"duplicate metric name {spec.name!r}")
        seen.add(spec.name)


def _address(v: object, env: Mapping[str, str], add: AddError) -> str:
    from_env = env.get("PROMETHEUS_URL")
    path = "analysis.prometheus.address"
    if from_env:
        v, path = from_env, "PROMETHEUS_URL"
    elif v is None:
        return PrometheusConfig().address
    if not isinstance(v, str):
        add(path, "must be an http:// or https:// URL such as http://127.0.0.1:9090")
        return PrometheusConfig().address
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        add(path, f"must be an http:// or https:// URL such as http://127.0.0.1:9090, not {v!r}")
        return PrometheusConfig().address
    if parts.query or parts.fragment:
        add(path, "must not carry a query string or fragment")
    return v.rstrip("/")


def parse_analysis(
    top: object,
    per_service: Mapping[str, object],
    add: AddError,
    env: Mapping[str, str] | None = None,
) -> AnalysisConfig:
    """`analysis:` and each `services.<s>.analysis` into one resolved `AnalysisConfig`."""
    env = os.environ if env is None else env
    m = _mapping(top, "analysis", add)
    _unknown(m, ("prometheus", "templates", "metrics", "always"), "analysis", add)
    pm = _mapping(m.get("prometheus"), "analysis.prometheus", add)
    _unknown(pm, ("address", "timeout"), "analysis.prometheus", add)
    timeout = PrometheusConfig().timeout
    if "timeout" in pm:
        t = _duration(pm["timeout"])
        if t is None or not 0 < t <= 300:
            add("analysis.prometheus.timeout", "must be a duration > 0 such as 5s (at most 5m)")
        else:
            timeout = t
    prom = PrometheusConfig(_address(pm.get("address"), env, add), timeout)
    always = m.get("always", False)
    if not isinstance(always, bool):
        add("analysis.always", f"must be true or false, not {always!r}")
        always = False
    templates: dict[str, dict[str, Any]] = {}
    bad_templates: set[str] = set()
    tm = _mapping(m.get("templates"), "analysis.templates", add)
    for tname, tv in tm.items():
        tpath = key_path("analysis.templates", tname)
        errors = [0]

        def counted(p: str, msg: str, errors: list[int] = errors) -> None:
            errors[0] += 1
            add(p, msg)

        if not isinstance(tname, str) or not _NAME_RE.match(tname):
            counted(tpath, "template name must be letters, digits, '.', '_' or '-'")
        tmap = _mapping(tv, tpath, counted)
        _unknown(tmap, _FIELDS, tpath, counted)
        fields = _fields(tmap, tpath, counted)
        if errors[0]:
            bad_templates.add(str(tname))
        else:
            templates[str(tname)] = fields
    top_metrics = _metrics(m.get("metrics"), "analysis.metrics", templates, bad_templates, add)
    raw_top = m.get("metrics")
    if isinstance(raw_top, list):
        _duplicates(
            top_metrics, [f"analysis.metrics[{i}]" for i in _kept(raw_top, top_metrics)], add
        )
    services: dict[str, tuple[MetricSpec, ...]] = {}
    for sname, sv in per_service.items():
        spath = f"services.{sname}.analysis"
        if sv is None:
            if top_metrics:
                services[sname] = tuple(top_metrics)
            continue
        sm = _mapping(sv, spath, add)
        _unknown(sm, ("metrics", "inherit"), spath, add)
        inherit = sm.get("inherit", False)
        if not isinstance(inherit, bool):
            add(f"{spath}.inherit", f"must be true or false, not {inherit!r}")
            inherit = False
        own = _metrics(sm.get("metrics"), f"{spath}.metrics", templates, bad_templates, add)
        raw_own = sm.get("metrics")
        own_paths = (
            [f"{spath}.metrics[{i}]" for i in _kept(raw_own, own)]
            if isinstance(raw_own, list)
            else []
        )
        if inherit:
            specs = [*top_metrics, *own]
            paths = [f"analysis.metrics[{i}]" for i in range(len(top_metrics))] + own_paths
        else:
            specs, paths = own, own_paths
        _duplicates(specs, paths, add)
        if specs:
            services[sname] = tuple(specs)
    return AnalysisConfig(prometheus=prom, always=always, services=services)


def _kept(raw: list[Any], specs: list[MetricSpec]) -> list[int]:
    """Indexes in `raw` of the items that became `specs` (by name, in order)."""
    out: list[int] = []
    j = 0
    for i, item in enumerate(raw):
        if j < len(specs) and isinstance(item, Mapping) and item.get("name") == specs[j].name:
            out.append(i)
            j += 1
    return out
