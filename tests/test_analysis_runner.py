"""The analysis runner in a real gateway: waiting for traffic, holding a step, one evaluator.

Prometheus here is a small stand-in on 127.0.0.1 that answers `/api/v1/query`
with whatever the test sets (the real server is in test_analysis_e2e.py); it
counts the queries it gets, so the test can see who evaluates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.analysis_runner import LEASE_MIN
from gateway.app import Gateway
from tests.conftest import gateway_config, run_gateway_process, start_app
from tests.consul_double import ConsulDouble
from tests.polling import until

pytestmark = pytest.mark.timeout(120)

QUIET_GUARD = {
    "error_rate": 1,
    "latency_p95_ms": 1e9,
    "latency_p95_delta_ms": 1e9,
    "min_requests": 1,  # a step also needs this many requests served in it (README "Rollouts")
}
# Short steps in tests: the default minimums are 5m and 15m (README "Rollouts").
FAST_ROLLOUT = {"min_first_pause": "0s", "min_pause": "0s"}


class FakePrometheus:
    """Answers every instant query with `value` (None: an empty vector)."""

    def __init__(self) -> None:
        self.value: str | None = "0.99"
        self.queries: list[str] = []
        self.url = ""

    def app(self) -> web.Application:
        async def query(request: web.Request) -> web.Response:
            form = await request.post()
            self.queries.append(str(form.get("query")))
            result = [] if self.value is None else [{"metric": {}, "value": [0, self.value]}]
            return web.json_response(
                {"status": "success", "data": {"resultType": "vector", "result": result}}
            )

        app = web.Application()
        app.router.add_post("/api/v1/query", query)
        return app


@pytest.fixture
async def prom() -> AsyncIterator[FakePrometheus]:
    p = FakePrometheus()
    up = await start_app(p.app())
    p.url = up.url
    yield p
    await up.runner.cleanup()


def _doc(prom: FakePrometheus, stable: str, gray: str, metric: dict[str, Any], **top: Any) -> Any:
    svc = {
        "svc": {
            "releases": {
                "stable": {"weight": 100, "upstreams": [stable]},
                "gray": {"weight": 0, "upstreams": [gray]},
            },
            "guard": QUIET_GUARD,
        }
    }
    analysis = {"prometheus": {"address": prom.url, "timeout": "2s"}, "metrics": [metric]}
    return gateway_config(svc, analysis=analysis, **{"rollout": FAST_ROLLOUT, **top})


def _metric(**kw: Any) -> dict[str, Any]:
    return {
        "name": "kpi",
        "query": 'kpi{release="{{release}}"}',
        "min": 0.95,
        "interval": "1s",
        "initial_delay": "0s",
        "min_requests": 0,
        **kw,
    }


async def _start_rollout(gw: Gateway, steps: list[dict[str, Any]]) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{gw.admin_port}/admin/services/svc/rollout",
            json={"release": "gray", "steps": steps},
        ) as r:
            assert r.status == 200, await r.text()


def _runs(gw: Gateway) -> dict[str, Any]:
    block = gw.control.analysis_of("svc") or {}
    metrics: dict[str, Any] = block.get("releases", {}).get("gray", {}).get("metrics", {})
    return metrics.get("kpi", {})


async def test_no_evaluation_until_the_release_served_min_requests(
    prom: FakePrometheus, upstreams: Any, gateway: Any
) -> None:
    stable, gray = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(_doc(prom, stable.url, gray.url, _metric(min_requests=20)))
    await _start_rollout(gw, [{"weight": 20, "pause": "1h"}])
    # Evaluations are due every second but skipped: no query, no result.
    await until(lambda: gw.control.analysis_of("svc") is not None, 20)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await until(lambda: loop.time() - t0 >= 3, 10)  # three passes of the runner
    assert prom.queries == [] and _runs(gw).get("result") is None
    async with aiohttp.ClientSession() as s:
        for i in range(25):
            async with s.get(
                f"http://127.0.0.1:{gw.port}/",
                headers={"X-Release-Stage": "gray", "X-User-ID": f"u{i}"},
            ) as r:
                assert r.status == 200
    gw.handler.flush()
    await until(lambda: _runs(gw).get("result") == "success", 20)
    assert prom.queries and all('release="gray"' in q for q in prom.queries)


async def test_a_step_waits_for_a_counted_success(
    prom: FakePrometheus, upstreams: Any, gateway: Any
) -> None:
    stable, gray = await upstreams("stable"), await upstreams("gray")
    prom.value = None  # empty result: inconclusive, never progress
    gw = await gateway(_doc(prom, stable.url, gray.url, _metric(inconclusive_limit=1000)))
    await _start_rollout(gw, [{"weight": 10, "pause": "1s"}, {"weight": 30, "pause": "1h"}])
    async with aiohttp.ClientSession() as s:  # the step's min_requests: one gray request
        url = f"http://127.0.0.1:{gw.port}/"
        async with s.get(url, headers={"X-Release-Stage": "gray"}) as resp:
            assert resp.status == 200
    await until(lambda: _runs(gw).get("inconclusive_in_row", 0) >= 3, 20)
    r = gw.control.rollout_of("svc")
    assert r is not None and r.step == 0 and r.state == "Progressing"  # pause long over
    prom.value = "0.99"
    await until(lambda: (gw.control.rollout_of("svc") or r).step == 1, 20)
    r1 = gw.control.rollout_of("svc")
    assert r1 is not None and r1.state == "Progressing"
    assert gw.holder.current.services["svc"].releases["gray"].raw_weight == 30


async def test_one_replica_evaluates_and_every_replica_shows_it(
    prom: FakePrometheus, upstreams: Any, gateway: Any
) -> None:
    stable, gray = await upstreams("stable"), await upstreams("gray")
    async with ConsulDouble(jitter=False) as consul:
        doc = _doc(
            prom,
            stable.url,
            gray.url,
            _metric(),
            state={"store": "consul"},
            consul={"address": consul.address, "kv_prefix": "gw/analysis"},
        )
        g1 = await gateway(doc)
        g2 = await gateway(doc)
        await _start_rollout(g1, [{"weight": 20, "pause": "1h"}])

        def runs(gw: Gateway) -> float:
            child = gw.metrics.analysis_runs.labels("svc", "gray", "kpi", "success")
            return float(child._value.get())

        await until(lambda: runs(g1) + runs(g2) >= 5, 30)
        owner = (g1.control.analysis_of("svc") or {})["lease"]["owner"]
        first, second = (g1, g2) if owner == g1.analysis.owner else (g2, g1)  # type: ignore[union-attr]
        assert runs(second) == 0, "both replicas evaluated"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{second.admin_port}/admin/services/svc") as r:
                view = (await r.json())["analysis"]
        assert view["evaluator"] == owner
        assert view["releases"]["gray"]["metrics"]["kpi"]["result"] == "success"
        # The evaluator goes away: the other takes over once the lease ran out.
        await first.stop(1.0)
        await until(lambda: runs(second) >= 1, LEASE_MIN + 30)


async def test_the_master_evaluates_with_every_workers_requests_counted(
    prom: FakePrometheus, upstreams: Any, tmp_path: Any
) -> None:
    """`--workers 2`: the admin process runs the analysis; min_requests sums both workers."""
    stable, gray = await upstreams("stable"), await upstreams("gray")
    doc = _doc(
        prom,
        stable.url,
        gray.url,
        _metric(min_requests=30),
        state={"store": "file", "path": str(tmp_path / "state.json")},
    )
    with run_gateway_process(tmp_path, doc, workers=2) as gp:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"{gp.admin}/admin/services/svc/rollout",
                json={"release": "gray", "steps": [{"weight": 20, "pause": "1h"}]},
            ) as r:
                assert r.status == 200, await r.text()

            async def view() -> dict[str, Any]:
                async with s.get(f"{gp.admin}/admin/services/svc") as r:
                    body: dict[str, Any] = await r.json()
                    return body

            async def has_block() -> bool:
                return bool((await view())["analysis"]["releases"])

            await until(has_block, 30)
            assert prom.queries == []  # waiting for traffic
            for i in range(40):  # new connections: spread over both workers
                async with aiohttp.ClientSession() as one:
                    async with one.get(
                        f"{gp.url}/", headers={"X-Release-Stage": "gray", "X-User-ID": f"u{i}"}
                    ) as r:
                        assert r.status == 200

            async def evaluated() -> bool:
                run = (await view())["analysis"]["releases"]["gray"]["metrics"]["kpi"]
                return bool(run["result"] == "success")

            await until(evaluated, 30)
            async with s.get(f"{gp.admin}/metrics") as r:
                text = await r.text()
            assert 'gateway_analysis_value{metric="kpi",release="gray",service="svc"} 0.99' in text
            assert "gateway_analysis_runs_total{" in text


@pytest.mark.parametrize(
    ("action", "weight_after", "alert"),
    [("rollback", 0.0, "AnalysisRolledBack"), ("pause", 10.0, "AnalysisPaused")],
    ids=["rollback-sets-weight-0", "pause-only-alerts"],
)
async def test_always_analyses_a_release_without_a_rollout(
    prom: FakePrometheus,
    upstreams: Any,
    gateway: Any,
    action: str,
    weight_after: float,
    alert: str,
) -> None:
    got: list[dict[str, Any]] = []
    alerted = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        alerted.set()
        return web.Response()

    receiver = web.Application()
    receiver.router.add_post("/", hook)
    rx = await upstreams(app=receiver)
    stable, gray = await upstreams("stable"), await upstreams("gray")
    prom.value = "0.5"  # below min 0.95
    doc = _doc(
        prom,
        stable.url,
        gray.url,
        _metric(failure_limit=1, action=action),
        alerts=[{"url": f"{rx.url}/"}],
    )
    doc["services"]["svc"]["releases"]["gray"]["weight"] = 10
    doc["analysis"]["always"] = True
    gw = await gateway(doc)
    await asyncio.wait_for(alerted.wait(), 30)
    assert got[0]["alert"] == alert and got[0]["value"] == 0.5 and got[0]["threshold"] == 0.95
    assert gw.holder.current.services["svc"].releases["gray"].raw_weight == weight_after
    r = gw.control.rollout_of("svc")
    if action == "rollback":
        assert r is not None and r.state == "CircuitBreak"
    else:  # the failures go on; the alert came once, at the limit
        assert r is None
        await until(lambda: _runs(gw).get("failed_in_row", 0) >= 4, 30)
        assert [a["alert"] for a in got] == [alert]


async def test_a_retry_starts_the_failure_count_afresh(
    prom: FakePrometheus, upstreams: Any, gateway: Any
) -> None:
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response()

    receiver = web.Application()
    receiver.router.add_post("/", hook)
    rx = await upstreams(app=receiver)
    stable, gray = await upstreams("stable"), await upstreams("gray")
    prom.value = "0.5"  # below min 0.95: every evaluation fails
    doc = _doc(prom, stable.url, gray.url, _metric(), alerts=[{"url": f"{rx.url}/"}])
    gw = await gateway(doc)
    await _start_rollout(gw, [{"weight": 20, "pause": "1h"}])

    def rolled_back() -> list[dict[str, Any]]:
        return [a for a in got if a["alert"] == "AnalysisRolledBack"]

    await until(lambda: len(rolled_back()) == 1, 30)
    assert rolled_back()[0]["failed_in_row"] == 2
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc/rollout/retry"
        async with s.post(url) as r:
            assert r.status == 200
    # Two new failures trip it again; without the reset the first would have.
    await until(lambda: len(rolled_back()) == 2, 30)
    assert rolled_back()[1]["failed_in_row"] == 2
