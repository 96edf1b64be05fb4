"""One rollout driver per service across replicas (docs/operations.md "Several replicas").

Three gateways share one state store (the Consul double's KV for in-process
gateways; one state file for real processes) and a hook receiver on 127.0.0.1
counts every call: each hook is called once per event, whichever replica got
the admin command; a holder killed with SIGKILL is replaced within the lease's
TTL and the rollout carries on from its stored step, and a clean stop hands
the lease over at once; a step's `min_requests` (the guard's and an analysis
metric's) is met by the replicas' traffic together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway import lease
from gateway.app import Gateway
from tests.conftest import gateway_config, run_gateway_process, two_releases
from tests.consul_double import ConsulDouble
from tests.polling import until

pytestmark = pytest.mark.timeout(120)

TTL = 3.0  # rollout.lease_ttl in these tests (the shortest allowed)
# A rollout of three steps, two of them paused 1 s: hooks fire on each of its events.
THREE_STEPS = {
    "release": "gray",
    "steps": [
        {"weight": 20, "pause": "1s"},
        {"weight": 50, "pause": "1s"},
        {"weight": 100, "pause": 0},
    ],
}


class Receiver:
    """Hooks land here: every JSON body is kept; `status[path]` answers (default 200)."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.status: dict[str, int] = {}

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.got.append({"path": request.path, **await request.json()})
            return web.json_response({}, status=self.status.get(request.path, 200))

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        return app

    def at(self, path: str) -> list[dict[str, Any]]:
        return [b for b in self.got if b["path"] == path]


def _limits(url: str, *hooks: tuple[str, str], **more: Any) -> dict[str, Any]:
    return {
        "min_first_pause": "0s",
        "min_pause": "0s",
        "lease_ttl": f"{TTL:g}s",
        "publish_interval": "0.5s",
        "webhooks": [
            {"name": name, "type": kind, "url": f"{url}/{name}", "retries": 0, "timeout": "5s"}
            for name, kind in hooks
        ],
        **more,
    }


def _consul_doc(services: dict[str, Any], consul: ConsulDouble, rollout: dict[str, Any]) -> Any:
    return gateway_config(
        services,
        rollout=rollout,
        state={"store": "consul"},
        consul={"address": consul.address, "kv_prefix": "gw/replicas"},
    )


def _state(gw: Gateway) -> Any:
    return gw.control.doc.services.get("svc")


async def test_three_replicas_call_each_hook_once_per_event(upstreams: Any, gateway: Any) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    recv = Receiver()
    up = await upstreams(app=recv.app())
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"enabled": False}  # no traffic needed to step
    rollout = _limits(
        up.url,
        ("pre", "pre_rollout"),
        ("smoke", "step"),
        ("log", "event"),
        ("done", "post_rollout"),
    )
    plan = THREE_STEPS
    async with ConsulDouble(jitter=False) as consul:
        doc = _consul_doc(services, consul, rollout)
        gws = [await gateway(doc) for _ in range(3)]
        async with aiohttp.ClientSession() as s:  # the command reaches the second replica
            url = f"http://127.0.0.1:{gws[1].admin_port}/admin/services/svc/rollout"
            async with s.post(url, json=plan) as r:
                assert r.status == 200, await r.text()

        def promoted_everywhere() -> bool:
            return all(
                getattr(g.control.rollout_of("svc"), "state", None) == "Promoted" for g in gws
            )

        await until(promoted_everywhere, 90)
        # The holder records the promotion once its hook calls finished.
        await until(
            lambda: lease.driver(_state(gws[0]).extra).announced == ("gray", "Promoted", 2), 30
        )
        # More ticks on every replica change nothing: no hook is called again.
        for g in gws:
            await g.driver.advance()
            await g.driver.advance()
        for g in gws:
            await g.driver.hooks.drain()
        holder = lease.read(_state(gws[0]).extra)
        assert holder is not None and holder.owner in {g.driver.owner for g in gws}
        recs = await gws[2].auditor.query("svc")  # the audit is shared: one record per move
    events = [b["metadata"]["eventMessage"] for b in recv.at("/log")]
    assert events == [
        "gray: - -> Pending at step -1",
        "gray: Pending -> Progressing at step 0",
        "gray: Progressing -> Progressing at step 1",
        "gray: Progressing -> Progressing at step 2",
        "gray: Progressing -> Promoted at step 2",
    ]
    assert [b["phase"] for b in recv.at("/pre")] == ["Pending"]
    assert [b["step"] for b in recv.at("/smoke")] == [0, 1, 2]
    assert [b["state"] for b in recv.at("/done")] == ["Promoted"]
    moves = [
        (r["actor"], r["action"])
        for r in recs
        if r["actor"] == "rollout" and r["action"] != "rollout.wait"  # a reason, not a move
    ]
    assert moves == [
        ("rollout", "rollout.precheck"),
        ("rollout", "rollout.step"),
        ("rollout", "rollout.step"),
        ("rollout", "rollout.step"),
    ], moves


