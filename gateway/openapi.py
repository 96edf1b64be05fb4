"""The OpenAPI 3.1 document of the admin API (`GET /admin/openapi.json`, README "Admin API").

Why hand-written data instead of generated: the document is part of the
contract, reviewed like code; tests keep it true by checking that every
documented operation is routed, every route is documented, and every
response the tests see validates against its schema.
"""

from __future__ import annotations

from typing import Any

from gateway.config import RULE_ACTIONS, RULE_METRICS
from gateway.rollout import STATES as ROLLOUT_STATES
from gateway.statedoc import (
    GUARD_FIELDS,
    MAX_LATENCY_MS,
    MAX_MIN_REQUESTS,
    MAX_WEIGHT,
    MIN_WEIGHT,
)

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_NUM = {"type": "number"}
_WEIGHT = {
    "type": "number",
    "minimum": 0,
    "maximum": MAX_WEIGHT,
    "description": f"0, or between {MIN_WEIGHT:g} and {MAX_WEIGHT:,.0f}",
}
_SHARE = {"type": "number", "minimum": 0, "maximum": 1}
_PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
_RATIO_MAP = {"type": "object", "additionalProperties": _SHARE}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "field"],
        "properties": {
            "error": {"type": "string", "description": "what is wrong and how to fix it"},
            "field": {
                "type": ["string", "null"],
                "description": "the offending field, e.g. `weights.gray`, `service`, `If-Match`",
            },
        },
    },
    "ReloadError": {
        "allOf": [
            _ref("Error"),
            {
                "type": "object",
                "required": ["errors"],
                "properties": {
                    "errors": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["field", "error"],
                            "properties": {
                                "field": {"type": "string"},
                                "error": {"type": "string"},
                            },
                        },
                    }
                },
            },
        ]
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "ready", "not ready", "draining"]},
            "no_endpoints": {
                "type": "array",
                "description": "on /readyz: the releases with weight > 0 and no endpoint",
                "items": {
                    "type": "object",
                    "required": ["service", "release"],
                    "properties": {"service": {"type": "string"}, "release": {"type": "string"}},
                },
            },
        },
    },
    "Endpoint": {
        "type": "object",
        "required": ["address", "weight", "healthy", "outstanding"],
        "properties": {
            "address": {"type": "string"},
            "weight": {"type": "integer", "minimum": 1},
            "healthy": {
                "type": "boolean",
                "description": "false while ejected: passive health, outlier ejection "
                "on consecutive 5xx, or a failing active health check",
            },
            "outstanding": {
                "type": "integer",
                "description": "requests in flight to it from this process, across reloads",
            },
        },
    },
    "Release": {
        "type": "object",
        "required": ["weight", "percent", "available", "endpoints"],
        "properties": {
            "weight": {**_WEIGHT, "description": "raw weight (weights are normalized)"},
            "percent": _PERCENT,
            "available": {"type": "boolean", "description": "has a healthy endpoint"},
            "endpoints": {"type": "array", "items": _ref("Endpoint")},
        },
    },
    "Thresholds": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "error_rate": {"type": "number", "minimum": 0, "maximum": 1},
            "latency_p95_ms": {"type": "number", "minimum": 0, "maximum": MAX_LATENCY_MS},
            "latency_p95_delta_ms": {"type": "number", "minimum": 0, "maximum": MAX_LATENCY_MS},
            "min_requests": {"type": "integer", "minimum": 1, "maximum": MAX_MIN_REQUESTS},
        },
    },
    "Guard": {
        "type": "object",
        "required": ["enabled", "thresholds", "window_s", "min_endpoints"],
        "properties": {
            "enabled": {"type": "boolean"},
            "thresholds": _ref("Thresholds"),
            "window_s": {"type": "number", "minimum": 0},
            "min_endpoints": {"type": "integer", "minimum": 0},
            "for_s": {
                "type": "number",
                "minimum": 0,
                "description": "how long a breach must last before the guard acts",
            },
            "rules": {"type": "array", "items": _ref("GuardRule")},
        },
    },
    "GuardRule": {
        "type": "object",
        "required": ["metric", "window_s", "action", "for_s"],
        "properties": {
            "metric": {"type": "string", "enum": list(RULE_METRICS)},
            "above": {"type": "number"},
            "below": {"type": "number", "description": "healthy_endpoints only"},
            "window_s": {"type": "number", "minimum": 0},
            "action": {"type": "string", "enum": list(RULE_ACTIONS)},
            "for_s": {"type": "number", "minimum": 0},
        },
    },
    "Service": {
        "type": "object",
        "required": [
            "service",
            "baseline",
            "balancer",
            "state_version",
            "weights",
            "percent",
            "releases",
            "guard",
        ],
        "properties": {
            "service": {"type": "string"},
            "baseline": {"type": "string"},
            "balancer": {"type": "string", "enum": ["p2c", "round_robin", "hash"]},
            "state_version": {"type": "integer", "minimum": 0},
            "weights": {"type": "object", "additionalProperties": _WEIGHT},
            "percent": {
                "type": "object",
                "additionalProperties": _PERCENT,
            },
            "releases": {"type": "object", "additionalProperties": _ref("Release")},
            "guard": _ref("Guard"),
            "rollout": _ref("Rollout"),
            "analysis": _ref("Analysis"),
        },
    },
    "Analysis": {
        "type": ["object", "null"],
        "description": (
            'Prometheus analysis: config and last results (README "Progressive delivery")'
        ),
        "required": ["evaluator", "metrics", "releases"],
        "properties": {
            "evaluator": {
                "type": ["string", "null"],
                "description": "the replica holding the evaluation lease",
            },
            "metrics": {"type": "array", "items": {"type": "object"}},
            "releases": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "weight_at": {"type": ["number", "null"]},
                        "metrics": {
                            "type": "object",
                            "additionalProperties": _ref("AnalysisRun"),
                        },
                    },
                },
            },
        },
    },
    "AnalysisRun": {
        "type": "object",
        "required": ["value", "threshold", "result", "at", "failed_in_row", "inconclusive_in_row"],
        "properties": {
            "action": {"type": "string", "enum": ["rollback", "pause", "observe"]},
            "value": {"type": ["number", "null"]},
            "baseline_value": {"type": ["number", "null"]},
            "threshold": {"type": ["number", "null"]},
            "result": {
                "type": ["string", "null"],
                "enum": ["success", "failure", "inconclusive", None],
            },
            "why": {"type": ["string", "null"]},
            "at": {"type": ["number", "null"]},
            "counted": {
                "type": "boolean",
                "description": "false: started within initial_delay of a weight change",
            },
            "failed_in_row": {"type": "integer", "minimum": 0},
            "inconclusive_in_row": {"type": "integer", "minimum": 0},
            "success_at": {"type": ["number", "null"]},
            "last": {"type": "array", "maxItems": 10, "items": {"type": "object"}},
        },
    },
    "ServiceList": {
        "type": "object",
        "required": ["state_version", "services"],
        "properties": {
            "state_version": {"type": "integer", "minimum": 0},
            "services": {"type": "array", "items": _ref("Service")},
        },
    },
    "Rollout": {
        "type": ["object", "null"],
        "required": ["release", "state", "step", "steps", "weight"],
        "properties": {
            "release": {"type": "string"},
            "state": {
                "type": "string",
                "enum": list(ROLLOUT_STATES),
            },
            "step": {"type": "integer", "minimum": -1},
            "step_started": {"type": "number"},
            "paused_left": {"type": ["number", "null"]},
            "reason": {"type": ["string", "null"]},
            "paused_by": {
                "type": ["string", "null"],
                "enum": ["guard", "analysis", "hook", "deadline", None],
                "description": "guard or analysis: that pause lifts by itself; "
                "hook: a confirm hook holds it until it answers 2xx; deadline: the progress "
                "deadline held it, only resume continues",
            },
            "held_since": {
                "type": ["number", "null"],
                "description": "Pending/Paused: since when (rollout.progress_deadline counts)",
            },
            "step_started_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "when the current step began (RFC 3339)",
            },
            "confirm_by": {
                "type": ["number", "null"],
                "description": "CircuitBreak: when it confirms itself (rollout.confirm_timeout)",
            },
            "weight": _PERCENT,
            "steps": {"type": "array", "items": _ref("RolloutStep")},
            "driver": {
                "type": "object",
                "description": "several replicas (docs/operations.md): the replica that "
                "drives this rollout (its lease's owner, null when none holds it) and the "
                "requests the release served in the step across replicas, as they published "
                "them (null outside a step)",
                "properties": {
                    "replica": {"type": ["string", "null"]},
                    "served_in_step": {"type": ["integer", "null"], "minimum": 0},
                    "min_requests": {"type": "integer", "minimum": 0},
                },
            },
        },
    },
    "AuditRecord": {
        "type": "object",
        "required": [
            "time",
            "actor",
            "source",
            "action",
            "service",
            "before",
            "after",
            "reason",
            "state_version",
        ],
        "properties": {
            "time": {"type": "string", "format": "date-time"},
            "actor": {
                "type": "string",
                "description": "the admin token's name, or guard, rollout, reload",
            },
            "source": {"type": "string"},
            "action": {"type": "string"},
            "service": {"type": ["string", "null"]},
            "before": {"type": ["object", "null"]},
            "after": {"type": ["object", "null"]},
            "reason": {"type": ["string", "null"]},
            "state_version": {"type": "integer", "minimum": 0},
        },
    },
    "AuditList": {
        "type": "object",
        "required": ["records", "count"],
        "properties": {
            "records": {"type": "array", "items": _ref("AuditRecord")},
            "count": {"type": "integer", "minimum": 0},
        },
    },
    "RolloutStep": {
        "type": "object",
        "required": ["weight"],
        "properties": {
            "weight": {
                **_PERCENT,
                "description": "percent of the service's traffic for the release (not a raw "
                "weight); the baseline gets the rest",
            },
            "pause": {
                "type": ["number", "string", "null"],
                "description": 'seconds or a duration (5m); null or "manual" = hold until '
                "promote; at least rollout.min_first_pause (first step) and "
                "rollout.min_pause (later steps but the last)",
            },
        },
    },
    "RolloutPlan": {
        "type": "object",
        "required": ["release", "steps"],
        "properties": {
            "release": {"type": "string"},
            "steps": {"type": "array", "minItems": 1, "items": _ref("RolloutStep")},
        },
        "example": {
            "release": "gray",
            "steps": [
                {"weight": 1, "pause": "5m"},
                {"weight": 5, "pause": "15m"},
                {"weight": 20, "pause": "15m"},
                {"weight": 50, "pause": "15m"},
                {"weight": 100, "pause": 0},
            ],
        },
    },
    "Weights": {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": _WEIGHT,
        "description": "release -> raw weight (not percent: weights are normalized, so "
        "stable 95 + gray 10 gives gray 10/105 = 9.5 %); releases not named keep their weight; "
        "at least one weight of the result must be > 0",
        "example": {"stable": 95, "gray": 5},
    },
    "PlatformPayload": {
        "type": "object",
        "required": ["service"],
        "additionalProperties": False,
        "properties": {
            "service": {"type": "string"},
            "gray_weight": {
                "type": "number",
                "minimum": 0,
                "maximum": 100,
                "description": "percent for the gray release; the baseline gets the rest, "
                "any other release 0",
            },
            "metrics_threshold": _ref("Thresholds"),
        },
        "example": {
            "service": "user-api",
            "gray_weight": 5,
            "metrics_threshold": {"error_rate": 0.01, "latency_p95_ms": 800},
        },
    },
    "Explain": {
        "type": "object",
        "required": ["service", "release", "reason", "key", "chosen", "trusted", "state_version"],
        "properties": {
            "service": {"type": "string"},
            "release": {"type": ["string", "null"]},
            "reason": {
                "type": "string",
                "enum": [
                    "header",
                    "cookie",
                    "tag",
                    "lane",
                    "segment",
                    "hash",
                    "random",
                    "fallback",
                    "unavailable",
                    "lane_unavailable",
                ],
            },
            "key": {"type": ["string", "null"]},
            "chosen": {"type": ["string", "null"]},
            "trusted": {"type": "boolean"},
            "segment": {
                "type": ["string", "null"],
                "description": "the user segment that chose the release (README Segments)",
            },
            "client": {
                "type": "string",
                "description": "the client address, when trusted proxies make it differ from"
                " client_ip (README, Segments)",
            },
            "lane": {
                "type": "string",
                "description": "the lane the request is in (routing.lanes)",
            },
            "state_version": {"type": "integer", "minimum": 0},
        },
    },
    "Preview": {
        "type": "object",
        "required": [
            "service",
            "state_version",
            "weights",
            "sample",
            "moved_share",
            "moves",
            "shares",
            "before",
        ],
        "properties": {
            "service": {"type": "string"},
            "state_version": {"type": "integer", "minimum": 0},
            "weights": {"type": "object", "additionalProperties": _WEIGHT},
            "sample": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
            "segment": {
                "type": "string",
                "description": "present when the preview is of that segment's split",
            },
            "moved_share": _SHARE,
            "moves": {**_RATIO_MAP, "description": '"from->to" -> fraction of the sample'},
            "shares": {**_RATIO_MAP, "description": "fraction per release after the change"},
            "before": {**_RATIO_MAP, "description": "fraction per release now"},
        },
    },
    "Segment": {
        "type": "object",
        "required": ["name", "match"],
        "description": 'one user segment, as in the config\'s `segments:` (README "Segments")',
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"},
            "match": {
                "type": "object",
                "description": "every condition given must hold: header, cookie, query, "
                "path, method, users, cidrs, time",
            },
            "release": {"type": "string", "description": "all of the segment to this release"},
            "weights": {
                "type": "object",
                "additionalProperties": _WEIGHT,
                "description": "the segment's own split (instead of `release`)",
            },
            "sticky_by": {
                "type": "object",
                "description": "{header: NAME} or {cookie: NAME}: the bucketing key",
            },
        },
    },
    "Segments": {
        "type": "object",
        "required": ["service", "state_version", "source", "segments"],
        "properties": {
            "service": {"type": "string"},
            "state_version": {"type": "integer", "minimum": 0},
            "source": {
                "type": "string",
                "enum": ["config", "live"],
                "description": "`live`: set by PUT …/segments; `config`: the config's list",
            },
            "segments": {"type": "array", "items": _ref("Segment")},
        },
    },
    "Reload": {
        "type": "object",
        "required": ["status", "state_version", "warnings"],
        "properties": {
            "status": {"type": "string", "enum": ["reloaded"]},
            "state_version": {"type": "integer", "minimum": 0},
            "warnings": {"type": "array", "items": {"type": "string"}},
        },
    },
}

