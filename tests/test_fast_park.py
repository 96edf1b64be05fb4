"""Idle keep-alive connections parked outside uvloop (gateway/engine/fast_park.py).

Real engine, real sockets on 127.0.0.1; the parking threshold is small
(`park_after`) so a connection parks a moment after its answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.engine.fast import FastEngine
from gateway.engine.fast_park import ParkingLot
from gateway.tls import server_context
from tests.conftest import Upstream, gateway_config
from tests.engine_helpers import Env, ProxyHandler, RawClient, idle_checked
from tests.polling import until
from tests.tls_helpers import make_pki

PARK = 0.1  # seconds idle before a connection is parked, in these tests
GET_A = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
GET_B = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _parked(eng: FastEngine, n: int) -> bool:
    return eng.parked == n and not eng._clients


async def _answered(c: RawClient, request: bytes = GET_A) -> None:
    await c.send(request)
    r = await c.response()
    assert (r.status, r.body) == (200, b"local:" + request.split()[1])


async def _engine(env: Env, **kw: float) -> tuple[FastEngine, int]:
    kw.setdefault("park_after", PARK)
    return await env.engine(ProxyHandler(1, local=[b"/a", b"/b"]), **kw)


async def test_a_parked_connection_serves_its_next_requests(env: Env) -> None:
    eng, port = await _engine(env)
    c = await env.connect(port)
    await _answered(c)
    await until(lambda: _parked(eng, 1), 30.0)
    await _answered(c, GET_B)  # adopted again at its next byte
    await until(lambda: _parked(eng, 1), 30.0)
    await c.send(GET_A + GET_B)  # a pipelined pair wakes it: both answered, in order
    first, second = await c.response(), await c.response()
    assert (first.body, second.body) == (b"local:/a", b"local:/b")


async def test_a_request_split_across_the_parking_moment(env: Env) -> None:
    eng, port = await _engine(env)
    # Its first bytes came before the threshold: a head in progress is never parked.
    early = await env.connect(port)
    await _answered(early)
    await early.send(GET_A[:10])
    # The first half of a request wakes a parked connection; the rest follows.
    late = await env.connect(port)
    await _answered(late)
    await until(lambda: eng.parked == 1, 30.0)  # `late` parked; `early` waits for its head
    assert len(eng._clients) == 1
    await late.send(GET_B[:10])
    await until(lambda: eng.parked == 0 and len(eng._clients) == 2, 30.0)
    await late.send(GET_B[10:])
    await early.send(GET_A[10:])
    assert (await late.response()).body == b"local:/b"
    assert (await early.response()).body == b"local:/a"


async def test_a_connection_waiting_on_its_upstream_is_never_parked(env: Env) -> None:
    """An answer slower than the threshold: its client's connection stays a transport."""
    asked, release = asyncio.Event(), asyncio.Event()

    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        asked.set()
        await release.wait()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        await w.drain()
        await r.read()  # until the engine closes its pooled connection

    up = await env.raw_upstream(slow)
    eng, port = await env.engine(ProxyHandler(up.port, local=[b"/a"]), park_after=PARK)
    waiting = await env.connect(port)
    await waiting.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(asked.wait(), 30.0)
    (conn,) = eng._clients
    # The clock: a connection answered after the slow request was sent parks once it has
    # idled past the threshold, so by then the slow one has waited longer than that too.
    clock = await env.connect(port)
    await _answered(clock)
    await until(lambda: eng.parked == 1, 30.0)
    assert list(eng._clients) == [conn]  # `waiting`'s, still a transport
    release.set()
    r = await waiting.response()
    assert (r.status, r.body) == (200, b"slow")
    await until(lambda: _parked(eng, 2), 30.0)  # idle after its answer: parked in turn


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_client_that_closes_while_parked_leaves_nothing(env: Env, reset: bool) -> None:
    eng, port = await _engine(env)
    baseline = _fds()
    c = await RawClient.connect(port)
    await _answered(c)
    await until(lambda: _parked(eng, 1), 30.0)
    if reset:  # SO_LINGER 0: close sends a reset
        sock = c.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await c.close()
    await until(lambda: eng.parked == 0 and _fds() <= baseline, 30.0)
    assert not eng._clients


async def test_the_idle_timeout_closes_a_parked_connection(env: Env) -> None:
    eng, port = await _engine(env, keepalive_timeout=0.5)
    c = await env.connect(port)
    await _answered(c)
    await until(lambda: _parked(eng, 1), 30.0)
    assert await c.closed_by_peer(30.0)
    await until(lambda: eng.parked == 0, 30.0)


async def test_a_drain_closes_parked_connections_at_once(env: Env) -> None:
    eng, port = await _engine(env)
    clients = [await env.connect(port) for _ in range(3)]
    for c in clients:
        await _answered(c)
    await until(lambda: _parked(eng, 3), 30.0)
    await asyncio.wait_for(eng.shutdown(60.0), 30.0)  # nothing in flight: no drain wait
    assert eng.parked == 0
    for c in clients:
        assert await c.closed_by_peer(30.0)


async def test_parking_off_keeps_idle_connections_as_transports(env: Env) -> None:
    eng, port = await _engine(env, park_after=0)
    c = await env.connect(port)
    await _answered(c)
    # The parser and queue are dropped at the tick that would have parked it (PARSER_IDLE_SECONDS).
    (conn,) = eng._clients
    await until(lambda: idle_checked(conn), 30.0)
    assert eng.parked == 0 and list(eng._clients) == [conn]
    await _answered(c, GET_B)


