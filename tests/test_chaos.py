"""Chaos: endpoints and the gateway killed under load, on loopback, bounded in time.

Every test here runs the gateway as a process (`python -m gateway run -c FILE`)
and stops what it starts by PID. Select them with `pytest -k chaos`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.store.doc import decode
from tests.conftest import ROOT, GatewayProcess, free_port, run_gateway_process
from tests.test_failover import RawUpstream
from tests.test_process import threaded_app

pytestmark = pytest.mark.slow

RATE = 500  # requests per second offered to the gateway
COUNT = 1500  # three seconds of it
KILL_AT = 500  # the request after which one endpoint is killed


class UpstreamProc:
    """One upstream process (tests/chaos_upstream.py) and the request ids it received."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, arrivals: Path) -> None:
        self.proc = proc
        self.port = port
        self.arrivals = arrivals
        self.url = f"http://127.0.0.1:{port}"

    def received(self) -> set[str]:
        return set(self.arrivals.read_text().split()) if self.arrivals.exists() else set()


@contextmanager
def upstream_processes(tmp: Path, n: int, delay: float) -> Iterator[list[UpstreamProc]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(n):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "tests" / "chaos_upstream.py"),
                        f"u{i}",
                        str(tmp / f"arrivals-{i}"),
                        str(delay),
                    ],
                    stdout=subprocess.PIPE,
                )
            )
        ups = []
        for i, p in enumerate(procs):
            assert p.stdout is not None
            line = p.stdout.readline().decode()  # "PORT n", or "" if it died
            assert line.startswith("PORT "), f"upstream {i} did not start: {line!r}"
            ups.append(UpstreamProc(p, int(line.split()[1]), tmp / f"arrivals-{i}"))
        yield ups
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()


def _doc(urls: list[str], **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "state": {"store": "memory"},
        "drain_timeout": "30s",
        # connect: 3s rides out one dropped SYN (retransmitted after 1 s) on a busy box.
        "timeouts": {"connect": "3s", "read": "10s"},
        # A kill sends every request in flight on that endpoint (a third of them)
        # into failover at once, more than the default 20 % budget allows; the
        # budget has its own tests (tests/test_failover.py), this one is about
        # failover, so retries may be as many as requests in flight.
        "retry_budget": {"percent": 100},
        "services": {"svc": {"releases": {"stable": {"weight": 100, "upstreams": urls}}}},
    }
    doc.update(top)
    return doc


Result = tuple[int, str, str, bool]  # status (-1: client error), body, request id, after kill


async def _paced(
    gw: GatewayProcess, method: str, kill: Callable[[], None], *, body: bytes | None = None
) -> list[Result]:
    """COUNT requests at RATE per second; `kill` runs after request KILL_AT is launched."""
    loop = asyncio.get_running_loop()
    killed = False

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one(i: int, after: bool) -> Result:
            rid = f"req-{i}"
            try:
                async with s.request(
                    method, f"{gw.url}/x", data=body, headers={"X-Request-ID": rid}
                ) as r:
                    return r.status, await r.text(), rid, after
            except (aiohttp.ClientError, OSError) as e:
                return -1, repr(e), rid, after

        tasks = []
        t0 = loop.time()
        for i in range(COUNT):
            due = t0 + i / RATE
            if due > loop.time():
                await asyncio.sleep(due - loop.time())  # pacing the offered load, not a sync
            tasks.append(asyncio.ensure_future(one(i, killed)))
            if i == KILL_AT:
                kill()
                killed = True
        return list(await asyncio.gather(*tasks))


async def _retries(gw: GatewayProcess) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{gw.admin}/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_upstream_retries_total{")
    )


def _kill(up: UpstreamProc) -> Callable[[], None]:
    def do() -> None:
        os.kill(up.proc.pid, signal.SIGKILL)

    return do


