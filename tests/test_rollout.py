"""The rollout state machine (README "Guard and rollouts")."""

from __future__ import annotations

import pytest

from gateway import rollout as R
from gateway.errors import BadRequest, Conflict

PLAN = [
    {"weight": 1, "pause": "5m"},
    {"weight": 5, "pause": "15m"},
    {"weight": 20, "pause": 60},
    {"weight": 50, "pause": 60},
    {"weight": 100, "pause": 0},
]


def test_steps_advance_on_time_to_promoted() -> None:
    r = R.start(R.parse_plan("gray", PLAN), now=0)
    assert (r.state, r.weight) == (R.PROGRESSING, 1)
    assert R.tick(r, 299).weight == 1
    assert R.tick(r, 300).weight == 5
    assert R.tick(r, 300 + 900).weight == 20
    end = R.tick(r, 300 + 900 + 120)
    assert (end.state, end.weight) == (R.PROMOTED, 100)


def test_pause_freezes_and_resume_keeps_the_remaining_time() -> None:
    r = R.start(R.parse_plan("gray", PLAN), now=0)
    p = R.pause(r, now=100)
    assert p.state == R.PAUSED and p.paused_left == 200
    assert R.tick(p, 10_000).weight == 1  # no progress while paused
    q = R.resume(p, now=1000)
    assert R.tick(q, 1199).weight == 1 and R.tick(q, 1200).weight == 5


def test_circuit_break_then_rolled_back() -> None:
    r = R.start(R.parse_plan("gray", PLAN), now=0)
    cb = R.circuit_break(r, "error_rate")
    assert (cb.state, cb.weight, cb.reason) == (R.CIRCUIT_BREAK, 0, "error_rate")
    assert R.rolled_back(cb).state == R.ROLLED_BACK


@pytest.mark.parametrize(
    ("op", "state"),
    [
        (R.pause, R.PENDING),
        (R.resume, R.PROGRESSING),
        (R.start, R.PROGRESSING),
        (R.promote, R.ROLLED_BACK),
        (R.abort, R.PROMOTED),
    ],
    ids=[
        "pause-pending",
        "resume-progressing",
        "start-twice",
        "promote-rolled-back",
        "abort-promoted",
    ],
)
def test_impossible_transitions_conflict(op: object, state: str) -> None:
    from dataclasses import replace

    r = replace(R.parse_plan("gray", PLAN), state=state, step=0)
    with pytest.raises(Conflict):
        op(r, 0)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("steps", "field"),
    [
        ([], "steps"),
        ([{"weight": 120}], "steps[0].weight"),
        ([{"weight": 5}, {"weight": 1}], "steps[1].weight"),
        ([{"weight": 5, "pause": "soon"}], "steps[0].pause"),
        (["x"], "steps[0]"),
    ],
    ids=["empty", "over-100", "decreasing", "bad-pause", "not-object"],
)
def test_bad_plans_name_the_field(steps: list[object], field: str) -> None:
    with pytest.raises(BadRequest) as e:
        R.parse_plan("gray", steps)
    assert e.value.field == field


def test_weights_for_keeps_other_releases() -> None:
    r = R.start(R.parse_plan("gray", PLAN), now=0)
    w = R.weights_for(R.tick(r, 300), "stable", ["stable", "gray", "batch"], {"batch": 10})
    assert w == {"stable": 85, "gray": 5, "batch": 10}


def test_json_round_trip() -> None:
    r = R.tick(R.start(R.parse_plan("gray", PLAN), now=0), 400)
    assert R.Rollout.from_json(r.to_json()) == r
