"""The request head read without llhttp (gateway/engine/fast_head.py): never another reading.

Why differential: the fast path is the front door that request smuggling
knocks on. It may only ever decline; whenever it accepts some bytes, llhttp
(httptools, the engine's parser for everything else) must read the same bytes
as exactly one whole request with the same method, target, version, fields
and keep-alive, and no body; and it must decline every head llhttp refuses.
A table pins the cases named in RFC 9112 §3 and §5 and the smuggling suites;
hypothesis mutates heads around them. Then, through the engine and the
gateway, the same head read either way gives the same `RequestHead` and the
upstream sees exactly the requests sent, fast path and llhttp mixed on one
connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httptools
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import Gateway
from gateway.engine.api import RequestHead
from gateway.engine.fast import FastEngine
from gateway.engine.fast_client import S_HEAD, ClientConn
from gateway.engine.fast_head import read_head
from gateway.engine.fast_wire import BODY_NONE, P_DEAD, head_at_start, request_framing
from gateway.headers import parse_field_lines
from tests.conftest import gateway_config
from tests.engine_helpers import Env, ProxyHandler, RawClient, read_request
from tests.polling import until

GatewayFactory = Callable[..., Awaitable[Gateway]]

MAX_TARGET = 256
CLIENT_IP = "203.0.113.9"


class Message:
    """One request as llhttp reported it."""

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = ""
        self.keep = False
        self.body = b""
        self.complete = False


class Llhttp:
    """Everything llhttp reports for some bytes fed in one call, as the engine's parser sees it."""

    def __init__(self, data: bytes) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.messages: list[Message] = []
        self.error: str | None = None
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self.error = f"{type(e).__name__}: {e}"  # (an upgrade: not one plain request either)

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_url(self, url: bytes) -> None:
        self.messages[-1].url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].fields.append((name, value))

    def on_headers_complete(self) -> None:
        m = self.messages[-1]
        m.method = self.parser.get_method()
        m.version = self.parser.get_http_version()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        m = self.messages[-1]
        m.keep = self.parser.should_keep_alive()  # (read here: llhttp resets it after the feed)
        m.complete = True


def fast(data: bytes) -> RequestHead | None:
    return read_head(data, MAX_TARGET, CLIENT_IP, "http")


def agrees_with_llhttp(data: bytes) -> bool:
    """Whether the fast path accepts `data`; when it does, that llhttp reads it the same.

    The same, field by field, as the engine's llhttp path would build the head
    (fast_client.ClientConn.on_headers_complete: `head_at_start` for the version
    and the field block), and the same framing verdict.
    """
    head = fast(data)
    if head is None:
        return False  # declining is always allowed: llhttp then reads the bytes
    ll = Llhttp(data)
    assert ll.error is None, f"accepted what llhttp refuses ({ll.error}): {data!r}"
    assert len(ll.messages) == 1, f"llhttp read {len(ll.messages)} messages: {data!r}"
    m = ll.messages[0]
    assert m.complete and m.body == b"" and m.keep, data
    assert (head.method, head.target, head.headers, head.http_version) == (
        m.method,
        m.url,
        m.fields,
        m.version,
    ), data
    assert head_at_start(data, m.method, m.url, m.fields) == (head.http_version, head.fields)
    assert head.fields is not None and parse_field_lines(head.fields) == head.headers
    assert (head.client_ip, head.scheme) == (CLIENT_IP, "http")
    hosts = sum(n.lower() == b"host" for n, _ in m.fields)
    framing = request_framing(m.version, m.method, hosts, None, None, None)
    assert framing == (m.version == "1.1", BODY_NONE, 0, None)
    return True


BENCH = b"GET /1k HTTP/1.1\r\nHost: bench\r\nX-User-ID: u123\r\n\r\n"
BROWSER = (
    b"GET /app/dashboard?tab=overview&range=7d HTTP/1.1\r\nHost: shop.example.com\r\n"
    b"Connection: keep-alive\r\n"
    b'sec-ch-ua: "Chromium";v="124", "Not-A.Brand";v="99"\r\nsec-ch-ua-mobile: ?0\r\n'
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Sec-Fetch-Mode: navigate\r\nReferer: https://shop.example.com/app/\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
    b"Cookie: uid=u-8f3a2c; release_stage=gray\r\n\r\n"
)