async def test_min_requests_counts_every_replicas_traffic(upstreams: Any, gateway: Any) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"min_requests": 30}
    plan = {"release": "gray", "steps": [{"weight": 20, "pause": "1s"}, {"weight": 100}]}
    async with ConsulDouble(jitter=False) as consul:
        doc = _consul_doc(services, consul, _limits("http://127.0.0.1:9"))
        gws = [await gateway(doc) for _ in range(3)]
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{gws[0].admin_port}/admin/services/svc/rollout"
            async with s.post(url, json=plan) as r:
                assert r.status == 200, await r.text()

            def step_seen() -> bool:
                return all(
                    _state(g) is not None and lease.driver(_state(g).extra).step for g in gws
                )

            await until(step_seen, 30)
            step = lease.driver(_state(gws[0]).extra).step
            assert step is not None
            owners = {g.driver.owner for g in gws}

            def counting() -> bool:  # every replica counts from here on (it published a 0)
                d = lease.driver(_state(gws[0]).extra)
                return {w for w, (s_, _) in d.served.items() if s_ == step} == owners

            await until(counting, 30)

            async def to_gray(g: Gateway, n: int) -> None:
                for _ in range(n):
                    async with s.get(
                        f"http://127.0.0.1:{g.port}/", headers={"X-Release-Stage": "gray"}
                    ) as r:
                        assert r.headers["X-Release-Stage"] == "gray"

            def published() -> int:
                d = lease.driver(_state(gws[0]).extra)
                return sum(n for s_, n in d.served.values() if s_ == step)

            # 12 + 12: every replica published what it served, and the step still waits.
            await to_gray(gws[0], 12)
            await to_gray(gws[1], 12)
            await until(lambda: published() == 24, 30)
            r0 = gws[0].control.rollout_of("svc")
            await until(
                lambda: (gws[0].control.rollout_of("svc") or r0).reason == "waiting for traffic",
                30,
            )
            r0 = gws[0].control.rollout_of("svc")
            assert r0 is not None and (r0.state, r0.step) == ("Progressing", 0)
            # Any replica shows who drives it and the fleet's count so far.
            async with s.get(f"http://127.0.0.1:{gws[2].admin_port}/admin/services/svc") as r:
                shown = (await r.json())["rollout"]["driver"]
            assert shown == {
                "replica": gws[0].driver.owner,  # it took the POST while nobody held it
                "served_in_step": 24,
                "min_requests": 30,
            }
            # The third replica's 12 make 36 >= 30: no replica served 30 on its own.
            await to_gray(gws[2], 12)
            await until(lambda: (gws[1].control.rollout_of("svc") or r0).step == 1, 30)