_ERR = _ref("Error")
_E400 = _json(_ERR, "bad input; nothing changed")
_E401 = _json(_ERR, "missing or wrong bearer token")
_E404 = _json(_ERR, "unknown service")
_E409 = _json(_ERR, "If-Match is stale; nothing changed")
_SVC_PARAM = {"name": "service", "in": "path", "required": True, "schema": {"type": "string"}}
_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": "optional: the state version this change is based on, as the ETag "
    "of GET /admin/services/{service} gives it; a stale one answers 409",
    "schema": {"type": "string"},
}
_ETAG = {"ETag": {"description": "the state version", "schema": {"type": "string"}}}
_PUBLIC: list[dict[str, list[str]]] = []


def _service_ok(description: str) -> dict[str, Any]:
    return {**_json(_ref("Service"), description), "headers": _ETAG}


def _paths() -> dict[str, Any]:
    health = {
        "200": _json(_ref("Status"), "serving"),
    }
    return {
        "/healthz": {
            "get": {
                "summary": "liveness; 503 draining once the process drains (SIGTERM)",
                "security": _PUBLIC,
                "responses": {**health, "503": _json(_ref("Status"), "draining")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "ready while every release with weight > 0 has an endpoint",
                "security": _PUBLIC,
                "responses": {**health, "503": _json(_ref("Status"), "not ready")},
            }
        },
        "/metrics": {
            "get": {
                "summary": 'Prometheus text format (README "Tracing & metrics")',
                "security": _PUBLIC,
                "responses": {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/admin/services": {
            "get": {
                "summary": "every service with releases, weights, endpoints, guard",
                "responses": {
                    "200": {**_json(_ref("ServiceList"), "services"), "headers": _ETAG},
                    "401": _E401,
                },
            }
        },
        "/admin/services/{service}": {
            "parameters": [_SVC_PARAM],
            "get": {
                "summary": "one service",
                "responses": {"200": _service_ok("the service"), "401": _E401, "404": _E404},
            },
        },
        "/admin/services/{service}/weights": {
            "parameters": [_SVC_PARAM],
            "put": {
                "summary": "set raw weights; persisted before the answer, applied by every worker",
                "parameters": [_IF_MATCH],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Weights")}},
                },
                "responses": {
                    "200": _service_ok("accepted; the new state version"),
                    "400": _E400,
                    "401": _E401,
                    "404": _E404,
                    "409": _E409,
                },
            },
            "delete": {
                "summary": "forget stored weights and thresholds: back to the config",
                "parameters": [_IF_MATCH],
                "responses": {
                    "200": _service_ok("accepted; the new state version"),
                    "400": _E400,
                    "401": _E401,
                    "404": _E404,
                    "409": _E409,
                },
            },
        },
        "/admin/services/{service}/segments": {
            "parameters": [_SVC_PARAM],
            "get": {
                "summary": "the user segments in force: set live, else the config's",
                "responses": {
                    "200": {**_json(_ref("Segments"), "the segments"), "headers": _ETAG},
                    "401": _E401,
                    "404": _E404,
                },
            },
            "put": {
                "summary": "replace the whole list, validated like the config; persisted "
                "before the answer, applied by every worker and replica; user files re-read",
                "parameters": [_IF_MATCH],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"type": "array", "items": _ref("Segment")}}
                    },
                },
                "responses": {
                    "200": {**_json(_ref("Segments"), "accepted"), "headers": _ETAG},
                    "400": _E400,
                    "401": _E401,
                    "404": _E404,
                    "409": _E409,
                },
            },
            "delete": {
                "summary": "forget the live list: the config's segments are in force again",
                "parameters": [_IF_MATCH],
                "responses": {
                    "200": {**_json(_ref("Segments"), "accepted"), "headers": _ETAG},
                    "400": _E400,
                    "401": _E401,
                    "404": _E404,
                    "409": _E409,
                },
            },
        },
        "/admin/weights": {
            "post": {
                "summary": "release-platform payload: gray percent and guard thresholds",
                "parameters": [_IF_MATCH],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("PlatformPayload")}},
                },
                "responses": {
                    "200": _service_ok("accepted; the new state version"),
                    "400": _E400,
                    "401": _E401,
                    "404": _E404,
                    "409": _E409,
                },
            }
        },
        "/admin/services/{service}/explain": {
            "parameters": [_SVC_PARAM],
            "get": {
                "summary": "the release the data path would pick for this request now, and why",
                "parameters": [
                    {
                        "name": "user",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "sticky key, as the user header",
                    },
                    {
                        "name": "header",
                        "in": "query",
                        "style": "form",
                        "explode": True,
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "description": "NAME:VALUE, repeatable",
                    },
                    {
                        "name": "cookie",
                        "in": "query",
                        "style": "form",
                        "explode": True,
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "description": "NAME=VALUE, repeatable",
                    },
                    {
                        "name": "client_ip",
                        "in": "query",
                        "schema": {"type": "string", "default": "127.0.0.1"},
                        "description": "decides whether stage overrides are trusted; "
                        "segments' `cidrs` match it",
                    },
                    {
                        "name": "path",
                        "in": "query",
                        "schema": {"type": "string", "default": "/"},
                        "description": "request path, for segments' `path`",
                    },
                    {
                        "name": "query",
                        "in": "query",
                        "schema": {"type": "string", "default": ""},
                        "description": "raw query string (a=1&b=2, percent-encoded), "
                        "for segments' `query`",
                    },
                    {
                        "name": "method",
                        "in": "query",
                        "schema": {"type": "string", "default": "GET"},
                        "description": "request method, for segments' `method`",
                    },
                ],
                "responses": {
                    "200": _json(_ref("Explain"), "the decision"),
                    "400": _E400,
                    "401": _E401,
                    "404": _E404,
                },
            },
        },
        "/admin/services/{service}/preview": {
            "parameters": [_SVC_PARAM],
            "get": {
                "summary": "exact share of sticky users that a weight change would move",
                "description": "Query: release=weight for any release (others keep their "
                "weight) and `sample` synthetic keys (default 100000). The weights are raw, "
                "as in PUT .../weights, not percent: beside stable 95, ?gray=10 means "
                "10/105 = 9.5 %.",
                "parameters": [
                    {
                        "name": "sample",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 1_000_000,
                            "default": 100_000,
                        },
                    },
                    {
                        "name": "segment",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "preview that segment's own split instead of the "
                        "service's (its weights not named are kept)",
                    },
                    {
                        "name": "weights",
                        "in": "query",
                        "style": "form",
                        "explode": True,
                        "schema": {"type": "object", "additionalProperties": _WEIGHT},
                        "description": "release=raw weight pairs (not percent), e.g. "
                        "?stable=90&gray=10",
                    },
                ],
                "responses": {
                    "200": _json(_ref("Preview"), "the movement"),
                    "400": _E400,
                    "401": _E401,
                    "404": _E404,
                },
            },
        },
        "/admin/services/{service}/rollout": {
            "parameters": [_SVC_PARAM],
            "post": {
                "summary": "start a step plan: the release goes to each step's weight, advancing "
                'after each pause while the guard holds (README "Guard and rollouts")',
                "parameters": [_IF_MATCH],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("RolloutPlan")}},
                },
                "responses": {
                    "200": _service_ok(
                        "accepted: Progressing when the pre-check passed at once, else "
                        "Pending with the reason; the new state version"
                    ),
                    "400": _E400,
                    "401": _E401,
                    "404": _E404,
                    "409": _json(_ERR, "a rollout is already active, or If-Match is stale"),
                },
            },
        },
        **{
            f"/admin/services/{{service}}/{action}": {
                "parameters": [_SVC_PARAM],
                "post": {
                    "summary": summary,
                    "parameters": [_IF_MATCH],
                    "responses": {
                        "200": _service_ok("accepted; the new state version"),
                        "400": _E400,
                        "401": _E401,
                        "404": _E404,
                        "409": _json(_ERR, "not possible in the current rollout state"),
                    },
                },
            }
            for action, summary in (
                ("pause", "hold the current step"),
                ("resume", "continue a paused rollout"),
                ("abort", "roll back: the release to weight 0, state RolledBack"),
                ("rollout/confirm", "accept a guard rollback: CircuitBreak -> RolledBack"),
                (
                    "rollout/retry",
                    "start the plan again at step 1: CircuitBreak|RolledBack -> "
                    "Progressing, guard counters reset",
                ),
            )
        },
        "/admin/services/{service}/promote": {
            "parameters": [_SVC_PARAM],
            "post": {
                "summary": "end the current step now (every gate skipped); with "
                '{"full": true} or ?full=true, all of them: the release takes all traffic',
                "parameters": [
                    _IF_MATCH,
                    {
                        "name": "full",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["true", "false"]},
                    },
                ],
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"full": {"type": "boolean", "default": False}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _service_ok("accepted; the new state version"),
                    "400": _E400,
                    "401": _E401,
                    "404": _E404,
                    "409": _json(_ERR, "not possible in the current rollout state"),
                },
            },
        },
        "/admin/services/{service}/baseline": {
            "parameters": [_SVC_PARAM],
            "put": {
                "summary": "point the baseline at another release (after a promotion); "
                "persisted like weights; refused while a rollout is Pending, Progressing "
                "or Paused",
                "parameters": [_IF_MATCH],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["baseline"],
                                "additionalProperties": False,
                                "properties": {"baseline": {"type": "string"}},
                            },
                            "example": {"baseline": "gray"},
                        }
                    },
                },
                "responses": {
                    "200": _service_ok("accepted; the new state version"),
                    "400": _E400,
                    "401": _E401,
                    "404": _E404,
                    "409": _json(_ERR, "a rollout is active, or If-Match is stale"),
                },
            },
        },
        "/admin/audit": {
            "get": {
                "summary": "the audit trail: every accepted change and guard action, oldest "
                "first (the last 1,000 are kept)",
                "parameters": [
                    {
                        "name": "service",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "since",
                        "in": "query",
                        "required": False,
                        "description": "RFC 3339 time, epoch seconds, or a duration ago (10m)",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 1000,
                            "default": 100,
                        },
                    },
                ],
                "responses": {
                    "200": _json(_ref("AuditList"), "matching records"),
                    "400": _E400,
                    "401": _E401,
                    "404": _E404,
                },
            }
        },
        "/admin/reload": {
            "post": {
                "summary": "re-read the config file; on any error keep the running config",
                "responses": {
                    "200": _json(_ref("Reload"), "reloaded"),
                    "400": _json(_ref("ReloadError"), "the config has errors; nothing changed"),
                    "401": _E401,
                },
            }
        },
        "/admin/openapi.json": {
            "get": {
                "summary": "this document",
                "responses": {
                    "200": _json({"type": "object"}, "OpenAPI 3.1 document"),
                    "401": _E401,
                },
            }
        },
    }


