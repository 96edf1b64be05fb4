"""Admin REST API on its own listener (SPEC §6).

Why a separate listener: operators and the release platform reach it on a
private address with a bearer token; the data path never serves it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from gateway.app import Gateway

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")


def _gw(request: web.Request) -> Gateway:
    return request.app[GATEWAY_KEY]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers={"X-App-Version": _gw(request).version})


async def readyz(request: web.Request) -> web.Response:
    gw = _gw(request)
    ok = gw.is_ready()
    return web.json_response(
        {"status": "ready" if ok else "not ready"},
        status=200 if ok else 503,
        headers={"X-App-Version": gw.version},
    )


async def metrics(request: web.Request) -> web.Response:
    body = _gw(request).metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def service_doc(gw: Gateway, name: str) -> dict[str, Any]:
    snap = gw.holder.current
    sv = snap.services[name]
    return {
        "service": name,
        "baseline": sv.cfg.baseline,
        "balancer": sv.cfg.balancer,
        "state_version": snap.version,
        "releases": {
            r: {
                "weight": rv.raw_weight,
                "share": round(rv.share * 100.0, 6),
                "endpoints": [
                    {"address": s.endpoint.address, "weight": s.weight, "healthy": True,
                     "outstanding": s.outstanding}
                    for s in rv.pool.slots
                ],
            }
            for r, rv in sv.releases.items()
        },
    }


async def list_services(request: web.Request) -> web.Response:
    gw = _gw(request)
    snap = gw.holder.current
    return web.json_response(
        {"state_version": snap.version, "services": [service_doc(gw, n) for n in snap.services]}
    )


async def get_service(request: web.Request) -> web.Response:
    gw = _gw(request)
    name = request.match_info["service"]
    if name not in gw.holder.current.services:
        return web.json_response({"error": f"unknown service {name!r}", "field": "service"}, status=404)
    return web.json_response(service_doc(gw, name))


def build_admin_app(gw: Gateway) -> web.Application:
    app = web.Application()
    app[GATEWAY_KEY] = gw
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/services", list_services)
    app.router.add_get("/admin/services/{service}", get_service)
    return app
