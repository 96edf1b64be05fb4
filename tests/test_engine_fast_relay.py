"""The fast engine's response relay: the head as relayed from the upstream's raw bytes.

Exact bytes in, exact bytes out: each end-to-end field line as the upstream sent
it, hop-by-hop fields cut (RFC 9110 §7.6.1), our status line only when the
upstream's is not HTTP/1.1, the policy's fields and our framing appended; and
the same bytes whatever the reads the head arrives in.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import struct
import termios

import pytest

from gateway.engine.fast import FastEngine
from gateway.engine.fast_upstream import MAX_RESPONSE_HEAD, line_end
from gateway.engine.fast_wire import Reject
from tests.engine_helpers import MARK, Env, ProxyHandler, RawClient, RawUpstream, Script
from tests.engine_helpers import read_request as read_one

OURS = MARK[0] + b": " + MARK[1] + b"\r\n"  # the policy's field, appended after the upstream's
GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def answering(response: bytes) -> Script:
    """An upstream that answers every request on its connection with `response`."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_one(r)
            w.write(response)
            await w.drain()

    return script


async def relay(
    env: Env, script: Script
) -> tuple[RawUpstream, ProxyHandler, RawClient, FastEngine]:
    up = await env.raw_upstream(script)
    handler = ProxyHandler(up.port)
    eng, port = await env.engine(handler)
    return up, handler, await env.connect(port), eng


async def exact(c: RawClient) -> bytes:
    """One whole response as the client received it (a chunked body de-chunked)."""
    r = await c.response()
    return r.raw_head + r.body


# (upstream response, what the client gets): the head from the upstream's bytes.
HEAD_CASES: list[tuple[bytes, bytes]] = [
    (  # nginx's eight static-file fields: only Connection goes
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 08:00:00 GMT\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 2\r\n"
        b"Last-Modified: Mon, 30 Nov 2026 07:00:00 GMT\r\nConnection: keep-alive\r\n"
        b'ETag: "6566c1a0-2"\r\nAccept-Ranges: bytes\r\n\r\nok',
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 08:00:00 GMT\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 2\r\n"
        b"Last-Modified: Mon, 30 Nov 2026 07:00:00 GMT\r\n"
        b'ETag: "6566c1a0-2"\r\nAccept-Ranges: bytes\r\n' + OURS + b"\r\nok",
    ),
    (  # the upstream's reason phrase and the spelling of its lines are kept
        b"HTTP/1.1 201 Made It\r\nx-lower: a\r\nX-Spaced:   b \t\r\nX-Empty:\r\n"
        b"content-length: 0\r\n\r\n",
        b"HTTP/1.1 201 Made It\r\nx-lower: a\r\nX-Spaced:   b \t\r\nX-Empty:\r\n"
        b"content-length: 0\r\n" + OURS + b"\r\n",
    ),
    (  # another version: our status line (RFC 9110 §6.2), the fields as sent
        b"HTTP/1.0 200 OK\r\nX-A: 1\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 0\r\n" + OURS + b"\r\n",
    ),
    (  # no reason phrase and no space after the code: ours
        b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n" + OURS + b"\r\n",
    ),
    (  # every hop-by-hop field in any case, first, last and in between
        b"HTTP/1.1 200 OK\r\nKEEP-ALIVE: timeout=5\r\nX-A: 1\r\nproxy-connection: keep-alive\r\n"
        b"Proxy-Authenticate: Basic\r\nTe: trailers\r\nTRAILER: T\r\nUpgrade: h2c\r\n"
        b"X-B: 2\r\nContent-Length: 0\r\nConnection: Keep-Alive\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nX-B: 2\r\nContent-Length: 0\r\n" + OURS + b"\r\n",
    ),
    (  # names that only begin or end like a hop-by-hop one are end-to-end
        b"HTTP/1.1 200 OK\r\nConnection-Id: 1\r\nX-Connection: 2\r\nUpgrade-Insecure: 3\r\n"
        b"Tea: 4\r\nKeep-Alive-X: 5\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection-Id: 1\r\nX-Connection: 2\r\nUpgrade-Insecure: 3\r\n"
        b"Tea: 4\r\nKeep-Alive-X: 5\r\nContent-Length: 0\r\n" + OURS + b"\r\n",
    ),
    (  # fields Connection names go too (two Connection lines); Content-Length stays
        b"HTTP/1.1 200 OK\r\nX-Hop: a\r\nConnection: x-hop , keep-alive\r\nX-Hopper: b\r\n"
        b"connection: X-Other,Content-Length\r\nx-other: c\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Hopper: b\r\nContent-Length: 2\r\n" + OURS + b"\r\nok",
    ),
    (  # chunked from the upstream: its Transfer-Encoding goes, ours is appended
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\nX-B: 2\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nX-B: 2\r\n" + OURS + b"Transfer-Encoding: chunked\r\n\r\n"
        b"ok",  # the body as `exact` gives it: de-chunked
    ),
    (  # empty lines before the status line are skipped (RFC 9112 §2.2)
        b"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + OURS + b"\r\nok",
    ),
    (  # hop-by-hop names in odd cases, with no OWS or a tab before the value
        b"HTTP/1.1 200 OK\r\ncOnNeCtIoN:keep-alive\r\nX-A:\t1\t\r\nKEEP-alive:\ttimeout=5\r\n"
        b"tE:trailers\r\nCONTENT-LENGTH:2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A:\t1\t\r\nCONTENT-LENGTH:2\r\n" + OURS + b"\r\nok",
    ),
    (  # lines of odd and even lengths, shortest ones included, a hop-by-hop one between
        b"HTTP/1.1 200 OK\r\nA:\r\nB:1\r\nC:12\r\nTe:x\r\nD:123\r\nContent-Length: 0\r\nE:\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA:\r\nB:1\r\nC:12\r\nD:123\r\nContent-Length: 0\r\nE:\r\n"
        + OURS
        + b"\r\n",
    ),
    (  # colons and hop-by-hop names inside values are values
        b"HTTP/1.1 200 OK\r\nX-A: connection: close\r\nX-B: a:b:c\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: connection: close\r\nX-B: a:b:c\r\nContent-Length: 0\r\n"
        + OURS
        + b"\r\n",
    ),
]
HEAD_IDS = [
    "nginx-fields",
    "kept-as-sent",
    "http10-upstream",
    "no-reason",
    "every-hop-by-hop",
    "look-alike-names",
    "connection-named",
    "chunked",
    "leading-empty-lines",
    "odd-case-and-ows",
    "odd-and-even-lengths",
    "names-in-values",
]


