"""Analysis end to end: a real gateway, a real Prometheus (1 s scrape) and a business counter.

The exporter's `payments_total{release,status}` gives each release an ok-ratio the
test sets; the gateway's analysis runner queries Prometheus and rolls back, pauses,
resumes or lets the rollout advance through the control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import Gateway
from tests.conftest import ROOT, gateway_config, start_app
from tests.polling import until
from tests.prometheus_helpers import PaymentsExporter, Prometheus

pytestmark = pytest.mark.timeout(120)

PAYMENT_SUCCESS = (
    'sum(rate(payments_total{release="{{release}}",status="ok"}[5s]))'
    ' / sum(rate(payments_total{release="{{release}}"}[5s]))'
)
QUIET_GUARD = {
    "error_rate": 1,
    "latency_p95_ms": 1e9,
    "latency_p95_delta_ms": 1e9,
    "min_requests": 1,  # a step also needs this many requests served in it (README "Rollouts")
}
# Short steps in tests: the default minimums are 5m and 15m (README "Rollouts").
FAST_ROLLOUT = {"min_first_pause": "0s", "min_pause": "0s"}


def _service(
    stable: str, gray: str, metrics: list[dict[str, Any]], guard: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "svc": {
            "releases": {
                "stable": {"weight": 100, "upstreams": [stable]},
                "gray": {"weight": 0, "upstreams": [gray]},
            },
            "guard": {**QUIET_GUARD, **(guard or {})},
            "analysis": {"metrics": metrics},
        }
    }


def _payment_metric(**over: Any) -> dict[str, Any]:
    return {
        "name": "payment-success",
        "query": PAYMENT_SUCCESS,
        "compare": "baseline",
        "max_drop": 0.005,
        "interval": "2s",
        "failure_limit": 2,
        "min_requests": 0,
        **over,
    }


async def _admin(gw: Gateway, method: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as s:
        async with s.request(
            method, f"http://127.0.0.1:{gw.admin_port}/admin{path}", json=body
        ) as r:
            doc = await r.json()
            assert r.status < 300, (r.status, doc)
            return doc


def _gray_weight(gw: Gateway) -> float:
    return gw.holder.current.services["svc"].releases["gray"].raw_weight


def _run(gw: Gateway, metric: str = "payment-success") -> dict[str, Any]:
    block = gw.control.analysis_of("svc") or {}
    runs: dict[str, Any] = block.get("releases", {}).get("gray", {}).get("metrics", {})
    return runs.get(metric, {})


def _state(gw: Gateway) -> str | None:
    r = gw.control.rollout_of("svc")
    return r.state if r is not None else None


class Setup:
    """Upstreams, the exporter, Prometheus and the gateway of one test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.exporter = PaymentsExporter({"stable": 0.99, "gray": 0.99})
        self.prom: Prometheus | None = None
        self.gw: Gateway | None = None
        self.cleanup: list[Any] = []

    async def start(
        self,
        gateway: Any,
        upstreams: Any,
        metrics: list[dict[str, Any]],
        **top: Any,
    ) -> Gateway:
        stable = await upstreams("stable")
        gray = await upstreams("gray")
        exp = await self.exporter.start()
        self.cleanup.append(exp)
        self.prom = Prometheus(self.tmp, [f"127.0.0.1:{exp.port}"])
        prom_cfg = {"prometheus": {"address": self.prom.url, "timeout": "1s"}}
        doc = gateway_config(
            _service(stable.url, gray.url, metrics),
            analysis=prom_cfg,
            **{"rollout": FAST_ROLLOUT, **top},
        )
        await self.prom.start()
        self.gw = await gateway(doc)
        # Rates need a few scrapes before the first evaluation can be conclusive.
        await until(self._has_rates, 60)
        return self.gw

    async def _has_rates(self) -> bool:
        assert self.prom is not None
        data = await self.prom.api("query", query='sum(rate(payments_total{release="gray"}[5s]))')
        return bool(data["result"])

    async def gray_ratio_back(self) -> bool:
        assert self.prom is not None
        data = await self.prom.api("query", query=PAYMENT_SUCCESS.replace("{{release}}", "gray"))
        return bool(data["result"]) and float(data["result"][0]["value"][1]) >= 0.989

    async def stop(self) -> None:
        if self.prom is not None:
            await self.prom.stop()
        for up in self.cleanup:
            await up.runner.cleanup()


@pytest.fixture
async def setup(tmp_path: Path) -> Any:
    s = Setup(tmp_path)
    yield s
    await s.stop()


