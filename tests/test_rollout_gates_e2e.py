"""Rollout gates end to end (README "Rollouts"): pre-check, served requests, confirm hooks,
the progress deadline, minimum step durations and `PUT .../baseline`, against a real
in-process gateway with real upstreams and a real hook receiver on 127.0.0.1.

The driver's loop is slowed to once an hour here; each test calls `gw.driver.advance(now)`
with the time it wants the driver to see (the clock is injected, nothing sleeps).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import gateway_config, two_releases

SLOW = 3600.0  # the background driver's interval: only the test's advance() calls act


class Receiver:
    """A hook / alert receiver: records every JSON body; answers `status` (settable)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.got: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.got.append({"path": request.path, **await request.json()})
            self.changed.set()
            return web.json_response({}, status=self.status)

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        return app

    async def wait_for(self, pred: Any, deadline: float = 30.0) -> dict[str, Any]:
        end = time.monotonic() + deadline
        while True:
            for body in self.got:
                if pred(body):
                    return body
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching call within {deadline}s: {self.got}")
            self.changed.clear()
            with __import__("contextlib").suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


async def _post(s: aiohttp.ClientSession, url: str, body: Any = None) -> tuple[int, Any]:
    async with s.post(url, json=body) as r:
        return r.status, await r.json()


async def _put(
    s: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with s.put(url, json=body, headers=headers) as r:
        return r.status, await r.json()


async def _to_gray(s: aiohttp.ClientSession, gw: Any, n: int) -> None:
    """`n` requests the gray release serves (the trusted stage header picks it)."""
    for _ in range(n):
        async with s.get(f"http://127.0.0.1:{gw.port}/", headers={"X-Release-Stage": "gray"}) as r:
            assert r.headers["X-Release-Stage"] == "gray"


async def _advance_until(gw: Any, now: float, pred: Any, deadline: float = 30.0) -> Any:
    """Drive at `now` until the rollout satisfies `pred` (hook answers arrive in the background)."""
    end = time.monotonic() + deadline
    while True:
        await gw.driver.advance(now)
        r = gw.control.rollout_of("svc")
        if pred(r):
            return r
        assert time.monotonic() < end, f"rollout still {r!r}"
        await asyncio.sleep(0.05)  # poll interval of the condition, not a synchronisation


def _fast_limits(**more: Any) -> dict[str, Any]:
    return {"min_first_pause": "1m", "min_pause": "1m", **more}


async def test_pre_check_keeps_a_rollout_pending_while_too_few_endpoints_are_healthy(
    upstreams: Any, gateway: Any
) -> None:
    st, g1, g2 = await upstreams("stable"), await upstreams("gray"), await upstreams("gray")
    services = two_releases(st.url, g1.url, 100, 0)
    services["svc"]["guard"] = {"min_endpoints": 2}
    services["two"] = {
        "match": {"hosts": ["two.local"]},
        "guard": {"min_endpoints": 2},
        "releases": {
            "stable": {"weight": 100, "upstreams": [st.url]},
            "gray": {"weight": 0, "upstreams": [g1.url, g2.url]},
        },
    }
    gw = await gateway(gateway_config(services), rollout_interval=SLOW)
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services"
    plan = {"release": "gray", "steps": [{"weight": 10, "pause": "1h"}, {"weight": 100}]}
    async with aiohttp.ClientSession() as s:
        status, doc = await _post(s, f"{admin}/svc/rollout", plan)
        assert status == 200, doc
        ro = doc["rollout"]
        assert ro["state"] == "Pending" and doc["percent"]["gray"] == 0
        assert ro["reason"].startswith("pre-check: 1 healthy endpoint(s) of gray, need 2")
        for later in (60, 3600):
            await gw.driver.advance(time.time() + later)
            assert gw.control.rollout_of("svc").state == "Pending"  # type: ignore[union-attr]
        # The same plan where gray has two healthy endpoints starts at once.
        status, doc = await _post(s, f"{admin}/two/rollout", plan)
        assert status == 200 and doc["rollout"]["state"] == "Progressing"
        assert doc["percent"]["gray"] == 10
        # The operator can still end it.
        status, doc = await _post(s, f"{admin}/svc/abort")
        assert status == 200 and doc["rollout"]["state"] == "RolledBack"


async def test_a_step_waits_for_min_requests_served_in_it(upstreams: Any, gateway: Any) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"min_requests": 5}
    gw = await gateway(gateway_config(services, rollout=_fast_limits()), rollout_interval=SLOW)
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    plan = {
        "release": "gray",
        "steps": [{"weight": 10, "pause": "1m"}, {"weight": 30, "pause": "1m"}, {"weight": 100}],
    }
    async with aiohttp.ClientSession() as s:
        status, doc = await _post(s, f"{admin}/rollout", plan)
        assert status == 200 and doc["rollout"]["state"] == "Progressing", doc
        start = time.time()
        await _to_gray(s, gw, 4)
        assert await gw.driver.advance(start + 3600) == ["svc"]  # the reason changed
        async with s.get(admin) as r:
            doc = await r.json()
        ro = doc["rollout"]
        assert (ro["step"], ro["reason"], doc["percent"]["gray"]) == (0, "waiting for traffic", 10)
        assert ro["step_started_at"].endswith("Z")
        assert await gw.driver.advance(start + 7200) == []  # still 4 of 5: nothing moves
        await _to_gray(s, gw, 1)
        assert await gw.driver.advance(start + 7200) == ["svc"]
        r2 = gw.control.rollout_of("svc")
        assert r2 is not None and (r2.step, r2.reason, r2.weight) == (1, None, 30)
        # The new step counts afresh: the 5 requests of step 0 do not carry over.
        await gw.driver.advance(start + 3 * 3600)
        r3 = gw.control.rollout_of("svc")
        assert r3 is not None and (r3.step, r3.reason) == (1, "waiting for traffic")
    recs = await gw.auditor.query("svc")
    assert [(r["actor"], r["action"], r["reason"]) for r in recs][:3] == [
        ("anonymous", "rollout.start", None),
        ("rollout", "rollout.wait", "waiting for traffic"),
        ("rollout", "rollout.step", None),
    ]