@pytest.mark.parametrize(("upstream", "want"), HEAD_CASES, ids=HEAD_IDS)
async def test_the_head_is_relayed_from_the_upstreams_bytes(
    env: Env, upstream: bytes, want: bytes
) -> None:
    up, handler, c, _ = await relay(env, answering(upstream))
    for _ in range(2):  # the second on the reused upstream connection
        await c.send(GET)
        assert await exact(c) == want
    assert up.connections == 1
    done = await handler.wait_done(2)
    assert done[0] == done[1] and done[0][1] is None


# (bytes, where a line starts, where its CRLF starts): the CRLF at either parity, after
# short and long runs of bytes, a tab before it; -1: no CRLF ends it (a 502).
LINE_END_CASES: list[tuple[bytes, int, int]] = [
    (b"A:1\r\n", 0, 3),
    (b"AB:1\r\n", 0, 4),
    (b"A:\r\n", 0, 2),
    (b"X-Long: abcdefghijklmnopqrstuvwxyz\r\nNext: 1\r\n", 0, 34),
    (b"X-Long: abcdefghijklmnopqrstuvwxy\r\nNext: 1\r\n", 0, 33),
    (b"X-Tab:\ta\t\r\n", 0, 9),
    (b"HTTP/1.1 200 OK\r\nA:12\r\n\r\n", 17, 21),
    (b"HTTP/1.1 200 OK\r\nAB:1\r\n\r\n", 17, 21),
    (b"A:1", 0, -1),
    (b"A:12\r", 0, -1),
    (b"A:1\nB:2\r\n", 0, -1),
    (b"A:1\rB:2\r\n", 0, -1),
]
LINE_END_IDS = [
    "cr-at-odd",
    "cr-at-even",
    "empty-value",
    "long-even",
    "long-odd",
    "tabs",
    "later-line-even",
    "later-line-odd",
    "unterminated",
    "cr-at-the-end",
    "bare-lf",
    "bare-cr",
]


@pytest.mark.parametrize(("data", "start", "want"), LINE_END_CASES, ids=LINE_END_IDS)
def test_line_end_finds_the_crlf_whichever_byte_the_walk_lands_on(
    data: bytes, start: int, want: int
) -> None:
    if want < 0:
        with pytest.raises(Reject):
            line_end(data, start)
    else:
        assert line_end(data, start) == want
        assert data[want : want + 2] == b"\r\n" and b"\r" not in data[start:want]


def _queued(fd: int, request: int) -> int:
    """Bytes in a socket's receive (FIONREAD) or send (TIOCOUTQ) queue."""
    got = fcntl.ioctl(fd, request, b"\0\0\0\0")
    return int(struct.unpack("i", got)[0])


