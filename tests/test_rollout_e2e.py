"""Rollouts through the admin API: steps, pause/resume, promote, abort, guard rollback."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from gateway import audit
from gateway.errors import Conflict
from tests.conftest import gateway_config, two_releases

PLAN = {
    "release": "gray",
    "steps": [
        {"weight": 5, "pause": "1h"},
        {"weight": 20, "pause": "1h"},
        {"weight": 100, "pause": 0},
    ],
}


async def _post(s: aiohttp.ClientSession, url: str, body: Any = None) -> tuple[int, Any]:
    async with s.post(url, json=body) as r:
        return r.status, await r.json()


async def test_rollout_steps_pause_resume_promote(upstreams: Any, gateway: Any) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    services = two_releases(st.url, gr.url, 100, 0)
    services["svc"]["guard"] = {"min_requests": 1}
    gw = await gateway(gateway_config(services))
    base = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    async with aiohttp.ClientSession() as s:
        status, doc = await _post(s, f"{base}/rollout", PLAN)
        assert status == 200, doc
        assert doc["rollout"]["state"] == "Progressing" and doc["percent"]["gray"] == 5
        status, doc = await _post(s, f"{base}/rollout", PLAN)
        assert status == 409 and doc["field"] == "state"  # one active rollout at a time
        # The driver steps forward once the pause has elapsed (time passed in, not slept)
        # and gray served min_requests in the step.
        stage = {"X-Release-Stage": "gray"}
        async with s.get(f"http://127.0.0.1:{gw.port}/", headers=stage) as r:
            assert r.headers["X-Release-Stage"] == "gray"
        assert await gw.driver.advance(time.time() + 3600) == ["svc"]
        async with s.get(base) as r:
            doc = await r.json()
        assert doc["rollout"]["step"] == 1 and doc["percent"]["gray"] == 20
        status, doc = await _post(s, f"{base}/pause")
        assert status == 200 and doc["rollout"]["state"] == "Paused"
        assert await gw.driver.advance(time.time() + 600) == []  # paused: no step
        status, doc = await _post(s, f"{base}/resume")
        assert status == 200 and doc["rollout"]["state"] == "Progressing"
        status, doc = await _post(s, f"{base}/promote", {"full": True})
        assert status == 200 and doc["rollout"]["state"] == "Promoted"
        assert doc["percent"] == {"stable": 0, "gray": 100}
        status, doc = await _post(s, f"{base}/pause")
        assert status == 409
        async with s.get(f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": "u"}) as r:
            assert r.headers["X-Release-Stage"] == "gray"
        async with s.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as r:
            assert 'gateway_rollout_state{service="svc",state="Promoted"} 1.0' in await r.text()


async def test_abort_rolls_back_and_bad_plans_change_nothing(upstreams: Any, gateway: Any) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(gateway_config(two_releases(st.url, gr.url, 100, 0)))
    base = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    async with aiohttp.ClientSession() as s:
        for body, field in [
            ({"release": "stable", "steps": [{"weight": 5}]}, "release"),
            ({"release": "blue", "steps": [{"weight": 5}]}, "release"),
            ({"release": "gray", "steps": []}, "steps"),
            ({"release": "gray", "steps": [{"weight": 500}]}, "steps[0].weight"),
        ]:
            version = gw.holder.current.version
            status, doc = await _post(s, f"{base}/rollout", body)
            assert (status, doc["field"]) == (400, field)
            assert gw.holder.current.version == version
        status, doc = await _post(s, f"{base}/abort")
        assert status == 409  # nothing to abort
        for action in ("rollout/confirm", "rollout/retry"):
            status, doc = await _post(s, f"{base}/{action}")
            assert (status, doc["field"]) == (409, "state"), action
            status, doc = await _post(
                s, f"http://127.0.0.1:{gw.admin_port}/admin/services/x/{action}"
            )
            assert (status, doc["field"]) == (404, "service"), action
        status, doc = await _post(s, f"{base}/rollout", PLAN)
        assert status == 200
        status, doc = await _post(s, f"{base}/abort")
        assert status == 200 and doc["rollout"]["state"] == "RolledBack"
        assert doc["percent"]["gray"] == 0
        version = gw.holder.current.version
        status, doc = await _post(s, f"{base}/rollout/confirm")  # abort needs no confirm
        assert (status, doc["field"]) == (409, "state")
        assert gw.holder.current.version == version


async def test_guard_trip_during_rollout_is_circuit_break_until_confirmed(
    upstreams: Any, gateway: Any
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(gateway_config(two_releases(st.url, gr.url, 100, 0)))
    base = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    async with aiohttp.ClientSession() as s:
        await _post(s, f"{base}/rollout", PLAN)
        await gw.control.trip("svc", "gray", "error_rate")
        async with s.get(base) as r:
            doc = await r.json()
        assert doc["rollout"]["state"] == "CircuitBreak"
        assert doc["rollout"]["reason"] == "error_rate"
        assert doc["weights"]["gray"] == 0
        status, doc = await _post(s, f"{base}/rollout/confirm")
        assert status == 200 and doc["rollout"]["state"] == "RolledBack"
        status, doc = await _post(s, f"{base}/rollout/confirm")
        assert status == 409 and doc["field"] == "state"
        status, doc = await _post(s, f"{base}/rollout/retry")
        assert status == 200 and doc["rollout"]["state"] == "Progressing"
        assert doc["rollout"]["step"] == 0 and doc["percent"]["gray"] == 5


async def test_circuit_break_confirms_itself_after_confirm_timeout(
    upstreams: Any, gateway: Any
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    cfg = gateway_config(two_releases(st.url, gr.url, 100, 0), rollout={"confirm_timeout": "10m"})
    gw = await gateway(cfg)
    base = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    async with aiohttp.ClientSession() as s:
        await _post(s, f"{base}/rollout", PLAN)
        now = time.time()
        with audit.acting("guard", "guard", "guard.rollback"):
            await gw.control.trip("svc", "gray", "error_rate", now=now)
        version = gw.holder.current.version
        with pytest.raises(Conflict):  # a second worker's trip of the same release: no-op
            await gw.control.trip("svc", "gray", "error_rate", now=now)
        assert gw.holder.current.version == version
        assert await gw.driver.advance(now + 599) == []  # still waiting for an operator
        assert gw.control.rollout_of("svc").state == "CircuitBreak"  # type: ignore[union-attr]
        assert await gw.driver.advance(now + 600) == ["svc"]
        async with s.get(base) as r:
            doc = await r.json()
    assert doc["rollout"]["state"] == "RolledBack" and doc["weights"]["gray"] == 0
    recs = await gw.auditor.query("svc")
    assert [(r["actor"], r["action"]) for r in recs] == [
        ("anonymous", "rollout.start"),
        ("guard", "guard.rollback"),
        ("rollout", "rollout.confirm_timeout"),
    ]
    assert recs[-1]["after"]["rollout"]["state"] == "RolledBack"