def _stored(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        doc: dict[str, Any] = json.loads(path.read_text())
        return dict(doc.get("services", {}).get("svc", {}))
    return {}


async def test_a_killed_holder_is_replaced_and_the_rollout_carries_on(
    upstreams: Any, tmp_path: Path
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    recv = Receiver()
    recv.status["/approve"] = 403  # holds the rollout at the end of step 0
    up = await upstreams(app=recv.app())
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"enabled": False}
    state = tmp_path / "state.json"
    doc = gateway_config(
        services,
        rollout=_limits(up.url, ("approve", "confirm_step"), ("log", "event")),
        state={"store": "file", "path": str(state)},
    )
    plan = THREE_STEPS
    with contextlib.ExitStack() as stack:
        procs = []
        for i in range(3):
            (tmp_path / f"r{i}").mkdir()
            procs.append(stack.enter_context(run_gateway_process(tmp_path / f"r{i}", doc)))
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{procs[0].admin}/admin/services/svc/rollout", json=plan) as r:
                assert r.status == 200, await r.text()

            def held() -> bool:
                ro = _stored(state).get("rollout", {})
                why = str(ro.get("reason"))  # then "waiting:approve (HTTP 403)"
                return ro.get("state") == "Paused" and why.startswith("waiting:approve")

            await until(held, 60)
            records: list[dict[str, Any]] = []

            def audited(state: str, step: int, via: Any) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:  # the audit record follows the stored change
                    async with s.get(f"{via.admin}/admin/audit?service=svc") as r:
                        records[:] = (await r.json())["records"]
                    return any(
                        r["actor"] == "rollout"
                        and (r["after"]["rollout"]["state"], r["after"]["rollout"]["step"])
                        == (state, step)
                        for r in records
                    )

                return check

            await until(audited("Paused", 0, procs[0]), 30)  # recorded before the crash
            owner = lease.read(_stored(state)).owner  # type: ignore[union-attr]
            pid = int(owner.split(":")[1])
            victim = next(p for p in procs if p.proc.pid == pid)
            victim.proc.kill()  # no clean stop: the lease is not handed back
            victim.proc.wait(30)
            killed_at = time.monotonic()
            recv.status["/approve"] = 200

            def taken_over() -> bool:
                got = lease.read(_stored(state))
                return got is not None and got.owner != owner

            await until(taken_over, TTL + 30)
            took = time.monotonic() - killed_at
            await until(lambda: _stored(state).get("rollout", {}).get("state") == "Promoted", 60)
            survivor = next(p for p in procs if p is not victim)
            await until(audited("Promoted", 2, survivor), 30)
            wanted = (
                "-> Progressing at step 0",
                "-> Paused at step 0",
                "-> Progressing at step 1",
                "-> Progressing at step 2",
                "-> Promoted at step 2",
            )

            def announced() -> bool:  # the calls follow the stored change, in the background
                events = [b["metadata"]["eventMessage"] for b in recv.at("/log")]
                return all(any(e.endswith(w) for e in events) for w in wanted)

            # at least once across the failover (docs/operations.md "Several replicas")
            await until(announced, 30)
    assert took < TTL + 30  # within the lease's expiry (and generous CI slack)
    steps = [
        (r["after"]["rollout"]["state"], r["after"]["rollout"]["step"])
        for r in records
        if r["actor"] == "rollout" and r["action"] != "rollout.wait"  # a reason, not a move
    ]
    # Every move once, in order, across the failover: none repeated, none skipped
    # (the POST started step 0 itself: no pre_rollout hook to wait for; each step's end
    # waits Paused for its confirm_step call to answer).
    assert steps == [
        ("Paused", 0),
        ("Progressing", 1),
        ("Paused", 1),
        ("Progressing", 2),
        ("Promoted", 2),
    ], steps


async def test_a_clean_stop_delivers_the_hook_notification_under_way(
    upstreams: Any, tmp_path: Path
) -> None:
    """SIGTERM while the `event` hook is still answering: the call is not cut off."""
    st, gr = await upstreams("stable"), await upstreams("gray")
    arrived: list[str] = []
    answered: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        said = (await request.json())["metadata"]["eventMessage"]
        arrived.append(said)
        await asyncio.sleep(1.0)
        if request.transport is not None and not request.transport.is_closing():
            answered.append(said)  # the gateway still waits for this answer
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/log", slow)
    up = await upstreams(app=app)
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"enabled": False}
    doc = gateway_config(services, rollout=_limits(up.url, ("log", "event")))
    plan = {"release": "gray", "steps": [{"weight": 100, "pause": 0}]}
    with run_gateway_process(tmp_path, doc) as gp:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{gp.admin}/admin/services/svc/rollout", json=plan) as r:
                assert r.status == 200, await r.text()
        await until(lambda: any("-> Promoted" in m for m in arrived), 60)
        code = await asyncio.to_thread(gp.stop)  # the receiver answers on this loop meanwhile
    assert code == 0, gp.log.read_text()[-2000:]
    assert any("-> Promoted" in m for m in answered), (arrived, answered)


