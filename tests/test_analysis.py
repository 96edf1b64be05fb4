"""Analysis policy (gateway/analysis.py), as tables: one row per semantics rule."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway import analysis as A
from gateway import rollout as R
from gateway.analysis_config import MetricSpec

SPEC = MetricSpec(name="m", query="q", max=0.8)


def _vector(*values: str) -> dict[str, Any]:
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [{"metric": {"i": str(i)}, "value": [1.0, v]} for i, v in enumerate(values)],
        },
    }


@pytest.mark.parametrize(
    ("body", "value", "why"),
    [
        (_vector("0.97"), 0.97, None),
        ({"status": "success", "data": {"resultType": "scalar", "result": [1, "2.5"]}}, 2.5, None),
        (_vector(), None, "empty result"),
        (_vector("1", "2"), None, "2 series"),
        (_vector("NaN"), None, "nan"),
        (_vector("+Inf"), None, "inf"),
        (_vector("-Inf"), None, "inf"),
        (_vector("x"), None, "malformed"),
        ({"status": "error", "errorType": "bad_data", "error": "parse error"}, None, "parse error"),
        ({"status": "success", "data": {"resultType": "matrix", "result": []}}, None, "matrix"),
        ({"status": "success"}, None, "no data"),
        ("not json object", None, "not a json object"),
        (
            {"status": "success", "data": {"resultType": "vector", "result": ["x"]}},
            None,
            "malformed",
        ),
    ],
    ids=[
        "vector-one-series",
        "scalar",
        "empty-inconclusive",
        "two-series-inconclusive",
        "nan-inconclusive",
        "plus-inf-inconclusive",
        "minus-inf-inconclusive",
        "bad-sample",
        "query-error",
        "matrix-refused",
        "no-data",
        "not-an-object",
        "bad-vector-item",
    ],
)
def test_read_response(body: object, value: float | None, why: str | None) -> None:
    got = A.read_response(body)
    assert got.value == value
    if why is None:
        assert got.why is None
    else:
        assert got.why is not None and why in got.why.lower()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30.0, "30s"), (2.0, "2s"), (1.5, "1500ms"), (0.25, "250ms"), (300.0, "300s")],
    ids=["30s", "2s", "fraction", "sub-second", "minutes-as-seconds"],
)
def test_prom_duration(seconds: float, text: str) -> None:
    assert A.prom_duration(seconds) == text


def test_render_fills_every_placeholder() -> None:
    q = 'x{s="{{service}}",r="{{ release }}",b="{{baseline}}"}[{{interval}}]'
    got = A.render(q, service="pay", release="gray", baseline="stable", interval=30)
    assert got == 'x{s="pay",r="gray",b="stable"}[30s]'


def _spec(**kw: Any) -> MetricSpec:
    return replace(MetricSpec(name="m", query="q"), **kw)


def _r(v: float | None) -> A.Reading:
    return A.Reading(v, None if v is not None else "down")


@pytest.mark.parametrize(
    ("spec", "release", "baseline", "result"),
    [
        (_spec(max=0.8), 0.8, None, A.SUCCESS),
        (_spec(max=0.8), 0.8000001, None, A.FAILURE),
        (_spec(min=0.9), 0.9, None, A.SUCCESS),
        (_spec(min=0.9), 0.899, None, A.FAILURE),
        (_spec(compare="baseline", max_drop=0.005), 0.985, 0.99, A.SUCCESS),
        (_spec(compare="baseline", max_drop=0.005), 0.984, 0.99, A.FAILURE),
        (_spec(compare="baseline", max_drop=0.005), 0.995, 0.99, A.SUCCESS),
        (_spec(compare="baseline", max_increase=0.1), 0.6, 0.5, A.SUCCESS),
        (_spec(compare="baseline", max_increase=0.1), 0.61, 0.5, A.FAILURE),
        (_spec(compare="baseline", max_drop=0.005), 0.99, None, A.INCONCLUSIVE),
        (_spec(max=0.8), None, None, A.INCONCLUSIVE),
        (_spec(max=1.0, min=0.5), 0.4, None, A.FAILURE),
    ],
    ids=[
        "max-on-bound-passes",
        "max-above-fails",
        "min-on-bound-passes",
        "min-below-fails",
        "drop-on-bound-passes",
        "drop-beyond-fails",
        "better-than-baseline-passes",
        "increase-on-bound-passes",
        "increase-beyond-fails",
        "no-baseline-inconclusive",
        "no-value-inconclusive",
        "min-and-max",
    ],
)
def test_conditions_are_strict(
    spec: MetricSpec, release: float | None, baseline: float | None, result: str
) -> None:
    base = _r(baseline) if spec.compare else None
    e = A.evaluate(spec, _r(release), base)
    assert e.result == result, e


def test_compare_threshold_is_on_the_release_scale() -> None:
    e = A.evaluate(_spec(compare="baseline", max_drop=0.005), _r(0.97), _r(0.99))
    assert e.threshold == pytest.approx(0.985) and e.baseline_value == 0.99


def _eval(result: str) -> A.Evaluation:
    return A.Evaluation(result, 1.0 if result != A.INCONCLUSIVE else None, None, 0.8)


def _play(spec: MetricSpec, results: str, counted: bool = True) -> tuple[A.MetricRun, list[str]]:
    """Feed results (S/F/I) one by one; the run and the decision after each."""
    run = A.MetricRun()
    out = []
    names = {"S": A.SUCCESS, "F": A.FAILURE, "I": A.INCONCLUSIVE}
    for i, c in enumerate(results):
        run = A.record(run, spec, _eval(names[c]), float(i), counted)
        out.append(A.decide(run, spec, counted))
    return run, out


N, P, RB, AL = A.NOTHING, A.PAUSE, A.ROLLBACK, A.ALERT


@pytest.mark.parametrize(
    ("spec", "results", "decisions"),
    [
        (_spec(failure_limit=2), "FF", [N, RB]),
        (_spec(failure_limit=1), "F", [RB]),
        (_spec(failure_limit=2), "FSF", [N, N, N]),
        (_spec(failure_limit=2), "FIF", [N, N, RB]),
        (_spec(failure_limit=2, action="pause"), "FF", [N, P]),
        (_spec(inconclusive_limit=3), "III", [N, N, P]),
        (_spec(inconclusive_limit=3), "IISII", [N, N, N, N, N]),
        (_spec(inconclusive_limit=2, failure_limit=5), "IFI", [N, N, N]),
        (_spec(failure_limit=2, action="observe"), "FFF", [N, AL, N]),
        (_spec(inconclusive_limit=1, action="observe"), "II", [AL, N]),
        (_spec(failure_limit=2), "FFF", [N, RB, RB]),
    ],
    ids=[
        "two-consecutive-failures-act",
        "failure-limit-1-acts-at-once",
        "a-success-resets",
        "inconclusive-neither-counts-nor-resets",
        "pause-action",
        "inconclusive-limit-pauses",
        "a-success-resets-inconclusives",
        "a-failure-breaks-an-inconclusive-run",
        "observe-alerts-once-per-streak",
        "observe-inconclusive-alerts",
        "limit-reached-keeps-asking",
    ],
)
def test_runs_and_decisions(spec: MetricSpec, results: str, decisions: list[str]) -> None:
    _, got = _play(spec, results)
    assert got == decisions


def test_uncounted_results_are_recorded_but_change_no_count() -> None:
    run, got = _play(_spec(failure_limit=1), "FFI", counted=False)
    assert got == [N, N, N]
    assert run.failed_in_row == 0 and run.inconclusive_in_row == 0 and run.success_at is None
    assert [e["counted"] for e in run.last] == [False, False, False]
    assert run.result == A.INCONCLUSIVE


def test_history_keeps_the_last_ten() -> None:
    run, _ = _play(_spec(failure_limit=1000), "SF" * 8)
    assert len(run.last) == A.HISTORY and run.last[-1]["at"] == 15.0


@pytest.mark.parametrize(
    ("at", "weight_at", "delay", "counts"),
    [(10.0, 0.0, 10.0, True), (9.99, 0.0, 10.0, False), (5.0, 5.0, 0.0, True)],
    ids=["exactly-after-delay", "within-delay", "no-delay"],
)
def test_initial_delay(at: float, weight_at: float, delay: float, counts: bool) -> None:
    assert A.counts(at, weight_at, _spec(initial_delay=delay)) is counts


@pytest.mark.parametrize(
    ("spec", "run", "holding"),
    [
        (_spec(inconclusive_limit=2), A.MetricRun(inconclusive_in_row=2), True),
        (_spec(action="pause", failure_limit=2), A.MetricRun(failed_in_row=2), True),
        (_spec(failure_limit=2), A.MetricRun(failed_in_row=2), False),
        (_spec(action="observe", inconclusive_limit=1), A.MetricRun(inconclusive_in_row=5), False),
        (_spec(), A.MetricRun(), False),
    ],
    ids=["inconclusives", "pause-failures", "rollback-not-a-hold", "observe-never", "clean"],
)
def test_holds(spec: MetricSpec, run: A.MetricRun, holding: bool) -> None:
    assert A.holds(run, spec) is holding


def _results(**metrics: dict[str, Any]) -> dict[str, Any]:
    return {"releases": {"gray": {"metrics": metrics}}}


@pytest.mark.parametrize(
    ("results", "reason"),
    [
        (None, None),
        ({}, None),
        (_results(kpi={"action": "rollback", "success_at": 100.0}), None),
        (_results(kpi={"action": "rollback", "success_at": 99.0}), "waiting for analysis kpi"),
        (_results(kpi={"action": "rollback", "success_at": None}), "waiting for analysis kpi"),
        (_results(kpi={"action": "observe", "success_at": None}), None),
        (
            _results(a={"action": "pause", "success_at": 150.0}, b={"action": "rollback"}),
            "waiting for analysis b",
        ),
        ({"releases": {"gray": "garbage"}}, None),
    ],
    ids=[
        "no-analysis",
        "empty",
        "success-at-step-start",
        "success-before-step",
        "never-succeeded",
        "observe-does-not-hold",
        "every-metric-needs-one",
        "malformed-ignored",
    ],
)
def test_step_gate(results: object, reason: str | None) -> None:
    assert A.step_gate(results, 100.0) == reason


def test_from_json_tolerates_garbage() -> None:
    run = A.MetricRun.from_json(
        {"failed_in_row": -1, "value": "x", "result": "maybe", "last": "no", "counted": 0}
    )
    assert run == replace(A.MetricRun(), counted=True)


PLAN = R.Rollout("gray", (R.Step(10, 5.0), R.Step(50, 5.0), R.Step(100, None)))


@pytest.mark.parametrize(
    ("rollout", "now", "step", "started", "state"),
    [
        (
            replace(PLAN, state=R.PROGRESSING, step=0, step_started=0.0),
            100.0,
            1,
            100.0,
            R.PROGRESSING,
        ),
        (
            replace(PLAN, state=R.PROGRESSING, step=1, step_started=0.0),
            100.0,
            2,
            100.0,
            R.PROGRESSING,
        ),
        (replace(PLAN, state=R.PAUSED, step=0, step_started=0.0), 100.0, 0, 0.0, R.PAUSED),
    ],
    ids=["held-step-advances-one", "to-the-last-step", "paused-stays"],
)
def test_one_step(rollout: R.Rollout, now: float, step: int, started: float, state: str) -> None:
    got = A.one_step(rollout, now)
    assert (got.step, got.step_started, got.state) == (step, started, state)


def test_analysis_pause_and_resume_are_its_own() -> None:
    r = replace(PLAN, state=R.PROGRESSING, step=0, step_started=0.0)
    p = A.analysis_pause(r, 2.0, "analysis: kpi inconclusive")
    assert (p.state, p.paused_by) == (R.PAUSED, "analysis")
    assert R.Rollout.from_json(p.to_json()) == p  # survives the state document
    assert A.analysis_resume(p, 3.0).state == R.PROGRESSING
    with pytest.raises(Exception, match="not analysis"):
        A.analysis_resume(R.pause(r, 2.0), 3.0)


@pytest.mark.parametrize(
    ("results", "required", "reason"),
    [
        (None, ["kpi"], "waiting for analysis kpi"),
        (
            _results(other={"action": "rollback", "success_at": 100.0}),
            ["kpi"],
            "waiting for analysis kpi",
        ),
        (_results(kpi={"action": "rollback", "success_at": 100.0}), ["kpi"], None),
        (None, [], None),
    ],
    ids=["no-results-yet", "metric-not-run-yet", "run-and-passed", "nothing-required"],
)
def test_step_gate_required_metrics(
    results: object, required: list[str], reason: str | None
) -> None:
    assert A.step_gate(results, 100.0, "gray", required) == reason


def test_the_data_path_never_reaches_analysis() -> None:
    """No per-request work: the request path's modules import nothing of the analysis.

    The runner lives in the admin process (gateway/app.py) and only writes the
    state document, once per interval; what a request reads is the snapshot.
    """
    root = Path(A.__file__).resolve().parent
    data_path = [
        root / "handler.py",
        root / "routing.py",
        root / "balancer.py",
        root / "state.py",
        root / "tally.py",
        *sorted((root / "engine").glob("*.py")),
    ]
    analysis_modules = {
        "gateway.analysis",
        "gateway.analysis_runner",
        "gateway.analysis_config",
        "gateway.prometheus",
    }
    for f in data_path:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not analysis_modules & set(names), (f.name, names)
