"""Forwarding through the real gateway: headers, overrides, errors, fallback, WebSocket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import Gateway
from tests.conftest import Upstream, free_port, gateway_config, two_releases

GatewayFactory = Callable[..., Awaitable[Gateway]]
UpstreamFactory = Callable[..., Awaitable[Upstream]]


async def _pair(
    upstreams: UpstreamFactory, gateway: GatewayFactory, engine: str, **top: Any
) -> tuple[Gateway, Upstream, Upstream]:
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(gateway_config(two_releases(st.url, gr.url), engine=engine, **top))
    return gw, st, gr


async def test_headers_on_the_hop(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    gw, _, _ = await _pair(upstreams, gateway, engine)
    async with client.get(
        f"http://127.0.0.1:{gw.port}/p?q=1",
        headers={
            "X-User-ID": "alice",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "Proxy-Authorization": "Basic x",
            "X-Forwarded-For": "203.0.113.7",
            "X-Request-ID": "req-123",
            "baggage": "tenant=acme,bad member",
        },
    ) as r:
        assert r.status == 200
        seen = (await r.json())["headers"]
        assert r.headers["X-Release-Stage"] == seen["X-Release-Stage"]
        assert r.headers["X-Request-ID"] == "req-123"
    assert seen["X-Request-ID"] == "req-123"
    assert seen["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{gw.port}"
    assert seen["Via"] == "1.1 gray-gateway"
    assert "X-Drop-Me" not in seen and "Proxy-Authorization" not in seen
    assert seen["traceparent"].startswith("00-") and len(seen["traceparent"]) == 55
    assert seen["baggage"] == f"tenant=acme,release.stage={seen['X-Release-Stage']}"


async def test_request_id_generated_when_absent(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    gw, _, _ = await _pair(upstreams, gateway, engine)
    async with client.get(f"http://127.0.0.1:{gw.port}/") as r:
        seen = (await r.json())["headers"]
    assert len(seen["X-Request-ID"]) == 32 and r.headers["X-Request-ID"] == seen["X-Request-ID"]


@pytest.mark.parametrize(
    ("trust", "headers", "cookies", "want_forced"),
    [
        (True, {"X-Release-Stage": "gray"}, {}, True),
        (True, {}, {"release_stage": "gray"}, True),
        (False, {"X-Release-Stage": "gray"}, {}, False),
        (False, {}, {"release_stage": "gray"}, False),
        (["10.0.0.0/8"], {"X-Release-Stage": "gray"}, {}, False),
        (["127.0.0.0/8"], {"X-Release-Stage": "gray"}, {}, True),
        (["127.0.0.0/8"], {}, {"release_stage": "gray"}, True),
        (True, {"X-Release-Stage": "purple"}, {}, False),
    ],
    ids=[
        "header-trusted",
        "cookie-trusted",
        "header-untrusted",
        "cookie-untrusted",
        "outside-cidr",
        "inside-cidr",
        "cookie-inside-cidr",
        "unknown-value",
    ],
)
async def test_overrides(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    engine: str,
    trust: object,
    headers: dict[str, str],
    cookies: dict[str, str],
    want_forced: bool,
) -> None:
    # gray weight 0: only an honoured override can reach it.
    st, gr = await upstreams("stable"), await upstreams("gray")
    doc = gateway_config(
        two_releases(st.url, gr.url, stable=100, gray=0),
        engine=engine,
        routing={"trust_overrides": trust},
    )
    gw = await gateway(doc)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookies=cookies, cookie_jar=jar) as s:
        for i in range(20):
            async with s.get(
                f"http://127.0.0.1:{gw.port}/", headers={**headers, "X-User-ID": f"u{i}"}
            ) as r:
                assert r.status == 200
                body = await r.json()
                assert body["release"] == ("gray" if want_forced else "stable")
                assert r.headers["X-Release-Stage"] == body["release"]


async def test_sticky_cookie_for_anonymous_clients(
    upstreams: UpstreamFactory, gateway: GatewayFactory, engine: str
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(
        gateway_config(
            two_releases(st.url, gr.url, 50, 50), engine=engine, routing={"sticky_cookie": True}
        )
    )
    for _ in range(5):
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            async with s.get(f"http://127.0.0.1:{gw.port}/") as r:
                first = r.headers["X-Release-Stage"]
                assert "uid=" in r.headers["Set-Cookie"]
            for _ in range(5):
                async with s.get(f"http://127.0.0.1:{gw.port}/") as r:
                    assert r.headers["X-Release-Stage"] == first
                    assert "Set-Cookie" not in r.headers


async def test_no_service_matches_is_404_json(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    st = await upstreams("stable")
    gw = await gateway(
        gateway_config(
            {
                "svc": {
                    "match": {"hosts": ["only.example"]},
                    "releases": {"stable": {"weight": 1, "upstreams": [st.url]}},
                }
            },
            engine=engine,
        )
    )
    async with client.get(f"http://127.0.0.1:{gw.port}/") as r:
        assert r.status == 404
        assert "error" in await r.json()
    async with client.get(f"http://127.0.0.1:{gw.port}/", headers={"Host": "only.example"}) as r:
        assert r.status == 200


async def test_upstream_down_is_502_json(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await gateway(gateway_config(two_releases(dead, dead), engine=engine))
    async with client.get(f"http://127.0.0.1:{gw.port}/") as r:
        assert r.status == 502
        body = await r.json()
        assert body["service"] == "svc" and body["kind"] == "connect" and body["error"]


async def test_slow_upstream_is_504_json(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/", slow)
    up = await upstreams(app=app)
    svc = two_releases(up.url, up.url)
    svc["svc"]["timeouts"] = {"connect": "1s", "read": "300ms"}
    gw = await gateway(gateway_config(svc, engine=engine))
    try:
        async with client.get(f"http://127.0.0.1:{gw.port}/") as r:
            assert r.status == 504
            assert (await r.json())["kind"] == "timeout"
    finally:
        release.set()


async def test_empty_release_falls_back_to_baseline(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    st = await upstreams("stable")
    svc = {
        "svc": {
            "releases": {
                "stable": {"weight": 0, "upstreams": [st.url]},
                # Discovered from Consul, nothing registered: no healthy endpoint.
                "gray": {"weight": 100, "consul": {"service": "svc", "tags": ["gray"]}},
            }
        }
    }
    gw = await gateway(gateway_config(svc, engine=engine))
    async with client.get(f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": "u1"}) as r:
        assert r.status == 200
        assert (await r.json())["release"] == "stable"
        assert r.headers["X-Release-Fallback"] == "gray"
        assert r.headers["X-Release-Stage"] == "stable"


async def test_nothing_healthy_is_503_json(
    gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    svc = {
        "svc": {
            "releases": {
                "stable": {"weight": 1, "consul": {"service": "svc", "tags": ["stable"]}},
                "gray": {"weight": 1, "consul": {"service": "svc", "tags": ["gray"]}},
            }
        }
    }
    gw = await gateway(gateway_config(svc, engine=engine))
    async with client.get(f"http://127.0.0.1:{gw.port}/") as r:
        assert r.status == 503
        assert await r.json() == {"error": "no healthy endpoint in any release", "service": "svc"}
    async with client.get(f"http://127.0.0.1:{gw.port}/readyz") as r:
        assert r.status == 503


async def test_healthz_carries_version(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    gw, _, _ = await _pair(upstreams, gateway, engine)
    for port in (gw.port, gw.admin_port):
        async with client.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200 and r.headers["X-App-Version"] == gw.version
        async with client.get(f"http://127.0.0.1:{port}/readyz") as r:
            assert r.status == 200


async def test_websocket_echo_through_the_gateway(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    def ws_app(release: str) -> web.Application:
        async def ws(request: web.Request) -> web.WebSocketResponse:
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            async for msg in sock:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await sock.send_str(f"{release}:{msg.data}")
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await sock.send_bytes(msg.data[::-1])
            return sock

        app = web.Application()
        app.router.add_get("/ws", ws)
        return app

    st, gr = await upstreams(app=ws_app("stable")), await upstreams(app=ws_app("gray"))
    gw = await gateway(gateway_config(two_releases(st.url, gr.url), engine=engine))
    async with client.ws_connect(
        f"http://127.0.0.1:{gw.port}/ws", headers={"X-Release-Stage": "gray"}
    ) as ws:
        await ws.send_str("hello")
        assert await ws.receive_str() == "gray:hello"
        await ws.send_bytes(b"abc")
        assert await ws.receive_bytes() == b"cba"


async def test_post_body_and_status_pass_through(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        data = await request.read()
        return web.Response(status=201, body=data[::-1], headers={"X-Up": "1"})

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 1000)

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    app = web.Application()
    app.router.add_post("/echo", handler)
    app.router.add_get("/big", big)
    app.router.add_get("/status/{code}", status)
    up = await upstreams(app=app)
    gw = await gateway(gateway_config(two_releases(up.url, up.url), engine=engine))
    payload = json.dumps({"k": "v" * 5000}).encode()
    async with client.post(f"http://127.0.0.1:{gw.port}/echo", data=payload) as r:
        assert r.status == 201 and r.headers["X-Up"] == "1"
        assert await r.read() == payload[::-1]
    async with client.head(f"http://127.0.0.1:{gw.port}/big") as r:
        assert r.status == 200 and r.headers["Content-Length"] == "1000"
        assert await r.read() == b""
    for code in (204, 304, 404, 500):
        async with client.get(f"http://127.0.0.1:{gw.port}/status/{code}") as r:
            assert r.status == code
            await r.read()
    async with client.get(f"http://127.0.0.1:{gw.port}/big") as r:  # keep-alive still good
        assert await r.read() == b"x" * 1000


async def test_expect_100_continue(
    upstreams: UpstreamFactory, gateway: GatewayFactory, engine: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=(await request.read())[::-1])

    app = web.Application()
    app.router.add_post("/up", handler)
    up = await upstreams(app=app)
    gw = await gateway(gateway_config(two_releases(up.url, up.url), engine=engine))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"hello")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"X-Release-Stage" in head or b"x-release-stage" in head.lower()
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"olleh"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_dead_endpoint_is_ejected_and_a_dead_release_falls_back(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    st = await upstreams("stable")
    dead = f"http://127.0.0.1:{free_port()}"
    svc = {
        "svc": {
            "releases": {
                "stable": {"weight": 50, "upstreams": [st.url, dead]},
                "gray": {"weight": 50, "upstreams": [dead]},
            }
        }
    }
    gw = await gateway(gateway_config(svc, engine=engine))
    base = f"http://127.0.0.1:{gw.port}/"
    codes = []
    for i in range(40):
        async with client.get(
            base, headers={"X-Release-Stage": "stable", "X-User-ID": f"{i}"}
        ) as r:
            codes.append(r.status)
            await r.read()
    # A few 502s while the dead stable endpoint is found out, then only the live one.
    assert codes.count(502) <= 3 and codes[-20:] == [200] * 20
    for _ in range(3):  # gray's only endpoint fails three times in a row...
        async with client.get(base, headers={"X-Release-Stage": "gray"}) as r:
            assert r.status == 502
            await r.read()
    async with client.get(base, headers={"X-Release-Stage": "gray"}) as r:  # ...then sits out
        assert r.status == 200
        assert r.headers["X-Release-Fallback"] == "gray"
        assert (await r.json())["release"] == "stable"
    explain = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc/explain"
    async with client.get(explain, params={"header": "X-Release-Stage:gray"}) as r:
        got = await r.json()  # explain sees the ejection too
    assert (got["release"], got["reason"], got["chosen"]) == ("stable", "fallback", "gray")
