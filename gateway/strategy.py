"""The strategy DSL: a YAML file naming target releases and a traffic share.

Why pure and config-checked: `validate` must report every mistake with its
path in one pass (like `gateway check`), and `plan` must print exactly the
weights `apply` will send, so both are plain functions over the parsed file
and the gateway config, tested with tables.

`segments:` (label routing and time windows) maps a service to a list of user
segments in the config's own shape (README "Segments"), checked by the
config's parser; a segment's `release` and `weights` may name a release or a
Consul tag of one, like a target's `version`. `apply` sends each list whole
to `PUT /admin/services/{s}/segments`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Config, ServiceConfig
from gateway.config_syntax import load_yaml, yaml_problem
from gateway.errors import ConfigError
from gateway.segments_config import parse_segments
from gateway.statedoc import is_number

VERSIONS = ("v1",)
_FIELDS = ("version", "traffic", "targets", "segments")
_TARGET_FIELDS = ("service", "version", "weight")
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%?\s*$")


@dataclass(frozen=True, slots=True)
class Target:
    service: str
    version: str  # as written: a release name or a Consul tag of one
    release: str  # the release it resolved to
    weight: float


@dataclass(frozen=True, slots=True)
class Strategy:
    traffic: float  # percent of each listed service's traffic that goes to its targets
    targets: tuple[Target, ...]
    # service -> its whole segments list, releases resolved, as PUT …/segments takes it
    segments: Mapping[str, list[Any]] = field(default_factory=dict)


def parse_percent(v: object) -> float | None:
    """'20%' / '20 %' / 20 / 20.5 -> 20.0; None when not a percentage in 0..100."""
    if isinstance(v, bool):
        return None
    if is_number(v):
        assert isinstance(v, int | float)
        p = float(v)
    elif isinstance(v, str) and (m := _PERCENT_RE.match(v)):
        p = float(m.group(1))
    else:
        return None
    return p if 0 <= p <= 100 else None


def resolve_version(svc: ServiceConfig, version: str) -> tuple[str | None, str | None]:
    """A target version -> (release, None) or (None, why not): release name, else Consul tag."""
    if version in svc.releases:
        return version, None
    tagged = [r.name for r in svc.releases.values() if r.consul and version in r.consul.tags]
    if len(tagged) == 1:
        return tagged[0], None
    if tagged:
        return None, f"Consul tag {version!r} is on several releases ({', '.join(tagged)})"
    return None, (
        f"service {svc.name!r} has no release or Consul tag {version!r} "
        f"(releases: {', '.join(svc.releases)})"
    )


def _target(i: int, raw: object, config: Config, errs: list[tuple[str, str]]) -> Target | None:
    path = f"targets[{i}]"
    if not isinstance(raw, Mapping):
        errs.append((path, "must be a mapping {service, version, weight}"))
        return None
    ok = True
    for k in raw:
        if k not in _TARGET_FIELDS:
            errs.append((f"{path}.{k}", f"unknown field (known: {', '.join(_TARGET_FIELDS)})"))
    service = raw.get("service")
    svc: ServiceConfig | None = None
    if not isinstance(service, str) or not service:
        errs.append((f"{path}.service", "is required (a service name from the config)"))
        ok = False
    elif (svc := config.services.get(service)) is None:
        errs.append(
            (f"{path}.service", f"unknown service {service!r} (have: {', '.join(config.services)})")
        )
        ok = False
    version = raw.get("version")
    release: str | None = None
    if not isinstance(version, str) or not version:
        errs.append(
            (f"{path}.version", 'is required (a release name or Consul tag; quote it: "2.10")')
        )
        ok = False
    elif svc is not None:
        release, why = resolve_version(svc, version)
        if why is not None:
            errs.append((f"{path}.version", why))
            ok = False
        elif release == svc.baseline:
            errs.append(
                (
                    f"{path}.version",
                    f"{version!r} is the baseline of {svc.name!r}; it keeps the rest",
                )
            )
            ok = False
    weight = raw.get("weight", 1)
    if not is_number(weight) or weight < 0:
        errs.append((f"{path}.weight", "must be a number >= 0"))
        ok = False
    if not ok:
        return None
    assert isinstance(service, str) and isinstance(version, str) and release is not None
    return Target(service, version, release, float(weight))


def _resolve(svc: ServiceConfig, v: object) -> object:
    """A segment's release as written -> the release it names (Consul tags resolved)."""
    if isinstance(v, str):
        release, _ = resolve_version(svc, v)
        if release is not None:
            return release
    return v