async def _read_by_gateway(up_fd: int, gw_fd: int, limit: float = 30.0) -> None:
    """Wait until what the upstream wrote is acknowledged and read by the gateway.

    Loopback acknowledges once the bytes are in the gateway's receive queue, and
    the engine's read empties that queue: one read per write, whatever the timing.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while _queued(up_fd, termios.TIOCOUTQ) or _queued(gw_fd, termios.FIONREAD):
        assert loop.time() < end, "the gateway did not read the upstream's bytes"
        await asyncio.sleep(0)


def _gateway_fd(engines: list[FastEngine]) -> int:
    """The socket of the engine's one upstream connection (the test's upstream is its peer)."""
    pool = engines[0]._pool
    assert pool is not None
    (gw,) = pool.conns
    assert gw.transport is not None
    return int(gw.transport.get_extra_info("socket").fileno())


async def _one_read(w: asyncio.StreamWriter, data: bytes, gw_fd: int) -> None:
    """Write `data` and wait until the gateway has read it: one read on its side."""
    w.write(data)
    await w.drain()
    await _read_by_gateway(w.get_extra_info("socket").fileno(), gw_fd)


INTERIM = b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\nConnection: keep-alive\r\n\r\n"
SPLIT_RESPONSE = INTERIM + (
    b"HTTP/1.1 200 OK\r\nServer: up\r\nX-Hop: gone\r\nConnection: X-Hop, keep-alive\r\n"
    b"Keep-Alive: timeout=5\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
    b'ETag: "e"\r\n\r\nhello'
)
SPLIT_WANT_INTERIM = b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
SPLIT_WANT = (
    b"HTTP/1.1 200 OK\r\nServer: up\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
    b'ETag: "e"\r\n' + OURS + b"\r\nhello"
)


async def test_a_response_read_one_byte_at_a_time_is_relayed_as_from_one_read(env: Env) -> None:
    engines: list[FastEngine] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await read_one(r)
        w.write(SPLIT_RESPONSE)  # the whole response in one write
        await w.drain()
        await read_one(r)
        gw_fd = _gateway_fd(engines)
        for i in range(len(SPLIT_RESPONSE)):  # then one byte per read of the gateway
            await _one_read(w, SPLIT_RESPONSE[i : i + 1], gw_fd)
        await r.read()

    up, handler, c, eng = await relay(env, script)
    engines.append(eng)
    for _ in range(2):
        await c.send(GET)
        assert await exact(c) == SPLIT_WANT_INTERIM
        assert await exact(c) == SPLIT_WANT
    assert await handler.wait_done(2) == [(200, None), (200, None)]
    assert up.connections == 1


async def test_an_http10_client_gets_the_final_response_without_the_interim_one(
    env: Env,
) -> None:
    """The 1xx and the final head in one read: only the final one reaches an HTTP/1.0
    client (RFC 9110 §15.2), the 1xx's bytes taken back out of what the read relays."""
    up, handler, c, _ = await relay(env, answering(SPLIT_RESPONSE))
    await c.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    assert await exact(c) == SPLIT_WANT.replace(OURS + b"\r\n", OURS + b"Connection: close\r\n\r\n")
    assert await handler.wait_done(1) == [(200, None)]
    assert c.buf == b""


async def test_a_head_split_at_every_byte_is_relayed_whole(env: Env) -> None:
    """Two reads per response, the split moving one byte on each time (head and body)."""
    engines: list[FastEngine] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        for k in range(1, len(SPLIT_RESPONSE)):
            await read_one(r)
            await _one_read(w, SPLIT_RESPONSE[:k], _gateway_fd(engines))
            w.write(SPLIT_RESPONSE[k:])
            await w.drain()
        await r.read()

    up, handler, c, eng = await relay(env, script)
    engines.append(eng)
    for _ in range(1, len(SPLIT_RESPONSE)):
        await c.send(GET)
        assert await exact(c) == SPLIT_WANT_INTERIM
        assert await exact(c) == SPLIT_WANT
    assert up.connections == 1


async def test_interim_final_head_body_and_more_in_one_read(env: Env) -> None:
    """1xx, final head, body and an unasked-for response share a read: the first is relayed,
    the connection is not reused (RFC 9112 §9.3: nothing may follow a response)."""
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad"
    up, handler, c, _ = await relay(env, answering(SPLIT_RESPONSE + second))
    for _ in range(2):
        await c.send(GET)
        assert await exact(c) == SPLIT_WANT_INTERIM
        assert await exact(c) == SPLIT_WANT
    assert await handler.wait_done(2) == [(200, None), (200, None)]
    assert up.connections == 2  # each upstream connection carried one response only
    assert c.buf == b""


