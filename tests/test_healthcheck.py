"""Active health checks, outlier ejection and their log lines, through a running gateway."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway import config as C
from gateway.app import Gateway
from gateway.balancer import FAIL_TIMEOUT, MAX_FAILS
from gateway.errors import ConfigError
from gateway.healthcheck import HealthChecker
from gateway.state import SnapshotHolder, build_snapshot
from tests.conftest import gateway_config

Make = Callable[..., Awaitable[Any]]


def _release(**extra: Any) -> dict[str, Any]:
    return {"svc": {"releases": {"stable": {"weight": 1, "upstreams": ["http://a:1"], **extra}}}}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"health_check": {"path": "healthz"}}, "health_check.path"),
        ({"health_check": {"interval": "soon"}}, "health_check.interval"),
        ({"health_check": {"interval": "1s", "timeout": "2s"}}, "health_check.timeout"),
        ({"health_check": {"healthy": 0}}, "health_check.healthy"),
        ({"health_check": {"unhealthy": 1.5}}, "health_check.unhealthy"),
        ({"health_check": {"port": 1}}, "health_check.port"),
        ({"health_check": []}, "health_check"),
        ({"outlier": {"consecutive_5xx": -1}}, "outlier.consecutive_5xx"),
        ({"outlier": {"max_ejection_percent": 101}}, "outlier.max_ejection_percent"),
        ({"outlier": {"ejection_time": "0s"}}, "outlier.ejection_time"),
        ({"outlier": {"base": 1}}, "outlier.base"),
    ],
    ids=[
        "relative-path",
        "bad-interval",
        "timeout-over-interval",
        "healthy-zero",
        "unhealthy-fraction",
        "unknown-hc-field",
        "hc-not-a-mapping",
        "negative-5xx",
        "percent-over-100",
        "zero-ejection",
        "unknown-outlier-field",
    ],
)
def test_bad_health_config_names_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        C.build({"services": _release(**extra)}, env={})
    assert [p for p, _ in e.value.errors] == [f"services.svc.releases.stable.{field}"]


def test_health_config_defaults_and_values() -> None:
    cfg = C.build({"services": _release(health_check={"path": "/ready", "interval": "2s"})}, env={})
    r = cfg.services["svc"].releases["stable"]
    assert r.health_check == C.HealthCheckConfig("/ready", 2.0, 1.0, 2, 3)
    assert r.outlier == C.OutlierConfig(5, 50.0, 30.0)
    assert (
        C.build({"services": _release()}, env={}).services["svc"].releases["stable"].health_check
        is None
    )


def test_check_command_exits_2_naming_the_health_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"services": _release(health_check={"timeout": "nope"})}))
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "services.svc.releases.stable.health_check.timeout" in r.stderr


class Switchable:
    """An upstream whose /healthz and answers can be turned bad and good again."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.status = 200
        self.checks = 0
        self.served = 0

    def app(self) -> web.Application:
        async def health(_: web.Request) -> web.Response:
            self.checks += 1
            return web.Response(status=200 if self.healthy else 503)

        async def serve(_: web.Request) -> web.Response:
            self.served += 1
            return web.json_response({"name": self.name}, status=self.status)

        app = web.Application()
        app.router.add_get("/healthz", health)
        app.router.add_get("/{tail:.*}", serve)
        return app


async def _until(cond: Callable[[], bool], what: str, within: float = 20.0) -> None:
    end = time.monotonic() + within
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.01)


async def _names(gw: Gateway, n: int) -> dict[str, int]:
    got: dict[str, int] = {}
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(f"http://127.0.0.1:{gw.port}/") as r:
                body = await r.json()
                got[f"{r.status} {body.get('name')}"] = (
                    got.get(f"{r.status} {body.get('name')}", 0) + 1
                )
    return got


async def _healthy(gw: Gateway) -> dict[int, bool]:
    url = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        doc = await r.json()
    return {
        int(e["address"].rsplit(":", 1)[1]): e["healthy"]
        for e in doc["releases"]["stable"]["endpoints"]
    }


async def _endpoints_gauge(gw: Gateway) -> float:
    url = f"http://127.0.0.1:{gw.admin_port}/metrics"
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        text = await r.text()
    want = 'gateway_upstream_endpoints{release="stable",service="svc"} '
    [line] = [ln for ln in text.splitlines() if ln.startswith(want)]
    return float(line.split()[-1])


