"""Issue 10's smaller cases: absolute-form targets, X-Request-ID, /readyz, draining /healthz."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway import config as C
from gateway.app import Gateway
from gateway.discovery import Pacing
from gateway.engine.api import RequestHead, Respond
from gateway.headers import valid_request_id
from tests.conftest import Upstream, gateway_config, run_gateway_process, two_releases
from tests.consul_double import ConsulDouble
from tests.engine_helpers import RawClient

GatewayFactory = Callable[..., Awaitable[Gateway]]
UpstreamFactory = Callable[..., Awaitable[Upstream]]


async def _exchange(port: int, head: bytes) -> tuple[int, dict[str, Any], Any]:
    c = await RawClient.connect(port)
    try:
        await c.send(head)
        r = await c.response(limit=30)
    finally:
        await c.close()
    return r.status, json.loads(r.body), r


# --------------------------------------------------------------------------- absolute form


async def test_absolute_form_authority_wins_over_host(
    upstreams: UpstreamFactory, gateway: GatewayFactory, engine: str
) -> None:
    """RFC 9112 §3.2.2: the target's authority, not Host, picks the service."""
    user, other = await upstreams("user-api"), await upstreams("other")
    services = {
        "user": {
            "match": {"hosts": ["user-api.local"]},
            "releases": {"stable": {"weight": 1, "upstreams": [user.url]}},
        },
        "other": {
            "match": {"hosts": ["other.local"]},
            "releases": {"stable": {"weight": 1, "upstreams": [other.url]}},
        },
    }
    gw = await gateway(gateway_config(services, engine=engine))
    assert gw.port is not None
    status, body, _ = await _exchange(
        gw.port,
        b"GET http://user-api.local/x/../y?q=1 HTTP/1.1\r\nHost: other.local\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert status == 200, body
    assert body["release"] == "user-api"
    assert body["path"] == "/y?q=1"  # origin form upstream, normalized
    assert body["headers"]["Host"] == "user-api.local"  # generated from the target
    assert body["headers"]["X-Forwarded-Host"] == "user-api.local"


# --------------------------------------------------------------------------- X-Request-ID

RIDS = [
    (b"req-123", True),
    (b"a" * 200, True),
    (b"a" * 201, False),
    (b"a" * 8000, False),
    (b"caf\xc3\xa9", False),
    (b"two words", False),
    (b"tab\tin", False),
    (b"\x7f", False),
    (b"~!#$%&'()*+,-./:;<=>?@[]^_`{|}", True),
]


@pytest.mark.parametrize(
    ("rid", "ok"),
    RIDS,
    ids=[
        "plain",
        "200-bytes",
        "201-bytes",
        "8000-bytes",
        "non-ascii",
        "space",
        "tab",
        "del",
        "punctuation",
    ],
)
def test_valid_request_id(rid: bytes, ok: bool) -> None:
    assert valid_request_id(rid) is ok


@pytest.mark.parametrize(
    ("rid", "kept"),
    [(b"req-123", True), (b"a" * 201, False), (b"r" * 8000, False), (b"caf\xc3\xa9", False)],
    ids=["kept", "201-bytes", "8000-bytes", "non-ascii"],
)
async def test_bad_request_id_replaced_and_logged(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    engine: str,
    caplog: pytest.LogCaptureFixture,
    rid: bytes,
    kept: bool,
) -> None:
    """Issue 10: an 8,000-byte or non-ASCII X-Request-ID is neither forwarded nor echoed."""
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(gateway_config(two_releases(st.url, gr.url), engine=engine, access_log=True))
    assert gw.port is not None
    caplog.set_level(logging.INFO, logger="gateway.access")
    status, body, r = await _exchange(
        gw.port,
        b"GET /r HTTP/1.1\r\nHost: x\r\nX-Request-ID: %s\r\nConnection: close\r\n\r\n" % rid,
    )
    assert status == 200
    echoed = r.get(b"x-request-id")
    assert body["headers"]["X-Request-ID"].encode() == echoed
    if kept:
        assert echoed == rid
    else:
        assert echoed != rid and valid_request_id(echoed) and len(echoed) == 32
    deadline = time.monotonic() + 30
    lines: list[dict[str, Any]] = []
    while not lines and time.monotonic() < deadline:
        lines = [json.loads(m.getMessage()) for m in caplog.records if m.name == "gateway.access"]
        if not lines:
            await asyncio.sleep(0.02)
    assert lines, "no access log line"
    assert lines[-1]["request_id"] == echoed.decode()
    assert lines[-1].get("request_id_replaced", False) is (not kept)


# --------------------------------------------------------------------------- /readyz


def _register(consul: ConsulDouble, port: int) -> None:
    consul.register(
        {
            "ID": "gray-1",
            "Name": "user-api",
            "Tags": ["gray"],
            "Address": "127.0.0.1",
            "Port": port,
            "Check": {"CheckID": "service:gray-1", "TTL": "600s", "Status": "passing"},
        }
    )


async def _poll_ready(
    s: aiohttp.ClientSession, url: str, want: int, deadline_s: float = 30.0
) -> dict[str, Any]:
    end = time.monotonic() + deadline_s
    while True:
        async with s.get(url) as r:
            body: dict[str, Any] = await r.json()
            if r.status == want:
                return body
        if time.monotonic() > end:
            raise AssertionError(f"{url} never answered {want}; last {body}")
        await asyncio.sleep(0.05)


async def test_readyz_not_ready_while_weighted_release_has_no_endpoint(
    upstreams: UpstreamFactory, gateway: GatewayFactory
) -> None:
    """Issue 10: a Consul-discovered gray with weight > 0 and 0 endpoints is not ready."""
    stable, gray = await upstreams("stable"), await upstreams("gray")
    async with ConsulDouble(jitter=False) as consul:
        doc = gateway_config(
            {
                "user-api": {
                    "releases": {
                        "stable": {"weight": 90, "upstreams": [stable.url]},
                        "gray": {"weight": 10, "consul": {"service": "user-api", "tags": ["gray"]}},
                    }
                }
            },
            consul={"address": consul.address},
        )
        gw = await gateway(doc, consul_pacing=Pacing(rate=50, burst=50))
        admin = f"http://127.0.0.1:{gw.admin_port}"
        data = f"http://127.0.0.1:{gw.port}"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{admin}/readyz") as r:
                assert r.status == 503
                body = await r.json()
            assert body == {
                "status": "not ready",
                "no_endpoints": [{"service": "user-api", "release": "gray"}],
            }
            async with s.get(f"{data}/readyz") as r:
                assert r.status == 503
                assert await r.json() == {"status": "not ready"}  # no topology on the data port
            _register(consul, gray.port)
            assert await _poll_ready(s, f"{admin}/readyz", 200) == {"status": "ready"}
            assert await _poll_ready(s, f"{data}/readyz", 200) == {"status": "ready"}
            consul.deregister("gray-1")
            await _poll_ready(s, f"{admin}/readyz", 503)
            # weight 0 (what the guard's min_endpoints rollback does): ready again
            async with s.put(
                f"{admin}/admin/services/user-api/weights", json={"stable": 100, "gray": 0}
            ) as r:
                assert r.status == 200, await r.text()
            assert await _poll_ready(s, f"{admin}/readyz", 200) == {"status": "ready"}


# --------------------------------------------------------------------------- draining /healthz


async def test_healthz_answers_draining_while_the_process_drains(
    upstreams: UpstreamFactory,
) -> None:
    """Issue 10: the admin /healthz keeps 200 no longer once a drain (SIGTERM) began."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"release": "stable"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    up = await upstreams(app=app)
    svc = {"s": {"releases": {"stable": {"weight": 1, "upstreams": [up.url]}}}}
    gw = Gateway(C.build(gateway_config(svc), env={}))
    await gw.start()
    stopping: asyncio.Task[None] | None = None
    try:
        admin = f"http://127.0.0.1:{gw.admin_port}"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{admin}/healthz") as r:
                assert r.status == 200
            in_flight = asyncio.ensure_future(s.get(f"http://127.0.0.1:{gw.port}/slow"))
            async with asyncio.timeout(30):
                await entered.wait()
            stopping = asyncio.ensure_future(gw.stop(60))
            end = time.monotonic() + 30
            while True:
                async with s.get(f"{admin}/healthz") as r:
                    if r.status == 503:
                        assert await r.json() == {"status": "draining"}
                        assert r.headers["X-App-Version"] == gw.version
                        break
                assert time.monotonic() < end, "admin /healthz never said draining"
                await asyncio.sleep(0.02)
            # the data listener's /healthz answers the same (new connections are refused)
            r2 = gw.handler.handle(RequestHead(b"GET", b"/healthz", [], "127.0.0.1"))
            assert isinstance(r2, Respond)
            assert (r2.status, r2.body) == (503, b'{"status":"draining"}')
            release.set()
            resp = await in_flight
            assert resp.status == 200  # the drain lets the in-flight request finish
            resp.release()
    finally:
        release.set()
        if stopping is None:
            await gw.stop(1)
        else:
            await stopping


@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
async def test_sigterm_turns_admin_healthz_to_draining(
    upstreams: UpstreamFactory, tmp_path: Path, workers: int
) -> None:
    """Issue 10, as an operator sees it: `gateway run`, SIGTERM, a request still in flight."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"release": "stable"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    up = await upstreams(app=app)
    doc = {
        "state": {"store": "memory"},
        "drain_timeout": "60s",
        "services": {"s": {"releases": {"stable": {"weight": 1, "upstreams": [up.url]}}}},
    }
    with run_gateway_process(tmp_path, doc, workers=workers) as gp:
        end = time.monotonic() + 60
        while gp.log.read_text(errors="replace").count("serving: engine") < workers:
            # every worker up: one still starting would die of the SIGTERM unhandled
            assert time.monotonic() < end, "workers never all served"
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as s:
            in_flight = asyncio.ensure_future(s.get(f"{gp.url}/slow"))
            try:
                async with asyncio.timeout(60):
                    await entered.wait()
                gp.proc.send_signal(signal.SIGTERM)
                body = await _poll_ready(s, f"{gp.admin}/healthz", 503, deadline_s=60)
                assert body == {"status": "draining"}
            finally:
                release.set()
            resp = await in_flight
            assert resp.status == 200  # the in-flight request still finished
            resp.release()
        assert await asyncio.to_thread(gp.proc.wait, 60) == 0
