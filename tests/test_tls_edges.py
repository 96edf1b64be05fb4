"""The fast engine's hostile-input and smuggling cases replayed over the HTTPS listener.

Why a replay: TLS changes the transport under the parser (records, not segments),
so every refusal that holds over plain TCP must hold over TLS too (README "TLS").
"""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest

from gateway.tls import server_context
from tests.engine_helpers import Env, ProxyHandler, RawClient
from tests.test_engine_fast import BAD_IDS, BAD_REQUESTS, LIMIT_CASES, echo_app
from tests.tls_helpers import PKI


async def tls_echo(
    env: Env, pki: PKI, **kw: float
) -> tuple[ProxyHandler, int, list[object], ssl.SSLContext]:
    seen: list[object] = []
    up_port = await env.aiohttp_server(echo_app(seen))
    handler = ProxyHandler(up_port, read_timeout=10.0)
    ctx = server_context(str(pki.server.cert), str(pki.server.key), None)
    _, port = await env.engine(handler, tls=ctx, **kw)  # type: ignore[arg-type]
    return handler, port, seen, pki.client_ctx()


async def connect(env: Env, port: int, ctx: ssl.SSLContext) -> RawClient:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    c = RawClient(r, w)
    env.clients.append(c)
    return c


async def test_a_good_request_over_tls_is_forwarded_with_https_as_its_proto(
    env: Env, pki: PKI
) -> None:
    handler, port, seen, ctx = await tls_echo(env, pki)
    c = await connect(env, port, ctx)
    for i in range(3):  # keep-alive over one TLS connection
        await c.send(f"GET /k?i={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        r = await c.response()
        assert r.status == 200 and json.loads(r.body)["path"] == f"/k?i={i}"
    assert [h.scheme for h in handler.heads] == ["https"] * 3
    assert len(seen) == 3


@pytest.mark.parametrize(("raw", "status"), BAD_REQUESTS, ids=BAD_IDS)
async def test_refused_requests_over_tls_never_reach_upstream(
    env: Env, pki: PKI, raw: bytes, status: int
) -> None:
    handler, port, seen, ctx = await tls_echo(env, pki)
    c = await connect(env, port, ctx)
    await c.send(raw)
    r = await c.response()
    assert r.status == status
    assert r.get(b"connection") == b"close"
    assert "error" in json.loads(r.body)
    assert await c.closed_by_peer()
    assert seen == [] and handler.heads == [] and handler.done == []


@pytest.mark.parametrize(
    ("raw", "status"),
    LIMIT_CASES,
    ids=["long-target", "big-header", "many-headers", "unfinished-head"],
)
async def test_limits_over_tls(env: Env, pki: PKI, raw: bytes, status: int) -> None:
    _, port, seen, ctx = await tls_echo(env, pki, max_target_bytes=256, max_header_bytes=512)
    c = await connect(env, port, ctx)
    await c.send(raw)
    r = await c.response()
    assert r.status == status and r.get(b"connection") == b"close"
    assert await c.closed_by_peer()
    assert seen == []


async def test_pipelined_smuggling_over_tls_answers_the_good_one_then_refuses(
    env: Env, pki: PKI
) -> None:
    _, port, seen, ctx = await tls_echo(env, pki)
    c = await connect(env, port, ctx)
    await c.send(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET /bad HTTP/1.1\r\nX: \x01\r\n\r\n")
    assert (await c.response()).status == 200
    assert (await c.response()).status == 400
    assert await c.closed_by_peer()
    assert len(seen) == 1


async def test_header_timeout_over_tls_answers_408(env: Env, pki: PKI) -> None:
    _, port, _, ctx = await tls_echo(env, pki, header_timeout=0.3)
    c = await connect(env, port, ctx)
    await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert (await c.response()).status == 408
    assert await c.closed_by_peer()


async def test_a_silent_client_that_never_shakes_hands_is_dropped(env: Env, pki: PKI) -> None:
    """A TCP connection that never starts TLS ends after the handshake timeout (header_timeout)."""
    _, port, _, ctx = await tls_echo(env, pki, header_timeout=0.3)
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await asyncio.wait_for(r.read(), 30) == b""
    finally:
        w.close()
    c = await connect(env, port, ctx)  # and the engine still serves
    await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await c.response()).status == 200
