"""Failover to another endpoint, the retry budget, timeouts.total and the 502/503/504 log line."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway import config as C
from gateway.app import Gateway
from gateway.balancer import Pool
from gateway.config import Endpoint
from gateway.engine.api import Forward, RequestHead
from gateway.errors import ConfigError
from gateway.handler import ProxyHandler
from gateway.ratelog import RateLimiter
from gateway.retry import BUDGET_MIN, RetryBudget, may_retry
from gateway.state import SnapshotHolder, build_snapshot
from tests.conftest import Upstream, free_port, gateway_config

GatewayFactory = Callable[..., Awaitable[Gateway]]
UpstreamFactory = Callable[..., Awaitable[Upstream]]


def _svc(*urls: str, balancer: str = "round_robin", **extra: Any) -> dict[str, Any]:
    return {
        "svc": {
            "balancer": balancer,
            "releases": {"stable": {"weight": 100, "upstreams": list(urls)}},
            **extra,
        }
    }


class RawUpstream:
    """A loopback TCP server that reads one request head and then misbehaves.

    `mode`: "close" shuts the connection without a response byte (a crash after
    the request was sent); "hang" never answers; "head" sends a response head
    and part of a body, then stalls.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.heads: list[bytes] = []
        self.got_head = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.release = asyncio.Event()
        self.port = 0

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            self.got_head.set()
            if self.mode == "head":
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
                await w.drain()
            if self.mode in ("hang", "head"):
                await self.release.wait()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[str], Awaitable[RawUpstream]]]:
    started: list[RawUpstream] = []

    async def make(mode: str) -> RawUpstream:
        u = await RawUpstream(mode).start()
        started.append(u)
        return u

    yield make
    for u in started:
        await u.stop()


def _counting_app(hits: list[str]) -> web.Application:
    async def any_(request: web.Request) -> web.Response:
        await request.read()
        hits.append(request.method)
        return web.json_response({"release": "stable", "method": request.method})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_)
    return app


async def _metric(client: aiohttp.ClientSession, gw: Gateway, reason: str) -> float:
    async with client.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as r:
        text = await r.text()
    want = {f'reason="{reason}"', 'release="stable"', 'service="svc"'}
    for line in text.splitlines():
        m = re.match(r"^gateway_upstream_retries_total\{(.*)\} (\S+)$", line)
        if m and set(m.group(1).split(",")) == want:
            return float(m.group(2))
    return 0.0


# -- end to end: the "200 502 200 200 200 502" -------------------------------


