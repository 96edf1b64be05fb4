"""`upstream.max_connections` and `queue_timeout`: a slow upstream never gets more than the cap.

Both engines, a real gateway in process and a raw upstream on 127.0.0.1 that
counts the sockets it accepts and holds every response until the test lets it go.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import config as C
from gateway.app import Gateway
from gateway.errors import ConfigError
from gateway.upstream_config import engine_limits
from tests.conftest import gateway_config

DEADLINE = 30.0  # generous: the box is shared


class HeldUpstream:
    """A keep-alive HTTP/1.1 upstream that answers only once `go` is set; counts its sockets."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.open = 0
        self.peak = 0
        self.accepted = 0
        self.waiting = 0  # requests read and not yet answered
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            while True:
                try:
                    await r.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.waiting += 1
                await self.go.wait()
                self.waiting -= 1
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await w.drain()
        except ConnectionError:
            return
        finally:
            self.open -= 1
            w.close()

    async def stop(self) -> None:
        self.go.set()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def held() -> AsyncIterator[HeldUpstream]:
    u = HeldUpstream()
    await u.start()
    yield u
    await u.stop()


@pytest.fixture
async def many_clients() -> AsyncIterator[aiohttp.ClientSession]:
    # One connection per concurrent request (no client-side cap), as many clients would.
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        yield s


