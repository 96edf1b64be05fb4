"""The state document: what the store holds, its canonical bytes and their checks.

Why a checksum over canonical JSON: a torn, truncated or hand-mangled file
must be detected and never half-applied (SPEC §6); the version makes every
change ordered so each process applies only newer documents (SPEC §6).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.errors import StateError

FORMAT = 1

# Guard thresholds an operator may change live: name -> (integer?, minimum, maximum).
GUARD_FIELDS: Mapping[str, tuple[bool, float, float]] = {
    "error_rate": (False, 0.0, 1.0),
    "latency_p95_ms": (False, 0.0, math.inf),
    "latency_p95_delta_ms": (False, 0.0, math.inf),
    "min_requests": (True, 1.0, math.inf),
}


def is_number(v: object) -> bool:
    """A finite JSON number that is not a bool (True would otherwise count as 1)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def weight_problem(v: object) -> str | None:
    """Why `v` is not a usable weight, or None."""
    if not is_number(v):
        return "must be a finite number (not a string, bool, null or NaN)"
    assert isinstance(v, int | float)
    if v < 0:
        return "must be >= 0"
    return None


def guard_problem(name: str, v: object) -> str | None:
    """Why `v` is not a usable value for guard threshold `name`, or None."""
    spec = GUARD_FIELDS.get(name)
    if spec is None:
        return f"unknown guard threshold (known: {', '.join(GUARD_FIELDS)})"
    integer, lo, hi = spec
    if integer:
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            return f"must be an integer >= {lo:g}"
        return None
    if not is_number(v):
        return "must be a finite number"
    assert isinstance(v, int | float)
    if not lo <= v <= hi:
        return f"must be between {lo:g} and {hi:g}" if math.isfinite(hi) else f"must be >= {lo:g}"
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

    def with_service(self, name: str, state: ServiceState) -> StateDoc:
        return replace(self, services={**self.services, name: state})

    def without_service(self, name: str) -> StateDoc:
        return replace(self, services={k: v for k, v in self.services.items() if k != name})

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "services": {k: v.to_json() for k, v in sorted(self.services.items())},
        }

    def weights(self) -> dict[str, dict[str, float]]:
        return {k: dict(v.weights) for k, v in self.services.items() if v.weights}

    def guards(self) -> dict[str, dict[str, float]]:
        return {k: dict(v.guard) for k, v in self.services.items() if v.guard}


EMPTY = StateDoc()


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def checksum(body: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()


def encode(doc: StateDoc) -> bytes:
    """Pretty, sorted JSON with the checksum of the canonical form of everything else."""
    body = doc.body()
    out = {**body, "checksum": checksum(body)}
    return (json.dumps(out, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode(data: bytes, source: str = "<state>") -> StateDoc:
    """Parse and verify a stored document; StateError naming the problem otherwise."""

    def bad(msg: str) -> StateError:
        return StateError(f"{source}: corrupt state document: {msg}", "state")

    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"not valid JSON ({e}); the file may be truncated") from e
    if not isinstance(raw, dict):
        raise bad("top level is not an object")
    got = raw.pop("checksum", None)
    if not isinstance(got, str):
        raise bad("no checksum")
    if got != checksum(raw):
        raise bad("checksum mismatch (edited or partially written)")
    fmt = raw.get("format", FORMAT)
    if fmt != FORMAT:
        raise bad(f"format {fmt!r} is not supported by this gateway (expected {FORMAT})")
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise bad("version must be an integer >= 0")
    services = raw.get("services")
    if not isinstance(services, dict):
        raise bad("services must be an object")
    out: dict[str, ServiceState] = {}
    for name, sv in services.items():
        if not isinstance(sv, dict):
            raise bad(f"services.{name} must be an object")
        weights = sv.get("weights", {})
        if not isinstance(weights, dict):
            raise bad(f"services.{name}.weights must be an object")
        for rel, w in weights.items():
            if (p := weight_problem(w)) is not None:
                raise bad(f"services.{name}.weights.{rel} {p}")
        guard = sv.get("guard", {})
        if not isinstance(guard, dict):
            raise bad(f"services.{name}.guard must be an object")
        for g, v in guard.items():
            if (p := guard_problem(g, v)) is not None:
                raise bad(f"services.{name}.guard.{g} {p}")
        extra = {k: v for k, v in sv.items() if k not in ("weights", "guard")}
        out[name] = ServiceState(
            {r: float(w) for r, w in weights.items()},
            {g: (v if GUARD_FIELDS[g][0] else float(v)) for g, v in guard.items()},
            extra,
        )
    return StateDoc(version, out)
