"""The request head read from the bytes as received: HTTP version and the client's field lines.

Why these tables: the fast engine reads the version from the request line, and
hands policy the client's field lines as one block, only for a head that began
at the start of a read and is in the plain form (gateway/engine/fast_wire.py
`head_at_start`); every other head must take the parser's answer and be
rendered from the field list. Whichever way a head went, the version and the
fields the upstream receives must be the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httptools
import pytest

from gateway.app import Gateway
from gateway.engine.api import RequestHead
from gateway.engine.fast import FastEngine
from gateway.engine.fast_client import S_HEAD
from gateway.engine.fast_wire import head_at_start, method_at_start
from gateway.headers import parse_field_lines
from tests.conftest import gateway_config
from tests.engine_helpers import Env, ProxyHandler, RawClient, parse_head
from tests.polling import until

GatewayFactory = Callable[..., Awaitable[Gateway]]


class _First:
    """What llhttp reports for the first message of some bytes."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.version = ""

    def on_url(self, url: bytes) -> None:
        if not self.version:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.version:
            self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        if not self.version:
            self.version = self.parser.get_http_version()


def first_head(data: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], str]:
    """(method, target, fields, version) of the first request in `data`, as llhttp parsed it."""
    rec = _First()
    try:
        rec.parser.feed_data(data)
    except httptools.HttpParserError:
        pass  # a later message may be incomplete or bad: only the first one counts
    assert rec.version, "llhttp did not complete a head"
    method = rec.parser.get_method()
    return method, rec.url, rec.fields, rec.version


PLAIN_FIELDS = b"Host: x.example\r\nX-User-ID: u1\r\nAccept: */*\r\n"
PLAIN = b"GET /a?b=1 HTTP/1.1\r\n" + PLAIN_FIELDS + b"\r\n"

# (bytes of a read, version read from them, the field block or None)
HEADS = [
    (PLAIN, "1.1", PLAIN_FIELDS),
    (b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", "1.0", b"Host: x\r\n"),
    (b"GET / HTTP/1.0\r\n\r\n", "1.0", b""),
    (
        b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        "1.1",
        b"Host: x\r\nContent-Length: 3\r\n",
    ),
    (PLAIN + b"GET /next HTTP/1.0\r\nHost: y\r\n\r\n", "1.1", PLAIN_FIELDS),
    (PLAIN + b"GET /next HT", "1.1", PLAIN_FIELDS),
    (b"\r\n" + PLAIN, "", None),
    (b"\r\n\r\nGET / HTTP/1.0\r\nHost: x\r\n\r\n", "", None),
    (b"GET  /a HTTP/1.1\r\nHost: x\r\n\r\n", "", None),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", "", None),
    (b"GET / HTTP/0.9\r\nHost: x\r\n\r\n", "", None),
    (b"GET /\r\n\r\n", "", None),
    (b"GET / HTTP/1.1\r\nHost:x\r\n\r\n", "1.1", None),
    (b"GET / HTTP/1.1\r\nHost:  x\r\n\r\n", "1.1", None),
    (b"GET / HTTP/1.1\r\nHost:\tx\r\n\r\n", "1.1", None),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Empty:\r\n\r\n", "1.1", None),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Trail: v \r\n\r\n", "1.1", b"Host: x\r\nX-Trail: v \r\n"),
    # One line an OWS short, the next one an OWS long: the lengths add up, the lines do not.
    (b"GET / HTTP/1.1\r\nA:x\r\nB:  y\r\n\r\n", "1.1", None),
    (b"GET / HTTP/1.1\r\nA:  x\r\nB:y\r\n\r\nGET / HTTP/1.1\r\nC: z\r\n\r\n", "1.1", None),
]
HEAD_IDS = [
    "plain-1.1",
    "plain-1.0",
    "no-fields",
    "body-after-head",
    "pipelined-next-whole",
    "pipelined-next-begun",
    "leading-crlf",
    "leading-crlfs-1.0",
    "two-spaces-after-method",
    "http-2.0",
    "http-0.9-with-fields",
    "http-0.9",
    "no-space-after-colon",
    "two-spaces-after-colon",
    "tab-after-colon",
    "empty-value",
    "trailing-space-kept",
    "ows-lengths-cancel",
    "ows-lengths-cancel-pipelined",
]


