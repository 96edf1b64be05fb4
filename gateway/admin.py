"""Admin REST API on its own listener (README "Admin API").

Why a separate listener: operators and the release platform reach it on a
private address with a bearer token; the data path never serves it.
`/healthz`, `/readyz` and `/metrics` stay unauthenticated so probes and
Prometheus need no secret; everything under `/admin` needs the token when
one is configured.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway import analysis, audit, changes, live_segments, preview
from gateway.config import AdminConfig, AdminToken
from gateway.errors import BadRequest, Forbidden, GatewayError, NotFound, Unauthorized
from gateway.openapi import build_openapi
from gateway.paths import BadTarget
from gateway.readiness import unready_releases
from gateway.routing import WeightTable

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.state import ServiceView, Snapshot

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")
# Largest admin request body: every valid one is a few hundred bytes; more is refused
# with a JSON 413 before it is parsed (aiohttp's client_max_size).
ADMIN_MAX_BODY = 1024 * 1024
log = logging.getLogger("gateway.admin")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _gw(request: web.Request) -> Gateway:
    return request.app[GATEWAY_KEY]


def error_response(status: int, message: str, field: str | None) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="gateway-admin"'} if status == 401 else None
    return web.json_response({"error": message, "field": field}, status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """The one place admin errors become `{"error", "field"}` JSON (README "Admin API")."""
    try:
        return await handler(request)
    except GatewayError as e:
        return error_response(e.status, e.message, e.field)
    except web.HTTPNotFound:
        return error_response(404, f"no such endpoint: {request.path}", "path")
    except web.HTTPMethodNotAllowed as e:
        allowed = ", ".join(sorted(e.allowed_methods))
        return error_response(405, f"{request.method} not allowed here (use {allowed})", "method")
    except web.HTTPRequestEntityTooLarge:
        return error_response(
            413, f"request body larger than {ADMIN_MAX_BODY:,} bytes; send less", "body"
        )
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, e.reason, None)
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        # A bug, not the caller's input: say so in JSON and keep the traceback in the log.
        log.exception("admin %s %s failed", request.method, request.path)
        return error_response(500, "internal error; see the gateway log", None)


def admin_tokens(cfg: AdminConfig) -> tuple[AdminToken, ...]:
    """The `token_env` token (named `admin`, role write) and the named ones of `tokens_file`."""
    env = (AdminToken("admin", cfg.token, "write"),) if cfg.token else ()
    return env + cfg.tokens


def match_token(tokens: tuple[AdminToken, ...], cred: str) -> AdminToken | None:
    """Compare against every token in constant time, so timing tells nothing (RFC 6750 §5.3)."""
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: this gives back the
    # bytes the client sent (any bytes, "\xff" too) instead of raising on them.
    got = cred.encode("utf-8", "surrogateescape")
    found: AdminToken | None = None
    for t in tokens:
        if hmac.compare_digest(got, t.token.encode()) and found is None:
            found = t
    return found


_READ_METHODS = ("GET", "HEAD", "OPTIONS")
# What an admin request does, for the audit trail: (method, route) -> action.
_AUDIT_ACTIONS = {
    ("PUT", "/admin/services/{service}/weights"): "weights.set",
    ("DELETE", "/admin/services/{service}/weights"): "weights.clear",
    ("PUT", "/admin/services/{service}/segments"): "segments.set",
    ("DELETE", "/admin/services/{service}/segments"): "segments.clear",
    ("POST", "/admin/weights"): "weights.platform",
    ("POST", "/admin/services/{service}/rollout"): "rollout.start",
    ("PUT", "/admin/services/{service}/baseline"): "baseline.set",
    ("POST", "/admin/reload"): "reload",
}


@web.middleware
async def auth_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Bearer token on /admin, compared in constant time (RFC 6750 §2.1); roles read|write."""
    actor = "anonymous"
    if request.path.startswith("/admin"):
        tokens = admin_tokens(_gw(request).control.config.admin)
        if tokens:
            scheme, _, cred = request.headers.get("Authorization", "").partition(" ")
            who = match_token(tokens, cred.strip()) if scheme.lower() == "bearer" else None
            if who is None:
                raise Unauthorized("missing or wrong bearer token", "Authorization")
            if who.role != "write" and request.method not in _READ_METHODS:
                raise Forbidden(
                    f"token {who.name!r} is read-only: it may only GET", "Authorization"
                )
            actor = who.name
    info = request.match_info
    route = info.route.resource.canonical if info.route.resource is not None else request.path
    action = _AUDIT_ACTIONS.get((request.method, route))
    if action is None and request.method == "POST" and route.startswith("/admin/services/"):
        action = "rollout." + route.rsplit("/", 1)[-1]
    with audit.acting(actor, "admin", action or f"{request.method} {route}"):
        return await handler(request)


