"""The state document and its rules — pure, no I/O.

Why one home: the admin API (gateway/changes.py), the strategy DSL, the
OpenAPI document and every store must agree on what a valid document is, so
that no admin call can write a document that the next start refuses, and a
document that passes its checksum but holds a bad value is refused exactly
like a corrupt one (README, "Admin API"). The stores import these rules;
the rules import nothing that does I/O.

Why bounds on every number: a weight of 1e308 makes the sum of weights
infinite (every share 0 %), a weight of 1e-320 makes 1/weight infinite (the
sticky hash can never pick that release although its share shows 100 %), and
an integer of 400 digits overflows float(). Bounded numbers keep shares,
hash scores and JSON round trips exact enough to agree with each other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gateway import rollout as rollout_mod
from gateway.errors import BadRequest

FORMAT = 1

# Release weights: 0 (no traffic) or between MIN_WEIGHT and MAX_WEIGHT. Within these
# bounds the smallest share is > 0 and 1/weight is finite, so percent and hash agree.
MAX_WEIGHT = 1_000_000.0
MIN_WEIGHT = 1e-6
# The largest integer every JSON reader holds exactly (RFC 8259 §6): version numbers.
MAX_VERSION = 2**53 - 1
MAX_LATENCY_MS = 3_600_000.0  # one hour
MAX_MIN_REQUESTS = 1_000_000_000
_FLOAT_MAX = 1.7976931348623157e308

# Guard thresholds an operator may change live: name -> (integer?, minimum, maximum).
GUARD_FIELDS: Mapping[str, tuple[bool, float, float]] = {
    "error_rate": (False, 0.0, 1.0),
    "latency_p95_ms": (False, 0.0, MAX_LATENCY_MS),
    "latency_p95_delta_ms": (False, 0.0, MAX_LATENCY_MS),
    "min_requests": (True, 1.0, float(MAX_MIN_REQUESTS)),
}


def is_number(v: object) -> bool:
    """A JSON number that is not a bool and fits a finite float.

    Why compare instead of math.isfinite for ints: math.isfinite(10**400)
    raises OverflowError; comparing an int with a float is exact in Python.
    """
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return -_FLOAT_MAX <= v <= _FLOAT_MAX
    return isinstance(v, float) and math.isfinite(v)


def weight_problem(v: object) -> str | None:
    """Why `v` is not a usable release weight, or None."""
    if not is_number(v):
        return "must be a finite number (not a string, bool, null or NaN)"
    assert isinstance(v, int | float)
    if v < 0:
        return "must be >= 0"
    if v > MAX_WEIGHT:
        return f"must be at most {MAX_WEIGHT:,.0f}"
    if 0 < v < MIN_WEIGHT:
        return f"must be 0 or at least {MIN_WEIGHT:g}"
    return None


def guard_problem(name: str, v: object) -> str | None:
    """Why `v` is not a usable value for guard threshold `name`, or None."""
    spec = GUARD_FIELDS.get(name)
    if spec is None:
        return f"unknown guard threshold (known: {', '.join(GUARD_FIELDS)})"
    integer, lo, hi = spec
    if integer:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            return f"must be an integer between {lo:,.0f} and {hi:,.0f}"
        return None
    if not is_number(v):
        return "must be a finite number"
    assert isinstance(v, int | float)
    if not lo <= v <= hi:
        return f"must be between {lo:g} and {hi:g}"
    return None


@dataclass(frozen=True, slots=True)
class ServiceState:
    """One service's accepted changes; `extra` keeps fields a newer gateway wrote."""

    weights: Mapping[str, float] = field(default_factory=dict)
    guard: Mapping[str, float] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out["weights"] = dict(self.weights)
        out["guard"] = dict(self.guard)
        return out


@dataclass(frozen=True, slots=True)
class StateDoc:
    """A complete, versioned state: applied whole or not at all."""

    version: int = 0
    services: Mapping[str, ServiceState] = field(default_factory=dict)
    # Audit records written with this document and maybe not yet in the audit trail
    # (gateway/audit.py): the change and its record are one write, whatever the store.
    audit: tuple[Mapping[str, Any], ...] = ()

    def with_service(self, name: str, state: ServiceState) -> StateDoc:
        return replace(self, services={**self.services, name: state})

    def without_service(self, name: str) -> StateDoc:
        return replace(self, services={k: v for k, v in self.services.items() if k != name})

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "version": self.version,
            "services": {k: v.to_json() for k, v in sorted(self.services.items())},
        }
        if self.audit:
            out["audit"] = [dict(r) for r in self.audit]
        return out

    def weights(self) -> dict[str, dict[str, float]]:
        return {k: dict(v.weights) for k, v in self.services.items() if v.weights}

    def guards(self) -> dict[str, dict[str, float]]:
        return {k: dict(v.guard) for k, v in self.services.items() if v.guard}


EMPTY = StateDoc()