async def test_a_clean_stop_hands_the_lease_to_another_replica(
    upstreams: Any, gateway: Any
) -> None:
    """With a 10-minute lease only the hand-back at stop lets the other replica drive."""
    st, gr = await upstreams("stable"), await upstreams("gray")
    services = two_releases(st.url, gr.url, 100, 0)
    plan = {"release": "gray", "steps": [{"weight": 20, "pause": "manual"}, {"weight": 100}]}
    async with ConsulDouble(jitter=False) as consul:
        doc = _consul_doc(services, consul, {**_limits("http://127.0.0.1:9"), "lease_ttl": "10m"})
        g1, g2 = await gateway(doc), await gateway(doc)
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{g1.admin_port}/admin/services/svc/rollout"
            async with s.post(url, json=plan) as r:
                assert r.status == 200, await r.text()

        def owner(g: Gateway) -> str | None:
            got = lease.read(_state(g).extra) if _state(g) is not None else None
            return got.owner if got is not None else None

        await until(lambda: owner(g2) == g1.driver.owner, 30)
        await g1.stop(1.0)
        await until(lambda: owner(g2) == g2.driver.owner, 30)
        got = lease.read(_state(g2).extra)
        assert got is not None and got.until > time.time()  # g2 holds it now


async def test_analysis_waits_for_the_fleets_traffic(upstreams: Any, gateway: Any) -> None:
    """An analysis metric's `min_requests` in a rollout step counts every replica too."""
    queries: list[str] = []

    async def query(request: web.Request) -> web.Response:  # a one-series answer, always
        queries.append(str((await request.post()).get("query")))
        result = [{"metric": {}, "value": [0, "0.99"]}]
        return web.json_response(
            {"status": "success", "data": {"resultType": "vector", "result": result}}
        )

    prom_app = web.Application()
    prom_app.router.add_post("/api/v1/query", query)
    prom = await upstreams(app=prom_app)
    st, gr = await upstreams("stable"), await upstreams("gray")
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"enabled": False}
    metric = {
        "name": "kpi",
        "query": 'kpi{release="{{release}}"}',
        "min": 0.95,
        "interval": "1s",
        "initial_delay": "0s",
        "min_requests": 20,
    }
    plan = {"release": "gray", "steps": [{"weight": 20, "pause": "manual"}, {"weight": 100}]}
    async with ConsulDouble(jitter=False) as consul:
        doc = _consul_doc(services, consul, _limits("http://127.0.0.1:9"))
        doc["analysis"] = {
            "prometheus": {"address": prom.url, "timeout": "2s"},
            "metrics": [metric],
        }
        gws = [await gateway(doc) for _ in range(2)]
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{gws[0].admin_port}/admin/services/svc/rollout"
            async with s.post(url, json=plan) as r:
                assert r.status == 200, await r.text()
            step = lease.driver(_state(gws[0]).extra).step
            owners = {g.driver.owner for g in gws}

            def counting() -> bool:  # both replicas count from here on (each published a 0)
                d = lease.driver(_state(gws[0]).extra)
                return {w for w, (s_, _) in d.served.items() if s_ == step} == owners

            await until(counting, 30)
            assert queries == []  # waiting for traffic: no evaluation yet
            for g in gws:  # 12 + 12: neither replica alone reaches 20
                for _ in range(12):
                    async with s.get(
                        f"http://127.0.0.1:{g.port}/", headers={"X-Release-Stage": "gray"}
                    ) as r:
                        assert r.headers["X-Release-Stage"] == "gray"
            await until(lambda: bool(queries), 30)

            def result() -> Any:
                block = gws[1].control.analysis_of("svc") or {}
                return block.get("releases", {}).get("gray", {}).get("metrics", {}).get("kpi", {})

            await until(lambda: result().get("result") == "success", 30)
    assert all('release="gray"' in q for q in queries)