def test_chaos_kill_one_of_three_endpoints_under_gets(tmp_path: Path) -> None:
    with upstream_processes(tmp_path, 3, 0.005) as ups:
        with run_gateway_process(tmp_path, _doc([u.url for u in ups])) as gw:
            results = asyncio.run(_paced(gw, "GET", _kill(ups[0])))
            retries = asyncio.run(_retries(gw))
            failed = [(st, body[:200], rid) for st, body, rid, _ in results if st != 200]
            assert failed == []  # inside: a failure prints the gateway's log
        assert ups[0].proc.wait(10) == -signal.SIGKILL
    served_after = {json.loads(b)["pid"] for st, b, _, after in results if after and st == 200}
    assert {ups[1].proc.pid, ups[2].proc.pid} <= served_after  # the survivors took over
    assert ups[0].received()  # the killed endpoint was in rotation before the kill
    assert retries >= 1  # 0 failures because of failover, not because the kill missed


def test_chaos_kill_one_of_three_endpoints_under_posts(tmp_path: Path) -> None:
    with upstream_processes(tmp_path, 3, 0.005) as ups:
        with run_gateway_process(tmp_path, _doc([u.url for u in ups])) as gw:
            results = asyncio.run(_paced(gw, "POST", _kill(ups[0]), body=b"p" * 512))
            failed = [(st, body, rid) for st, body, rid, _ in results if st != 200]
            for st, body, rid in failed:
                # Only a POST already written to the killed endpoint may fail (a POST
                # is never sent twice, RFC 9110 §9.2.2), and then with a clean JSON 502.
                assert st == 502, (st, body, rid)
                doc = json.loads(body)
                assert doc["kind"] == "reset" and doc["service"] == "svc", (doc, rid)
        assert ups[0].proc.wait(10) == -signal.SIGKILL
    # "reset" is reported only for a request written to an upstream connection;
    # one refused at connect moved on. The survivors kept serving after the kill.
    assert ups[0].received()
    assert any(st == 200 and after for st, _, _, after in results)
    assert sum(1 for st, _, _, _ in results if st == 200) == COUNT - len(failed)


def test_chaos_endpoint_that_never_answers_is_a_504_then_ejected(tmp_path: Path) -> None:
    async def run() -> list[tuple[int, dict[str, Any], str | None, float]]:
        silent = await RawUpstream("hang").start()
        try:
            with upstream_processes(tmp_path, 1, 0.0) as ups:
                doc = _doc([ups[0].url], retries=0)
                doc["services"]["svc"]["releases"]["gray"] = {
                    "weight": 0,
                    "upstreams": [silent.url],
                }
                doc["services"]["svc"]["timeouts"] = {"connect": "1s", "read": "500ms"}
                with run_gateway_process(tmp_path, doc) as gw:
                    out = []
                    async with aiohttp.ClientSession() as s:
                        for _ in range(4):
                            t0 = time.monotonic()
                            async with s.get(
                                f"{gw.url}/", headers={"X-Release-Stage": "gray"}
                            ) as r:
                                out.append(
                                    (
                                        r.status,
                                        await r.json(),
                                        r.headers.get("X-Release-Fallback"),
                                        time.monotonic() - t0,
                                    )
                                )
                    return out
        finally:
            await silent.stop()

    out = asyncio.run(run())
    for status, body, _, took in out[:3]:
        assert status == 504 and body["kind"] == "timeout"
        assert took >= 0.45  # answered at the read timeout, not before
    status, body, fallback, _ = out[3]
    # Three timeouts in a row eject the silent endpoint (passive health): the
    # fourth request is served by the baseline and says so.
    assert (status, body["release"], fallback) == (200, "u0", "gray")


