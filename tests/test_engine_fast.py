"""The fast engine on loopback: framing, smuggling defences, pooling, errors, shutdown."""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import json
import re
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import uvloop
from aiohttp import web

from gateway.engine.api import Forward, RequestHead, Respond
from gateway.engine.fast import FastEngine
from gateway.engine.fast_client import (
    C_CLOSED,
    C_LINGER,
    C_OPEN,
    C_SHUT,
    C_TUNNEL,
    CLIENT_STATES,
    ClientConn,
    ClientContext,
)
from gateway.engine.fast_pool import Pool
from gateway.engine.fast_upstream import (
    U_BUSY,
    U_CLOSED,
    U_CONNECTING,
    U_DONE,
    U_IDLE,
    U_TUNNEL,
    UPSTREAM_STATES,
)
from gateway.engine.fast_wire import (
    BODY_CHUNKED,
    BODY_CL,
    BODY_NONE,
    EXCHANGE_STATES,
    X_ANSWERED,
    X_FINISHED,
    X_HEAD_SENT,
    X_WAITING,
    Exchange,
    Reject,
    request_framing,
)
from tests.engine_helpers import MARK, Env, ProxyHandler, Script, idle_checked, read_request
from tests.polling import until

# A head llhttp reads (engine/fast_head.py leaves it: no SP after the colon), so the
# connection makes its llhttp parser.
LLHTTP_GET_A = b"GET /a HTTP/1.1\r\nHost:x\r\n\r\n"


def echo_app(seen: list[object] | None = None) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        if seen is not None:
            seen.append(request.transport)
        info = {
            "method": request.method,
            "path": request.path_qs,
            "len": len(body),
            "sha": hashlib.sha256(body).hexdigest(),
            "te": request.headers.get("Transfer-Encoding"),
            "cl": request.headers.get("Content-Length"),
            "host": request.headers.get("Host"),
        }
        return web.json_response(info)

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, headers={"ETag": '"x"'})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "0.3")))
        return web.Response(text="slow")

    app = web.Application()
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/slow", slow)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def proxied_echo(env: Env, **kw: float) -> tuple[ProxyHandler, int, list[object], FastEngine]:
    seen: list[object] = []
    up_port = await env.aiohttp_server(echo_app(seen))
    handler = ProxyHandler(up_port, read_timeout=kw.pop("read_timeout", 10.0))
    eng, port = await env.engine(handler, **kw)
    return handler, port, seen, eng


# -- normal flows -----------------------------------------------------------


async def test_keepalive_reuses_one_upstream_connection(env: Env) -> None:
    handler, port, seen, _ = await proxied_echo(env)
    async with aiohttp.ClientSession() as s:
        for i in range(10):
            async with s.get(f"http://127.0.0.1:{port}/k?i={i}") as r:
                assert r.status == 200
                assert r.headers["X-Engine-Test"] == "1"
                assert (await r.json())["path"] == f"/k?i={i}"
    assert len({id(t) for t in seen}) == 1
    assert await handler.wait_done(10) == [(200, None)] * 10


async def test_pipelined_requests_answered_in_order(env: Env) -> None:
    handler, port, _, eng = await proxied_echo(env)
    c = await env.connect(port)
    reqs = b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5))
    await c.send(reqs + b"POST /p5 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    for i in range(6):
        r = await c.response()
        assert r.status == 200
        assert json.loads(r.body)["path"] == f"/p{i}"
    assert json.loads(r.body)["len"] == 3
    await c.close()
    await handler.wait_done(6)


async def test_content_length_body_forwarded(env: Env) -> None:
    handler, port, _, eng = await proxied_echo(env)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/u", data=b"x" * 5000) as r:
            info = await r.json()
    assert (info["len"], info["cl"], info["te"]) == (5000, "5000", None)
    assert info["host"] == f"127.0.0.1:{port}"


async def test_chunked_request_reframed_chunked(env: Env) -> None:
    got: list[tuple[bytes, list[tuple[bytes, bytes]], bytes, bytes]] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        got.append(await read_request(r))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await r.read()

    _, _, c = await env.via(script)
    await c.send(
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    r = await c.response()
    assert (r.status, r.body) == (200, b"ok")
    await c.close()
    line, headers, body, raw = got[0]
    names = [n.lower() for n, _ in headers]
    assert body == b"hello world"
    assert b"transfer-encoding" in names and b"content-length" not in names
    assert b"x-trailer" not in raw.lower()
    assert raw.endswith(b"0\r\n\r\n")


REFRAME_CASES: list[tuple[bytes, bytes, bytes | None, bool]] = [
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;x=y\r\nabc\r\n4\r\ndefg\r\n0\r\nT: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"chunked",
        False,
    ),
    (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabcdefg",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"chunked",
        False,
    ),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nabcdefg\r\n0\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
        None,
        True,
    ),
]