def _get(fields: bytes, line: bytes = b"GET /p HTTP/1.1") -> bytes:
    return line + b"\r\n" + fields + b"\r\n"


# (bytes of one read, read by the fast path?)
HEADS: list[tuple[bytes, bool]] = [
    (BENCH, True),
    (BROWSER, True),
    (_get(b"host: x\r\n"), True),
    (_get(b"Host: x\r\nConnection: keep-alive\r\n", b"GET / HTTP/1.0"), True),
    (_get(b"Host: x\r\nCONNECTION: Keep-Alive\r\n", b"GET / HTTP/1.0"), True),
    (_get(b"Host: x\r\nConnection: keep-alive\r\n"), True),
    (_get(b"Host: x\r\nX-A: a\tb  c\r\n"), True),
    (_get(b"Host: x\r\nX-!#$%&'*+.^_`|~09az: 1\r\n"), True),
    (_get(b"Host: x\r\n", b"GET /a/b;c=d?e=f&g=%41:@!$'()*+,~._-/? HTTP/1.1"), True),
    (_get(b"Host: x\r\n", b"GET /" + b"a" * (MAX_TARGET - 1) + b" HTTP/1.1"), True),
    (_get(b"Host: x\r\nX-Name-Host: y\r\nX-Content-Length: 1\r\n"), True),
    *((_get(b"Host: x\r\n", m + b" /m HTTP/1.1"), True) for m in (b"HEAD", b"POST", b"PUT")),
    *((_get(b"Host: x\r\n", m + b" /m HTTP/1.1"), True) for m in (b"DELETE", b"OPTIONS", b"PATCH")),
    # Keep-alive as llhttp decides it: an HTTP/1.0 request without it, or a close, is left.
    (_get(b"Host: x\r\n", b"GET / HTTP/1.0"), False),
    (_get(b"Host: x\r\nConnection: close\r\n"), False),
    (_get(b"Host: x\r\nConnection: keep-alive\r\nConnection: keep-alive\r\n"), False),
    (_get(b"Host: x\r\nConnection: keep-alive, X-Hop\r\n"), False),
    (_get(b"Host: x\r\nConnection: keep-alive \r\n"), False),
    (_get(b"Host: x\r\nProxy-Connection: keep-alive\r\n"), False),
    (_get(b"Host: x\r\nProxy-Connection: close\r\n"), False),
    # Framing fields: llhttp's path and request_framing keep every rule.
    (_get(b"Host: x\r\nContent-Length: 0\r\n"), False),
    (_get(b"Host: x\r\nContent-Length: 3\r\n") + b"abc", False),
    (_get(b"Host: x\r\nTransfer-Encoding: chunked\r\n") + b"0\r\n\r\n", False),
    (_get(b"Host: x\r\nTransfer-Encoding: chunked\r\n"), False),
    (_get(b"Host: x\r\nContent-Length: 5\r\n"), False),
    (_get(b"Host: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n"), False),
    (_get(b"Host: x\r\nExpect: 100-continue\r\n"), False),
    (_get(b""), False),
    (_get(b"Connection: keep-alive\r\n", b"GET / HTTP/1.0"), False),
    (_get(b"Host: x\r\nHost: y\r\n"), False),
    (_get(b"Host: x\r\nhost: x\r\n"), False),
    # Field lines other than `name ": " value CRLF`.
    (_get(b"Host:x\r\n"), False),
    (_get(b"Host:  x\r\n"), False),
    (_get(b"Host:\tx\r\n"), False),
    (_get(b"Host : x\r\n"), False),
    (_get(b"Host: x\r\nX-A: v \r\n"), False),
    (_get(b"Host: x\r\nX-A: v\t\r\n"), False),
    (_get(b"Host: x\r\nX-A:\r\n"), False),
    (_get(b"Host: x\r\nX-A: \r\n"), False),
    (_get(b"Host: x\r\nX-A: a\r\n b\r\n"), False),
    (_get(b"Host: x\r\n\tX-A: b\r\n"), False),
    (_get(b"Host: x\nX-A: b\r\n"), False),
    (b"GET /p HTTP/1.1\r\nHost: x\r\n\n", False),
    (b"GET /p HTTP/1.1\nHost: x\r\n\r\n", False),
    (_get(b"Host: x\r\nX-A: a\rb\r\n"), False),
    (_get(b"Host: x\r\nX-A: a\nb\r\n"), False),
    (_get(b"Host: x\r\nX-A: a\x00b\r\n"), False),
    (_get(b"Host: x\r\nX-A: a\x01b\r\n"), False),
    (_get(b"Host: x\r\nX-A: a\x7fb\r\n"), False),
    (_get(b"Host: x\r\nX-A: a\x80b\r\n"), False),
    (_get(b"Host: x\r\nX-\x01: b\r\n"), False),
    (_get(b"Host: x\r\nX[A]: b\r\n"), False),
    (_get(b"Host: x\r\n: b\r\n"), False),
    # Request lines other than `method SP origin-form SP HTTP/1.x CRLF`.
    (b"\r\n" + BENCH, False),
    (_get(b"Host: x\r\n", b"GET  /p HTTP/1.1"), False),
    (_get(b"Host: x\r\n", b"GET /p  HTTP/1.1"), False),
    (_get(b"Host: x\r\n", b"GET /p HTTP/1.1 "), False),
    (_get(b"Host: x\r\n", b"GET /p HTTP/2.0"), False),
    (_get(b"Host: x\r\n", b"GET /p HTTP/1.2"), False),
    (_get(b"Host: x\r\n", b"GET /p http/1.1"), False),
    (_get(b"Host: x\r\n", b"GET /p"), False),
    (_get(b"Host: x\r\n", b"GET http://x/p HTTP/1.1"), False),
    (_get(b"Host: x\r\n", b"OPTIONS * HTTP/1.1"), False),
    (_get(b"Host: x:443\r\n", b"CONNECT x:443 HTTP/1.1"), False),
    (_get(b"Host: x\r\n", b"PROPFIND /p HTTP/1.1"), False),
    (_get(b"Host: x\r\n", b"get /p HTTP/1.1"), False),
    (_get(b"Host: x\r\n", b"GET /p#f HTTP/1.1"), False),
    (_get(b"Host: x\r\n", b'GET /p"<> HTTP/1.1'), False),
    (_get(b"Host: x\r\n", b"GET /p\tq HTTP/1.1"), False),
    (_get(b"Host: x\r\n", b"GET /p\x80 HTTP/1.1"), False),
    (_get(b"Host: x\r\n", b"GET /" + b"a" * MAX_TARGET + b" HTTP/1.1"), False),
    # Not exactly one whole head in the read.
    (BENCH + BENCH, False),
    (BENCH + b"GE", False),
    (BENCH[:-2], False),
    (BENCH[:20], False),
    (BENCH + b"\r\n", False),
]
HEAD_IDS = [
    "bench", "browser", "host-lower-case", "http10-keep-alive", "http10-keep-alive-odd-case",
    "http11-keep-alive", "value-inner-tab-and-spaces", "every-tchar", "every-target-char",
    "longest-target", "special-names-inside-others", "head", "post-no-body", "put-no-body",
    "delete", "options", "patch",
    "http10-no-keep-alive", "close", "keep-alive-twice", "connection-list",
    "keep-alive-trailing-space", "proxy-connection-keep-alive", "proxy-connection-close",
    "content-length-0", "content-length-body", "chunked", "chunked-body-in-next-read",
    "content-length-body-in-next-read", "upgrade", "expect", "no-host",
    "http10-no-host", "two-hosts", "two-hosts-odd-case",
    "no-space-after-colon", "two-spaces-after-colon", "tab-after-colon", "space-before-colon",
    "trailing-space", "trailing-tab", "empty-value", "only-space-value", "obs-fold",
    "line-starts-with-tab", "bare-lf-line-end", "bare-lf-empty-line", "bare-lf-request-line",
    "bare-cr-in-value", "bare-lf-in-value", "nul-in-value", "ctl-in-value", "del-in-value",
    "obs-text-in-value", "ctl-in-name", "brackets-in-name", "empty-name",
    "leading-crlf", "two-spaces-after-method", "two-spaces-after-target", "space-after-version",
    "http-2.0", "http-1.2", "lower-case-version", "http-0.9", "absolute-form",
    "asterisk-form", "connect", "other-method", "lower-case-method", "fragment",
    "quote-and-angles-in-target", "tab-in-target", "obs-text-in-target", "target-too-long",
    "pipelined-pair", "pipelined-begun", "no-empty-line", "request-line-only",
    "empty-line-after",
]  # fmt: skip


