"""`timeouts:` — parsed, refused when not positive, and enforced by both engines."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from gateway import config as C
from gateway.app import Gateway
from gateway.errors import ConfigError
from tests.conftest import Upstream, gateway_config
from tests.engine_helpers import RawClient

GatewayFactory = Callable[..., Awaitable[Gateway]]
UpstreamFactory = Callable[..., Awaitable[Upstream]]


def _svc(**extra: Any) -> dict[str, Any]:
    return {
        "s": {"releases": {"stable": {"weight": 1, "upstreams": ["http://127.0.0.1:1"]}}, **extra}
    }


def test_defaults() -> None:
    t = C.build({"services": _svc()}, env={}).timeouts
    assert (t.connect, t.read, t.total) == (2.0, 30.0, None)
    assert (t.header, t.body, t.body_min_rate, t.idle, t.idle_park, t.upstream_idle) == (
        30.0,
        10.0,
        240.0,
        75.0,
        0.5,
        60.0,
    )


def test_top_level_and_per_service() -> None:
    cfg = C.build(
        {
            "services": _svc(timeouts={"read": "5s"}),
            "timeouts": {
                "connect": "1s",
                "header": "3s",
                "body": "2s",
                "idle": "4s",
                "idle_park": 0,
                "body_min_rate": 0,
                "upstream_idle": "9s",
                "total": "20s",
            },
        },
        env={},
    )
    t = cfg.timeouts
    assert (t.connect, t.header, t.body, t.idle, t.body_min_rate, t.upstream_idle, t.total) == (
        1.0,
        3.0,
        2.0,
        4.0,
        0.0,
        9.0,
        20.0,
    )
    assert t.idle_park == 0.0  # parking off
    st = cfg.services["s"].timeouts
    assert (st.connect, st.read, st.total) == (1.0, 5.0, 20.0)  # inherits, overrides read


BAD = [
    ({"timeouts": {"read": 0}}, "timeouts.read", "positive"),
    ({"timeouts": {"connect": "0s"}}, "timeouts.connect", "positive"),
    ({"timeouts": {"header": 0}}, "timeouts.header", "positive"),
    ({"timeouts": {"body": "0ms"}}, "timeouts.body", "positive"),
    ({"timeouts": {"idle": -1}}, "timeouts.idle", "duration"),
    ({"timeouts": {"upstream_idle": 0}}, "timeouts.upstream_idle", "positive"),
    ({"timeouts": {"idle_park": -1}}, "timeouts.idle_park", "duration"),
    ({"timeouts": {"idle_park": "soon"}}, "timeouts.idle_park", "duration"),
    ({"timeouts": {"total": 0}}, "timeouts.total", "positive"),
    ({"timeouts": {"body_min_rate": -1}}, "timeouts.body_min_rate", ">= 0"),
    ({"timeouts": {"bodyy": "1s"}}, "timeouts.bodyy", "unknown"),
    ({"services": _svc(timeouts={"read": 0})}, "services.s.timeouts.read", "positive"),
    ({"services": _svc(timeouts={"idle": "5s"})}, "services.s.timeouts.idle", "top-level"),
    ({"services": _svc(timeouts={"idle_park": 0})}, "services.s.timeouts.idle_park", "top-level"),
]


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    BAD,
    ids=[
        "read-0",
        "connect-0s",
        "header-0",
        "body-0ms",
        "idle-negative",
        "upstream-idle-0",
        "idle-park-negative",
        "idle-park-not-a-duration",
        "total-0",
        "rate-negative",
        "unknown-key",
        "service-read-0",
        "service-idle",
        "service-idle-park",
    ],
)
def test_bad_timeouts_refused_naming_the_field(doc: dict[str, Any], field: str, words: str) -> None:
    doc = {"services": _svc(), **doc}
    with pytest.raises(ConfigError) as e:
        C.build(doc, env={})
    msgs = dict(e.value.errors)
    assert field in msgs, msgs
    assert words in msgs[field]


# --------------------------------------------------------------------------- enforced


class SlowBodyUpstream:
    """An upstream that reads the whole request body and records whether it was cut."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.aborted = asyncio.Event()
        self.completed = 0

    def app(self) -> web.Application:
        async def read_all(request: web.Request) -> web.Response:
            self.started.set()
            ok = False
            try:
                body = await request.read()
                ok = True
            finally:
                if not ok:
                    self.aborted.set()
            self.completed += 1
            return web.json_response({"release": "stable", "body_bytes": len(body)})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", read_all)
        return app


async def _gateway_on(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    app: web.Application | None,
    engine: str,
    **timeouts: Any,
) -> Gateway:
    up = await upstreams(app=app) if app is not None else await upstreams()
    svc = {"s": {"releases": {"stable": {"weight": 1, "upstreams": [up.url]}}}}
    return await gateway(gateway_config(svc, engine=engine, timeouts=timeouts))