@contextmanager
def _held_upstream(expect: int) -> Iterator[tuple[str, threading.Event, Callable[[], None]]]:
    """An upstream that holds every request until released; `all_in` once `expect` arrived."""
    all_in = threading.Event()
    arrived: list[int] = []
    state: dict[str, Any] = {}

    async def on_startup(app: web.Application) -> None:
        state["loop"], state["go"] = asyncio.get_running_loop(), asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        arrived.append(1)
        if len(arrived) >= expect:
            all_in.set()
        await state["go"].wait()
        return web.Response(text="done")

    def release() -> None:  # from the test's thread
        state["loop"].call_soon_threadsafe(state["go"].set)

    app = web.Application()
    app.on_startup.append(on_startup)
    app.router.add_get("/held", held)
    with threaded_app(app) as url:
        try:
            yield url, all_in, release
        finally:
            release()


def _refused(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_chaos_sigterm_with_200_in_flight_completes_them_all(tmp_path: Path) -> None:
    n = 200
    with _held_upstream(n) as (url, all_in, release):
        with run_gateway_process(tmp_path, _doc([url])) as gw:

            async def run() -> tuple[list[int], bool]:
                conn = aiohttp.TCPConnector(limit=0)
                async with aiohttp.ClientSession(connector=conn) as s:

                    async def one() -> int:
                        async with s.get(f"{gw.url}/held") as r:
                            assert await r.text() == "done"
                            return r.status

                    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
                    assert await asyncio.to_thread(all_in.wait, 60)
                    gw.proc.send_signal(signal.SIGTERM)
                    refused = False
                    end = time.monotonic() + 20
                    while not refused and time.monotonic() < end:
                        refused = await asyncio.to_thread(_refused, gw.port)
                    release()  # only now do the 200 answers start to come back
                    return list(await asyncio.gather(*tasks)), refused

            statuses, refused = asyncio.run(run())
            assert gw.proc.wait(30) == 0
    assert statuses == [200] * n
    assert refused, "new connections still accepted while draining"


def test_chaos_kill_gateway_during_admin_writes_keeps_an_acknowledged_state(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.json"
    dead = f"http://127.0.0.1:{free_port()}"
    doc: dict[str, Any] = {
        "state": {"store": "file", "path": str(state)},
        "services": {
            "svc": {
                "releases": {
                    "stable": {"weight": 100, "upstreams": [dead]},
                    "gray": {"weight": 0, "upstreams": [dead]},
                }
            }
        },
    }
    writes, kill_during = 1000, 600

    def weights(k: int) -> dict[str, float]:
        g = k % 97 + 1  # consecutive writes always differ
        return {"stable": float(100 - g), "gray": float(g)}

    async def put(s: aiohttp.ClientSession, gw: GatewayProcess, k: int) -> dict[str, Any]:
        async with s.put(f"{gw.admin}/admin/services/svc/weights", json=weights(k)) as r:
            assert r.status == 200, await r.text()
            got: dict[str, Any] = await r.json()
            return got

    async def hammer(gw: GatewayProcess) -> tuple[int, asyncio.Task[Any]]:
        async with aiohttp.ClientSession() as s:
            acked = 0
            for k in range(1, writes + 1):
                if k == kill_during:
                    task = asyncio.ensure_future(put(s, gw, k))
                    await asyncio.sleep(0)  # let the request start on its way
                    os.kill(gw.proc.pid, signal.SIGKILL)
                    await asyncio.wait([task])
                    return acked, task
                got = await put(s, gw, k)
                assert got["weights"] == weights(k)
                acked = k
        raise AssertionError("never killed")

    with run_gateway_process(tmp_path, doc) as gw:
        acked, task = asyncio.run(hammer(gw))
        assert gw.proc.wait(10) == -signal.SIGKILL
    assert acked == kill_during - 1
    if not task.cancelled():
        task.exception()  # the in-flight write may have failed with the process: that is fine

    stored = decode(state.read_bytes(), str(state))  # valid, checksum and all
    assert stored is not None

    async def after(gw: GatewayProcess) -> dict[str, float]:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{gw.admin}/admin/services/svc") as r:
                body: dict[str, Any] = await r.json()
                w: dict[str, float] = body["weights"]
                return w

    with run_gateway_process(tmp_path, doc) as gw:
        now = asyncio.run(after(gw))
    assert now in (weights(acked), weights(kill_during))