def _segments(
    raw: object, config: Config, errs: list[tuple[str, str]], env: Mapping[str, str]
) -> dict[str, list[Any]]:
    """`segments: {service: [segment, ...]}`, each list checked as the config's would be."""
    if not isinstance(raw, Mapping) or not raw:
        errs.append(("segments", "must be a mapping of service -> list of segments"))
        return {}
    out: dict[str, list[Any]] = {}
    base_dir = Path.cwd() if config.source.startswith("<") else Path(config.source).parent
    for service, items in raw.items():
        path = f"segments.{service}"
        svc = config.services.get(str(service))
        if svc is None:
            errs.append((path, f"unknown service {service!r} (have: {', '.join(config.services)})"))
            continue
        if not isinstance(items, list):
            errs.append((path, "must be a list of segments (an empty list removes them all)"))
            continue
        resolved: list[Any] = []
        for item in items:
            if isinstance(item, Mapping):
                item = dict(item)
                if "release" in item:
                    item["release"] = _resolve(svc, item["release"])
                if isinstance(item.get("weights"), Mapping):
                    item["weights"] = {_resolve(svc, k): v for k, v in item["weights"].items()}
            resolved.append(item)
        parse_segments(
            resolved,
            path,
            lambda p, m: errs.append((p, m)),
            service=svc.name,
            releases=tuple(svc.releases),
            base_dir=base_dir,
            env=env,
        )
        out[svc.name] = resolved
    return out


def build(
    raw: object,
    config: Config,
    *,
    source: str = "<strategy>",
    env: Mapping[str, str] | None = None,
) -> Strategy:
    """Validate a parsed strategy against `config`; ConfigError listing every problem."""
    env = os.environ if env is None else env
    errs: list[tuple[str, str]] = []
    if not isinstance(raw, Mapping):
        raise ConfigError(
            [("(root)", "must be a mapping with version, traffic and targets")], source
        )
    for k in raw:
        if k not in _FIELDS:
            errs.append((str(k), f"unknown field (known: {', '.join(_FIELDS)})"))
    version = raw.get("version", "v1")
    if version not in VERSIONS:
        errs.append(("version", f"must be one of {', '.join(VERSIONS)}"))
    traffic = 0.0
    segments = _segments(raw["segments"], config, errs, env) if "segments" in raw else None
    only_segments = segments is not None and "targets" not in raw and "traffic" not in raw
    if only_segments:
        pass  # a strategy of segments alone changes no weights
    elif "traffic" not in raw:
        errs.append(("traffic", "is required: the share for the targets, e.g. 20%"))
    elif (p := parse_percent(raw["traffic"])) is None:
        errs.append(("traffic", "must be a percentage between 0% and 100%, e.g. 20%"))
    else:
        traffic = p
    targets: list[Target] = []
    raw_targets = raw.get("targets")
    if only_segments:
        raw_targets = []
    elif not isinstance(raw_targets, list) or not raw_targets:
        errs.append(("targets", "is required: a non-empty list of {service, version, weight}"))
        raw_targets = []
    seen: dict[tuple[str, str], int] = {}
    for i, rt in enumerate(raw_targets):
        t = _target(i, rt, config, errs)
        if t is None:
            continue
        if (j := seen.get((t.service, t.release))) is not None:
            errs.append((f"targets[{i}]", f"same service and release as targets[{j}]"))
            continue
        seen[(t.service, t.release)] = i
        targets.append(t)
    if traffic > 0:
        for service in dict.fromkeys(t.service for t in targets):
            if sum(t.weight for t in targets if t.service == service) <= 0:
                errs.append(
                    ("targets", f"weights for {service!r} sum to 0 but traffic is {traffic:g}%")
                )
    if errs:
        raise ConfigError(errs, source)
    return Strategy(traffic, tuple(targets), segments or {})


def load_text(text: str, config: Config, *, source: str = "<strategy>") -> Strategy:
    """Parse a strategy file the way the config is parsed: duplicate keys are errors."""
    try:
        raw, duplicates = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError([("(yaml)", yaml_problem(e))], source) from e
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError([("(yaml)", "not valid YAML: nested too deeply")], source) from None
    try:
        strategy = build(raw, config, source=source)
    except ConfigError as e:
        raise ConfigError([*duplicates, *e.errors], source) from None
    if duplicates:
        raise ConfigError(duplicates, source)
    return strategy


def _num(x: float) -> float | int:
    x = round(x, 6)
    return int(x) if x == int(x) else x


def plan(strategy: Strategy, config: Config) -> dict[str, dict[str, float | int]]:
    """Weights per service: targets split `traffic`, the baseline keeps the rest, others 0."""
    out: dict[str, dict[str, float | int]] = {}
    for service in dict.fromkeys(t.service for t in strategy.targets):
        svc = config.services[service]
        mine = [t for t in strategy.targets if t.service == service]
        total = sum(t.weight for t in mine)
        w: dict[str, float | int] = {}
        for t in mine:
            w[t.release] = _num(strategy.traffic * t.weight / total if total > 0 else 0.0)
        w[svc.baseline] = _num(100.0 - strategy.traffic)
        for r in svc.releases:
            w.setdefault(r, 0)
        out[service] = w
    return out