@pytest.mark.parametrize(
    ("upstream", "request_line", "want_te", "want_close"),
    REFRAME_CASES,
    ids=["chunked-to-chunked", "close-delimited-to-chunked", "chunked-to-http10-close"],
)
async def test_response_body_reframed(
    env: Env, upstream: bytes, request_line: bytes, want_te: bytes | None, want_close: bool
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(r)
            w.write(upstream)
            await w.drain()
            if b"Connection: close" in upstream:
                return

    _, handler, c = await env.via(script)
    await c.send(request_line)
    if want_close:
        data = await c.read_until_eof()
        assert data.endswith(b"\r\n\r\nabcdefg")
        assert b"Connection: close" in data and b"Transfer-Encoding" not in data
    else:
        r = await c.response()
        assert r.body == b"abcdefg"
        assert r.get(b"transfer-encoding") == want_te
        assert r.get(b"content-length") is None
        assert r.get(b"t") is None
        assert r.get(b"connection") is None
        await c.send(request_line)  # the client connection stays usable
        r2 = await c.response()
        assert r2.body == b"abcdefg"
        assert r2.get(b"t") is None  # no trailer leaks into the next response
    await c.close()
    await handler.wait_done(1)
    assert handler.done[0] == (200, None)


async def test_response_hop_by_hop_removed(env: Env) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_request(r)
            w.write(
                b"HTTP/1.1 200 OK\r\nX-Hop: gone\r\nSet-Cookie: a=1\r\nKeep-Alive: timeout=5\r\n"
                b"Connection: X-Hop, keep-alive\r\nProxy-Authenticate: Basic\r\nTrailer: T\r\n"
                b"Upgrade: h2c\r\nProxy-Connection: keep-alive\r\nSet-Cookie: b=2\r\n"
                b"Content-Length: 2\r\n\r\nok"
            )
            await w.drain()

    up, _, c = await env.via(script)
    for _ in range(2):
        await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        r = await c.response()
        assert [n for n, _ in r.headers] == [
            b"Set-Cookie",
            b"Set-Cookie",
            b"Content-Length",
            MARK[0],
        ]
        assert r.all(b"set-cookie") == [b"a=1", b"b=2"]
        assert r.body == b"ok"
    assert up.connections == 1


async def test_head_with_content_length_keeps_both_connections(env: Env) -> None:
    handler, port, seen, _ = await proxied_echo(env)
    c = await env.connect(port)
    await c.send(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
    r = await c.response(no_body=True)
    assert r.status == 200 and r.get(b"content-length") is not None
    await c.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    r = await c.response()
    assert json.loads(r.body)["path"] == "/after"
    assert c.buf == b""
    await c.close()
    assert len({id(t) for t in seen}) == 1
    assert await handler.wait_done(2) == [(200, None), (200, None)]


@pytest.mark.parametrize("code", [204, 304], ids=["204", "304"])
async def test_no_body_statuses(env: Env, code: int) -> None:
    handler, port, _, eng = await proxied_echo(env)
    c = await env.connect(port)
    await c.send(b"GET /status/%d HTTP/1.1\r\nHost: x\r\n\r\n" % code)
    r = await c.response()
    assert r.status == code and r.body == b""
    assert r.get(b"transfer-encoding") is None
    await c.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    r = await c.response()
    assert json.loads(r.body)["path"] == "/next"
    await c.close()
    assert (await handler.wait_done(2))[0] == (code, None)


async def test_expect_100_continue_relayed(env: Env) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        assert b"expect: 100-continue" in head.lower()
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await w.drain()
        body = await r.readexactly(5)
        w.write(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\n" + body)
        await w.drain()
        await r.read()

    _, handler, c = await env.via(script)
    await c.send(b"PUT /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    interim = await c.response()
    assert interim.status == 100
    await c.send(b"hello")
    final = await c.response()
    assert (final.status, final.body, final.get(b"x-engine-test")) == (201, b"hello", b"1")
    await c.close()
    assert await handler.wait_done(1) == [(201, None)]


async def test_websocket_upgrade_and_echo(env: Env) -> None:
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    up_port = await env.aiohttp_server(app)
    handler = ProxyHandler(up_port)
    _, port = await env.engine(handler)
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
            assert ws._response.headers["X-Engine-Test"] == "1"
            for word in ("a", "bb", "x" * 100_000):
                await ws.send_str(word)
                msg = await ws.receive()
                assert msg.data == "echo:" + word
        # a normal request on the same gateway still works afterwards
        async with s.get(f"http://127.0.0.1:{port}/plain") as r:
            assert r.status == 426 or r.status < 500
    done = await handler.wait_done(2)
    assert (101, None) in done


async def test_upgrade_refused_is_a_normal_response(env: Env) -> None:
    handler, port, _, eng = await proxied_echo(env)
    c = await env.connect(port)
    await c.send(b"GET /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n")
    r = await c.response()
    assert r.status == 200 and r.get(b"connection") == b"close"
    assert await c.closed_by_peer()
    await c.close()
    assert await handler.wait_done(1) == [(200, None)]


async def test_local_respond_keeps_connection(env: Env) -> None:
    handler = ProxyHandler(1, local=[b"/healthz"])
    _, port = await env.engine(handler)
    c = await env.connect(port)
    for _ in range(3):
        await c.send(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
        r = await c.response()
        assert (r.status, r.body) == (200, b"local:/healthz")
    await c.send(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = await c.response()
    assert r.get(b"connection") == b"keep-alive"
    await c.close()
    assert handler.done == []


async def test_an_idle_connection_drops_its_parser_and_parses_on(env: Env) -> None:
    """Idle keep-alive connections hold no llhttp parser (issue 14: 1,000 connections).

    One that has the first bytes of its next request keeps its parser: those bytes count.
    """
    handler = ProxyHandler(1, local=[b"/a"])
    eng, port = await env.engine(handler, park_after=0)  # not parked: it drops the parser itself
    partial = await env.connect(port)
    await partial.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGE")  # then the next one's start
    assert (await partial.response()).status == 200
    clean = await env.connect(port)
    await clean.send(LLHTTP_GET_A)  # read by llhttp: the connection makes a parser
    assert (await clean.response()).status == 200
    conns = {c._begun: c for c in eng._clients}
    assert sorted(conns) == [False, True]
    loop = asyncio.get_running_loop()
    end = loop.time() + 30.0
    while not idle_checked(conns[False]):  # the parser dropped after PARSER_IDLE_SECONDS
        assert loop.time() < end, "an idle connection kept its parser"
        await asyncio.sleep(0.05)
    # The partial one armed no later than the clean one: its check has run too.
    assert conns[True].parser is not None
    # Nor a request queue: the idle one's is the shared empty list, not a list of its own.
    assert conns[False]._queue == [] and conns[False]._queue is not conns[True]._queue
    await partial.send(b"T /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await clean.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    for c in (partial, clean):
        r = await c.response()
        assert (r.status, r.body) == (200, b"local:/a")
        await c.close()


async def test_idle_connections_share_no_queue_across_pipelining(env: Env) -> None:
    """Idle connections share one empty request queue; pipelining on one never fills it."""
    handler = ProxyHandler(1, local=[b"/a", b"/b"])
    eng, port = await env.engine(handler, park_after=0)  # the idle ones stay ClientConns
    idle = [await env.connect(port) for _ in range(2)]
    for c in idle:
        await c.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await c.response()).status == 200
    await until(lambda: all(idle_checked(c) for c in eng._clients), 30.0)  # PARSER_IDLE_SECONDS
    a, b = eng._clients
    assert a._queue is b._queue and a._queue == []
    shared = a._queue
    # Pipelined (and a refusal queued behind them) on the first connection.
    await idle[0].send(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    )
    assert [(await idle[0].response()).status for _ in range(3)] == [200, 200, 400]
    assert shared == [] and b._queue is shared
    await idle[1].send(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    r = await idle[1].response()
    assert (r.status, r.body) == (200, b"local:/b")


async def test_a_closed_connection_is_freed_without_the_cycle_collector(env: Env) -> None:
    """A closed client connection leaves no reference cycle (its parser holds its methods).

    Why it matters: a connection that lived long reached the collector's oldest
    generation, and with 1,000 connections coming and going the full collections
    that freed them walked the whole heap several times a second.
    """
    handler = ProxyHandler(1, local=[b"/a"])
    eng, port = await env.engine(handler)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable stays in gc.garbage
    try:
        c = await env.connect(port)
        await c.send(LLHTTP_GET_A)
        assert (await c.response()).status == 200
        (conn,) = eng._clients
        assert conn.parser is not None  # the connection's parser is still there when it closes
        del conn
        await c.close()
        await until(lambda: not eng._clients, 30.0)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage]
        assert "ClientConn" not in left and "HttpRequestParser" not in left, left
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


# -- refusals ---------------------------------------------------------------

FRAMING = [
    (("1.1", b"GET", 1, None, None, None), (True, BODY_NONE, 0, None)),
    (("1.0", b"GET", 0, None, None, None), (False, BODY_NONE, 0, None)),
    (("1.1", b"POST", 1, b"12", None, None), (True, BODY_CL, 12, None)),
    (("1.1", b"POST", 1, None, b"chunked", None), (True, BODY_CHUNKED, 0, None)),
    (("1.1", b"POST", 1, None, b" Chunked ", None), (True, BODY_CHUNKED, 0, None)),
    (("1.1", b"GET", 1, b"0", None, b"websocket"), (True, BODY_NONE, 0, b"websocket")),
    (("1.1", b"GET", 0, None, None, None), 400),
    (("1.0", b"GET", 2, None, None, None), 400),
    (("1.1", b"POST", 1, b"3", b"chunked", None), 400),
    (("1.0", b"POST", 1, None, b"chunked", None), 400),
    (("1.1", b"POST", 1, None, b"chunked, gzip", None), 400),
    (("1.1", b"POST", 1, None, b"gzip, chunked", None), 501),
    (("1.1", b"POST", 1, b"1e3", None, None), 400),
    (("1.1", b"GET", 1, None, b"chunked", b"websocket"), 400),
    (("2.0", b"GET", 1, None, None, None), 505),
    (("1.1", b"CONNECT", 1, None, None, None), 501),
]
FRAMING_IDS = [
    "get", "http10-no-host", "cl", "chunked", "chunked-case-space", "upgrade-cl0", "no-host",
    "two-hosts", "cl-and-te", "te-http10", "chunked-not-final", "gzip-chunked", "cl-exponent",
    "upgrade-chunked", "http2", "connect",
]  # fmt: skip


@pytest.mark.parametrize(("args", "want"), FRAMING, ids=FRAMING_IDS)
def test_request_framing_table(
    args: tuple[str, bytes, int, bytes | None, bytes | None, bytes | None],
    want: tuple[bool, int, int, bytes | None] | int,
) -> None:
    if isinstance(want, int):
        with pytest.raises(Reject) as e:
            request_framing(*args)
        assert e.value.status == want
    else:
        assert request_framing(*args) == want


BAD_REQUESTS = [
    (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc", 400),
    (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
        400,
    ),
    (b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX-A: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: x\n\n", 400),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 501),
    (
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: ws\r\n"
        b"Content-Length: 2\r\n\r\nab",
        400,
    ),
]
BAD_IDS = [
    "cl-then-te", "te-then-cl", "dup-cl-same", "dup-cl-differ", "cl-list", "te-gzip",
    "te-chunked-not-final", "two-te", "te-http10", "bad-chunk-size", "negative-chunk",
    "chunk-overflow", "ctl-01", "ctl-7f", "ctl-00", "bare-cr", "obs-fold", "no-host",
    "two-hosts", "space-before-colon", "bare-lf", "http2", "connect", "upgrade-with-body",
]  # fmt: skip


@pytest.mark.parametrize(("raw", "status"), BAD_REQUESTS, ids=BAD_IDS)
async def test_refused_requests_never_reach_upstream(env: Env, raw: bytes, status: int) -> None:
    handler, port, seen, _ = await proxied_echo(env)
    c = await env.connect(port)
    await c.send(raw)
    r = await c.response()
    assert r.status == status
    assert r.get(b"connection") == b"close"
    assert r.get(b"content-type") == b"application/json"
    assert "error" in json.loads(r.body)
    assert await c.closed_by_peer()
    await c.close()
    assert seen == [] and handler.heads == [] and handler.done == []


async def test_pipelined_good_request_answered_before_refusal(env: Env) -> None:
    handler, port, seen, _ = await proxied_echo(env)
    c = await env.connect(port)
    await c.send(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET /bad HTTP/1.1\r\nX: \x01\r\n\r\n")
    assert (await c.response()).status == 200
    assert (await c.response()).status == 400
    assert await c.closed_by_peer()
    await c.close()
    assert len(seen) == 1


LIMIT_CASES = [
    (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 600 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 100 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"c" * 2000, 431),
]


@pytest.mark.parametrize(
    ("raw", "status"),
    LIMIT_CASES,
    ids=["long-target", "big-header", "many-headers", "unfinished-head"],
)
async def test_limits(env: Env, raw: bytes, status: int) -> None:
    handler, port, seen, _ = await proxied_echo(env, max_target_bytes=256, max_header_bytes=512)
    c = await env.connect(port)
    await c.send(raw)
    r = await c.response()
    assert r.status == status and r.get(b"connection") == b"close"
    assert await c.closed_by_peer()
    await c.close()
    assert seen == []


async def test_header_timeout_answers_408(env: Env) -> None:
    handler, port, _, eng = await proxied_echo(env, header_timeout=0.2)
    c = await env.connect(port)
    await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
    r = await c.response()
    assert r.status == 408
    assert await c.closed_by_peer()
    await c.close()


async def test_body_timeout_aborts_exchange(env: Env) -> None:
    handler, port, _, eng = await proxied_echo(env, body_timeout=0.2)
    c = await env.connect(port)
    await c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    r = await c.response()
    assert r.status == 408
    await c.close()
    assert await handler.wait_done(1) == [(408, "client_abort")]


async def test_idle_keepalive_connection_closed(env: Env) -> None:
    handler, port, _, eng = await proxied_echo(env, keepalive_timeout=0.2)
    c = await env.connect(port)
    await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await c.response()).status == 200
    assert await c.read_until_eof() == b""
    await c.close()


# -- upstream failures --------------------------------------------------------


async def test_upstream_down_is_502_from_error_body(env: Env) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    handler = ProxyHandler(dead)
    _, port = await env.engine(handler)
    async with aiohttp.ClientSession() as sess:
        async with sess.get(f"http://127.0.0.1:{port}/x") as r:
            assert r.status == 502
            assert await r.json() == {"error": "connect"}
        async with sess.post(f"http://127.0.0.1:{port}/x", data=b"abc" * 1000) as r:
            assert r.status == 502
    assert await handler.wait_done(2) == [(502, "connect"), (502, "connect")]


async def test_slow_upstream_is_504(env: Env) -> None:
    handler, port, _, eng = await proxied_echo(env, read_timeout=0.2)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/slow?s=5") as r:
            assert r.status == 504
            assert await r.json() == {"error": "timeout"}
        async with s.get(f"http://127.0.0.1:{port}/fine") as r:
            assert r.status == 200
    assert await handler.wait_done(2) == [(504, "timeout"), (200, None)]


async def test_connect_timeout_is_504(env: Env) -> None:
    # A listener whose backlog is full never completes new handshakes.
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    fillers = []
    try:
        for _ in range(8):
            f = socket.socket()
            f.setblocking(False)
            try:
                f.connect(lst.getsockname())
            except BlockingIOError:
                pass
            fillers.append(f)
        handler = ProxyHandler(lst.getsockname()[1], connect_timeout=0.2)
        _, port = await env.engine(handler)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/x") as r:
                assert r.status in (502, 504)
        ((status, kind),) = await handler.wait_done(1)
        assert (status, kind) in ((504, "timeout"), (502, "connect"))
    finally:
        for f in fillers:
            f.close()
        lst.close()


def _keepalive_once(close_how: str, closed: asyncio.Event | None = None) -> Script:
    """Upstream that answers one request per connection, then drops it as asked."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nconn%d" % (len(b"conn%d" % n), n))
        await w.drain()
        if closed is not None:
            w.close()  # FIN while the engine holds the connection idle in its pool
            await w.wait_closed()
            closed.set()
            return
        await read_request(r)  # a second request on the same connection: drop it unanswered
        w.transport.abort()

    return script


@pytest.mark.parametrize(
    "close_how", ["idle", "on-reuse"], ids=["eof-while-idle", "reset-on-reuse"]
)
async def test_stale_pooled_connection_retried(env: Env, close_how: str) -> None:
    closed = asyncio.Event() if close_how == "idle" else None
    up = await env.raw_upstream(_keepalive_once(close_how, closed))
    handler = ProxyHandler(up.port, local=[b"/local"])
    _, port = await env.engine(handler)
    c = await env.connect(port)
    bodies = []
    for i in range(3):
        # After an idle close even a POST (never retried) must find a fresh connection.
        method = b"POST" if closed is not None and i else b"GET"
        await c.send(method + b" / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        r = await c.response()
        assert r.status == 200
        bodies.append(r.body)
        if closed is not None:
            await closed.wait()
            closed.clear()
            # one round trip through the engine: by its end the FIN has been read
            await c.send(b"GET /local HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await c.response()).status == 200
    await c.close()
    assert bodies == [b"conn1", b"conn2", b"conn3"]
    assert await handler.wait_done(3) == [(200, None)] * 3


async def test_non_idempotent_request_not_retried(env: Env) -> None:
    up = await env.raw_upstream(_keepalive_once("on-reuse"))
    handler = ProxyHandler(up.port)
    _, port = await env.engine(handler)
    c = await env.connect(port)
    await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await c.response()).status == 200
    await c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz")
    r = await c.response()
    assert r.status == 502 and json.loads(r.body) == {"error": "reset"}
    await c.close()
    assert await handler.wait_done(2) == [(200, None), (502, "reset")]
    assert up.connections == 1


async def test_upstream_closing_mid_body_aborts_client(env: Env) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await w.drain()

    up, handler, c = await env.via(script)
    await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        data = await c.read_until_eof()
    except ConnectionError:
        data = b""
    assert len(data) < 1000
    await c.close()
    assert await handler.wait_done(1) == [(200, "reset")]
    assert up.connections == 1  # never retried once a response byte arrived


async def test_garbage_from_upstream_is_502_protocol(env: Env) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 abc nonsense\r\n\r\n")
        await w.drain()
        await r.read()

    up = await env.raw_upstream(script)
    handler = ProxyHandler(up.port)
    _, port = await env.engine(handler)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/") as r:
            assert r.status == 502
    assert await handler.wait_done(1) == [(502, "protocol")]


async def test_client_abort_reported(env: Env) -> None:
    handler, port, _, eng = await proxied_echo(env)
    c = await env.connect(port)
    await c.send(b"GET /slow?s=5 HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        await handler.got_head.wait()
    await c.close()
    assert await handler.wait_done(1) == [(0, "client_abort")]


class BrokenPolicy(ProxyHandler):
    """Raises for /raise and returns unusable header values for /str-headers."""

    def handle(self, head: RequestHead) -> Forward | Respond:
        if head.target == b"/raise":
            raise RuntimeError("policy bug")
        res = super().handle(head)
        if head.target == b"/str-headers" and isinstance(res, Forward):
            res.headers = [("Host", "x")]  # type: ignore[list-item]
        return res


async def test_policy_bugs_still_get_an_answer(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.read()

    up = await env.raw_upstream(script)
    handler = BrokenPolicy(up.port)
    _, port = await env.engine(handler)
    c = await env.connect(port)
    await c.send(b"GET /raise HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await c.response()).status == 500
    await c.send(b"GET /str-headers HTTP/1.1\r\nHost: x\r\n\r\n")
    r = await c.response()
    assert (r.status, json.loads(r.body)) == (502, {"error": "protocol"})
    assert await handler.wait_done(1) == [(502, "protocol")]
    assert "handler.handle failed" in caplog.text


async def test_early_upstream_response_closes_client(env: Env) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 4\r\n\r\nnope")
        await w.drain()
        await r.read()

    _, handler, c = await env.via(script)
    await c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 10)
    r = await c.response()
    assert (r.status, r.get(b"connection")) == (413, b"close")
    await c.close()
    assert await handler.wait_done(1) == [(413, None)]


# -- shutdown ---------------------------------------------------------------


async def test_shutdown_drains_in_flight_and_refuses_new(env: Env) -> None:
    handler, port, _, eng = await proxied_echo(env)
    idle = await env.connect(port)
    await idle.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await idle.response()).status == 200
    busy = await env.connect(port)
    handler.got_head.clear()
    await busy.send(b"GET /slow?s=0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        await handler.got_head.wait()
    assert eng.in_flight == 1
    stop = asyncio.create_task(eng.shutdown(5.0))
    assert await idle.read_until_eof() == b""  # idle keep-alive connection closed
    with pytest.raises(OSError):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
    r = await busy.response()
    assert (r.status, r.body, r.get(b"connection")) == (200, b"slow", b"close")
    await stop
    assert eng.in_flight == 0
    await idle.close()
    await busy.close()
    assert await handler.wait_done(2) == [(200, None), (200, None)]


async def test_shutdown_aborts_after_drain_timeout(env: Env) -> None:
    handler, port, _, eng = await proxied_echo(env)
    c = await env.connect(port)
    await c.send(b"GET /slow?s=10 HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        await handler.got_head.wait()
    assert eng.in_flight == 1
    await eng.shutdown(0.1)
    assert await c.closed_by_peer()
    await c.close()
    assert await handler.wait_done(1) == [(0, "client_abort")]


# -- big bodies -------------------------------------------------------------

BIG = 20 * 1024 * 1024


async def test_streaming_upload_and_download(env: Env) -> None:
    block = bytes(range(256)) * 256  # 64 KiB

    async def upload(request: web.Request) -> web.Response:
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"n": n, "sha": h.hexdigest()})

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if request.query.get("cl"):
            resp.content_length = BIG
        await resp.prepare(request)
        for _ in range(BIG // len(block)):
            await resp.write(block)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/up", upload)
    app.router.add_get("/down", download)
    up_port = await env.aiohttp_server(app)
    handler = ProxyHandler(up_port)
    _, port = await env.engine(handler)
    want = hashlib.sha256(block * (BIG // len(block))).hexdigest()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(BIG // len(block)):
            yield block

    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/up", data=gen()) as r:
            assert await r.json() == {"n": BIG, "sha": want}
        for q in ("", "?cl=1"):
            h = hashlib.sha256()
            async with s.get(f"http://127.0.0.1:{port}/down{q}") as r:
                assert r.status == 200
                async for chunk in r.content.iter_any():
                    h.update(chunk)
            assert h.hexdigest() == want
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grown_kib < 16 * 1024, "a whole body was buffered somewhere"
    assert await handler.wait_done(3) == [(200, None)] * 3


PRESSURE = 64 * 1024 * 1024  # more than every socket buffer on the path together


async def test_slow_client_pauses_upstream(env: Env) -> None:
    block = b"d" * 65536
    all_sent = asyncio.Event()

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % PRESSURE)
        for _ in range(PRESSURE // len(block)):
            w.write(block)
            await w.drain()
        all_sent.set()
        await r.read()

    _, handler, c = await env.via(script)
    await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    # The client reads nothing: the upstream must stall instead of the engine buffering.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await all_sent.wait()
    got = 0
    async with asyncio.timeout(60):
        while got < PRESSURE:
            got += len(await c.reader.read(1 << 20))
    assert got >= PRESSURE
    assert await handler.wait_done(1) == [(200, None)]


async def test_slow_upstream_pauses_client_upload(env: Env) -> None:
    may_read = asyncio.Event()

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        await may_read.wait()
        left = PRESSURE
        while left:
            left -= len(await r.read(min(left, 1 << 20)))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await r.read()

    _, handler, c = await env.via(script)
    c.writer.write(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % PRESSURE)

    async def upload() -> None:
        block = b"u" * 65536
        for _ in range(PRESSURE // len(block)):
            c.writer.write(block)
            await c.writer.drain()

    sender = asyncio.create_task(upload())
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await asyncio.shield(sender)  # must not finish while nobody reads upstream
    may_read.set()
    async with asyncio.timeout(60):
        await sender
        r = await c.response()
    assert (r.status, r.body) == (200, b"ok")
    assert await handler.wait_done(1) == [(200, None)]


async def test_client_connection_close_honoured(env: Env) -> None:
    handler, port, _, eng = await proxied_echo(env)
    c = await env.connect(port)
    await c.send(b"GET /bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    r = await c.response()
    assert (r.status, r.get(b"connection")) == (200, b"close")
    assert await c.read_until_eof() == b""
    c2 = await env.connect(port)
    for _ in range(2):
        await c2.send(b"GET /ka HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        r = await c2.response()
        assert (r.status, r.get(b"connection")) == (200, b"keep-alive")
    assert eng.in_flight == 0
    assert await handler.wait_done(3) == [(200, None)] * 3
    assert MARK in [(n, v) for n, v in r.headers]


async def test_a_burst_of_new_connections_is_accepted_in_a_few_loop_turns(env: Env) -> None:
    """libuv alone accepts one connection per loop turn: under load a burst waited seconds."""
    _, port, _, eng = await proxied_echo(env)
    # Connected while the loop is held: the kernel queues all of them for accept().
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    try:
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(eng._clients) == 100
        loop = asyncio.get_running_loop()
        for c in clients[::33]:
            c.setblocking(False)
            await loop.sock_sendall(c, b"GET /burst HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await loop.sock_recv(c, 65536)).startswith(b"HTTP/1.1 200 ")
    finally:
        for c in clients:
            c.close()


# -- the same scenarios on uvloop ---------------------------------------------

UVLOOP_SCENARIOS: list[Callable[[Env], Awaitable[None]]] = [
    test_keepalive_reuses_one_upstream_connection,
    test_pipelined_requests_answered_in_order,
    test_content_length_body_forwarded,
    test_chunked_request_reframed_chunked,
    test_head_with_content_length_keeps_both_connections,
    test_response_hop_by_hop_removed,
    test_expect_100_continue_relayed,
    test_websocket_upgrade_and_echo,
    test_upgrade_refused_is_a_normal_response,
    test_local_respond_keeps_connection,
    test_pipelined_good_request_answered_before_refusal,
    test_header_timeout_answers_408,
    test_body_timeout_aborts_exchange,
    test_idle_keepalive_connection_closed,
    test_upstream_down_is_502_from_error_body,
    test_slow_upstream_is_504,
    test_non_idempotent_request_not_retried,
    test_upstream_closing_mid_body_aborts_client,
    test_garbage_from_upstream_is_502_protocol,
    test_client_abort_reported,
    test_early_upstream_response_closes_client,
    test_shutdown_drains_in_flight_and_refuses_new,
    test_shutdown_aborts_after_drain_timeout,
    test_streaming_upload_and_download,
    test_slow_client_pauses_upstream,
    test_slow_upstream_pauses_client_upload,
    test_client_connection_close_honoured,
    test_a_burst_of_new_connections_is_accepted_in_a_few_loop_turns,
    functools.partial(test_stale_pooled_connection_retried, close_how="idle"),
    functools.partial(test_stale_pooled_connection_retried, close_how="on-reuse"),
    functools.partial(test_no_body_statuses, code=304),
    *[
        functools.partial(test_response_body_reframed, upstream=u, request_line=q, want_te=t,
                          want_close=c)
        for u, q, t, c in REFRAME_CASES
    ],
    *[functools.partial(test_limits, raw=raw, status=st) for raw, st in LIMIT_CASES],
]  # fmt: skip


async def _all_refusals(env: Env) -> None:
    for raw, status in BAD_REQUESTS:
        fresh = Env()  # each case needs an upstream nobody else talked to
        try:
            await test_refused_requests_never_reach_upstream(fresh, raw, status)
        finally:
            await fresh.aclose()


def _scenario_id(f: Callable[[Env], Awaitable[None]]) -> str:
    if isinstance(f, functools.partial):
        return (
            f.func.__name__.removeprefix("test_")
            + "-"
            + "-".join(str(v)[:12] for v in f.keywords.values() if not isinstance(v, bytes))
            + str(UVLOOP_SCENARIOS.index(f))
        )
    return f.__name__.removeprefix("test_")


@pytest.mark.parametrize(
    "scenario",
    [*UVLOOP_SCENARIOS, _all_refusals],
    ids=[*map(_scenario_id, UVLOOP_SCENARIOS), "refusals"],
)
def test_on_uvloop(scenario: Callable[[Env], Awaitable[None]]) -> None:
    """Every scenario above again on uvloop, the loop production runs on."""

    async def run() -> None:
        e = Env()
        try:
            await scenario(e)
        finally:
            await e.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


# -- connection state, as the objects print it ---------------------------------


async def _until(check: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not check():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_connections_and_exchanges_print_their_lifecycle_state(env: Env) -> None:
    """One state field per object, shown by its repr: open/busy/waiting, then idle, then closed."""
    _, port, _, eng = await proxied_echo(env)
    assert eng._pool is not None
    c = await env.connect(port)
    await c.send(b"GET /slow?s=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await _until(lambda: bool(eng._pool and eng._pool.conns), "an upstream connection")
    (conn,) = eng._clients
    (up,) = eng._pool.conns
    await _until(lambda: up.state == U_BUSY, "the request to be sent upstream")
    assert repr(conn).startswith("ClientConn(127.0.0.1, open, waiting for request, ")
    assert "Exchange(GET /slow?s=1, waiting, request read, 0)" in repr(conn)
    assert re.match(r"Upstream\(127\.0\.0\.1:\d+, busy, mode=0, exchange=Exchange\(", repr(up))
    assert (await c.response()).status == 200
    await _until(lambda: up.state == U_IDLE, "the upstream connection back in the pool")
    assert repr(up).endswith(", idle, mode=1, exchange=None)")
    assert "active=None, queued=0)" in repr(conn)
    await c.close()
    await _until(lambda: conn.state == C_CLOSED, "the client connection to close")
    assert repr(conn).startswith("ClientConn(127.0.0.1, closed, ")


@pytest.mark.parametrize(
    ("names", "values"),
    [
        (CLIENT_STATES, (C_OPEN, C_TUNNEL, C_LINGER, C_SHUT, C_CLOSED)),
        (UPSTREAM_STATES, (U_CONNECTING, U_IDLE, U_BUSY, U_DONE, U_TUNNEL, U_CLOSED)),
        (EXCHANGE_STATES, (X_WAITING, X_HEAD_SENT, X_ANSWERED, X_FINISHED)),
    ],
    ids=["client", "upstream", "exchange"],
)
def test_every_state_value_has_one_name_in_order(
    names: tuple[str, ...], values: tuple[int, ...]
) -> None:
    assert values == tuple(range(len(names)))  # ordered: `state >= X` reads as "at least X"
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    ("head", "state", "req_done", "want"),
    [
        (
            RequestHead(b"GET", b"/a?b=1", [], "10.0.0.1"),
            X_WAITING,
            False,
            "GET /a?b=1, waiting, request reading, 0",
        ),
        (
            RequestHead(b"POST", b"/u", [], "10.0.0.1"),
            X_HEAD_SENT,
            True,
            "POST /u, head_sent, request read, 0",
        ),
        (None, X_FINISHED, True, "local, finished, request read, 0"),
    ],
    ids=["waiting", "head-sent", "local-finished"],
)
async def test_an_exchange_prints_its_request_and_state(
    head: RequestHead | None, state: int, req_done: bool, want: str
) -> None:
    loop = asyncio.get_running_loop()
    pool = Pool(loop, 1, 1.0)
    ctx = ClientContext(
        loop,
        pool,
        ProxyHandler(1),
        scheme="http",
        max_header_bytes=1024,
        max_target_bytes=1024,
        keepalive_timeout=1.0,
        header_timeout=1.0,
        body_timeout=1.0,
        body_min_bytes=1.0,
    )
    ex = Exchange(ClientConn(ctx), head)
    ex.state = state
    ex.req_done = req_done
    assert repr(ex) == f"Exchange({want})"
