"""What an admin request asks to change, validated — pure policy, no I/O (README "Admin API").

Why separate from the HTTP handlers: every rejection must name its field and
leave the state untouched, so validation returns plain values or raises
before anything is written; tables of bad inputs test it without sockets.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.config import ServiceConfig
from gateway.errors import BadRequest
from gateway.statedoc import GUARD_FIELDS, MAX_VERSION, guard_problem, weight_problem

GRAY = "gray"
_VERSION_DIGITS = len(str(MAX_VERSION))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose names are unique (RFC 8259 §4: with repeats, receivers disagree)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate name {k!r}: which one counts is ambiguous; send it once")
        out[k] = v
    return out


# Deepest admin body accepted: a valid one is under 10 levels (a segment's
# `{"not": ...}` value inside its match); Python's json takes ~1,000, and a body
# near that parses but cannot be encoded again where the gateway stores it.
MAX_JSON_DEPTH = 64


def _too_deep(doc: object) -> bool:
    """Whether `doc` nests arrays and objects deeper than MAX_JSON_DEPTH (no recursion)."""
    todo: list[tuple[object, int]] = [(doc, 1)]
    while todo:
        node, depth = todo.pop()
        items = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        if items and depth >= MAX_JSON_DEPTH:
            return True
        todo.extend((v, depth + 1) for v in items if isinstance(v, dict | list))
    return False


def parse_json(data: bytes) -> object:
    """Strict JSON (no NaN/Infinity, no repeated names); malformed input names field `body`."""
    try:
        doc: object = json.loads(
            data.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_unique_keys
        )
    except (UnicodeDecodeError, ValueError) as e:  # includes ints beyond Python's digit limit
        raise BadRequest(f"malformed JSON: {e}", "body") from None
    except RecursionError:
        doc = None
    else:
        if not _too_deep(doc):
            return doc
    raise BadRequest(f"malformed JSON: nested more than {MAX_JSON_DEPTH} levels deep", "body")


def weights_change(
    svc: ServiceConfig, current: Mapping[str, float], body: object, *, field: str = "weights"
) -> dict[str, float]:
    """Merge `{release: weight}` into the service's current raw weights.

    Releases not named keep their weight, so raising one release moves keys
    only into it (monotone: README "How routing decides"). Raises BadRequest naming the field.
    """
    if not isinstance(body, Mapping):
        raise BadRequest("body must be a JSON object of release: weight", "body")
    if not body:
        raise BadRequest('name at least one release, e.g. {"stable": 95, "gray": 5}', field)
    merged = {r: float(current.get(r, cfg.weight)) for r, cfg in svc.releases.items()}
    for rel, w in body.items():
        if rel not in svc.releases:
            raise BadRequest(
                f"unknown release {rel!r} of service {svc.name!r} "
                f"(have: {', '.join(svc.releases)})",
                f"{field}.{rel}",
            )
        if (p := weight_problem(w)) is not None:
            raise BadRequest(f"weight of {rel!r} {p}", f"{field}.{rel}")
        merged[rel] = float(w)
    if not any(w > 0 for w in merged.values()):
        raise BadRequest("all weights would be zero; at least one must be > 0", field)
    return merged


def thresholds_change(body: object, *, field: str = "metrics_threshold") -> dict[str, float]:
    """Validate guard thresholds (README "Guard rules" fields) an operator changes live."""
    if not isinstance(body, Mapping):
        raise BadRequest(f"must be an object with any of {', '.join(GUARD_FIELDS)}", field)
    out: dict[str, float] = {}
    for k, v in body.items():
        if (p := guard_problem(str(k), v)) is not None:
            raise BadRequest(f"{k} {p}", f"{field}.{k}")
        out[str(k)] = v if GUARD_FIELDS[str(k)][0] else float(v)
    return out


def gray_release(svc: ServiceConfig) -> str:
    """The release the release-platform payload calls "gray".

    The release literally named `gray`, else the only non-baseline release;
    anything else is ambiguous and must use PUT .../weights.
    """
    if GRAY in svc.releases and GRAY != svc.baseline:
        return GRAY
    others = [r for r in svc.releases if r != svc.baseline]
    if len(others) == 1:
        return others[0]
    raise BadRequest(
        f"service {svc.name!r} has no release named 'gray' and "
        f"{len(others)} non-baseline releases; use PUT /admin/services/{svc.name}/weights",
        "service",
    )


_PLATFORM_FIELDS = ("service", "gray_weight", "metrics_threshold")


def platform_service(body: object) -> str:
    """The `service` of a release-platform payload (checked before anything else)."""
    if not isinstance(body, Mapping):
        raise BadRequest("body must be a JSON object", "body")
    for k in body:
        if k not in _PLATFORM_FIELDS:
            raise BadRequest(f"unknown field (known: {', '.join(_PLATFORM_FIELDS)})", str(k))
    name = body.get("service")
    if not isinstance(name, str) or not name:
        raise BadRequest("must be the name of a service", "service")
    return name


def platform_change(
    svc: ServiceConfig, body: Mapping[str, Any]
) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """`{"gray_weight": P, "metrics_threshold": {...}}` -> (weights, guard thresholds).

    The gray release gets P, the baseline 100 - P and every other release 0,
    so the gray share is exactly P percent as the platform means it (README "Admin API").
    """
    weights: dict[str, float] | None = None
    guard: dict[str, float] | None = None
    if "gray_weight" not in body and "metrics_threshold" not in body:
        raise BadRequest("give gray_weight and/or metrics_threshold", "gray_weight")
    if "gray_weight" in body:
        p = body["gray_weight"]
        if weight_problem(p) is not None or not 0 <= p <= 100:
            raise BadRequest("must be a number between 0 and 100 (percent)", "gray_weight")
        gray = gray_release(svc)
        weights = {r: 0.0 for r in svc.releases}
        weights[gray] = float(p)
        weights[svc.baseline] = 100.0 - float(p)
    if "metrics_threshold" in body:
        guard = thresholds_change(body["metrics_threshold"])
    return weights, guard


def parse_if_match(value: str | None) -> int | None:
    """`If-Match: "7"` / `W/"7"` / `7` -> 7; `*` or absent -> None (RFC 9110 §13.1.1)."""
    if value is None:
        return None
    v = value.strip()
    if v == "*":
        return None
    if v.startswith("W/"):
        v = v[2:]
    v = v.strip('"')
    # ASCII digits only (str.isdigit also takes "²"), and no longer than the largest
    # version a document may hold, so int() never sees thousands of digits.
    if not (v.isascii() and v.isdigit()) or len(v) > _VERSION_DIGITS:
        raise BadRequest('must be the state version, e.g. "7" (from ETag)', "If-Match")
    return int(v)