async def until(cond: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not cond():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # polling a condition with a deadline


def config(port: int, engine: str, upstream: dict[str, Any]) -> dict[str, Any]:
    svcs = {"svc": {"releases": {"stable": {"weight": 1, "upstreams": [f"127.0.0.1:{port}"]}}}}
    return gateway_config(svcs, engine=engine, upstream=upstream)


async def get(s: aiohttp.ClientSession, port: int) -> tuple[int, str]:
    async with s.get(f"http://127.0.0.1:{port}/x") as r:
        return r.status, await r.text()


async def test_a_slow_upstream_gets_at_most_the_cap_and_the_rest_503_after_the_wait(
    engine: str,
    held: HeldUpstream,
    many_clients: aiohttp.ClientSession,
    gateway: Callable[..., Awaitable[Gateway]],
) -> None:
    cap, clients = 3, 12
    gw = await gateway(
        config(held.port, engine, {"max_connections": cap, "queue_timeout": "300ms"})
    )
    assert gw.port is not None
    tasks = [asyncio.create_task(get(many_clients, gw.port)) for _ in range(clients)]
    await until(lambda: held.waiting == cap, f"{cap} requests at the upstream")
    # The rest wait their queue_timeout and are answered 503 while the first ones are held.
    await until(lambda: sum(t.done() for t in tasks) == clients - cap, "the 503s")
    refused = [t.result() for t in tasks if t.done()]
    for status, body in refused:
        assert status == 503, body
        doc = json.loads(body)
        assert doc["error"] == "upstream connection limit" and doc["service"] == "svc", doc
    held.go.set()
    results = await asyncio.gather(*tasks)
    assert sorted(s for s, _ in results) == [200] * cap + [503] * (clients - cap)
    assert held.peak <= cap and held.accepted <= cap, (held.peak, held.accepted)


async def test_waiting_requests_take_connections_as_they_come_free(
    engine: str,
    held: HeldUpstream,
    many_clients: aiohttp.ClientSession,
    gateway: Callable[..., Awaitable[Gateway]],
) -> None:
    cap, clients = 2, 10
    gw = await gateway(config(held.port, engine, {"max_connections": cap, "queue_timeout": "60s"}))
    assert gw.port is not None
    tasks = [asyncio.create_task(get(many_clients, gw.port)) for _ in range(clients)]
    await until(lambda: held.waiting == cap, f"{cap} requests at the upstream")
    held.go.set()
    results = await asyncio.gather(*tasks)
    assert [s for s, _ in results] == [200] * clients, results
    # Kept-alive connections are handed to the waiting requests: no new sockets.
    assert held.peak <= cap and held.accepted <= cap, (held.peak, held.accepted)


async def test_a_service_cap_overrides_the_top_level_one(
    held: HeldUpstream,
    many_clients: aiohttp.ClientSession,
    gateway: Callable[..., Awaitable[Gateway]],
) -> None:
    doc = config(held.port, "fast", {"max_connections": 100, "queue_timeout": "200ms"})
    doc["services"]["svc"]["upstream"] = {"max_connections": 1}
    gw = await gateway(doc)
    assert gw.port is not None
    tasks = [asyncio.create_task(get(many_clients, gw.port)) for _ in range(4)]
    await until(lambda: held.waiting == 1, "one request at the upstream")
    await until(lambda: sum(t.done() for t in tasks) == 3, "the 503s")
    held.go.set()
    results = await asyncio.gather(*tasks)
    assert sorted(s for s, _ in results) == [200, 503, 503, 503]
    assert held.accepted == 1


# --------------------------------------------------------------------------- config

UP = {"releases": {"stable": {"weight": 1, "upstreams": ["127.0.0.1:9"]}}}


def _doc(top: Any = None, per: Any = None) -> dict[str, Any]:
    svc: dict[str, Any] = dict(UP)
    if per is not None:
        svc["upstream"] = per
    d = gateway_config({"svc": svc})
    if top is not None:
        d["upstream"] = top
    return d


BAD = [
    ("zero", _doc({"max_connections": 0}), "upstream.max_connections"),
    ("string", _doc({"max_connections": "10"}), "upstream.max_connections"),
    ("bool", _doc({"max_connections": True}), "upstream.max_connections"),
    ("float", _doc({"max_connections": 2.5}), "upstream.max_connections"),
    ("wait-word", _doc({"queue_timeout": "soon"}), "upstream.queue_timeout"),
    ("wait-negative", _doc({"queue_timeout": -1}), "upstream.queue_timeout"),
    ("unknown", _doc({"max_conns": 3}), "upstream.max_conns"),
    ("not-a-mapping", _doc(5), "upstream"),
    ("service", _doc(per={"max_connections": -3}), "services.svc.upstream.max_connections"),
    ("service-wait", _doc(per={"queue_timeout": "x"}), "services.svc.upstream.queue_timeout"),
]


@pytest.mark.parametrize(("doc", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_limits_are_refused_naming_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        C.build(doc, env={})
    assert field in [p for p, _ in e.value.errors], e.value.errors


GOOD = [
    ("defaults", _doc(), (1024, 1.0), (1024, 1.0)),
    ("top", _doc({"max_connections": 8, "queue_timeout": "250ms"}), (8, 0.25), (8, 0.25)),
    ("no-wait", _doc({"queue_timeout": 0}), (1024, 0.0), (1024, 0.0)),
    ("inherits", _doc({"queue_timeout": "2s"}, {"max_connections": 4}), (1024, 2.0), (4, 2.0)),
]


@pytest.mark.parametrize(("doc", "top", "svc"), [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_limits_per_service_inherit_the_top_level(
    doc: dict[str, Any], top: tuple[int, float], svc: tuple[int, float]
) -> None:
    default, per = engine_limits(C.build(doc, env={}))
    assert default == top and per == {"svc": svc}


def test_gateway_check_exits_2_naming_the_field(tmp_path: Path) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_text(
        "services:\n  user-api:\n"
        "    releases: {stable: {weight: 1, upstreams: ['127.0.0.1:9']}}\n"
        "    upstream: {max_connections: 0}\n",
        encoding="utf-8",
    )
    p = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p
    assert "services.user-api.upstream.max_connections" in p.stdout + p.stderr


async def test_a_reload_applies_new_limits(engine: str, tmp_path: Path) -> None:
    f = tmp_path / "gateway.yaml"
    doc = _doc({"max_connections": 8})
    doc["state"] = {"store": "memory"}
    f.write_text(yaml.safe_dump(doc), encoding="utf-8")
    gw = Gateway(C.load(str(f), env={}), admin=False)
    await gw.start()
    try:
        assert gw.engine.upstream_limits.get("svc") == (8, 1.0)
        doc["upstream"] = {"max_connections": 2, "queue_timeout": "5s"}
        doc["services"]["svc"]["upstream"] = {"queue_timeout": "250ms"}
        f.write_text(yaml.safe_dump(doc), encoding="utf-8")
        assert gw.control.reload().ok
        assert gw.engine.upstream_limits.get("svc") == (2, 0.25)
        assert gw.engine.upstream_limits.default == (2, 5.0)
    finally:
        await gw.stop(1.0)