async def test_a_kpi_drop_of_2_percent_rolls_back_then_confirm_and_retry(
    setup: Setup, gateway: Any, upstreams: Any
) -> None:
    gw = await setup.start(gateway, upstreams, [_payment_metric()])
    await _admin(
        gw,
        "POST",
        "/services/svc/rollout",
        {"release": "gray", "steps": [{"weight": 20, "pause": "1h"}]},
    )
    assert _gray_weight(gw) == 20
    # Healthy first: a counted success, nothing happens.
    await until(lambda: _run(gw).get("success_at") is not None, 30)
    assert _state(gw) == "Progressing"
    loop = asyncio.get_running_loop()
    setup.exporter.ratio["gray"] = 0.97
    dropped = loop.time()
    tripped = await until(lambda: _gray_weight(gw) == 0, 20)
    assert tripped - dropped <= 10, tripped - dropped
    assert _state(gw) == "CircuitBreak"
    run = _run(gw)
    assert run["result"] == "failure" and run["failed_in_row"] >= 2
    assert run["value"] == pytest.approx(0.97, abs=0.005)
    assert run["threshold"] == pytest.approx(0.99 - 0.005, abs=1e-6)
    view = await _admin(gw, "GET", "/services/svc")
    shown = view["analysis"]["releases"]["gray"]["metrics"]["payment-success"]
    assert shown["result"] == "failure" and len(shown["last"]) >= 2
    records = (await _admin(gw, "GET", "/audit?service=svc"))["records"]
    assert any(r["actor"] == "analysis" and r["action"] == "analysis.rollback" for r in records), (
        records
    )
    assert (
        gw.metrics.analysis_runs.labels("svc", "gray", "payment-success", "failure")._value.get()
        >= 2
    )
    await _admin(gw, "POST", "/services/svc/rollout/confirm")
    assert _state(gw) == "RolledBack"
    setup.exporter.ratio["gray"] = 0.99
    await until(setup.gray_ratio_back, 30)  # the rate window no longer holds the drop
    await _admin(gw, "POST", "/services/svc/rollout/retry")
    assert _state(gw) == "Progressing" and _gray_weight(gw) == 20
    # The retry starts afresh: the failures before it are not counted again.
    ro = gw.control.rollout_of("svc")
    assert ro is not None
    retried = ro.step_started
    await until(lambda: (_run(gw).get("success_at") or 0) >= retried, 30)
    assert _run(gw)["failed_in_row"] == 0
    assert _state(gw) == "Progressing" and _gray_weight(gw) == 20


async def test_a_small_kpi_drop_lets_the_rollout_advance(
    setup: Setup, gateway: Any, upstreams: Any
) -> None:
    gw = await setup.start(gateway, upstreams, [_payment_metric()])
    setup.exporter.ratio["gray"] = 0.988  # 0.2 percentage points below the baseline
    steps = [{"weight": 20, "pause": "1s"}, {"weight": 50, "pause": "1s"}, {"weight": 100}]
    await _admin(gw, "POST", "/services/svc/rollout", {"release": "gray", "steps": steps})
    seen: set[float] = set()

    def progressed() -> bool:
        seen.add(_gray_weight(gw))
        r = gw.control.rollout_of("svc")
        return r is not None and r.step == 2

    async def trickle() -> None:  # each step needs gray requests served in it
        async with aiohttp.ClientSession() as s:
            while True:
                url = f"http://127.0.0.1:{gw.port}/"
                async with s.get(url, headers={"X-Release-Stage": "gray"}) as resp:
                    await resp.read()
                await asyncio.sleep(0.1)  # a trickle of traffic, not a synchronisation

    traffic = asyncio.create_task(trickle())
    try:
        await until(progressed, 60)
    finally:
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await traffic
    assert {20.0, 50.0, 100.0} <= seen, seen
    assert _state(gw) == "Progressing"  # the last step waits for promote (pause: null)
    run = _run(gw)
    assert run["failed_in_row"] == 0 and run["result"] == "success"
    assert (
        gw.metrics.analysis_runs.labels("svc", "gray", "payment-success", "failure")._value.get()
        == 0
    )


async def test_prometheus_down_pauses_and_its_return_resumes_nothing_rolls_back(
    setup: Setup, gateway: Any, upstreams: Any
) -> None:
    gw = await setup.start(gateway, upstreams, [_payment_metric(inconclusive_limit=2)])
    await _admin(
        gw,
        "POST",
        "/services/svc/rollout",
        {"release": "gray", "steps": [{"weight": 20, "pause": "1h"}]},
    )
    await until(lambda: _run(gw).get("success_at") is not None, 30)
    assert setup.prom is not None
    await setup.prom.stop()
    await until(lambda: _state(gw) == "Paused", 30)
    r = gw.control.rollout_of("svc")
    assert r is not None and r.paused_by == "analysis" and "inconclusive" in (r.reason or "")
    assert _run(gw)["inconclusive_in_row"] >= 2
    assert _gray_weight(gw) == 20  # a pause holds the weight
    await setup.prom.start()
    await until(lambda: _state(gw) == "Progressing", 60)
    assert _gray_weight(gw) == 20
    assert _run(gw)["result"] == "success"
    records = (await _admin(gw, "GET", "/audit?service=svc"))["records"]
    actions = [r["action"] for r in records if r["actor"] == "analysis"]
    assert "analysis.pause" in actions and "analysis.resume" in actions, actions
    assert "analysis.rollback" not in actions