# --------------------------------------------------------------------------- unauthenticated


async def healthz(request: web.Request) -> web.Response:
    gw = _gw(request)
    if gw.draining:  # as the data listener's: probes see the drain (RFC 9110 §15.6.4)
        return web.json_response(
            {"status": "draining"}, status=503, headers={"X-App-Version": gw.version}
        )
    return web.json_response({"status": "ok"}, headers={"X-App-Version": gw.version})


async def readyz(request: web.Request) -> web.Response:
    gw = _gw(request)
    missing = unready_releases(gw.holder.current)
    body: dict[str, object] = {"status": "not ready" if missing else "ready"}
    if missing:  # which releases hold it back (gateway/readiness.py says why)
        body["no_endpoints"] = [{"service": s, "release": r} for s, r in missing]
    return web.json_response(
        body, status=503 if missing else 200, headers={"X-App-Version": gw.version}
    )


async def metrics(request: web.Request) -> web.Response:
    gw = _gw(request)
    gw.handler.flush()  # exchanges finished in this loop iteration count too
    body = gw.metrics.exposition()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


# --------------------------------------------------------------------------- services


def _percent(share: float) -> float:
    """Share as percent, 6 decimals; a positive share never shows as 0 (3 significant digits)."""
    p = round(share * 100.0, 6)
    if p == 0.0 and share > 0:
        return float(f"{share * 100.0:.3g}")
    return p