class InvalidDoc(ValueError):
    """A document that parses but breaks a rule; `field` is its path in the document."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _service(name: str, sv: object) -> ServiceState:
    path = f"services.{name}"
    if not isinstance(sv, dict):
        raise InvalidDoc(path, "must be an object")
    weights = sv.get("weights", {})
    if not isinstance(weights, dict):
        raise InvalidDoc(f"{path}.weights", "must be an object")
    for rel, w in weights.items():
        if (p := weight_problem(w)) is not None:
            raise InvalidDoc(f"{path}.weights.{rel}", p)
    if weights and not any(w > 0 for w in weights.values()):
        raise InvalidDoc(f"{path}.weights", "all weights are zero; at least one must be > 0")
    guard = sv.get("guard", {})
    if not isinstance(guard, dict):
        raise InvalidDoc(f"{path}.guard", "must be an object")
    for g, v in guard.items():
        if (p := guard_problem(g, v)) is not None:
            raise InvalidDoc(f"{path}.guard.{g}", p)
    extra = {k: v for k, v in sv.items() if k not in ("weights", "guard")}
    if "rollout" in extra:
        raw = extra["rollout"]
        if not isinstance(raw, dict):
            raise InvalidDoc(f"{path}.rollout", "must be an object")
        try:
            rollout_mod.Rollout.from_json(raw)
        except BadRequest as e:
            raise InvalidDoc(f"{path}.rollout.{e.field}", e.message) from None
    if "baseline" in extra and not (isinstance(extra["baseline"], str) and extra["baseline"]):
        raise InvalidDoc(f"{path}.baseline", "must be a release name")
    if "segments" in extra:
        _segments_shape(f"{path}.segments", extra["segments"])
    if CHANGED in extra:
        changed = extra[CHANGED]
        if (
            not isinstance(changed, int)
            or isinstance(changed, bool)
            or not 0 <= changed <= MAX_VERSION
        ):
            raise InvalidDoc(f"{path}.{CHANGED}", f"must be an integer between 0 and {MAX_VERSION}")
    return ServiceState(
        {r: float(w) for r, w in weights.items()},
        {g: (v if GUARD_FIELDS[g][0] else float(v)) for g, v in guard.items()},
        extra,
    )


# The state version of a service's last audited change (`ServiceState.extra`).
CHANGED = "changed"


def stale_if_match(doc: StateDoc, service: str, if_match: int) -> str | None:
    """Why a write to `service` conditional on state version `if_match` is stale, or None.

    Why per service: the version counts every write of the document, the
    gateway's bookkeeping included (rollout leases, analysis results, served
    counts, written every few seconds while a rollout runs) and other services'
    changes. A condition taken from `GET /admin/services/{service}` is stale
    only when that service's audited state (weights, thresholds, segments,
    baseline, rollout moves) changed after it, as an ETag names one resource
    (RFC 9110 §8.8.3, §13.1.1). A service whose last change predates the
    marker is held to the exact version, as before.
    """
    if if_match > doc.version:
        return f"stale If-Match: state version is {doc.version}, not {if_match}"
    st = doc.services.get(service)
    changed = st.extra.get(CHANGED) if st is not None else None
    if not isinstance(changed, int):
        changed = doc.version
    if if_match < changed:
        return f"stale If-Match: {service!r} changed at state version {changed}, after {if_match}"
    return None


def _segments_shape(path: str, raw: object) -> None:
    """A stored segments list (README "Segments"): an array of named objects.

    Why only the shape: the matching rules need the config (its releases, the
    directory user files resolve against); every process parses the list with
    the config's own parser when it applies the document (gateway/live_segments.py).
    """
    if not isinstance(raw, list):
        raise InvalidDoc(path, "must be an array of segments")
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidDoc(f"{path}[{i}]", "must be an object {name, match, release | weights}")
        if not isinstance(item.get("name"), str) or not item["name"]:
            raise InvalidDoc(f"{path}[{i}].name", "must be a non-empty string")
        if not isinstance(item.get("match"), dict):
            raise InvalidDoc(f"{path}[{i}].match", "must be an object")


def from_body(raw: object) -> StateDoc:
    """A parsed JSON document (checksum already removed) -> StateDoc, or InvalidDoc."""
    if not isinstance(raw, dict):
        raise InvalidDoc("(root)", "must be an object")
    fmt = raw.get("format", FORMAT)
    if fmt != FORMAT or isinstance(fmt, bool):
        raise InvalidDoc("format", f"{fmt!r} is not supported by this gateway (expected {FORMAT})")
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= MAX_VERSION:
        raise InvalidDoc("version", f"must be an integer between 0 and {MAX_VERSION}")
    services = raw.get("services")
    if not isinstance(services, dict):
        raise InvalidDoc("services", "must be an object")
    audit = raw.get("audit", [])
    if not isinstance(audit, list) or not all(isinstance(r, dict) for r in audit):
        raise InvalidDoc("audit", "must be a list of objects")
    return StateDoc(
        version, {name: _service(name, sv) for name, sv in services.items()}, tuple(audit)
    )


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check(doc: StateDoc) -> None:
    """Raise InvalidDoc unless `doc` survives the JSON round trip a store and a restart make.

    Why the round trip: it is exactly what the next start will read back, so a
    document that passes here is one that start accepts.
    """
    try:
        text = json.dumps(doc.body(), sort_keys=True, allow_nan=False)
        raw = json.loads(text, parse_constant=_no_constants)
    except (ValueError, TypeError, RecursionError) as e:
        raise InvalidDoc("(root)", f"not representable as JSON ({e})") from None
    from_body(raw)