def _receiver(got: list[dict[str, Any]]) -> web.Application:
    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    return app


async def test_an_observe_metric_only_alerts_and_initial_delay_does_not_count(
    setup: Setup, gateway: Any, upstreams: Any
) -> None:
    got: list[dict[str, Any]] = []
    hook = await start_app(_receiver(got))
    setup.cleanup.append(hook)
    observe = _payment_metric(
        name="observe-kpi", compare=None, max_drop=None, max=0.5, action="observe", failure_limit=1
    )
    observe = {k: v for k, v in observe.items() if v is not None}
    late = _payment_metric(name="late-kpi", initial_delay="1h", failure_limit=1)
    gw = await setup.start(
        gateway, upstreams, [observe, late], alerts=[{"url": f"{hook.url}/json"}]
    )
    setup.exporter.ratio["gray"] = 0.90  # fails both metrics
    await _admin(
        gw,
        "POST",
        "/services/svc/rollout",
        {"release": "gray", "steps": [{"weight": 20, "pause": "1h"}]},
    )
    await until(lambda: any(a.get("metric") == "observe-kpi" for a in got), 30)
    await until(lambda: len(_run(gw, "late-kpi").get("last", [])) >= 3, 30)
    # observe: failed and counted, alerted, changed nothing
    obs = _run(gw, "observe-kpi")
    assert obs["result"] == "failure" and obs["failed_in_row"] >= 1
    alert = next(a for a in got if a.get("metric") == "observe-kpi")
    assert alert["alert"] == "AnalysisFailed" and alert["action"]["metric_action"] == "observe"
    # within initial_delay: failures recorded, not counted, no action
    late_run = _run(gw, "late-kpi")
    assert late_run["result"] == "failure" and late_run["failed_in_row"] == 0
    assert all(e["counted"] is False for e in late_run["last"])
    assert _state(gw) == "Progressing" and _gray_weight(gw) == 20
    labels = ("svc", "gray", "late-kpi", "failure")
    assert gw.metrics.analysis_runs.labels(*labels)._value.get() == 0
    assert (
        gw.metrics.analysis_runs.labels("svc", "gray", "observe-kpi", "failure")._value.get() >= 1
    )
    records = (await _admin(gw, "GET", "/audit?service=svc"))["records"]
    assert not [r for r in records if r["actor"] == "analysis"], records


async def test_the_gray_error_alert_fires_on_real_series(
    tmp_path: Path, gateway: Any, upstreams: Any
) -> None:
    """config/prometheus-alerts.yml, loaded as is but with GrayErrorRate's `for` set to 0s."""

    async def fail(request: web.Request) -> web.Response:
        return web.json_response({"release": "gray"}, status=500)

    bad = web.Application()
    bad.router.add_route("*", "/{tail:.*}", fail)
    stable = await upstreams("stable")
    gray = await upstreams(app=bad)
    svc = {
        "svc": {
            "releases": {
                "stable": {"weight": 50, "upstreams": [stable.url]},
                "gray": {"weight": 50, "upstreams": [gray.url]},
            },
            "guard": QUIET_GUARD,
        }
    }
    gw = await gateway(gateway_config(svc))
    rules = yaml.safe_load((ROOT / "config" / "prometheus-alerts.yml").read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "GrayErrorRate"]
    rule["for"] = "0s"  # the file's 2m would outlast the test; the expression is unchanged
    copy = tmp_path / "alerts.yml"
    copy.write_text(yaml.safe_dump(rules))
    prom = Prometheus(tmp_path, [f"127.0.0.1:{gw.admin_port}"], rule_files=[copy])
    await prom.start()
    stop = asyncio.Event()

    async def traffic() -> None:
        async with aiohttp.ClientSession() as s:
            n = 0
            while not stop.is_set():
                n += 1
                async with s.get(
                    f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": f"u{n}"}
                ) as r:
                    await r.read()
                await asyncio.sleep(0.02)

    load = asyncio.create_task(traffic())
    try:
        groups = (await prom.api("rules"))["groups"]
        assert sum(len(g["rules"]) for g in groups) == 6

        async def firing() -> bool:
            alerts = (await prom.api("alerts"))["alerts"]
            return any(
                a["labels"].get("alertname") == "GrayErrorRate"
                and a["labels"].get("service") == "svc"
                and a["labels"].get("release") == "gray"
                and a["state"] == "firing"
                for a in alerts
            )

        await until(firing, 60)
        groups = (await prom.api("rules"))["groups"]
        assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    finally:
        stop.set()
        await load
        await prom.stop()