@pytest.mark.parametrize(("data", "accepted"), HEADS, ids=HEAD_IDS)
def test_the_fast_path_reads_only_what_llhttp_reads_the_same(data: bytes, accepted: bool) -> None:
    assert agrees_with_llhttp(data) == accepted


def test_every_head_llhttp_refuses_in_the_table_is_declined() -> None:
    refused = [data for data, _ in HEADS if Llhttp(data).error is not None]
    assert len(refused) >= 15  # the table does reach llhttp's refusals
    assert [data for data in refused if fast(data) is not None] == []


# -- hypothesis: heads mutated around the table's -----------------------------------------

SEEDS = [data for data, accepted in HEADS if accepted]
# Bytes that change how a head is read: OWS, line ends, CTLs, separators, obs-text, case.
PIECES = [
    b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ", b"\r\n\t", b"\x00", b"\x01", b"\x0b",
    b"\x7f", b"\x80", b"\xff", b":", b": ", b" :", b"/", b"?", b"#", b"%", b"@", b"*", b",",
    b";", b"=", b'"', b"a", b"A", b"0", b"-", b"\r\n\r\n",
]  # fmt: skip
FIELDS = [
    b"Host: other", b"host: x", b"HOST:x", b"Content-Length: 0", b"Content-Length: 3",
    b"content-length: 00", b"Content-Length: 1, 1", b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked", b"transfer-encoding:chunked", b"Connection: close",
    b"Connection: keep-alive", b"connection: Keep-Alive", b"Connection: Upgrade",
    b"Connection: keep-alive, close", b"Proxy-Connection: keep-alive",
    b"Proxy-Connection: close", b"Upgrade: h2c", b"Expect: 100-continue", b"Keep-Alive: 5",
    b"X-A: b", b"X-A:  b", b"X-A: b ", b"X-A:", b" X-A: b", b"X-A : b", b"\tfolded",
    b"Transfer-Encoding : chunked", b"Content-Length : 3", b"Host: a\x00b",
]  # fmt: skip
REQUEST_LINES = [
    b"GET / HTTP/1.1", b"GET / HTTP/1.0", b"GET / HTTP/2.0", b"GET / HTTP/0.9", b"GET /",
    b"GET http://x/ HTTP/1.1", b"OPTIONS * HTTP/1.1", b"CONNECT x:1 HTTP/1.1",
    b"POST /u HTTP/1.1", b"HEAD / HTTP/1.0", b"DELETE /d?x HTTP/1.1", b"GET /%zz HTTP/1.1",
    b"GET /" + b"t" * MAX_TARGET + b" HTTP/1.1", b"GET //x//y HTTP/1.1", b"PATCH /p HTTP/1.1",
]  # fmt: skip


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


