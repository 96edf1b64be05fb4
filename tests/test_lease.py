"""gateway/lease.py: who acts for a service, and the fleet's count of a step — tables."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import lease as L

ME, OTHER = "a:1:x", "b:2:y"
STEP = ("gray", 1, 3)


def _extra(lease: Any) -> dict[str, Any]:
    return {"analysis": {"lease": lease, "releases": {}}, "rollout": {"keep": True}}


@pytest.mark.parametrize(
    ("stored", "want"),
    [
        ({"owner": ME, "until": 12.5}, L.Lease(ME, 12.5)),
        ({"owner": ME, "until": 12}, L.Lease(ME, 12.0)),
        ({"owner": ME}, None),
        ({"owner": 7, "until": 1}, None),
        ({"owner": ME, "until": True}, None),
        ({"owner": ME, "until": "soon"}, None),
        ("a lease", None),
        (None, None),
    ],
    ids=["float", "int", "no-until", "bad-owner", "bool-until", "str-until", "not-object", "none"],
)
def test_read_accepts_only_a_well_formed_lease(stored: Any, want: L.Lease | None) -> None:
    assert L.read(_extra(stored)) == want
    assert L.read({}) is None and L.read({"analysis": "x"}) is None


@pytest.mark.parametrize(
    ("lease", "now", "other", "due"),
    [
        (None, 100.0, False, True),
        (L.Lease(OTHER, 105.0), 100.0, True, False),
        (L.Lease(OTHER, 100.0), 100.0, False, True),  # ran out exactly now: free
        (L.Lease(OTHER, 90.0), 100.0, False, True),
        (L.Lease(ME, 109.0), 100.0, False, False),  # more than half of 10 s left
        (L.Lease(ME, 104.9), 100.0, False, True),  # less than half: renew
        (L.Lease(ME, 90.0), 100.0, False, True),  # ours but run out: take it again
    ],
    ids=["none", "other-live", "other-just-expired", "other-expired", "mine-fresh", "mine-half",
         "mine-expired"],
)  # fmt: skip
def test_who_may_act_and_when_to_write(
    lease: L.Lease | None, now: float, other: bool, due: bool
) -> None:
    assert L.held_by_other(lease, ME, now) is other
    assert L.renewal_due(lease, ME, now, 10.0) is due


@pytest.mark.parametrize(
    ("configured", "intervals", "want"),
    [(10.0, (), 10.0), (10.0, (1.0, 2.0), 10.0), (10.0, (30.0, 60.0), 90.0), (3.0, (2.0,), 6.0)],
    ids=["no-analysis", "fast-analysis", "slow-analysis", "short-ttl"],
)
def test_ttl_outlives_three_evaluations(
    configured: float, intervals: tuple[float, ...], want: float
) -> None:
    assert L.ttl(configured, intervals) == want


def test_with_lease_keeps_the_rest_of_the_state() -> None:
    extra = _extra({"owner": OTHER, "until": 1})
    out = L.with_lease(extra, ME, 50.0)
    assert out["analysis"] == {"lease": {"owner": ME, "until": 50.0}, "releases": {}}
    assert out["rollout"] == {"keep": True}
    assert extra["analysis"]["lease"] == {"owner": OTHER, "until": 1}  # not changed in place
    assert L.with_lease({}, ME, 5.0) == {"analysis": {"lease": {"owner": ME, "until": 5.0}}}


def test_the_driver_block_round_trips_and_skips_what_it_cannot_read() -> None:
    d = L.Driver(STEP, ("gray", "Progressing", 1), {ME: (STEP, 4), OTHER: (STEP, 7)})
    assert L.driver(L.with_driver({"x": 1}, d)) == d
    raw = {
        "driver": {
            "step": {"release": "gray", "step": "1", "epoch": 3},
            "announced": {"release": "gray", "state": 5, "step": 1},
            "served": {
                ME: {"release": "gray", "step": 1, "epoch": 3, "count": -1},
                OTHER: {"release": "gray", "step": 1, "epoch": 3, "count": 2},
                "c": "many",
            },
        }
    }
    assert L.driver(raw) == L.Driver(None, None, {OTHER: (STEP, 2)})
    assert L.driver({}) == L.Driver() == L.driver({"driver": []})


@pytest.mark.parametrize(
    ("served", "own", "want"),
    [
        ({}, 3, 3),
        ({OTHER: (STEP, 5)}, 3, 8),
        ({OTHER: (STEP, 5), "c": (STEP, 1)}, 0, 6),
        ({OTHER: (("gray", 0, 2), 50)}, 3, 3),  # an earlier step does not count
        ({OTHER: (("gray", 1, 2), 50)}, 3, 3),  # nor the same step of an earlier try
        ({ME: (STEP, 1), OTHER: (STEP, 5)}, 3, 8),  # ours counts live, not as published
    ],
    ids=["alone", "two", "three", "old-step", "old-epoch", "own-live"],
)
def test_fleet_served_sums_the_replicas_of_this_step(
    served: dict[str, tuple[L.StepId, int]], own: int, want: int
) -> None:
    assert L.fleet_served(L.Driver(STEP, None, served), STEP, ME, own) == want


def test_publish_replaces_ours_and_drops_other_steps() -> None:
    d = L.Driver(STEP, None, {ME: (STEP, 1), OTHER: (STEP, 2), "c": (("gray", 0, 2), 9)})
    assert L.publish(d, ME, STEP, 4).served == {OTHER: (STEP, 2), ME: (STEP, 4)}


@pytest.mark.parametrize(
    ("served", "count", "needed", "last", "due"),
    [
        ({}, 3, 10, 0.0, True),
        ({}, 3, 0, 0.0, False),  # nothing to wait for: no writes
        ({}, 3, 10, 98.0, False),  # wrote 2 s ago, the interval is 5 s
        ({ME: (STEP, 3)}, 3, 10, 0.0, False),  # unchanged
        ({ME: (STEP, 2), OTHER: (STEP, 8)}, 3, 10, 0.0, False),  # the fleet has enough
        ({ME: (STEP, 2), OTHER: (STEP, 7)}, 3, 10, 0.0, True),
        ({ME: (("gray", 0, 2), 3)}, 3, 10, 0.0, True),  # stored for an earlier step
    ],
    ids=["first", "none-needed", "too-soon", "unchanged", "enough", "short", "old-step"],
)
def test_publish_due_bounds_the_writes(
    served: dict[str, tuple[L.StepId, int]], count: int, needed: int, last: float, due: bool
) -> None:
    d = L.Driver(STEP, None, served)
    assert L.publish_due(d, ME, STEP, count, needed, last, 100.0, 5.0) is due
