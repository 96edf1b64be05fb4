"""gateway/prometheus.py against small servers on 127.0.0.1: every failure is inconclusive."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from gateway.analysis_config import PrometheusConfig
from gateway.prometheus import PrometheusClient
from tests.conftest import free_port, start_app

GOOD = {
    "status": "success",
    "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "0.5"]}]},
}


def _answer(kind: str, release: asyncio.Event) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        assert form.get("query") == "up"
        if kind == "good":
            return web.json_response(GOOD)
        if kind == "slow":
            await release.wait()  # set once the client has given up
            return web.json_response(GOOD)
        if kind == "bad-query":
            body = {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}
            return web.json_response(body, status=400)
        if kind == "html":
            return web.Response(text="<html>proxy error</html>", status=502)
        if kind == "huge":
            return web.Response(body=b" " * (2 << 20), content_type="application/json")
        raise AssertionError(kind)

    app = web.Application()
    app.router.add_post("/api/v1/query", handle)
    return app


@pytest.mark.parametrize(
    ("kind", "value", "why"),
    [
        ("good", 0.5, None),
        ("slow", None, "timed out after 0.3s"),
        ("bad-query", None, "HTTP 400: query failed: parse error at char 3"),
        ("html", None, "HTTP 502: not a JSON answer"),
        ("huge", None, "larger than 1 MiB"),
    ],
    ids=["value", "timeout", "query-error", "not-json", "too-large"],
)
async def test_instant_query(kind: str, value: float | None, why: str | None) -> None:
    release = asyncio.Event()
    up = await start_app(_answer(kind, release))
    client = PrometheusClient(PrometheusConfig(up.url, timeout=0.3))
    try:
        got = await client.query("up")
    finally:
        release.set()
        await client.close()
        await up.runner.cleanup()
    assert got.value == value
    assert (got.why is None) if why is None else (got.why is not None and why in got.why), got


async def test_unreachable_is_inconclusive() -> None:
    client = PrometheusClient(PrometheusConfig(f"http://127.0.0.1:{free_port()}", timeout=2))
    try:
        got = await client.query("up")
    finally:
        await client.close()
    assert got.value is None and got.why is not None and got.why.startswith("unreachable")