def _insert(data: bytes, at: int, piece: bytes) -> bytes:
    at %= len(data) + 1
    return data[:at] + piece + data[at:]


def _with_field(data: bytes, at: int, field: bytes) -> bytes:
    lines = _lines(data)
    at = 1 + at % max(1, len(lines) - 2)  # after the request line, before the empty line
    return b"\r\n".join([*lines[:at], field, *lines[at:]])


def _with_request_line(data: bytes, line: bytes) -> bytes:
    return b"\r\n".join([line, *_lines(data)[1:]])


def _recase(data: bytes, at: int, size: int, upper: bool) -> bytes:
    at %= len(data) + 1
    part = data[at : at + size]
    return data[:at] + (part.upper() if upper else part.lower()) + data[at + size :]


_seed = st.sampled_from(SEEDS)
_at = st.integers(0, 2000)
_mutation = st.one_of(
    st.builds(_insert, _seed, _at, st.sampled_from(PIECES)),
    st.builds(lambda d, i, k: d[: i % len(d)] + d[i % len(d) + k :], _seed, _at, st.integers(1, 4)),
    st.builds(lambda d, i, b: d[: i % len(d)] + bytes([b]) + d[i % len(d) + 1 :], _seed, _at,
              st.integers(0, 255)),
    st.builds(_with_field, _seed, _at, st.sampled_from(FIELDS)),
    st.builds(_with_request_line, _seed, st.sampled_from(REQUEST_LINES)),
    st.builds(_recase, _seed, _at, st.integers(1, 20), st.booleans()),
    st.builds(lambda a, b: a + b, _seed, _seed),  # pipelined
    st.builds(lambda d, i: d[: i % len(d)], _seed, _at),  # a head split over reads
    st.builds(lambda d, body: d + body, _seed, st.binary(min_size=1, max_size=8)),
)  # fmt: skip