def service_doc(
    snap: Snapshot,
    name: str,
    rollout: Mapping[str, Any] | None = None,
    analysis_block: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One service as operators see it: weights, endpoints, guard, rollout, state version."""
    sv = snap.services[name]
    g = sv.guard
    now = time.perf_counter()  # the handler's clock for ejection deadlines
    return {
        "service": name,
        "baseline": sv.cfg.baseline,
        "balancer": sv.cfg.balancer,
        "state_version": snap.version,
        "weights": dict(sv.table.raw),
        "percent": {r: _percent(s) for r, s in sv.table.shares.items()},
        "releases": {
            r: {
                "weight": rv.raw_weight,
                "percent": _percent(rv.share),
                "available": r in sv.available,
                "endpoints": [
                    {
                        "address": s.endpoint.address,
                        "weight": s.weight,
                        "healthy": s.down_until <= now,  # any ejection (balancer.Slot)
                        "outstanding": s.outstanding,
                    }
                    for s in rv.pool.slots
                ],
            }
            for r, rv in sv.releases.items()
        },
        "guard": {
            "enabled": g.enabled,
            "thresholds": {
                "error_rate": g.error_rate,
                "latency_p95_ms": g.latency_p95_ms,
                "latency_p95_delta_ms": g.latency_p95_delta_ms,
                "min_requests": g.min_requests,
            },
            "window_s": g.window,
            "min_endpoints": g.min_endpoints,
            "for_s": g.hold,
            "rules": [
                {
                    "metric": r.metric,
                    ("below" if r.metric == "healthy_endpoints" else "above"): r.threshold,
                    "window_s": r.window if r.window is not None else g.window,
                    "action": r.action,
                    "for_s": r.hold if r.hold is not None else g.hold,
                }
                for r in g.rules
            ],
        },
        "rollout": dict(rollout) if rollout is not None else None,
        # README "Progressive delivery": last results per metric (gateway/analysis.py)
        "analysis": analysis.view(snap.config.analysis.metrics_for(name), analysis_block),
    }


def _rollout_json(gw: Gateway, name: str) -> dict[str, Any] | None:
    """The rollout status a pipeline waits on (README "Rollouts")."""
    r = gw.control.rollout_of(name)
    if r is None:
        return None
    doc = r.to_json()
    doc["step_started_at"] = (
        audit.iso(r.step_started) if r.step >= 0 and r.step_started > 0 else None
    )
    doc["driver"] = gw.driver.status(name, time.time())  # several replicas: who drives it
    return doc


def _etag(version: int) -> dict[str, str]:
    return {"ETag": f'"{version}"'}


def _service(request: web.Request) -> tuple[Snapshot, ServiceView]:
    snap = _gw(request).holder.current
    name = request.match_info["service"]
    sv = snap.services.get(name)
    if sv is None:
        raise NotFound(f"unknown service {name!r} (have: {', '.join(snap.services)})", "service")
    return snap, sv


def _service_response(gw: Gateway, name: str) -> web.Response:
    snap = gw.holder.current
    return web.json_response(
        service_doc(snap, name, _rollout_json(gw, name), gw.control.analysis_of(name)),
        headers=_etag(snap.version),
    )


async def list_services(request: web.Request) -> web.Response:
    snap = _gw(request).holder.current
    return web.json_response(
        {
            "state_version": snap.version,
            "services": [
                service_doc(
                    snap, n, _rollout_json(_gw(request), n), _gw(request).control.analysis_of(n)
                )
                for n in snap.services
            ],
        },
        headers=_etag(snap.version),
    )


async def get_service(request: web.Request) -> web.Response:
    _, sv = _service(request)
    return _service_response(_gw(request), sv.name)


async def put_weights(request: web.Request) -> web.Response:
    gw = _gw(request)
    _, sv = _service(request)
    if_match = changes.parse_if_match(request.headers.get("If-Match"))
    body = changes.parse_json(await request.read())
    await gw.control.set_weights(sv.name, body, if_match)
    return _service_response(gw, sv.name)


async def delete_weights(request: web.Request) -> web.Response:
    gw = _gw(request)
    _, sv = _service(request)
    if_match = changes.parse_if_match(request.headers.get("If-Match"))
    await gw.control.clear(sv.name, if_match)
    return _service_response(gw, sv.name)


async def post_platform_weights(request: web.Request) -> web.Response:
    gw = _gw(request)
    if_match = changes.parse_if_match(request.headers.get("If-Match"))
    body = changes.parse_json(await request.read())
    name = changes.platform_service(body)
    if name not in gw.holder.current.services:
        raise NotFound(f"unknown service {name!r}", "service")
    assert isinstance(body, dict)
    await gw.control.platform(name, body, if_match)
    return _service_response(gw, name)


def _segments_response(gw: Gateway, name: str) -> web.Response:
    """The list in force (README "Segments"): the stored live one, else the config's."""
    snap = gw.holder.current
    live = live_segments.stored(gw.control.doc, name) is not None
    return web.json_response(
        {
            "service": name,
            "state_version": snap.version,
            "source": "live" if live else "config",
            "segments": live_segments.as_json(snap.services[name].cfg.segments),
        },
        headers=_etag(snap.version),
    )


async def get_segments(request: web.Request) -> web.Response:
    _, sv = _service(request)
    return _segments_response(_gw(request), sv.name)


async def put_segments(request: web.Request) -> web.Response:
    gw = _gw(request)
    _, sv = _service(request)
    if_match = changes.parse_if_match(request.headers.get("If-Match"))
    body = changes.parse_json(await request.read())
    await gw.control.set_segments(sv.name, body, if_match)
    return _segments_response(gw, sv.name)


async def delete_segments(request: web.Request) -> web.Response:
    gw = _gw(request)
    _, sv = _service(request)
    if_match = changes.parse_if_match(request.headers.get("If-Match"))
    await gw.control.clear_segments(sv.name, if_match)
    return _segments_response(gw, sv.name)


# --------------------------------------------------------------------------- explain / preview


_EXPLAIN_PARAMS = ("user", "header", "cookie", "client_ip", "path", "query", "method")


async def explain(request: web.Request) -> web.Response:
    snap, sv = _service(request)
    q = request.query
    for k in q:
        if k not in _EXPLAIN_PARAMS:
            raise BadRequest(f"unknown parameter (known: {', '.join(_EXPLAIN_PARAMS)})", k)
    headers: list[tuple[str, str]] = []
    for h in q.getall("header", []):
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise BadRequest(f"{h!r} is not NAME:VALUE", "header")
        headers.append((name.strip(), value.strip()))
    for c in q.getall("cookie", []):
        name, sep, _ = c.partition("=")
        if not sep or not name.strip():
            raise BadRequest(f"{c!r} is not NAME=VALUE", "cookie")
        headers.append(("Cookie", c))
    if "user" in q:
        headers.append((snap.config.routing.user_header, q.getall("user")[-1]))
    client_ip = q.get("client_ip", "127.0.0.1")
    try:
        ipaddress.ip_address(client_ip)
    except ValueError:
        raise BadRequest(f"{client_ip!r} is not an IP address", "client_ip") from None
    path, method = q.get("path", "/"), q.get("method", "GET")
    if not path.startswith("/"):
        raise BadRequest(f"{path!r} is not a path starting with '/'", "path")
    if not method or not method.isascii() or not method.isalpha():
        raise BadRequest(f"{method!r} is not a request method", "method")
    try:
        ex = preview.explain(
            snap,
            sv.name,
            headers=headers,
            client_ip=client_ip,
            rng=_gw(request).rng,
            now=time.perf_counter(),  # the handler's clock, for passive-health ejections
            path=path,
            query=q.get("query", ""),
            method=method.upper(),
        )
    except BadTarget as e:
        raise BadRequest(f"{path!r}: {e.message}", "path") from None
    return web.json_response({**ex.to_json(), "state_version": snap.version})


def _float_param(value: str, field: str) -> float:
    try:
        w = float(value)
    except ValueError:
        raise BadRequest(f"{value!r} is not a number", field) from None
    if not math.isfinite(w):
        raise BadRequest(f"{value!r} is not a finite number", field)
    return w


# Keys hashed between two turns of the event loop: ~4 µs each (both tables, pure
# build), about a millisecond per turn; a proxied request takes a few turns, and
# the loop also serves the data path in a worker.
PREVIEW_CHUNK = 256
PREVIEW_LOCK: web.AppKey[asyncio.Lock] = web.AppKey("preview_lock", asyncio.Lock)


async def _preview_in_turns(
    lock: asyncio.Lock, old: WeightTable, new: WeightTable, sample: int
) -> preview.Preview:
    """A preview hashed a chunk per loop turn, one preview at a time.

    Why not a thread: hashing holds the GIL, and each thread running it made the
    loop wait for the GIL every time it woke (eight 1M-key previews at once took
    the data path's median from 0.5 ms to 49 ms). Why one at a time: a second
    preview queues instead of doubling the turns every request waits behind.
    """
    async with lock:
        moves: preview.Moves = Counter()
        for start in range(0, sample, PREVIEW_CHUNK):
            preview.count_moves(old, new, start, min(start + PREVIEW_CHUNK, sample), moves)
            await asyncio.sleep(0)  # let the loop serve what arrived meanwhile
        return preview.summarize(old, new, moves, sample)


async def preview_change(request: web.Request) -> web.Response:
    snap, sv = _service(request)
    q = request.query
    sample = preview.DEFAULT_SAMPLE
    if "sample" in q:
        s = q["sample"]
        if (
            not (s.isascii() and s.isdigit() and len(s) < 10)
            or not 1 <= int(s) <= preview.MAX_SAMPLE
        ):
            raise BadRequest(f"must be an integer between 1 and {preview.MAX_SAMPLE:,}", "sample")
        sample = int(s)
    body: dict[str, float] = {}
    for k, v in q.items():
        if k in ("sample", "segment"):
            continue
        if k not in sv.releases:
            raise BadRequest(
                f"unknown release {k!r} of service {sv.name!r} (have: {', '.join(sv.releases)})",
                f"weights.{k}",
            )
        body[k] = _float_param(v, f"weights.{k}")
    segment = q.get("segment")
    if segment is not None:  # that segment's own split (README "Segments")
        old, new, weights = live_segments.split_change(sv.name, sv.cfg.segments, segment, body)
    else:
        weights = changes.weights_change(sv.cfg, sv.table.raw, body)
        old, new = sv.table, WeightTable.build(sv.cfg.salt or sv.cfg.name, weights)
    pv = await _preview_in_turns(request.app[PREVIEW_LOCK], old, new, sample)
    extra = {"segment": segment} if segment is not None else {}
    return web.json_response(
        {
            "service": sv.name,
            "state_version": snap.version,
            "weights": weights,
            **extra,
            **pv.to_json(),
        }
    )


# --------------------------------------------------------------------------- rollouts


async def post_rollout(request: web.Request) -> web.Response:
    gw = _gw(request)
    _, sv = _service(request)
    if_match = changes.parse_if_match(request.headers.get("If-Match"))
    body = changes.parse_json(await request.read())
    now = time.time()
    await gw.control.rollout(
        sv.name,
        "start",
        body,
        if_match,
        now,
        admit=gw.driver.admit(sv.name, now),
        claim=gw.driver.claim(sv.name, now),
    )
    return _service_response(gw, sv.name)


def _promote_full(raw: bytes, query: Mapping[str, str]) -> bool:
    """`promote` ends the current step; `{"full": true}` (or `?full=true`) all of them."""
    full: object = query.get("full", "false")
    if full not in ("true", "false"):
        raise BadRequest("must be true or false", "full")
    full = full == "true"
    if raw.strip():
        body = changes.parse_json(raw)
        if not isinstance(body, Mapping):
            raise BadRequest('body must be a JSON object {"full": true|false}', "body")
        for k in body:
            if k != "full":
                raise BadRequest("unknown field (allowed: full)", str(k))
        full = body.get("full", full)
        if not isinstance(full, bool):
            raise BadRequest("must be true or false", "full")
    return bool(full)


def _rollout_action(action: str) -> _Handler:
    async def handle(request: web.Request) -> web.Response:
        gw = _gw(request)
        _, sv = _service(request)
        if_match = changes.parse_if_match(request.headers.get("If-Match"))
        act = action
        if action == "promote" and _promote_full(await request.read(), request.query):
            act = "promote_full"
        await gw.control.rollout(sv.name, act, None, if_match, time.time())
        return _service_response(gw, sv.name)

    handle.__name__ = f"rollout_{action}"
    return handle


async def put_baseline(request: web.Request) -> web.Response:
    gw = _gw(request)
    _, sv = _service(request)
    if_match = changes.parse_if_match(request.headers.get("If-Match"))
    body = changes.parse_json(await request.read())
    await gw.control.set_baseline(sv.name, body, if_match)
    return _service_response(gw, sv.name)


# --------------------------------------------------------------------------- audit

_AUDIT_PARAMS = ("service", "since", "limit")


async def get_audit(request: web.Request) -> web.Response:
    gw = _gw(request)
    q = request.query
    for k in q:
        if k not in _AUDIT_PARAMS:
            raise BadRequest(f"unknown parameter (known: {', '.join(_AUDIT_PARAMS)})", k)
    service = q.get("service") or None
    if service is not None and service not in gw.holder.current.services:
        raise NotFound(f"unknown service {service!r}", "service")
    since = None
    if "since" in q:
        since = audit.parse_time(q["since"], time.time())
        if since is None:
            raise BadRequest(
                "must be RFC 3339 (2026-01-02T03:04:05Z), epoch seconds or a duration ago (10m)",
                "since",
            )
    limit = 100
    if "limit" in q:
        s = q["limit"]
        # ASCII digits only (str.isdigit also takes "²") and few of them, so int() never fails.
        if not (s.isascii() and s.isdigit() and len(s) <= 4) or not 1 <= int(s) <= audit.KEEP:
            raise BadRequest(f"must be an integer between 1 and {audit.KEEP}", "limit")
        limit = int(s)
    records = await gw.auditor.query(service, since, limit)
    return web.json_response({"records": records, "count": len(records)})


# --------------------------------------------------------------------------- reload / openapi


async def reload(request: web.Request) -> web.Response:
    gw = _gw(request)
    res = gw.control.reload()
    if not res.ok:
        first = res.errors[0][0] if res.errors else None
        return web.json_response(
            {
                "error": f"config has {len(res.errors)} error(s); the running config is kept",
                "field": first,
                "errors": [{"field": p, "error": m} for p, m in res.errors],
            },
            status=400,
        )
    return web.json_response(
        {
            "status": "reloaded",
            "state_version": gw.holder.current.version,
            "warnings": list(res.warnings),
        }
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(build_openapi(_gw(request).version))


ROUTES: tuple[tuple[str, str, _Handler], ...] = (
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", metrics),
    ("GET", "/admin/services", list_services),
    ("GET", "/admin/services/{service}", get_service),
    ("PUT", "/admin/services/{service}/weights", put_weights),
    ("DELETE", "/admin/services/{service}/weights", delete_weights),
    ("POST", "/admin/weights", post_platform_weights),
    ("GET", "/admin/services/{service}/segments", get_segments),
    ("PUT", "/admin/services/{service}/segments", put_segments),
    ("DELETE", "/admin/services/{service}/segments", delete_segments),
    ("GET", "/admin/services/{service}/explain", explain),
    ("GET", "/admin/services/{service}/preview", preview_change),
    ("POST", "/admin/services/{service}/rollout", post_rollout),
    ("POST", "/admin/services/{service}/promote", _rollout_action("promote")),
    ("POST", "/admin/services/{service}/pause", _rollout_action("pause")),
    ("POST", "/admin/services/{service}/resume", _rollout_action("resume")),
    ("POST", "/admin/services/{service}/abort", _rollout_action("abort")),
    ("POST", "/admin/services/{service}/rollout/confirm", _rollout_action("confirm")),
    ("POST", "/admin/services/{service}/rollout/retry", _rollout_action("retry")),
    ("PUT", "/admin/services/{service}/baseline", put_baseline),
    ("GET", "/admin/audit", get_audit),
    ("POST", "/admin/reload", reload),
    ("GET", "/admin/openapi.json", openapi),
)


def build_admin_app(gw: Gateway) -> web.Application:
    """The admin aiohttp application; the Gateway is typed AppKey state."""
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware], client_max_size=ADMIN_MAX_BODY
    )
    app[GATEWAY_KEY] = gw
    app[PREVIEW_LOCK] = asyncio.Lock()
    for method, path, handler in ROUTES:
        if method == "GET":  # and HEAD: every server MUST support both (RFC 9110 §9.1)
            app.router.add_get(path, handler)
        else:
            app.router.add_route(method, path, handler)
    return app
