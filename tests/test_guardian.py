"""gateway/guardian.py: the guard loop's decisions, on a fake clock, through a real control plane.

`check()` is called directly (the loop only calls it every `interval`); the
windows are fed as the data path feeds them; time is a variable the test moves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway import config as config_mod
from gateway.control import ControlPlane
from gateway.guardian import Guardian, alert_payload, healthy_endpoints
from gateway.metrics import Metrics
from gateway.state import SnapshotHolder, build_snapshot
from gateway.store.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _raw(**guard: Any) -> dict[str, Any]:
    return {
        "state": {"store": "memory"},
        "admin": {"token_env": None},
        "services": {
            "user-api": {
                "releases": {
                    "stable": {"weight": 90, "upstreams": ["http://127.0.0.1:9001"]},
                    "gray": {"weight": 10, "upstreams": ["http://127.0.0.1:9011"]},
                },
                "guard": {"min_requests": 10, "for": "10s", "window": "60s", **guard},
            }
        },
    }


Setup = tuple[Guardian, ControlPlane, Clock, Metrics]


async def _setup(**guard: Any) -> Setup:
    cfg = config_mod.build(_raw(**guard), env={})
    clock = Clock()
    holder = SnapshotHolder(build_snapshot(cfg))
    cp = ControlPlane(cfg, holder, store=MemoryStore())
    await cp.start(admin=True)
    metrics = Metrics(CollectorRegistry())
    g = Guardian(holder, cp, metrics, clock=clock, wall=clock, health_clock=clock)
    return g, cp, clock, metrics


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    s = await _setup()
    yield s
    await s[0].alerts.stop()
    await s[1].stop()


def _traffic(g: Guardian, clock: Clock, release: str, status: int, n: int = 20) -> None:
    for _ in range(n):
        g.guard.record("user-api", release, status, 0.01, None)


def _trips(m: Metrics, reason: str) -> float:
    v = m.registry.get_sample_value(
        "gateway_guard_trips_total", {"service": "user-api", "release": "gray", "reason": reason}
    )
    return v or 0.0


async def test_a_healthy_release_is_left_alone(setup: Setup) -> None:
    g, cp, clock, _ = setup
    for _ in range(15):
        _traffic(g, clock, "gray", 200)
        _traffic(g, clock, "stable", 200)
        assert await g.check() == []
        clock.now += 1
    assert cp.holder.current.services["user-api"].table.raw["gray"] == 10


async def test_a_breach_acts_only_after_it_held_for_its_for(setup: Setup) -> None:
    g, cp, clock, metrics = setup
    _traffic(g, clock, "stable", 200)
    _traffic(g, clock, "gray", 500)  # error rate 100 % > 1 %
    assert await g.check() == []  # breached, not yet for 10 s
    clock.now += 5
    assert await g.check() == []
    clock.now += 5
    acted = await g.check()
    assert [v.rule.metric for v in acted] == ["error_rate"]
    assert cp.holder.current.services["user-api"].table.raw["gray"] == 0
    r = cp.rollout_of("user-api")
    assert r is not None and r.state == "CircuitBreak"
    assert _trips(metrics, "error_rate") == 1
    # the window was reset and the release is at weight 0: nothing more happens
    clock.now += 30
    assert await g.check() == []
    assert _trips(metrics, "error_rate") == 1


async def test_one_clear_evaluation_restarts_the_hold(setup: Setup) -> None:
    g, cp, clock, _ = setup
    _traffic(g, clock, "gray", 500)  # t=1000: breached
    assert await g.check() == []
    clock.now += 5
    assert await g.check() == []  # held 5 s
    clock.now += 1
    _traffic(g, clock, "gray", 200, n=2000)  # 20 / 2020 < 1 %: clear
    assert await g.check() == []
    clock.now += 1
    _traffic(g, clock, "gray", 500, n=40)  # 60 / 2060 > 1 %: breached again, from now
    assert await g.check() == []
    clock.now += 5  # 12 s since the first breach, 5 s since the second
    assert await g.check() == []
    assert cp.holder.current.services["user-api"].table.raw["gray"] == 10
    clock.now += 5
    assert [v.rule.metric for v in await g.check()] == ["error_rate"]


async def test_too_few_requests_give_no_verdict(setup: Setup) -> None:
    g, cp, clock, _ = setup
    _traffic(g, clock, "gray", 500, n=5)  # min_requests is 10
    for _ in range(3):
        clock.now += 10
        assert await g.check() == []
    assert cp.holder.current.services["user-api"].table.raw["gray"] == 10


async def test_a_disabled_guard_never_acts() -> None:
    g, cp, clock, _ = await _setup(enabled=False)
    try:
        _traffic(g, clock, "gray", 500)
        clock.now += 60
        assert await g.check() == []
        assert cp.holder.current.services["user-api"].table.raw["gray"] == 10
    finally:
        await g.alerts.stop()
        await cp.stop()


async def test_too_few_healthy_endpoints_roll_back() -> None:
    g, cp, clock, _ = await _setup(min_endpoints=2)  # gray has one endpoint
    try:
        assert await g.check() == []
        clock.now += 10
        acted = await g.check()
        assert [v.rule.metric for v in acted] == ["healthy_endpoints"]
        sv = cp.holder.current.services["user-api"]
        assert healthy_endpoints(sv, "gray", clock.now) == 1
        assert sv.table.raw["gray"] == 0
    finally:
        await g.alerts.stop()
        await cp.stop()


def test_the_alert_payload_names_the_action() -> None:
    from gateway import rules

    rule = rules.rules_of(config_mod.build(_raw(), env={}).services["user-api"].guard)[0]
    v = rules.Verdict("user-api", "gray", rule, 0.5, True, 12.0)
    p = alert_payload(v, rules.ROLLBACK, "CircuitBreak", 3, 1000.0)
    assert p["alert"] == "GrayReleaseRolledBack" and p["reason"] == rule.metric
    assert p["action"] == {"kind": "rollback", "weight": 0, "rollout_state": "CircuitBreak"}
    assert (p["value"], p["held_s"], p["state_version"]) == (0.5, 12.0, 3)