@pytest.mark.parametrize(
    "upstream",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_RESPONSE_HEAD,  # never ends
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_RESPONSE_HEAD + b"\r\nContent-Length: 0\r\n\r\n",
        # llhttp refuses these (RFC 9112 §2.2, §5.2): none of their bytes is relayed
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: x-a,\r\n\tx-b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\rConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    ],
    ids=[
        "over-the-limit-unfinished",
        "over-the-limit-finished",
        "obs-fold",
        "folded-connection",
        "bare-lf",
        "bare-cr",
        "lf-only",
    ],
)
async def test_a_response_head_that_cannot_be_relayed_is_502(env: Env, upstream: bytes) -> None:
    """Over the size limit, or with line ends other than CRLF: the client gets a 502."""
    up, handler, c, _ = await relay(env, answering(upstream))
    await c.send(GET)
    r = await c.response()
    assert (r.status, json.loads(r.body)) == (502, {"error": "protocol"})
    assert await handler.wait_done(1) == [(502, "protocol")]


async def test_a_shorter_head_whose_body_looks_like_the_last_heads_end(env: Env) -> None:
    """The last head's length is only a guess: here the second head is shorter and its
    body has CRLF CRLF exactly where the first head ended."""
    first = b"HTTP/1.1 200 OK\r\nX-Long-Field: abcdefghijklmnop\r\nContent-Length: 2\r\n\r\n"
    short = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
    filler = len(first) - len(short % 10) - 4  # the body's CRLF CRLF ends where `first` did
    body = b"x" * filler + b"\r\n\r\n" + b"Connection: close\r\n"
    second = short % len(body)
    assert len(second) + filler + 4 == len(first)
    responses = [first + b"ok", second + body]

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        for response in responses:
            await read_one(r)
            w.write(response)
            await w.drain()
        await r.read()

    up, handler, c, _ = await relay(env, script)
    await c.send(GET)
    assert await exact(c) == first[:-2] + OURS + b"\r\nok"
    await c.send(GET)
    assert await exact(c) == second[:-2] + OURS + b"\r\n" + body
    assert up.connections == 1


# Plain responses the upstream fast path takes whole (engine/fast_reply.py), one that
# closes, and one it leaves to llhttp: each relayed the same from one read or from two.
WHOLE_CASES = [
    HEAD_CASES[0][0],
    b"HTTP/1.1 404 Not Found\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    # hop-by-hop lines in one run, first or last (the fast path cuts the run), and in
    # two runs (left to llhttp)
    b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\nX-A: 1\r\n"
    b"Content-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nX-A: 1\r\nConnection: keep-alive\r\n"
    b"Content-Length: 2\r\n\r\nok",
]


def _peer_fd(engines: list[FastEngine], w: asyncio.StreamWriter) -> int:
    """The socket of the engine's upstream connection whose peer is the upstream's `w`."""
    pool = engines[0]._pool
    assert pool is not None
    peer = w.get_extra_info("peername")
    for up in pool.conns:
        if up.transport is not None:
            sock = up.transport.get_extra_info("socket")
            if sock.getsockname() == peer:
                return int(sock.fileno())
    raise AssertionError("no upstream connection of the engine is this one's peer")


@pytest.mark.parametrize(
    "response",
    WHOLE_CASES,
    ids=["nginx", "empty-body", "close", "chunked", "hop-run-first", "hop-run-last", "hop-runs"],
)
async def test_a_response_whole_in_one_read_is_relayed_as_from_two_reads(
    env: Env, response: bytes
) -> None:
    """Whole in one read (the fast path when plain), then split after the status line,
    then before its last byte (llhttp): the same bytes reach the client, and the
    upstream connection is reused exactly when the response allows it (RFC 9112 §9.3)."""
    engines: list[FastEngine] = []
    splits = [len(response), response.index(b"\r\n") + 2, len(response) - 1]
    sent: list[int] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            await read_one(r)
            k = splits[len(sent)]
            sent.append(k)
            if k < len(response):  # the first part, read by the gateway before the rest
                await _one_read(w, response[:k], _peer_fd(engines, w))
            w.write(response[k:] if k < len(response) else response)
            await w.drain()

    up, handler, c, eng = await relay(env, script)
    engines.append(eng)
    got = []
    for _ in splits:
        await c.send(GET)
        got.append(await exact(c))
    assert got[0] == got[1] == got[2]
    assert await handler.wait_done(3) == [(int(response[9:12]), None)] * 3
    closes = b"Connection: close" in response
    assert up.connections == (3 if closes else 1)
