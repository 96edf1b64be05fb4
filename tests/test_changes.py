"""gateway/changes.py: what an admin request asks to change, validated — tables, no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import changes, statedoc
from gateway import config as config_mod
from gateway.config import ServiceConfig
from gateway.errors import BadRequest
from gateway.statedoc import ServiceState, StateDoc


def _svc(**releases: float) -> ServiceConfig:
    raw = {
        "services": {
            "user-api": {
                "releases": {
                    r: {"weight": w, "upstreams": ["http://127.0.0.1:9"]}
                    for r, w in releases.items()
                }
            }
        }
    }
    return config_mod.build(raw, env={}).services["user-api"]


SVC = _svc(stable=95, gray=5)
THREE = _svc(stable=80, **{"batch-1": 15, "batch-2": 5})


@pytest.mark.parametrize(
    ("current", "body", "merged"),
    [
        ({}, {"gray": 10}, {"stable": 95, "gray": 10}),
        ({"stable": 50, "gray": 50}, {"gray": 0}, {"stable": 50, "gray": 0}),
        ({}, {"stable": 1, "gray": 1}, {"stable": 1, "gray": 1}),
        ({}, {"gray": 0.000001}, {"stable": 95, "gray": 0.000001}),
    ],
    ids=["one-release-others-keep", "to-zero", "both", "smallest-positive"],
)
def test_weights_change_merges_into_the_current_weights(
    current: dict[str, float], body: dict[str, float], merged: dict[str, float]
) -> None:
    assert changes.weights_change(SVC, current, body) == merged


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([1, 2], "body"),
        ({}, "weights"),
        ({"blue": 5}, "weights.blue"),
        ({"gray": -1}, "weights.gray"),
        ({"gray": "5"}, "weights.gray"),
        ({"gray": True}, "weights.gray"),
        ({"gray": 10**400}, "weights.gray"),
        ({"stable": 0, "gray": 0}, "weights"),
    ],
    ids=["not-object", "empty", "unknown", "negative", "string", "bool", "huge", "all-zero"],
)
def test_weights_change_refuses_naming_the_field(body: object, field: str) -> None:
    with pytest.raises(BadRequest) as e:
        changes.weights_change(SVC, {}, body)
    assert e.value.field == field


@pytest.mark.parametrize(
    ("body", "want"),
    [
        ({"error_rate": 0.05}, {"error_rate": 0.05}),
        ({"latency_p95_ms": 500}, {"latency_p95_ms": 500.0}),
        ({"min_requests": 10}, {"min_requests": 10}),
    ],
    ids=["error-rate", "latency", "min-requests-int"],
)
def test_thresholds_change_accepts(body: dict[str, Any], want: dict[str, float]) -> None:
    assert changes.thresholds_change(body) == want


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("x", "metrics_threshold"),
        ({"error_rate": 2}, "metrics_threshold.error_rate"),
        ({"nope": 1}, "metrics_threshold.nope"),
        ({"min_requests": 0}, "metrics_threshold.min_requests"),
    ],
    ids=["not-object", "rate-above-1", "unknown", "min-requests-0"],
)
def test_thresholds_change_refuses(body: object, field: str) -> None:
    with pytest.raises(BadRequest) as e:
        changes.thresholds_change(body)
    assert e.value.field == field


def test_gray_release_is_gray_else_the_only_other_one() -> None:
    assert changes.gray_release(SVC) == "gray"
    assert changes.gray_release(_svc(stable=1, canary=1)) == "canary"
    with pytest.raises(BadRequest) as e:
        changes.gray_release(THREE)
    assert e.value.field == "service"


@pytest.mark.parametrize(
    ("body", "weights", "guard"),
    [
        ({"gray_weight": 5}, {"stable": 95, "gray": 5}, None),
        ({"gray_weight": 100}, {"stable": 0, "gray": 100}, None),
        ({"metrics_threshold": {"error_rate": 0.02}}, None, {"error_rate": 0.02}),
    ],
    ids=["percent", "all-gray", "thresholds-only"],
)
def test_platform_change_is_percent_for_gray(
    body: dict[str, Any], weights: dict[str, float] | None, guard: dict[str, float] | None
) -> None:
    assert changes.platform_change(SVC, body) == (weights, guard)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "gray_weight"),
        ({"gray_weight": 101}, "gray_weight"),
        ({"gray_weight": -1}, "gray_weight"),
    ],
    ids=["neither", "over-100", "negative"],
)
def test_platform_change_refuses(body: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as e:
        changes.platform_change(SVC, body)
    assert e.value.field == field


@pytest.mark.parametrize(
    ("body", "result"),
    [
        ({"service": "user-api", "gray_weight": 5}, "user-api"),
        ("x", BadRequest("", "body")),
        ({"service": ""}, BadRequest("", "service")),
        ({"service": "a", "grey_weight": 5}, BadRequest("", "grey_weight")),
    ],
    ids=["ok", "not-object", "empty-service", "unknown-field"],
)
def test_platform_service(body: object, result: str | BadRequest) -> None:
    if isinstance(result, str):
        assert changes.platform_service(body) == result
        return
    with pytest.raises(BadRequest) as e:
        changes.platform_service(body)
    assert e.value.field == result.field


@pytest.mark.parametrize(
    ("value", "version"),
    [(None, None), ("*", None), ('"7"', 7), ("7", 7), ('W/"7"', 7), (' "0" ', 0)],
    ids=["absent", "star", "quoted", "bare", "weak", "spaces"],
)
def test_parse_if_match(value: str | None, version: int | None) -> None:
    assert changes.parse_if_match(value) == version


@pytest.mark.parametrize(
    "value",
    ['"x"', "²", "-1", "9" * 5000, '"3.0"'],
    ids=["word", "superscript", "neg", "long", "float"],
)
def test_parse_if_match_refuses(value: str) -> None:
    with pytest.raises(BadRequest) as e:
        changes.parse_if_match(value)
    assert e.value.field == "If-Match"


@pytest.mark.parametrize(
    "data",
    [b"{", b"\xff", b"NaN", b"[" * 100_000, b'{"a": Infinity}'],
    ids=["truncated", "not-utf8", "nan", "deep", "infinity"],
)
def test_parse_json_refuses_naming_the_body(data: bytes) -> None:
    with pytest.raises(BadRequest) as e:
        changes.parse_json(data)
    assert e.value.field == "body"


def test_parse_json_accepts_an_object() -> None:
    assert changes.parse_json(b'{"gray": 5}') == {"gray": 5}


def _doc(version: int, **changed: int | None) -> StateDoc:
    """A document at `version` whose services were last changed at the given versions."""
    return StateDoc(
        version,
        {
            name: ServiceState({"stable": 1.0}, {}, {} if v is None else {statedoc.CHANGED: v})
            for name, v in changed.items()
        },
    )


# (document, service, If-Match, stale?)
IF_MATCH = [
    ("current", _doc(7, api=7), "api", 7, False),
    ("bookkeeping-since", _doc(9, api=7), "api", 7, False),
    ("between-change-and-now", _doc(9, api=7), "api", 8, False),
    ("service-changed-since", _doc(9, api=8), "api", 7, True),
    ("future", _doc(9, api=7), "api", 10, True),
    ("other-service-changed", _doc(9, api=4, web=9), "api", 5, False),
    ("no-mark-is-exact", _doc(9, api=None), "api", 8, True),
    ("no-mark-current", _doc(9, api=None), "api", 9, False),
    ("no-state-is-exact", _doc(9, web=9), "api", 8, True),
]


@pytest.mark.parametrize(
    ("doc", "service", "if_match", "stale"),
    [c[1:] for c in IF_MATCH],
    ids=[c[0] for c in IF_MATCH],
)
def test_if_match_is_stale_only_when_the_service_changed(
    doc: StateDoc, service: str, if_match: int, stale: bool
) -> None:
    reason = statedoc.stale_if_match(doc, service, if_match)
    assert (reason is not None) == stale