@pytest.mark.parametrize(("data", "version", "block"), HEADS, ids=HEAD_IDS)
def test_head_at_start_reads_only_the_plain_form(
    data: bytes, version: str, block: bytes | None
) -> None:
    method, target, fields, parsed_version = first_head(data)
    got_version, got_block = head_at_start(data, method, target, fields)
    assert (got_version, got_block) == (version, block)
    if got_version:
        assert got_version == parsed_version  # never a different answer than the parser's
    if got_block is not None:
        assert parse_field_lines(got_block) == fields  # exactly the parsed fields


# (bytes of a read, the method constant taken from them, or None: the parser is asked)
METHODS = [
    (PLAIN, b"GET"),
    (b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"POST"),
    (b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", b"HEAD"),
    (b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"PUT"),
    (b"PATCH / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"PATCH"),
    (b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n", b"DELETE"),
    (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", b"OPTIONS"),
    (b"PROPFIND / HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"\r\n" + PLAIN, None),
]
METHOD_IDS = ["get", "post", "head", "put", "patch", "delete", "options", "other", "leading-crlf"]


@pytest.mark.parametrize(("data", "want"), METHODS, ids=METHOD_IDS)
def test_method_at_start_is_the_parsers_method_or_none(data: bytes, want: bytes | None) -> None:
    method, _, _, _ = first_head(data)
    got = method_at_start(data)
    assert got == want
    assert got is None or got == method  # never a different answer than the parser's


# -- the engine: which heads are read from the bytes, and the same versions either way ---------

# (reads sent one after another, (version, field block taken?) per request, or a status)
READS: list[tuple[list[bytes], list[tuple[str, bool]] | int]] = [
    ([b"GET /l HTTP/1.1\r\nHost: x\r\n\r\n"], [("1.1", True)]),
    ([b"GET /l HTTP/1.0\r\nHost: x\r\n\r\n"], [("1.0", True)]),
    (
        [b"GET /l HTTP/1.1\r\nHost: x\r\n\r\nGET /l HTTP/1.0\r\nHost: x\r\n\r\n"],
        [("1.1", True), ("1.0", False)],
    ),
    ([b"GET /l HTTP/1.1\r\nHo", b"st: x\r\n\r\n"], [("1.1", False)]),
    ([b"GET /l HT", b"TP/1.0\r\nHost: x\r\n\r\n"], [("1.0", False)]),
    (
        [b"GET /l HTTP/1.1\r\nHost: x\r\n\r\nGET /l HT", b"TP/1.0\r\nHost: x\r\n\r\n"],
        [("1.1", True), ("1.0", False)],
    ),
    ([b"\r\n\r\nGET /l HTTP/1.0\r\nHost: x\r\n\r\n"], [("1.0", False)]),
    ([b"GET  /l HTTP/1.1\r\nHost: x\r\n\r\n"], [("1.1", False)]),
    ([b"GET /l HTTP/1.1\r\nHost:x\r\n\r\n"], [("1.1", False)]),
    ([b"GET /l HTTP/2.0\r\nHost: x\r\n\r\n"], 505),
    ([b"GET /l\r\n\r\n"], 505),
]
READS_IDS = [
    "one-read-1.1",
    "one-read-1.0",
    "pipelined-in-one-read",
    "head-split-over-reads",
    "request-line-split-over-reads",
    "next-message-begun-in-the-read-before",
    "leading-crlfs",
    "two-spaces-after-method",
    "no-space-after-colon",
    "http-2.0",
    "http-0.9",
]


async def _send_in_reads(eng: FastEngine, c: RawClient, reads: list[bytes]) -> None:
    """Each element its own read: the next is sent once the engine is inside a head."""
    for i, data in enumerate(reads):
        await c.send(data)
        if i < len(reads) - 1:
            await until(lambda: any(k.waiting_for == S_HEAD for k in eng._clients), 30)


@pytest.mark.parametrize(("reads", "expect"), READS, ids=READS_IDS)
async def test_engine_reads_the_version_and_fields_the_parser_would(
    env: Env, reads: list[bytes], expect: list[tuple[str, bool]] | int
) -> None:
    handler = ProxyHandler(1, local=[b"/l"])  # answered locally: no upstream
    eng, port = await env.engine(handler)
    c = await env.connect(port)
    await _send_in_reads(eng, c, reads)
    if isinstance(expect, int):
        assert (await c.response(limit=30)).status == expect
        assert handler.heads == []
        return
    for _ in expect:
        assert (await c.response(limit=30)).status == 200
    heads: list[RequestHead] = handler.heads
    assert [(h.http_version, h.fields is not None) for h in heads] == expect
    for h in heads:
        if h.fields is not None:
            assert parse_field_lines(h.fields) == h.headers


# -- the gateway: the upstream gets the same head whichever way it was read --------------------

CLIENT_FIELDS = [
    b"Host: svc.example\r\nX-User-ID: u42\r\nAccept: */*\r\nUser-Agent: t/1\r\n"
    b"Cookie: a=1; uid=u42\r\n",
    b"Host: svc.example\r\nVia: 1.0 edge\r\nX-Forwarded-For: 10.1.1.1\r\n"
    b"baggage: k=v\r\nAccept: */*\r\n",
    b"host: svc.example\r\nAccept:*/*\r\nX-Trail: v \r\n",
    b"Host: svc.example\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nAccept: */*\r\n",
]
CLIENT_FIELDS_IDS = ["kept-as-received", "with-via-xff-baggage", "renamed-and-ows", "hop-by-hop"]
# Random per request (a new request id and span id each time): compared by name only.
RANDOM = {b"x-request-id", b"traceparent"}


async def _upstream_heads() -> tuple[asyncio.Server, list[bytes]]:
    heads: list[bytes] = []

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                heads.append(await r.readuntil(b"\r\n\r\n"))
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return srv, heads


def _comparable(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    parsed = parse_head(head)
    assert parsed is not None
    line, fields, _ = parsed
    return line, [(n, b"" if n.lower() in RANDOM else v) for n, v in fields]


@pytest.mark.parametrize("fields", CLIENT_FIELDS, ids=CLIENT_FIELDS_IDS)
async def test_upstream_gets_the_same_fields_from_one_read_or_two(
    gateway: GatewayFactory, fields: bytes
) -> None:
    srv, heads = await _upstream_heads()
    try:
        port = srv.sockets[0].getsockname()[1]
        services = {
            "svc": {
                "releases": {"stable": {"weight": 1, "upstreams": [f"http://127.0.0.1:{port}"]}}
            }
        }
        gw: Gateway = await gateway(gateway_config(services, engine="fast"))
        assert gw.port is not None and isinstance(gw.engine, FastEngine)
        request = b"GET /p?q=1 HTTP/1.1\r\n" + fields + b"\r\n"
        for reads in ([request], [request[:30], request[30:]]):
            c = await RawClient.connect(gw.port)
            try:
                await _send_in_reads(gw.engine, c, reads)
                assert (await c.response(limit=30)).status == 200
            finally:
                await c.close()
        assert len(heads) == 2
        one, two = (_comparable(h) for h in heads)
        assert one == two
        names = [n.lower() for n, _ in one[1]]
        assert names.count(b"x-request-id") == 1 and names.count(b"traceparent") == 1
    finally:
        srv.close()
        await srv.wait_closed()