async def test_confirm_promotion_hook_holds_the_rollout_until_it_answers_2xx(
    upstreams: Any, gateway: Any
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    hook = Receiver(status=403)
    events = Receiver()
    recv, ev = await upstreams(app=hook.app()), await upstreams(app=events.app())
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"min_requests": 1}
    limits = _fast_limits(
        webhooks=[
            {
                "name": "approve",
                "type": "confirm_promotion",
                "url": f"{recv.url}/approve",
                "retries": 0,
                "timeout": "5s",
            },
            {"name": "done", "type": "post_rollout", "url": f"{ev.url}/done", "retries": 0},
            {"name": "log", "type": "event", "url": f"{ev.url}/event", "retries": 0},
        ]
    )
    gw = await gateway(gateway_config(services, rollout=limits), rollout_interval=SLOW)
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    plan = {
        "release": "gray",
        "steps": [{"weight": 20, "pause": "1m"}, {"weight": 100, "pause": 0}],
    }
    async with aiohttp.ClientSession() as s:
        status, doc = await _post(s, f"{admin}/rollout", plan)
        assert status == 200 and doc["rollout"]["state"] == "Progressing", doc
        now = time.time()
        await _to_gray(s, gw, 1)
        assert await gw.driver.advance(now + 61) == ["svc"]
        assert gw.control.rollout_of("svc").step == 1  # type: ignore[union-attr]
        await _to_gray(s, gw, 1)
        # The final step is done: the hook is asked, and its 403 holds the rollout Paused.
        r = await _advance_until(gw, now + 62, lambda r: r.state == "Paused")
        assert (r.paused_by, r.reason) == ("hook", "waiting:approve")
        asked = await hook.wait_for(lambda b: b["type"] == "confirm_promotion")
        assert asked["name"] == "svc" and asked["release"] == "gray"
        assert asked["metadata"]["hook"] == "approve" and asked["phase"] == "Progressing"
        calls = len(hook.got)
        # The driver asks again on its next ticks; still 403: still held.
        r = await _advance_until(gw, now + 63, lambda r: len(hook.got) > calls + 1)
        assert r is not None and r.state == "Paused" and r.reason.startswith("waiting:approve")
        async with s.get(admin) as resp:
            doc = await resp.json()
        assert doc["rollout"]["state"] == "Paused" and doc["percent"]["gray"] == 100
        hook.status = 200
        r = await _advance_until(gw, now + 64, lambda r: r.state == "Promoted")
        assert r.weight == 100
    done = await events.wait_for(lambda b: b["path"] == "/done")
    assert done["type"] == "post_rollout" and done["state"] == "Promoted"
    await events.wait_for(
        lambda b: b["path"] == "/event" and "Promoted" in b["metadata"]["eventMessage"]
    )