async def test_active_check_takes_an_endpoint_out_and_brings_it_back(
    upstreams: Make, gateway: Make, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = Switchable("a"), Switchable("b")
    ua, ub = await upstreams(app=a.app()), await upstreams(app=b.app())
    hc = {"path": "/healthz", "interval": "50ms", "timeout": "50ms", "healthy": 2, "unhealthy": 2}
    doc = gateway_config(
        {
            "svc": {
                "releases": {
                    "stable": {"weight": 1, "upstreams": [ua.url, ub.url], "health_check": hc}
                }
            }
        }
    )
    gw: Gateway = await gateway(doc)
    gw.health.report_interval = 0.05
    caplog.set_level(logging.WARNING, logger="gateway.health")
    await _until(lambda: a.checks >= 2 and b.checks >= 2, "both probed")
    assert await _healthy(gw) == {ua.port: True, ub.port: True}
    b.healthy = False
    await _until(
        lambda: (
            gw.holder.current.slots.groups[("svc", "stable")]
            .by_address[f"127.0.0.1:{ub.port}"]
            .checked_down
        ),
        "b taken out",
    )
    assert await _healthy(gw) == {ua.port: True, ub.port: False}
    served = b.served
    assert await _names(gw, 20) == {"200 a": 20}
    assert b.served == served  # no request reached it
    await _until(lambda: "health check failing" in caplog.text, "ejection logged")
    assert await _endpoints_gauge(gw) == 1.0  # the gauge counts endpoints that can serve
    b.healthy = True
    await _until(lambda: "returned to service" in caplog.text, "return logged")
    assert await _healthy(gw) == {ua.port: True, ub.port: True}
    assert await _endpoints_gauge(gw) == 2.0
    got = await _names(gw, 40)
    assert set(got) == {"200 a", "200 b"}, got
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.health"]
    assert len([m for m in lines if str(ub.port) in m and "ejected" in m]) == 1
    assert len([m for m in lines if str(ub.port) in m and "returned" in m]) == 1


async def test_consecutive_5xx_eject_one_endpoint_never_the_whole_release(
    upstreams: Make, gateway: Make, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = Switchable("a"), Switchable("b")
    a.status = 500
    ua, ub = await upstreams(app=a.app()), await upstreams(app=b.app())
    doc = gateway_config(
        {"svc": {"releases": {"stable": {"weight": 1, "upstreams": [ua.url, ub.url]}}}}
    )
    gw: Gateway = await gateway(doc)
    caplog.set_level(logging.WARNING, logger="gateway.health")
    got = await _names(gw, 40)
    assert got.get("500 a", 0) == 5  # the 5th 5xx in a row ejects it (consecutive_5xx)
    assert await _healthy(gw) == {ua.port: False, ub.port: True}
    gw.health.report()
    assert "connect failures, timeouts or 5xx in a row" in caplog.text
    # Both answer 5xx now: at most 50 % of the release sits out, so b keeps serving.
    b.status = 500
    got = await _names(gw, 20)
    assert got == {"500 b": 20}
    assert await _healthy(gw) == {ua.port: False, ub.port: True}


def test_report_logs_each_change_once_and_caps_a_burst(caplog: pytest.LogCaptureFixture) -> None:
    ups = [f"http://127.0.0.1:{9000 + i}" for i in range(15)]
    cfg = C.build(
        {"services": {"svc": {"releases": {"stable": {"weight": 1, "upstreams": ups}}}}}, env={}
    )
    holder = SnapshotHolder(build_snapshot(cfg))
    now = [100.0]
    hc = HealthChecker(holder, clock=lambda: now[0], log_limit=10)
    caplog.set_level(logging.WARNING, logger="gateway.health")
    pool = holder.current.services["svc"].releases["stable"].pool
    for s in pool.slots:
        for _ in range(MAX_FAILS):
            pool.eject(s, 99.0)
    lines = hc.report()
    assert len(lines) == 15 and all("ejected for" in ln for ln in lines)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 11 and logged[-1] == "... and 5 more endpoint state changes"
    assert hc.report() == []  # each change once
    now[0] = 99.0 + FAIL_TIMEOUT
    back = hc.report()
    assert len(back) == 15 and all("returned to service" in ln for ln in back)