@pytest.mark.parametrize("every", [1.0, 0.25], ids=["byte-per-second", "byte-per-quarter"])
async def test_trickled_body_is_408_and_upstream_exchange_aborted(
    upstreams: UpstreamFactory, gateway: GatewayFactory, engine: str, every: float
) -> None:
    """Issue 10: a POST whose body arrives a byte at a time is timed out (408 JSON)."""
    up = SlowBodyUpstream()
    gw = await _gateway_on(upstreams, gateway, up.app(), engine, body="1s")
    assert gw.port is not None
    c = await RawClient.connect(gw.port)
    await c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    sent = 0
    r = None
    # One byte per `every` seconds; the 408 must come long before the body could end
    # (1,000 bytes): without a progress rule it never comes while bytes keep arriving.
    while r is None and sent < 60:
        try:
            await c.send(b"x")
            sent += 1
            r = await c.response(limit=every)
        except TimeoutError:
            continue
        except (ConnectionError, EOFError):
            break
    if r is None:
        r = await c.response(limit=10)
    assert r.status == 408
    assert (r.get(b"content-type") or b"").startswith(b"application/json")
    assert b"timeout" in r.body
    assert await c.closed_by_peer(limit=30)
    await c.close()
    async with asyncio.timeout(30):
        await up.aborted.wait()  # the upstream saw its exchange cut mid-body
    assert up.completed == 0


async def test_body_at_speed_passes(
    upstreams: UpstreamFactory, gateway: GatewayFactory, engine: str
) -> None:
    up = SlowBodyUpstream()
    gw = await _gateway_on(upstreams, gateway, up.app(), engine, body="1s")
    assert gw.port is not None
    c = await RawClient.connect(gw.port)
    body = b"y" * 200_000
    await c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
    await c.send(body)
    r = await c.response(limit=60)
    await c.close()
    assert r.status == 200
    assert b'"body_bytes": 200000' in r.body


@pytest.mark.parametrize(
    "partial",
    [b"GET / HTTP/1.1\r\nHost: x\r\n", b"GET /slow", b"GE"],
    ids=["half-header", "half-request-line", "two-bytes"],
)
async def test_half_a_header_is_closed_after_header_timeout(
    upstreams: UpstreamFactory, gateway: GatewayFactory, partial: bytes
) -> None:
    """Issue 10: a client that sends part of a head is closed after `timeouts.header`.

    The idle timeout is long, so only the header timeout can close it in time.
    The reference engine (aiohttp's server) has no request-head timeout.
    """
    gw = await _gateway_on(upstreams, gateway, None, "fast", header="1s", idle="300s")
    assert gw.port is not None
    c = await RawClient.connect(gw.port)
    await c.send(partial)
    data = await c.read_until_eof(limit=60)
    await c.close()
    if data:  # a 408 when the request line had started, else a plain close
        assert data.startswith(b"HTTP/1.1 408 "), data


async def test_idle_keepalive_connection_closed_after_idle_timeout(
    upstreams: UpstreamFactory, gateway: GatewayFactory, engine: str
) -> None:
    """Issue 10: `timeouts.idle` closes a keep-alive connection nobody uses."""
    gw = await _gateway_on(upstreams, gateway, None, engine, idle="1s")
    assert gw.port is not None
    c = await RawClient.connect(gw.port)
    await c.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    r = await c.response(limit=30)
    assert r.status == 200
    assert r.get(b"connection") != b"close"
    assert await c.read_until_eof(limit=60) == b""  # closed by the gateway, not by us
    await c.close()


async def test_top_level_read_timeout_applies_to_every_service(
    upstreams: UpstreamFactory, gateway: GatewayFactory, engine: str
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/", slow)
    gw = await _gateway_on(upstreams, gateway, app, engine, read="300ms")
    assert gw.port is not None
    try:
        c = await RawClient.connect(gw.port)
        await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        r = await c.response(limit=60)
        await c.close()
        assert r.status == 504
        assert b'"timeout"' in r.body
    finally:
        release.set()


async def test_idle_pooled_upstream_connection_closed_after_upstream_idle(
    gateway: GatewayFactory, engine: str
) -> None:
    """`timeouts.upstream_idle` closes a keep-alive upstream connection nobody reuses."""
    closed = asyncio.Event()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
        await writer.drain()
        if await reader.read() == b"":  # EOF: the gateway closed its pooled connection
            closed.set()
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        svc = {
            "s": {"releases": {"stable": {"weight": 1, "upstreams": [f"http://127.0.0.1:{port}"]}}}
        }
        # `read` longer than the wait below: the idle close must not wait for a read timer.
        timeouts = {"upstream_idle": "1s", "read": "100s"}
        gw = await gateway(gateway_config(svc, engine=engine, timeouts=timeouts))
        assert gw.port is not None
        c = await RawClient.connect(gw.port)
        await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await c.response(limit=30)).status == 200
        async with asyncio.timeout(60):
            await closed.wait()
        await c.close()
    finally:
        server.close()
        await server.wait_closed()


def test_gateway_check_refuses_read_0_naming_the_field(tmp_path: Path) -> None:
    """Issue 10: `timeouts.read: 0` passed `gateway check`; now exit 2 naming the field."""
    doc = {"timeouts": {"read": 0}, "services": _svc()}
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump(doc))
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "timeouts.read: must be a positive duration" in r.stdout + r.stderr
