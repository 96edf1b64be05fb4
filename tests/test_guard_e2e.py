"""The guard rolls a failing release back by itself, through the state store.

README "Guard and rollouts".
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import gateway_config, start_app, two_releases


def _failing_app() -> web.Application:
    async def boom(request: web.Request) -> web.Response:
        return web.json_response({"release": "gray"}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", boom)
    return app


def _hook_app(received: list[dict[str, Any]], got: asyncio.Event) -> web.Application:
    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        got.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/alert", hook)
    return app


async def test_failing_gray_is_rolled_back_with_alert(upstreams: Any, gateway: Any) -> None:
    stable = await upstreams("stable")
    gray = await start_app(_failing_app())
    received: list[dict[str, Any]] = []
    got = asyncio.Event()
    hook = await start_app(_hook_app(received, got))
    try:
        svc = two_releases(stable.url, gray.url, 50, 50)
        svc["svc"]["guard"] = {
            "error_rate": 0.05,
            "min_requests": 20,
            "window": "30s",
            "for": "0s",
            "alert_webhook": f"{hook.url}/alert",
        }
        gw = await gateway(gateway_config(svc), guard_interval=0.1)
        base = f"http://127.0.0.1:{gw.port}"
        async with aiohttp.ClientSession() as s:
            codes = []
            for i in range(120):
                async with s.get(f"{base}/", headers={"X-User-ID": f"user-{i}"}) as r:
                    codes.append(r.status)
            assert 500 in codes  # gray failed for its users before the trip
            await asyncio.wait_for(got.wait(), 10)
            alert = received[0]
            assert alert["service"] == "svc" and alert["release"] == "gray"
            assert alert["window"]["requests"] >= 20 and alert["window"]["failures"] > 0
            assert (
                alert["reason"] == "error_rate"
                and alert["action"]["rollout_state"] == "CircuitBreak"
            )
            snap = gw.holder.current
            assert snap.services["svc"].releases["gray"].raw_weight == 0
            assert snap.version >= 1  # written through the store, like an admin change
            for i in range(200):
                async with s.get(f"{base}/", headers={"X-User-ID": f"user-{i}"}) as r:
                    assert r.status == 200 and r.headers["X-Release-Stage"] == "stable"
            async with s.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as r:
                text = await r.text()
        trips = {
            (smp.labels["release"], smp.labels["reason"]): smp.value
            for fam in text_string_to_metric_families(text)
            if fam.name == "gateway_guard_trips"
            for smp in fam.samples
            if smp.name == "gateway_guard_trips_total"
        }
        assert trips == {("gray", "error_rate"): 1.0}
        assert 'gateway_rollout_state{service="svc",state="CircuitBreak"} 1.0' in text
    finally:
        await gray.runner.cleanup()
        await hook.runner.cleanup()


async def test_healthy_gray_is_left_alone(upstreams: Any, gateway: Any) -> None:
    stable, gray = await upstreams("stable"), await upstreams("gray")
    svc = two_releases(stable.url, gray.url, 50, 50)
    svc["svc"]["guard"] = {"error_rate": 0.05, "min_requests": 20, "window": "30s", "for": "0s"}
    gw = await gateway(gateway_config(svc), guard_interval=0.05)
    async with aiohttp.ClientSession() as s:
        for i in range(100):
            async with s.get(f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": f"u{i}"}) as r:
                assert r.status == 200
    assert await gw.guardian.check() == []
    assert gw.holder.current.services["svc"].releases["gray"].raw_weight == 50