_E403 = _json(_ERR, "a read-only token (admin.tokens_file) may only GET")
_E413 = _json(_ERR, "request body over the admin limit (1 MiB); nothing changed")
_E503 = _json(_ERR, "the state store cannot take the write now; nothing changed")


def _with_roles(paths: dict[str, Any]) -> dict[str, Any]:
    """Every admin write may answer 403 (read-only token), 413 (body too large) and 503."""
    for path, item in paths.items():
        for method in ("put", "post", "delete"):
            if path.startswith("/admin") and method in item:
                responses = item[method]["responses"]
                responses.setdefault("403", _E403)
                responses.setdefault("413", _E413)
                responses.setdefault("503", _E503)
    return paths


def build_openapi(version: str) -> dict[str, Any]:
    """The document served at /admin/openapi.json."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Gray-release gateway admin API",
            "version": version,
            "description": 'See README "Admin API". Every path under /admin needs '
            "`Authorization: Bearer <token>` when a token is configured "
            "(admin.token_env, admin.tokens_file); a "
            "`read` token may only GET (403 otherwise); /healthz, /readyz and "
            '/metrics never do. Errors are {"error", "field"}. Guard thresholds that can '
            f"change live: {', '.join(GUARD_FIELDS)}.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": _with_roles(_paths()),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }
