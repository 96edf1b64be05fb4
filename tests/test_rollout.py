"""The rollout state machine (README "Guard and rollouts")."""

from __future__ import annotations

from dataclasses import replace

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


# --------------------------------------------------------------------------- minimums

MIN_FIRST, MIN_LATER = 300.0, 900.0


@pytest.mark.parametrize(
    ("steps", "field"),
    [
        ([{"weight": 5, "pause": "1m"}, {"weight": 100, "pause": 0}], "steps[0].pause"),
        ([{"weight": 5, "pause": 299}], "steps[0].pause"),
        (
            [{"weight": 5, "pause": "5m"}, {"weight": 20, "pause": "10m"}, {"weight": 100}],
            "steps[1].pause",
        ),
        ([{"weight": 5, "pause": "5m"}, {"weight": 20, "pause": "15m"}, {"weight": 100}], None),
        ([{"weight": 5, "pause": "manual"}, {"weight": 20, "pause": None}, {"weight": 100}], None),
        ([{"weight": 5, "pause": "5m"}, {"weight": 100, "pause": 0}], None),  # last may be short
    ],
    ids=["1m-first", "just-under-first", "10m-second", "at-minimums", "manual", "short-last"],
)
def test_minimum_step_durations(steps: list[dict[str, object]], field: str | None) -> None:
    r = R.parse_plan("gray", steps)
    if field is None:
        R.check_minimums(r, MIN_FIRST, MIN_LATER)
        return
    with pytest.raises(BadRequest) as e:
        R.check_minimums(r, MIN_FIRST, MIN_LATER)
    assert e.value.field == field


def test_manual_pause_waits_for_promote_one_step_at_a_time() -> None:
    r = R.start(R.parse_plan("gray", [{"weight": 5, "pause": "manual"}, {"weight": 30}]), 0)
    assert r.steps[0].pause is None and R.next_move(r, 10**9) is None
    one = R.promote_step(r, 10)
    assert (one.state, one.step, one.step_started, one.weight) == (R.PROGRESSING, 1, 10, 30)
    assert R.promote_step(one, 11).state == R.PROMOTED  # ending the last step promotes
    assert R.promote(r, 12).weight == 100  # --full


# --------------------------------------------------------------------------- drive

GO = R.Facts(healthy=3, min_endpoints=1, served=500, min_requests=100)
TWO = [{"weight": 10, "pause": 60}, {"weight": 100, "pause": 0}]


def _progressing(step: int = 0) -> R.Rollout:
    r = R.start(R.parse_plan("gray", TWO), 0)
    return replace(r, step=step) if step else r


@pytest.mark.parametrize(
    ("facts", "now", "state", "step", "reason"),
    [
        (GO, 30, R.PROGRESSING, 0, None),
        (GO, 60, R.PROGRESSING, 1, None),
        (replace(GO, served=99), 60, R.PROGRESSING, 0, R.WAITING_FOR_TRAFFIC),
        (replace(GO, breaching=True), 60, R.PROGRESSING, 0, "guard: a rule is in breach"),
        (
            replace(GO, analysis="analysis: p99 no success yet"),
            60,
            R.PROGRESSING,
            0,
            "analysis: p99 no success yet",
        ),
        (replace(GO, hooks="waiting:smoke"), 60, R.PROGRESSING, 0, "waiting:smoke"),
        (replace(GO, confirm_step="waiting:ok"), 60, R.PAUSED, 0, "waiting:ok"),
        (replace(GO, confirm_promotion="waiting:ok"), 60, R.PROGRESSING, 1, None),
    ],
    ids=[
        "pause-not-elapsed",
        "all-gates-open",
        "few-requests",
        "guard-breach",
        "analysis",
        "step-hook",
        "confirm-step",
        "confirm-promotion-not-asked-for-a-step",
    ],
)
def test_a_step_advances_only_when_every_gate_is_open(
    facts: R.Facts, now: float, state: str, step: int, reason: str | None
) -> None:
    r = R.drive(_progressing(), now, facts)
    assert (r.state, r.step, r.reason) == (state, step, reason)


def test_confirm_promotion_holds_the_last_step_until_the_hook_says_yes() -> None:
    last = replace(_progressing(), step=1, step_started=100)
    held = R.drive(last, 100, replace(GO, confirm_promotion="waiting:approve"))
    assert (held.state, held.paused_by, held.reason) == (R.PAUSED, "hook", "waiting:approve")
    still = R.drive(held, 500, replace(GO, confirm_promotion="waiting:approve"))
    assert still == held
    assert R.drive(held, 501, GO).state == R.PROMOTED


@pytest.mark.parametrize(
    ("facts", "state", "reason_start"),
    [
        (replace(GO, healthy=1, min_endpoints=2), R.PENDING, "pre-check: 1 healthy"),
        (replace(GO, hooks="waiting:db-migrated"), R.PENDING, "waiting:db-migrated"),
        (GO, R.PROGRESSING, None),
    ],
    ids=["too-few-endpoints", "pre-rollout-hook", "passes"],
)
def test_pre_check(facts: R.Facts, state: str, reason_start: str | None) -> None:
    r = R.drive(R.pending(R.parse_plan("gray", TWO), 5), 6, facts)
    assert r.state == state
    assert (r.reason or "").startswith(reason_start or "") and (reason_start or not r.reason)


@pytest.mark.parametrize(
    ("action", "start_state", "state", "weight"),
    [
        ("pause", R.PAUSED, R.PAUSED, 10),
        ("rollback", R.PAUSED, R.CIRCUIT_BREAK, 0),
        ("pause", R.PENDING, R.PENDING, 0),
        ("rollback", R.PENDING, R.ROLLED_BACK, 0),
    ],
    ids=["paused-pause", "paused-rollback", "pending-pause", "pending-rollback"],
)
def test_progress_deadline(action: str, start_state: str, state: str, weight: float) -> None:
    if start_state == R.PAUSED:
        r = R.pause(_progressing(), 10)
    else:
        r = R.pending(R.parse_plan("gray", TWO), 10)
    assert not R.overdue(r, 10 + 1799, 1800)
    assert R.overdue(r, 10 + 1800, 1800)
    nxt = R.miss_deadline(r, 1810, action, 600)
    assert (nxt.state, nxt.weight) == (state, weight)
    assert nxt.reason is not None and nxt.reason.startswith("progress deadline")
    assert not R.overdue(nxt, 10**6, 1800)  # it acts once
    if nxt.state in (R.PAUSED, R.PENDING):
        assert nxt.paused_by == "deadline" and R.drive(nxt, 10**6, GO) == nxt
        assert R.resume(nxt, 2000).paused_by is None  # only an operator continues it


def test_new_fields_round_trip_and_bad_ones_name_the_field() -> None:
    r = R.miss_deadline(R.pause(_progressing(), 10), 2000, "pause", 600)
    assert R.Rollout.from_json(r.to_json()) == r
    for key, bad in [("held_since", "x"), ("paused_by", "me"), ("held_since", float("inf"))]:
        with pytest.raises(BadRequest) as e:
            R.Rollout.from_json({**r.to_json(), key: bad})
        assert e.value.field == key