async def test_https_connections_are_never_parked(env: Env, tmp_path: Path) -> None:
    """Their TLS session lives in the transport: the engine makes no lot at all."""
    pki = make_pki(tmp_path / "pki")
    tls = server_context(str(pki.server.cert), str(pki.server.key), None)
    eng, port = await env.engine(ProxyHandler(1, local=[b"/a"]), tls=tls, park_after=PARK)  # type: ignore[arg-type]
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=pki.client_ctx())
    c = RawClient(r, w)
    env.clients.append(c)
    await _answered(c)
    (conn,) = eng._clients
    await until(lambda: idle_checked(conn), 30.0)  # the tick that would have parked it
    assert eng.parked == 0 and list(eng._clients) == [conn]
    await _answered(c, GET_A)


async def test_many_connections_parked_and_reused_then_nothing_left(env: Env) -> None:
    eng, port = await _engine(env)
    baseline = _fds()
    n = 200
    clients = [await RawClient.connect(port) for _ in range(n)]
    for c in clients:
        await _answered(c)
    await until(lambda: _parked(eng, n), 60.0)
    await asyncio.gather(*(_answered(c, GET_B) for c in clients))
    await until(lambda: _parked(eng, n), 60.0)  # parked again after the second answer
    for c in clients:
        await c.close()
    await until(lambda: eng.parked == 0 and _fds() <= baseline, 60.0)
    assert not eng._clients


@pytest.mark.parametrize(
    ("idle_park", "parked"), [("50ms", 1), (0, 0), (None, 1)], ids=["on", "off", "default"]
)
async def test_timeouts_idle_park_reaches_the_gateway(
    gateway: Callable[..., Awaitable[Gateway]],
    upstreams: Callable[..., Awaitable[Upstream]],
    idle_park: object,
    parked: int,
) -> None:
    up = await upstreams()
    services: dict[str, Any] = {
        "svc": {"releases": {"stable": {"weight": 1, "upstreams": [up.url]}}}
    }
    timeouts = {} if idle_park is None else {"idle_park": idle_park}  # None: the default
    gw = await gateway(gateway_config(services, timeouts=timeouts))
    eng = gw.engine
    assert isinstance(eng, FastEngine) and gw.port is not None
    c = await RawClient.connect(gw.port)
    try:
        for _ in range(2):
            await c.send(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n")
            assert (await c.response()).status == 200
            # Parked (or, off, its parser and queue dropped at the tick that would have parked it).
            await until(lambda: eng.parked == 1 or all(idle_checked(k) for k in eng._clients), 30.0)
            assert (eng.parked, len(eng._clients)) == (parked, 1 - parked)
    finally:
        await c.close()


async def test_a_failing_adoption_is_logged_and_the_lot_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An error while waking one parked connection never stops the loop or the others."""
    loop = asyncio.get_running_loop()
    adopted: list[socket.socket] = []

    def adopt(sock: socket.socket) -> None:
        if not adopted:
            adopted.append(sock)
            raise RuntimeError("adoption bug")
        adopted.append(sock)

    lot = ParkingLot(loop, adopt, socket.AF_UNIX)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        deadline = loop.time() + 60.0
        for ours, _ in pairs:
            assert lot.park(ours.fileno(), deadline)
            ours.close()  # as the transport does: the lot's duplicate stays open
        with caplog.at_level(logging.ERROR, "gateway.engine.fast_park"):
            pairs[0][1].send(b"x")
            await until(lambda: len(adopted) == 1 and len(lot) == 1, 30.0)
            pairs[1][1].send(b"y")
            await until(lambda: len(adopted) == 2 and len(lot) == 0, 30.0)
        assert "could not be woken" in caplog.text
        assert adopted[1].recv(1) == b"y"  # nothing was read while parked
    finally:
        lot.close()
        for s in adopted:
            s.close()
        for _, theirs in pairs:
            theirs.close()


async def test_the_lot_returns_freed_memory_after_enough_parkings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After TRIM_AFTER parkings, one malloc_trim (glibc's, on this box) TRIM_DELAY later."""
    from gateway.engine import fast_park

    monkeypatch.setattr(fast_park, "TRIM_AFTER", 3)
    monkeypatch.setattr(fast_park, "TRIM_DELAY", 0.01)
    loop = asyncio.get_running_loop()
    lot = ParkingLot(loop, lambda sock: sock.close(), socket.AF_UNIX)
    assert lot.trim is not None  # glibc: the gateway's Linux targets have it
    trims: list[int] = []
    libc_trim = lot.trim

    def trim(pad: int) -> int:
        trims.append(pad)
        return libc_trim(pad)

    lot.trim = trim
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        for ours, _ in pairs[:2]:
            assert lot.park(ours.fileno(), loop.time() + 60.0)
        assert lot.trim_handle is None  # not enough parkings yet
        assert lot.park(pairs[2][0].fileno(), loop.time() + 60.0)
        await until(lambda: trims == [0], 30.0)
        assert lot.untrimmed == 0 and lot.trim_handle is None
        assert lot.park(pairs[3][0].fileno(), loop.time() + 60.0)
        assert lot.trim_handle is None and lot.untrimmed == 1  # counting again
    finally:
        lot.close()
        for a, b in pairs:
            a.close()
            b.close()