@pytest.mark.parametrize("balancer", ["p2c", "round_robin"], ids=["p2c", "rr"])
async def test_one_dead_endpoint_of_two_every_request_answered_200(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    engine: str,
    balancer: str,
) -> None:
    live = await upstreams("stable")
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await gateway(gateway_config(_svc(live.url, dead, balancer=balancer), engine=engine))
    codes = []
    for i in range(12):
        async with client.get(f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": f"u{i}"}) as r:
            codes.append(r.status)
            await r.read()
    assert codes == [200] * 12
    if balancer == "round_robin":
        # Round robin sends every second request to the dead endpoint until passive
        # health ejects it on its third connect failure: three failovers, no more.
        assert await _metric(client, gw, "connect") == 3.0


async def test_retries_zero_turns_failover_off(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    live = await upstreams("stable")
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await gateway(gateway_config(_svc(dead, live.url), engine=engine, retries=0))
    async with client.get(f"http://127.0.0.1:{gw.port}/") as r:  # round robin: dead first
        assert r.status == 502
        assert (await r.json())["kind"] == "connect"
    assert await _metric(client, gw, "connect") == 0.0


async def test_post_that_never_reached_an_upstream_fails_over(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    hits: list[str] = []
    live = await upstreams(app=_counting_app(hits))
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await gateway(gateway_config(_svc(dead, live.url), engine=engine))
    async with client.post(f"http://127.0.0.1:{gw.port}/", data=b"x" * 300_000) as r:
        assert r.status == 200  # connect refused: not one byte was sent, any method moves on
        assert (await r.json())["method"] == "POST"
    assert hits == ["POST"]


@pytest.mark.parametrize(
    ("method", "body", "moved"),
    [
        ("GET", None, True),
        ("PUT", b"small", True),
        ("DELETE", None, True),
        ("POST", b"small", False),
        ("PATCH", None, False),
        ("PUT", b"x" * 200_000, False),  # more than is kept for a replay
    ],
    ids=["get", "put-small", "delete", "post", "patch", "put-large"],
)
async def test_after_sending_only_idempotent_kept_requests_move(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    raw: Callable[[str], Awaitable[RawUpstream]],
    client: aiohttp.ClientSession,
    engine: str,
    method: str,
    body: bytes | None,
    moved: bool,
) -> None:
    hits: list[str] = []
    live = await upstreams(app=_counting_app(hits))
    crash = await raw("close")
    gw = await gateway(gateway_config(_svc(crash.url, live.url), engine=engine))
    async with client.request(method, f"http://127.0.0.1:{gw.port}/", data=body) as r:
        got = await r.read()
        status = r.status
    assert crash.heads and crash.heads[0].startswith(method.encode())  # it was sent there
    if moved:
        assert status == 200 and hits == [method]
        assert await _metric(client, gw, "reset") == 1.0
    else:
        assert status == 502 and hits == []
        assert b'"kind":"reset"' in got


async def test_read_timeout_of_a_get_fails_over(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    raw: Callable[[str], Awaitable[RawUpstream]],
    client: aiohttp.ClientSession,
    engine: str,
) -> None:
    live = await upstreams("stable")
    silent = await raw("hang")
    svc = _svc(silent.url, live.url, timeouts={"connect": "2s", "read": "300ms"})
    gw = await gateway(gateway_config(svc, engine=engine))
    async with client.get(f"http://127.0.0.1:{gw.port}/") as r:
        assert r.status == 200
        await r.read()
    assert await _metric(client, gw, "timeout") == 1.0


async def test_total_timeout_is_a_504_json_before_the_read_timeout(
    gateway: GatewayFactory,
    raw: Callable[[str], Awaitable[RawUpstream]],
    client: aiohttp.ClientSession,
    engine: str,
) -> None:
    a, b = await raw("hang"), await raw("hang")
    svc = _svc(a.url, b.url, timeouts={"connect": "2s", "read": "60s", "total": "500ms"})
    gw = await gateway(gateway_config(svc, engine=engine))
    t0 = time.monotonic()
    async with client.get(f"http://127.0.0.1:{gw.port}/") as r:
        assert r.status == 504
        body = await r.json()
    assert body["kind"] == "timeout" and body["service"] == "svc"
    assert time.monotonic() - t0 < 45  # the 60 s read timeout did not decide it
    assert len(a.heads) + len(b.heads) == 1  # the deadline never waits for a second try


async def test_total_timeout_cuts_a_response_already_under_way(
    gateway: GatewayFactory,
    raw: Callable[[str], Awaitable[RawUpstream]],
    client: aiohttp.ClientSession,
    engine: str,
) -> None:
    stall = await raw("head")
    svc = _svc(stall.url, timeouts={"connect": "2s", "read": "60s", "total": "500ms"})
    gw = await gateway(gateway_config(svc, engine=engine))
    async with client.get(f"http://127.0.0.1:{gw.port}/") as r:
        assert r.status == 200  # the head was relayed before the deadline...
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()  # ...the body is cut short, never silently truncated


async def test_each_answered_502_and_503_is_logged_once(
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    engine: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    svc = _svc(dead)
    svc["empty"] = {
        "match": {"path_prefix": "/empty"},
        "releases": {"stable": {"weight": 1, "consul": {"service": "e", "tags": ["x"]}}},
    }
    gw = await gateway(gateway_config(svc, engine=engine))
    caplog.set_level(logging.WARNING, logger="gateway.handler")
    async with client.get(f"http://127.0.0.1:{gw.port}/", headers={"X-Request-ID": "r-1"}) as r:
        assert r.status == 502
    async with client.get(f"http://127.0.0.1:{gw.port}/empty", headers={"X-Request-ID": "r-2"}):
        pass
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "gateway.handler"]
    assert len(lines) == 2, lines
    assert '"status":502' in lines[0] and '"kind":"connect"' in lines[0]
    assert '"service":"svc"' in lines[0] and '"release":"stable"' in lines[0]
    assert f'"upstream":"127.0.0.1:{dead.rsplit(":", 1)[1]}"' in lines[0]
    assert '"request_id":"r-1"' in lines[0]
    assert '"status":503' in lines[1] and '"service":"empty"' in lines[1]
    assert '"request_id":"r-2"' in lines[1]


# -- policy, with plain values ------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "attempts", "retries", "left", "ok"),
    [
        ("connect", 0, 2, None, True),
        ("reset", 1, 2, None, True),
        ("timeout", 1, 2, 0.5, True),
        ("connect", 2, 2, None, False),
        ("connect", 0, 0, None, False),
        ("connect", 0, 2, 0.0, False),
        ("connect", 0, 2, -1.0, False),
        ("protocol", 0, 2, None, False),
        ("client_abort", 0, 2, None, False),
    ],
    ids=[
        "first",
        "second",
        "time-left",
        "limit",
        "off",
        "deadline",
        "past-deadline",
        "protocol",
        "client",
    ],
)
def test_may_retry(kind: str, attempts: int, retries: int, left: float | None, ok: bool) -> None:
    assert may_retry(kind, attempts, retries, left) is ok


@pytest.mark.parametrize(
    ("in_flight", "limit"),
    [(0, BUDGET_MIN), (10, BUDGET_MIN), (15, 3), (20, 4), (100, 20), (1000, 200)],
    ids=["idle", "few", "at-min", "above-min", "hundred", "thousand"],
)
def test_retry_budget_is_a_fifth_of_requests_in_flight(in_flight: int, limit: int) -> None:
    b = RetryBudget()
    assert sum(b.admit(in_flight) for _ in range(limit + 5)) == limit
    b.release()
    assert b.admit(in_flight) and not b.admit(in_flight)


@pytest.mark.parametrize(
    ("times", "expect"),
    [
        ([0.0, 0.1, 0.2], [0, 0, 0]),
        ([0.0, 0.1, 0.2, 0.3, 0.4], [0, 0, 0, None, None]),
        ([0.0, 0.1, 0.2, 0.3, 1.05], [0, 0, 0, None, 1]),
        ([0.0, 0.1, 0.2, 0.3, 0.4, 2.0, 2.1], [0, 0, 0, None, None, 2, 0]),
    ],
    ids=["under", "over", "next-second-says-one", "next-second-says-two"],
)
def test_rate_limited_lines(times: list[float], expect: list[int | None]) -> None:
    lim = RateLimiter(per_second=3)
    assert [lim.allow(("svc", "connect"), t) for t in times] == expect
    assert lim.allow(("svc", "timeout"), times[-1]) == 0  # keys are counted apart


def test_pick_other_never_returns_a_tried_or_ejected_endpoint() -> None:
    eps = tuple(Endpoint(f"10.0.0.{i}", 80) for i in range(4))
    for kind in ("p2c", "round_robin", "hash"):
        pool = Pool(eps, kind, random.Random(5))
        a, b, c, d = pool.slots
        pool.eject(c, 0.0)
        pool.eject(c, 0.0)
        pool.eject(c, 0.0)  # sits out
        for _ in range(50):
            assert pool.pick_other((a,), "key", 1.0) in (b, d)
        assert pool.pick_other((a, b), "key", 1.0) is d
        assert pool.pick_other((a, b, d), "key", 1.0) is None


def _handler(n_endpoints: int, **svc: Any) -> ProxyHandler:
    doc = gateway_config(_svc(*(f"http://10.0.0.{i}:80" for i in range(1, n_endpoints + 1)), **svc))
    cfg = C.build(doc, env={})
    return ProxyHandler(SnapshotHolder(build_snapshot(cfg, rng=random.Random(1))))


def _forward(h: ProxyHandler) -> Forward:
    f = h.handle(RequestHead(b"GET", b"/", [(b"Host", b"x")], "127.0.0.1"))
    assert isinstance(f, Forward)
    return f


def test_handler_moves_to_each_endpoint_once_within_retries() -> None:
    h = _handler(4, retries=2)
    f = _forward(h)
    assert f.retry is not None
    seen = {(f.host, f.port)}
    assert f.retry.again(f, "connect") and f.retry.again(f, "reset")
    seen |= {(f.host, f.port)}
    assert len(seen) == 2 and not f.retry.again(f, "connect")  # retries: 2 used up
    pool = h.holder.current.services["svc"].releases["stable"].pool
    assert sum(s.outstanding for s in pool.slots) == 1  # one request, counted on one endpoint
    f.on_done(200, None)
    assert sum(s.outstanding for s in pool.slots) == 0


def test_handler_retry_budget_caps_concurrent_retries() -> None:
    h = _handler(3, retries=2)
    fwds = [_forward(h) for _ in range(40)]  # 40 in flight: 8 retries may be
    moved = [f for f in fwds if f.retry is not None and f.retry.again(f, "reset")]
    assert len(moved) == 8
    moved[0].on_done(502, "reset")  # a retrying request ends: its token comes back
    extra = _forward(h)  # 40 in flight again
    assert extra.retry is not None and extra.retry.again(extra, "reset")
    assert not fwds[-1].retry.again(fwds[-1], "reset")  # type: ignore[union-attr]


def test_single_endpoint_release_offers_no_failover() -> None:
    assert _forward(_handler(1)).retry is None
    assert _forward(_handler(3, retries=0)).retry is None


@pytest.mark.parametrize(
    ("where", "value", "field"),
    [
        ("svc", -1, "services.svc.retries"),
        ("svc", 11, "services.svc.retries"),
        ("svc", "2", "services.svc.retries"),
        ("svc", True, "services.svc.retries"),
        ("top", 1.5, "retries"),
    ],
    ids=["negative", "too-many", "string", "bool", "top-float"],
)
def test_bad_retries_names_the_field(where: str, value: object, field: str) -> None:
    services = _svc("http://127.0.0.1:1")
    doc = gateway_config(services)
    if where == "svc":
        services["svc"]["retries"] = value
    else:
        doc["retries"] = value
    with pytest.raises(ConfigError) as e:
        C.build(doc, env={})
    assert field in [p for p, _ in e.value.errors]


def test_retries_default_and_inheritance() -> None:
    cfg = C.build(gateway_config(_svc("http://127.0.0.1:1")), env={})
    assert cfg.retries == 2 and cfg.services["svc"].retries == 2
    doc = gateway_config(_svc("http://127.0.0.1:1"), retries=5)
    assert C.build(doc, env={}).services["svc"].retries == 5
    doc = gateway_config(_svc("http://127.0.0.1:1", retries=0), retries=5)
    assert C.build(doc, env={}).services["svc"].retries == 0


@pytest.mark.parametrize(
    ("budget", "field"),
    [
        ({"percent": -1}, "retry_budget.percent"),
        ({"percent": 101}, "retry_budget.percent"),
        ({"percent": "20%"}, "retry_budget.percent"),
        ({"min_concurrent": -3}, "retry_budget.min_concurrent"),
        ({"min_concurrent": 2.5}, "retry_budget.min_concurrent"),
        ({"ratio": 0.2}, "retry_budget.ratio"),
        ("lots", "retry_budget"),
    ],
    ids=["negative", "over-100", "string", "min-negative", "min-float", "unknown", "not-mapping"],
)
def test_bad_retry_budget_names_the_field(budget: object, field: str) -> None:
    doc = gateway_config(_svc("http://127.0.0.1:1"), retry_budget=budget)
    with pytest.raises(ConfigError) as e:
        C.build(doc, env={})
    assert field in [p for p, _ in e.value.errors]


def test_retry_budget_from_config() -> None:
    doc = gateway_config(
        _svc(*(f"http://10.0.0.{i}:80" for i in range(1, 4))),
        retry_budget={"percent": 50, "min_concurrent": 0},
    )
    h = ProxyHandler(SnapshotHolder(build_snapshot(C.build(doc, env={}), rng=random.Random(1))))
    fwds = [_forward(h) for _ in range(10)]  # 10 in flight, 50 %: 5 retries
    assert sum(1 for f in fwds if f.retry is not None and f.retry.again(f, "reset")) == 5


def test_a_refused_connection_moves_on_without_a_budget_token() -> None:
    doc = gateway_config(
        _svc(*(f"http://10.0.0.{i}:80" for i in range(1, 4))),
        retry_budget={"percent": 0, "min_concurrent": 0},  # no budgeted retry at all
    )
    h = ProxyHandler(SnapshotHolder(build_snapshot(C.build(doc, env={}), rng=random.Random(1))))
    sent, refused = _forward(h), _forward(h)
    assert sent.retry is not None and not sent.retry.again(sent, "reset")
    assert sent.retry is not None and not sent.retry.again(sent, "timeout")
    assert refused.retry is not None and refused.retry.again(refused, "connect")
    assert not refused.retry.again(refused, "reset")  # sent on the second try: needs a token