async def test_pre_rollout_hook_that_fails_keeps_the_rollout_pending(
    upstreams: Any, gateway: Any
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    hook = Receiver(status=500)
    recv = await upstreams(app=hook.app())
    limits = _fast_limits(
        webhooks=[{"name": "db", "type": "pre_rollout", "url": f"{recv.url}/", "retries": 0}]
    )
    gw = await gateway(
        gateway_config(two_releases(st.url, gr.url, 100, 0), rollout=limits),
        rollout_interval=SLOW,
    )
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    plan = {"release": "gray", "steps": [{"weight": 10, "pause": "1m"}, {"weight": 100}]}
    async with aiohttp.ClientSession() as s:
        status, doc = await _post(s, f"{admin}/rollout", plan)
        assert status == 200 and doc["rollout"]["state"] == "Pending"
        assert doc["rollout"]["reason"] == "waiting:db"
        await hook.wait_for(lambda b: b["type"] == "pre_rollout" and b["phase"] == "Pending")
        r = await _advance_until(gw, time.time(), lambda r: r.reason == "waiting:db (HTTP 500)")
        assert r.state == "Pending" and r.weight == 0
        hook.status = 204
        r = await _advance_until(gw, time.time(), lambda r: r.state == "Progressing")
        assert r.weight == 10


@pytest.mark.parametrize(
    ("action", "state", "gray"),
    [("pause", "Paused", 10), ("rollback", "CircuitBreak", 0)],
    ids=["pause", "rollback"],
)
async def test_progress_deadline_alerts_then_acts(
    upstreams: Any, gateway: Any, action: str, state: str, gray: float
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    alerts = Receiver()
    recv = await upstreams(app=alerts.app())
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"alert_webhook": f"{recv.url}/alert"}
    limits = _fast_limits(progress_deadline="2m", progress_deadline_action=action)
    gw = await gateway(gateway_config(services, rollout=limits), rollout_interval=SLOW)
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    plan = {"release": "gray", "steps": [{"weight": 10, "pause": "1m"}, {"weight": 100}]}
    async with aiohttp.ClientSession() as s:
        assert (await _post(s, f"{admin}/rollout", plan))[0] == 200
        status, doc = await _post(s, f"{admin}/pause")
        assert status == 200 and doc["rollout"]["state"] == "Paused"
        paused_at = time.time()
        assert await gw.driver.advance(paused_at + 119) == []  # not yet 2 minutes
        assert await gw.driver.advance(paused_at + 121) == ["svc"]
        async with s.get(admin) as r:
            doc = await r.json()
        assert doc["rollout"]["state"] == state and doc["percent"]["gray"] == gray
        assert doc["rollout"]["reason"].startswith("progress deadline: Paused for 12")
        assert await gw.driver.advance(paused_at + 1000) == []  # it acts once
        if action == "pause":
            assert doc["rollout"]["paused_by"] == "deadline"
            status, doc = await _post(s, f"{admin}/resume")  # the operator takes it on
            assert status == 200 and doc["rollout"]["state"] == "Progressing"
    alert = await alerts.wait_for(lambda b: b["alert"] == "RolloutProgressDeadline")
    assert alert["service"] == "svc" and alert["release"] == "gray"
    assert alert["action"] == {
        "kind": action,
        "weight": None if action == "pause" else 0,
        "rollout_state": state,
    }
    recs = await gw.auditor.query("svc")
    assert ("rollout", "rollout.progress_deadline") in [(r["actor"], r["action"]) for r in recs]


async def test_short_steps_are_refused_under_the_default_minimums(
    upstreams: Any, gateway: Any
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(gateway_config(two_releases(st.url, gr.url, 100, 0)))
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    async with aiohttp.ClientSession() as s:
        for steps, field in [
            ([{"weight": 5, "pause": "1m"}, {"weight": 100, "pause": 0}], "steps[0].pause"),
            (
                [{"weight": 5, "pause": "5m"}, {"weight": 20, "pause": "14m"}, {"weight": 100}],
                "steps[1].pause",
            ),
            ([{"weight": 5, "pause": "soon"}], "steps[0].pause"),
        ]:
            status, doc = await _post(s, f"{admin}/rollout", {"release": "gray", "steps": steps})
            assert (status, doc["field"]) == (400, field), doc
            assert "rollout.min_" in doc["error"] or field == "steps[0].pause"
            assert gw.holder.current.version == 0 and gw.control.rollout_of("svc") is None
        ok = [{"weight": 5, "pause": "5m"}, {"weight": 20, "pause": "15m"}, {"weight": 100}]
        status, doc = await _post(s, f"{admin}/rollout", {"release": "gray", "steps": ok})
        assert status == 200, doc


async def test_bad_admin_input_is_refused_naming_the_field(upstreams: Any, gateway: Any) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(gateway_config(two_releases(st.url, gr.url, 100, 0)))
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    async with aiohttp.ClientSession() as s:
        cases: list[tuple[str, str, Any, int, str]] = [
            ("PUT", "/baseline", {"baseline": "blue"}, 400, "baseline"),
            ("PUT", "/baseline", {"baseline": 7}, 400, "baseline"),
            ("PUT", "/baseline", {}, 400, "baseline"),
            ("PUT", "/baseline", ["gray"], 400, "body"),
            ("PUT", "/baseline", {"baseline": "gray", "x": 1}, 400, "x"),
            ("POST", "/rollout", {"release": "gray", "steps": [{"weight": 5}], "z": 1}, 400, "z"),
            ("POST", "/promote", {"full": "yes"}, 400, "full"),
            ("POST", "/promote", {"fully": True}, 400, "fully"),
            ("POST", "/promote?full=maybe", None, 400, "full"),
            ("POST", "/promote", None, 409, "state"),  # no rollout to promote
        ]
        for method, path, body, status, field in cases:
            async with s.request(method, admin + path, json=body) as r:
                doc = await r.json()
                assert (r.status, doc["field"]) == (status, field), (method, path, body, doc)
        async with s.put(admin + "/baseline", data=b"{not json") as r:
            assert r.status == 400 and (await r.json())["field"] == "body"
        async with s.put(
            admin + "/baseline", json={"baseline": "gray"}, headers={"If-Match": '"7"'}
        ) as r:
            assert r.status == 409 and (await r.json())["field"] == "If-Match"
        assert gw.holder.current.version == 0


async def test_put_baseline_after_a_promotion_persists_and_routes(
    upstreams: Any, gateway: Any, tmp_path: Any
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    doc_cfg = gateway_config(
        two_releases(st.url, gr.url, 100, 0),
        state={"store": "file", "path": str(tmp_path / "state.json")},
    )
    gw = await gateway(doc_cfg, rollout_interval=SLOW)
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    plan = {"release": "gray", "steps": [{"weight": 10, "pause": "1h"}, {"weight": 100}]}
    async with aiohttp.ClientSession() as s:
        assert (await _post(s, f"{admin}/rollout", plan))[0] == 200
        status, doc = await _put(s, f"{admin}/baseline", {"baseline": "gray"})
        assert (status, doc["field"]) == (409, "state")  # not while it is Progressing
        status, doc = await _post(s, f"{admin}/promote", {"full": True})
        assert status == 200 and doc["rollout"]["state"] == "Promoted"
        version = doc["state_version"]
        status, doc = await _put(
            s, f"{admin}/baseline", {"baseline": "gray"}, {"If-Match": f'"{version}"'}
        )
        assert status == 200 and doc["baseline"] == "gray", doc
        assert doc["state_version"] == version + 1
        # The old stable is now the one a new rollout may bring back; gray, the baseline, not.
        status, doc = await _post(s, f"{admin}/rollout", {**plan, "release": "gray"})
        assert (status, doc["field"]) == (400, "release")
        status, doc = await _post(s, f"{admin}/rollout", {**plan, "release": "stable"})
        assert status == 200 and doc["percent"] == {"stable": 10, "gray": 90}
        status, doc = await _post(s, f"{admin}/abort")
        assert status == 200 and doc["percent"] == {"stable": 0, "gray": 100}
    recs = await gw.auditor.query("svc")
    assert [r["action"] for r in recs if r["action"] == "baseline.set"] == ["baseline.set"]
    await gw.stop(1.0)
    again = await gateway(doc_cfg, rollout_interval=SLOW)  # the file store keeps it
    assert again.holder.current.services["svc"].cfg.baseline == "gray"
    assert again.control.baseline_of("svc") == "gray"


async def test_failing_step_hook_holds_then_rolls_back(upstreams: Any, gateway: Any) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    smoke, notes = Receiver(status=502), Receiver()
    recv, ev = await upstreams(app=smoke.app()), await upstreams(app=notes.app())
    limits = _fast_limits(
        webhooks=[
            {"name": "smoke", "type": "step", "url": f"{recv.url}/smoke", "retries": 0},
            {"name": "undo", "type": "rollback", "url": f"{ev.url}/undo", "retries": 0},
        ]
    )
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"min_requests": 1}
    gw = await gateway(gateway_config(services, rollout=limits), rollout_interval=SLOW)
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    plan = {"release": "gray", "steps": [{"weight": 10, "pause": "1m"}, {"weight": 100}]}
    async with aiohttp.ClientSession() as s:
        assert (await _post(s, f"{admin}/rollout", plan))[0] == 200
        await _to_gray(s, gw, 1)
        now = time.time() + 61  # the pause is over and gray served enough: only the hook holds
        r = await _advance_until(gw, now, lambda r: r.reason == "waiting:smoke (HTTP 502)")
        assert (r.state, r.step) == ("Progressing", 0)
        r = await _advance_until(gw, now, lambda r: r.state == "CircuitBreak")
        assert r.reason == "hook:smoke failed 2 times in a row" and r.weight == 0
    undo = await notes.wait_for(lambda b: b["path"] == "/undo")
    assert undo["type"] == "rollback" and undo["state"] == "CircuitBreak"
    assert [b["step"] for b in smoke.got] == [0, 0]


async def test_an_analysis_gate_holds_the_step_until_it_opens(upstreams: Any, gateway: Any) -> None:
    """The driver asks gateway/analysis.py's `step_gate` (when present) through
    `RolloutDriver.analysis`; here a stand-in says what that gate would."""
    st, gr = await upstreams("stable"), await upstreams("gray")
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"min_requests": 1}
    gw = await gateway(gateway_config(services, rollout=_fast_limits()), rollout_interval=SLOW)
    verdict: dict[str, str | None] = {"why": "waiting for analysis payment-success"}
    asked: list[tuple[str, str, int]] = []

    def gate(service: str, r: Any, now: float) -> str | None:
        asked.append((service, r.release, r.step))
        return verdict["why"]

    gw.driver.analysis = gate
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    plan = {"release": "gray", "steps": [{"weight": 10, "pause": "1m"}, {"weight": 100}]}
    async with aiohttp.ClientSession() as s:
        assert (await _post(s, f"{admin}/rollout", plan))[0] == 200
        await _to_gray(s, gw, 1)
        now = time.time() + 61
        await gw.driver.advance(now)
        r = gw.control.rollout_of("svc")
        assert r is not None and (r.step, r.reason) == (0, "waiting for analysis payment-success")
        verdict["why"] = None
        await gw.driver.advance(now)
        r = gw.control.rollout_of("svc")
        assert r is not None and (r.step, r.weight) == (1, 100)
    assert ("svc", "gray", 0) in asked


async def test_confirm_step_hook_holds_each_step_paused_until_2xx(
    upstreams: Any, gateway: Any
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    gate = Receiver(status=409)
    recv = await upstreams(app=gate.app())
    limits = _fast_limits(
        webhooks=[{"name": "qa", "type": "confirm_step", "url": f"{recv.url}/qa", "retries": 0}]
    )
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"min_requests": 1}
    gw = await gateway(gateway_config(services, rollout=limits), rollout_interval=SLOW)
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    plan = {
        "release": "gray",
        "steps": [{"weight": 10, "pause": "1m"}, {"weight": 40, "pause": "1m"}, {"weight": 100}],
    }
    async with aiohttp.ClientSession() as s:
        assert (await _post(s, f"{admin}/rollout", plan))[0] == 200
        await _to_gray(s, gw, 1)
        now = time.time() + 61
        r = await _advance_until(gw, now, lambda r: r.state == "Paused")
        assert (r.step, r.paused_by, r.reason, r.weight) == (0, "hook", "waiting:qa", 10)
        asked = await gate.wait_for(lambda b: b["type"] == "confirm_step")
        assert (asked["step"], asked["phase"]) == (0, "Progressing")
        gate.status = 200
        r = await _advance_until(gw, now, lambda r: r.step == 1)
        assert (r.state, r.weight, r.reason) == ("Progressing", 40, None)


async def test_two_replicas_driving_one_rollout_move_it_once(
    upstreams: Any, gateway: Any, tmp_path: Any
) -> None:
    """Two gateways on one state file (as replicas): one holds the lease and moves it once."""
    st, gr = await upstreams("stable"), await upstreams("gray")
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"min_requests": 1}
    doc = gateway_config(
        services,
        rollout=_fast_limits(),
        state={"store": "file", "path": str(tmp_path / "state.json")},
    )
    g1 = await gateway(doc, rollout_interval=SLOW)
    g2 = await gateway(doc, rollout_interval=SLOW)
    plan = {"release": "gray", "steps": [{"weight": 10, "pause": "1m"}, {"weight": 100}]}
    async with aiohttp.ClientSession() as s:
        status, body = await _post(
            s, f"http://127.0.0.1:{g1.admin_port}/admin/services/svc/rollout", plan
        )
        assert status == 200, body
        end = time.monotonic() + 30
        while g2.control.rollout_of("svc") is None:  # the file store's poll brings it
            assert time.monotonic() < end
            await asyncio.sleep(0.05)
        r0 = g2.control.rollout_of("svc")
        # Each driver counts its own replica's requests from when it first saw the step.
        assert await g1.driver.advance(time.time()) == []
        assert await g2.driver.advance(time.time()) == []
        await _to_gray(s, g1, 1)
        await _to_gray(s, g2, 1)
        later = time.time() + 61
        moved = await asyncio.gather(g1.driver.advance(later), g2.driver.advance(later))
    assert sorted(moved) == [[], ["svc"]]
    end = time.monotonic() + 30
    while (g1.control.rollout_of("svc") or r0).step != 1:  # the file store's poll brings it
        assert time.monotonic() < end
        await asyncio.sleep(0.05)
    r = g1.control.rollout_of("svc")
    assert r is not None and (r.step, r.weight) == (1, 100)
    steps = [x for x in await g1.auditor.query("svc") if x["action"] == "rollout.step"]
    assert len(steps) == 1, steps