@st.composite
def _mutated_twice(draw: st.DrawFn) -> bytes:
    """A mutation and a field on top: mixes one mutation does not reach (CL and TE, ...)."""
    data = draw(_mutation)
    field = draw(st.sampled_from(FIELDS))
    return _with_field(data, draw(_at), field) if b"\r\n" in data else data


def test_mutated_heads_are_read_as_llhttp_reads_them_or_declined() -> None:
    outcomes: list[bool] = []

    @settings(
        max_examples=3000,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(data=st.one_of(_mutation, _mutated_twice()))
    def check(data: bytes) -> None:
        outcomes.append(agrees_with_llhttp(data))

    check()
    # Both ways were reached: the strategy is not all refusals (nor all plain heads).
    assert outcomes.count(True) >= 100 and outcomes.count(False) >= 100


# -- through the engine: the same RequestHead whichever way it was read -----------------------

SAME = [(data, i) for (data, accepted), i in zip(HEADS, HEAD_IDS, strict=True) if accepted]


def _conn(eng: FastEngine) -> ClientConn:
    (conn,) = eng._clients
    return conn


def _reading_a_head(eng: FastEngine) -> bool:
    """The engine's one connection is inside a head (llhttp holds its first bytes)."""
    return len(eng._clients) == 1 and _conn(eng).waiting_for == S_HEAD


@pytest.mark.parametrize("data", [d for d, _ in SAME], ids=[i for _, i in SAME])
async def test_the_engine_builds_the_same_head_from_one_read_or_two(env: Env, data: bytes) -> None:
    """One read: the fast path (no llhttp parser is even made); two reads: llhttp's callbacks."""
    target = data.split(b" ")[1]
    handler = ProxyHandler(1, local=[target])  # answered locally: no upstream
    eng, port = await env.engine(handler, max_target_bytes=MAX_TARGET)
    one = await env.connect(port)
    await one.send(data)
    first = await one.response(no_body=data.startswith(b"HEAD "))
    assert _conn(eng).parser is None  # read without llhttp
    await one.close()
    await until(lambda: not eng._clients, 30)
    two = await env.connect(port)
    await two.send(data[:9])
    await until(lambda: _reading_a_head(eng), 30)
    await two.send(data[9:])
    second = await two.response(no_body=data.startswith(b"HEAD "))
    assert _conn(eng).parser is not None  # read by llhttp
    assert (first.status, first.headers, first.body) == (second.status, second.headers, second.body)
    assert first.status == 200 and first.get(b"connection") != b"close"
    a, b = handler.heads
    assert a is not b
    assert [a.method, a.target, a.headers, a.client_ip, a.http_version, a.scheme] == [
        b.method, b.target, b.headers, b.client_ip, b.http_version, b.scheme,
    ]  # fmt: skip
    # The field block as received: the llhttp path has it only for a head that began and
    # ended in one read (fast_wire.head_at_start; agrees_with_llhttp checks it is this one).
    assert a.fields is not None and parse_field_lines(a.fields) == a.headers and b.fields is None


async def test_after_a_close_llhttp_refuses_the_next_head_as_before(env: Env) -> None:
    """A head after `Connection: close` is llhttp's to refuse, even one the fast path reads.

    llhttp refuses any byte after a message it closes after; the fast path
    leaves such bytes to it, so the connection ends the same way either way.
    """
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow")

    app = web.Application()
    app.router.add_get("/slow", slow)
    handler = ProxyHandler(await env.aiohttp_server(app))
    eng, port = await env.engine(handler)
    c = await env.connect(port)
    await c.send(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await asyncio.wait_for(handler.got_head.wait(), 30)
    conn = _conn(eng)
    nxt = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
    assert fast(nxt) is not None  # a head the fast path reads between other requests
    await c.send(nxt)
    await until(lambda: bool(conn.pause & P_DEAD), 30)  # refused by llhttp
    release.set()
    r = await c.response(limit=30)
    assert (r.status, r.body, r.get(b"connection")) == (200, b"slow", b"close")
    assert await c.closed_by_peer(30)
    assert [h.target for h in handler.heads] == [b"/slow"]


# -- through the gateway: fast path and llhttp mixed on one connection ------------------------


async def _recording_upstream() -> tuple[
    asyncio.Server, list[tuple[bytes, dict[bytes, bytes], bytes]]
]:
    """An upstream that records (request line, lower-cased fields, body) of every request."""
    seen: list[tuple[bytes, dict[bytes, bytes], bytes]] = []

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                line, fields, body, _ = await read_request(r)
                seen.append((line, {n.lower(): v for n, v in fields}, body))
                head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(line)
                w.write(head if line.startswith(b"HEAD ") else head + line)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    return await asyncio.start_server(on_conn, "127.0.0.1", 0), seen


async def test_one_connection_mixes_the_fast_path_and_llhttp(gateway: GatewayFactory) -> None:
    srv, seen = await _recording_upstream()
    try:
        port = srv.sockets[0].getsockname()[1]
        services = {
            "svc": {
                "releases": {"stable": {"weight": 1, "upstreams": [f"http://127.0.0.1:{port}"]}}
            }
        }
        gw = await gateway(gateway_config(services, engine="fast"))
        assert gw.port is not None and isinstance(gw.engine, FastEngine)
        fast_1 = b"GET /one HTTP/1.1\r\nHost: svc\r\nX-User-ID: u1\r\n\r\n"
        post = b"POST /two HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello"
        fast_3 = b"GET /three?x=1 HTTP/1.1\r\nHost: svc\r\nX-User-ID: u3\r\n\r\n"
        split = b"GET /four HTTP/1.1\r\nHost: svc\r\nX-User-ID: u4\r\n\r\n"
        pipelined = (
            b"GET /five HTTP/1.1\r\nHost: svc\r\n\r\n"
            b"DELETE /six HTTP/1.1\r\nHost: svc\r\nX-User-ID: u6\r\n\r\n"
        )
        fast_7 = b"HEAD /seven HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n"
        # Which reads the fast path takes (between messages, one whole plain head) and which
        # it leaves to llhttp.
        assert [fast(d) is not None for d in (fast_1, post, fast_3, split, pipelined, fast_7)] == [
            True, False, True, True, False, True,
        ]  # fmt: skip
        c = await RawClient.connect(gw.port)
        try:
            await until(lambda: len(gw.engine._clients) == 1, 30)
            conn = _conn(gw.engine)
            await c.send(fast_1)
            assert (await c.response(limit=30)).body == b"GET /one HTTP/1.1"
            assert conn.parser is None  # no llhttp parser yet
            await c.send(post)
            assert (await c.response(limit=30)).body == b"POST /two HTTP/1.1"
            assert conn.parser is not None
            await c.send(fast_3)
            assert (await c.response(limit=30)).body == b"GET /three?x=1 HTTP/1.1"
            await c.send(split[:25])  # split inside a field: llhttp reads both parts
            await until(lambda: _reading_a_head(gw.engine), 30)
            await c.send(split[25:])
            assert (await c.response(limit=30)).body == b"GET /four HTTP/1.1"
            await c.send(pipelined)
            assert (await c.response(limit=30)).body == b"GET /five HTTP/1.1"
            assert (await c.response(limit=30)).body == b"DELETE /six HTTP/1.1"
            await c.send(fast_7)
            r = await c.response(no_body=True, limit=30)
            assert r.status == 200 and r.get(b"connection") != b"close"
        finally:
            await c.close()
        assert [(line, f.get(b"x-user-id"), body) for line, f, body in seen] == [
            (b"GET /one HTTP/1.1", b"u1", b""),
            (b"POST /two HTTP/1.1", None, b"hello"),
            (b"GET /three?x=1 HTTP/1.1", b"u3", b""),
            (b"GET /four HTTP/1.1", b"u4", b""),
            (b"GET /five HTTP/1.1", None, b""),
            (b"DELETE /six HTTP/1.1", b"u6", b""),
            (b"HEAD /seven HTTP/1.1", None, b""),
        ]
        for _, f, _ in seen:
            assert f[b"host"] == b"svc" and b"connection" not in f
            assert b"content-length" not in f or f[b"content-length"] == b"5"
    finally:
        srv.close()
        await srv.wait_closed()
