"""Guard rules against a real gateway, real upstreams and the real guard loop.

`for` (a breach must last), `min_endpoints` as a rollback rule, a p99 `pause`
rule that holds a rollout and lifts itself, each with its alert and audit record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import Gateway
from tests.conftest import gateway_config, start_app
from tests.polling import until

QUIET = {"latency_p95_ms": 1e9, "latency_p95_delta_ms": 1e9}  # only the rule under test


class Flaky:
    """An upstream whose behaviour the test turns: every 10th answer a 500, or a delay."""

    def __init__(self, release: str) -> None:
        self.release = release
        self.failing = False
        self.delay = 0.0
        self.n = 0

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.n += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.failing and self.n % 10 == 0:
                return web.json_response({"release": self.release}, status=500)
            return web.json_response({"release": self.release})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def _receiver(got: list[dict[str, Any]], event: asyncio.Event) -> web.Application:
    async def hook(request: web.Request) -> web.Response:
        got.append({"path": request.path, "body": await request.json()})
        event.set()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    return app


async def _traffic(
    gw: Gateway, stop: asyncio.Event, release: str = "gray", workers: int = 4
) -> None:
    """Requests pinned to `release` by the stage header until `stop` is set."""

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(
                    f"http://127.0.0.1:{gw.port}/",
                    headers={"X-Release-Stage": release, "X-User-ID": f"u{i}-{n}"},
                ) as r:
                    await r.read()
            await asyncio.sleep(0.005)  # pace the load on a shared box; nothing waits on it

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(one(s, i) for i in range(workers)))


def _gray_weight(gw: Gateway) -> float:
    return gw.holder.current.services["svc"].releases["gray"].raw_weight


async def _audit(gw: Gateway, **params: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{gw.admin_port}/admin/audit", params=params) as r:
            assert r.status == 200
            doc = await r.json()
    records: list[dict[str, Any]] = doc["records"]
    return records


async def test_a_burst_shorter_than_for_does_not_trip_a_lasting_breach_does(
    upstreams: Any, gateway: Any
) -> None:
    stable = await upstreams("stable")
    flaky = Flaky("gray")
    gray = await upstreams(app=flaky.app())
    svc = {
        "svc": {
            "releases": {
                "stable": {"weight": 50, "upstreams": [stable.url]},
                "gray": {"weight": 50, "upstreams": [gray.url]},
            },
            "guard": {
                "error_rate": 0.05,
                "window": "2s",
                "min_requests": 5,
                "for": "10s",
                "min_endpoints": 0,
                **QUIET,
            },
        }
    }
    gw = await gateway(gateway_config(svc), guard_interval=0.2)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    load = asyncio.create_task(_traffic(gw, stop))
    try:
        # 10 % errors for 3 s, then none: the breach never lasts 10 s.
        flaky.failing = True
        burst = loop.time()
        await until(lambda: loop.time() - burst >= 3, 10)
        flaky.failing = False
        await until(lambda: loop.time() - burst >= 14, 30)
        assert _gray_weight(gw) == 50
        assert gw.metrics.guard_trips.labels("svc", "gray", "error_rate")._value.get() == 0
        # 10 % errors that stay: trips 10-12 s after the breach began.
        flaky.failing = True
        began = loop.time()
        tripped = await until(lambda: _gray_weight(gw) == 0, 40)
        assert 10.0 <= tripped - began <= 12.0, tripped - began
    finally:
        stop.set()
        await load
    assert gw.control.rollout_of("svc").state == "CircuitBreak"  # type: ignore[union-attr]
    (rec,) = [r for r in await _audit(gw, service="svc") if r["actor"] == "guard"]
    assert rec["action"] == "guard.rollback" and "error_rate" in rec["reason"]


async def test_min_endpoints_rolls_back_when_endpoints_die(upstreams: Any, gateway: Any) -> None:
    stable = await upstreams("stable")
    grays = [await start_app(Flaky("gray").app()) for _ in range(3)]
    got: list[dict[str, Any]] = []
    alerted = asyncio.Event()
    hook = await upstreams(app=_receiver(got, alerted))
    svc = {
        "svc": {
            "releases": {
                "stable": {"weight": 50, "upstreams": [stable.url]},
                "gray": {"weight": 50, "upstreams": [g.url for g in grays]},
            },
            "guard": {
                "error_rate": 1,  # the dead endpoints' 502s must not trip first
                "min_requests": 1,
                "min_endpoints": 2,
                "for": "2s",
                "window": "10s",
                "alerts": [{"url": f"{hook.url}/wecom", "format": "wecom"}],
                **QUIET,
            },
        }
    }
    gw = await gateway(
        gateway_config(svc, alerts=[{"url": f"{hook.url}/json"}]), guard_interval=0.2
    )
    stop = asyncio.Event()
    load = asyncio.create_task(_traffic(gw, stop))
    try:
        await until(lambda: gw.guardian.guard.stats("svc", "gray").requests > 20, 20)
        assert _gray_weight(gw) == 50  # three healthy endpoints: nothing to do
        for g in grays[:2]:
            await g.runner.cleanup()
        stopped = asyncio.get_running_loop().time()
        tripped = await until(lambda: _gray_weight(gw) == 0, 20)
        assert tripped - stopped <= 2 + 2, tripped - stopped  # `for` + 2 s
        await asyncio.wait_for(alerted.wait(), 20)
        await until(lambda: len(got) >= 2, 20)
    finally:
        stop.set()
        await load
        await grays[2].runner.cleanup()
    bodies = {g["path"]: g["body"] for g in got}
    assert bodies["/json"]["reason"] == "healthy_endpoints"
    assert bodies["/json"]["value"] < 2 and bodies["/json"]["threshold"] == 2
    assert bodies["/json"]["action"]["rollout_state"] == "CircuitBreak"
    assert "healthy_endpoints" in bodies["/wecom"]["markdown"]["content"]
    (rec,) = [r for r in await _audit(gw) if r["actor"] == "guard"]
    assert rec["action"] == "guard.rollback" and "healthy_endpoints" in rec["reason"]
    assert rec["before"]["weights"]["gray"] == 50 and rec["after"]["weights"]["gray"] == 0
    assert rec["state_version"] == gw.holder.current.version


async def test_p99_pause_rule_holds_the_rollout_and_lifts_itself(
    upstreams: Any, gateway: Any, caplog: Any
) -> None:
    stable = await upstreams("stable")
    slow = Flaky("gray")
    gray = await upstreams(app=slow.app())
    svc = {
        "svc": {
            "releases": {
                "stable": {"weight": 100, "upstreams": [stable.url]},
                "gray": {"weight": 0, "upstreams": [gray.url]},
            },
            "guard": {
                "error_rate": 1,
                "min_requests": 3,
                "min_endpoints": 0,
                "for": "2s",
                "window": "10s",
                "rules": [
                    {"metric": "latency_p99_ms", "above": 150, "window": "2s", "action": "pause"}
                ],
                **QUIET,
            },
        }
    }
    caplog.set_level(logging.INFO, "gateway.audit")
    gw = await gateway(gateway_config(svc), guard_interval=0.2)
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    plan = {"release": "gray", "steps": [{"weight": 30, "pause": "1h"}, {"weight": 100}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{admin}/rollout", json=plan) as r:
            assert r.status == 200
    stop = asyncio.Event()
    load = asyncio.create_task(_traffic(gw, stop, workers=8))

    def state() -> str:
        r = gw.control.rollout_of("svc")
        return r.state if r is not None else "none"

    try:
        slow.delay = 0.3
        await until(lambda: state() == "Paused", 30)
        r = gw.control.rollout_of("svc")
        assert r is not None and r.paused_by == "guard" and "latency_p99_ms" in (r.reason or "")
        assert (r.step, _gray_weight(gw)) == (0, 30)  # held at its step, weights unchanged
        slow.delay = 0.0
        back = asyncio.get_running_loop().time()
        resumed = await until(lambda: state() == "Progressing", 30)
        assert resumed - back >= 2.0  # latency had to stay back for `for`
    finally:
        stop.set()
        await load
    r = gw.control.rollout_of("svc")
    assert r is not None and (r.step, r.reason, _gray_weight(gw)) == (0, None, 30)
    actions = [(x["actor"], x["action"]) for x in await _audit(gw, service="svc")]
    assert actions == [
        ("anonymous", "rollout.start"),
        ("guard", "guard.pause"),
        ("guard", "guard.resume"),
    ]
    logged = [m for m in caplog.messages if '"audit"' in m]
    assert len(logged) == 3 and '"guard.pause"' in logged[1]
    assert gw.metrics.guard_trips.labels("svc", "gray", "latency_p99_ms")._value.get() == 1
