"""Analysis policy (README "Progressive delivery") — pure: no I/O, time passed in.

Why pure: what a Prometheus answer means, when a metric fails, and when a
run of results pauses or rolls a release back must agree between replicas
and over restarts, so it is plain functions over plain values, tested with
tables. The semantics are Argo Rollouts' analysis
(https://argo-rollouts.readthedocs.io/en/stable/features/analysis/) where it
and Flagger agree, with these settled choices:

- conditions are strict (`max: 0.8` fails at a value above 0.8);
  `compare: baseline` runs the query for the baseline too and `max_drop` /
  `max_increase` bound release − baseline in the query's own unit;
- an error, a timeout, an empty result, NaN/±Inf or more than one series is
  *inconclusive*: it never rolls back and never lets a step advance;
  `inconclusive_limit` of them in a row pause;
- `failure_limit` *consecutive* failures act; a success resets the count and
  an inconclusive result leaves it as it is;
- an evaluation that started within `initial_delay` of a weight change is
  recorded but does not count;
- `action: observe` records and alerts, and never acts or holds a step.

The per-service results live in the state document (`extra["analysis"]`),
so every replica shows them and `step_gate` reads them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gateway import rollout as rollout_mod
from gateway.analysis_config import PLACEHOLDER_RE, MetricSpec

SUCCESS = "success"
FAILURE = "failure"
INCONCLUSIVE = "inconclusive"
RESULTS = (SUCCESS, FAILURE, INCONCLUSIVE)
HISTORY = 10  # results kept per metric

# What a metric asks for after a result.
NOTHING = "nothing"
PAUSE = "pause"
ROLLBACK = "rollback"
ALERT = "alert"  # an observe metric that reached a limit: an alert, nothing else


def prom_duration(seconds: float) -> str:
    """Seconds as a Prometheus duration (`30s`, `1500ms`) for `{{interval}}`."""
    ms = round(seconds * 1000)
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def render(query: str, *, service: str, release: str, baseline: str, interval: float) -> str:
    """The query with its placeholders filled (unknown ones are refused at config load)."""
    values = {
        "service": service,
        "release": release,
        "baseline": baseline,
        "interval": prom_duration(interval),
    }
    return PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), query)


@dataclass(frozen=True, slots=True)
class Reading:
    """One query's outcome: a finite value, or why it is inconclusive."""

    value: float | None
    why: str | None = None


def _sample(v: object) -> float | None:
    """A sample value `[time, "string"]` as Prometheus encodes it (None when malformed)."""
    if not isinstance(v, list) or len(v) != 2 or not isinstance(v[1], str):
        return None
    try:
        return float(v[1])
    except ValueError:
        return None


def read_response(body: object) -> Reading:
    """An instant query's JSON (Prometheus HTTP API `/api/v1/query`) as one value.

    https://prometheus.io/docs/prometheus/latest/querying/api/#instant-queries
    — `vector` results are a list of `{metric, value: [t, "v"]}`, `scalar`
    ones a bare `[t, "v"]`; values are strings ("NaN", "+Inf" included).
    """
    if not isinstance(body, Mapping):
        return Reading(None, "the answer is not a JSON object")
    if body.get("status") != "success":
        err = body.get("error") or body.get("errorType") or "status is not success"
        return Reading(None, f"query failed: {str(err)[:200]}")
    data = body.get("data")
    if not isinstance(data, Mapping):
        return Reading(None, "the answer has no data")
    kind = data.get("resultType")
    result = data.get("result")
    value: float | None
    if kind == "scalar":
        value = _sample(result)
    elif kind == "vector":
        if not isinstance(result, list):
            return Reading(None, "malformed vector result")
        if not result:
            return Reading(None, "empty result (no series)")
        if len(result) > 1:
            return Reading(None, f"{len(result)} series; the query must return one")
        item = result[0]
        value = _sample(item.get("value")) if isinstance(item, Mapping) else None
    else:
        return Reading(None, f"result type {kind!r}; the query must return a vector or scalar")
    if value is None:
        return Reading(None, "malformed sample value")
    if not math.isfinite(value):
        return Reading(None, f"the value is {value}")
    return Reading(value)


def _slack(b: float, v: float) -> float:
    """Rounding room for a difference: 0.99 - 0.985 is 0.0050000000000000044 in binary floats.

    Without it a drop of exactly `max_drop` (on the bound, which passes) would fail.
    """
    return 1e-9 * max(1.0, abs(b), abs(v))


@dataclass(frozen=True, slots=True)
class Evaluation:
    result: str
    value: float | None  # the release's value
    baseline_value: float | None
    threshold: float | None  # the bound the value was held to (compare: on the release's scale)
    why: str | None = None


def evaluate(spec: MetricSpec, release: Reading, baseline: Reading | None = None) -> Evaluation:
    """A result for one evaluation: the conditions are strict (a value on the bound passes)."""
    if release.value is None:
        return Evaluation(INCONCLUSIVE, None, None, None, release.why)
    v = release.value
    b: float | None = None
    if spec.compare == "baseline":
        if baseline is None or baseline.value is None:
            why = baseline.why if baseline is not None else "no baseline reading"
            return Evaluation(INCONCLUSIVE, v, None, None, f"baseline: {why}")
        b = baseline.value
    failed: list[str] = []
    threshold: float | None = None
    if spec.max is not None:
        threshold = spec.max
        if v > spec.max:
            failed.append(f"{v:g} > max {spec.max:g}")
    if spec.min is not None:
        threshold = spec.min if threshold is None else threshold
        if v < spec.min:
            failed.append(f"{v:g} < min {spec.min:g}")
    if b is not None:
        if spec.max_drop is not None:
            threshold = b - spec.max_drop
            if b - v > spec.max_drop + _slack(b, v):
                failed.append(f"dropped {b - v:g} below the baseline (max_drop {spec.max_drop:g})")
        if spec.max_increase is not None:
            threshold = b + spec.max_increase if spec.max_drop is None else threshold
            if v - b > spec.max_increase + _slack(b, v):
                failed.append(
                    f"rose {v - b:g} above the baseline (max_increase {spec.max_increase:g})"
                )
    if failed:
        return Evaluation(FAILURE, v, b, threshold, "; ".join(failed))
    return Evaluation(SUCCESS, v, b, threshold)


@dataclass(frozen=True, slots=True)
class MetricRun:
    """One metric's run for one release, as stored in the state document."""

    action: str = "rollback"
    value: float | None = None
    baseline_value: float | None = None
    threshold: float | None = None
    result: str | None = None
    why: str | None = None
    at: float | None = None
    counted: bool = True
    failed_in_row: int = 0
    inconclusive_in_row: int = 0
    success_at: float | None = None  # start of the last counted success
    last: tuple[Mapping[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "value": self.value,
            "baseline_value": self.baseline_value,
            "threshold": self.threshold,
            "result": self.result,
            "why": self.why,
            "at": self.at,
            "counted": self.counted,
            "failed_in_row": self.failed_in_row,
            "inconclusive_in_row": self.inconclusive_in_row,
            "success_at": self.success_at,
            "last": [dict(x) for x in self.last],
        }

    @classmethod
    def from_json(cls, d: object) -> MetricRun:
        """A stored run; malformed fields read as their defaults (a run is advisory state)."""
        if not isinstance(d, Mapping):
            return cls()

        def num(k: str) -> float | None:
            v = d.get(k)
            return float(v) if isinstance(v, int | float) and _finite(v) else None

        def count(k: str) -> int:
            v = d.get(k)
            return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

        result = d.get("result")
        why = d.get("why")
        last = d.get("last")
        action = d.get("action")
        return cls(
            action=action if isinstance(action, str) else "rollback",
            value=num("value"),
            baseline_value=num("baseline_value"),
            threshold=num("threshold"),
            result=result if result in RESULTS else None,
            why=why if isinstance(why, str) else None,
            at=num("at"),
            counted=d.get("counted") is not False,
            failed_in_row=count("failed_in_row"),
            inconclusive_in_row=count("inconclusive_in_row"),
            success_at=num("success_at"),
            last=tuple(x for x in last[-HISTORY:] if isinstance(x, Mapping))
            if isinstance(last, list)
            else (),
        )


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def record(run: MetricRun, spec: MetricSpec, e: Evaluation, at: float, counts: bool) -> MetricRun:
    """The run after one evaluation; `counts` is False within `initial_delay` of a weight change."""
    entry = {"at": at, "result": e.result, "value": e.value, "counted": counts}
    run = replace(
        run,
        action=spec.action,
        value=e.value,
        baseline_value=e.baseline_value,
        threshold=e.threshold,
        result=e.result,
        why=e.why,
        at=at,
        counted=counts,
        last=(*run.last, entry)[-HISTORY:],
    )
    if not counts:
        return run
    if e.result == SUCCESS:
        return replace(run, failed_in_row=0, inconclusive_in_row=0, success_at=at)
    if e.result == FAILURE:
        return replace(run, failed_in_row=run.failed_in_row + 1, inconclusive_in_row=0)
    return replace(run, inconclusive_in_row=run.inconclusive_in_row + 1)


def decide(run: MetricRun, spec: MetricSpec, counted: bool) -> str:
    """What the latest result asks for: NOTHING, PAUSE, ROLLBACK or ALERT (observe).

    A limit reached acts at every further result in the streak (the action is
    idempotent: a second rollback or pause finds nothing to do); an observe
    metric alerts once per streak, when it reaches the limit.
    """
    if not counted or run.result is None:
        return NOTHING
    if run.result == FAILURE and run.failed_in_row >= spec.failure_limit:
        if spec.action == "observe":
            return ALERT if run.failed_in_row == spec.failure_limit else NOTHING
        return ROLLBACK if spec.action == "rollback" else PAUSE
    if run.result == INCONCLUSIVE and run.inconclusive_in_row >= spec.inconclusive_limit:
        if spec.action == "observe":
            return ALERT if run.inconclusive_in_row == spec.inconclusive_limit else NOTHING
        return PAUSE
    return NOTHING


def holds(run: MetricRun, spec: MetricSpec) -> bool:
    """Whether this metric still keeps an analysis pause in force."""
    if spec.action == "observe":
        return False
    if run.inconclusive_in_row >= spec.inconclusive_limit:
        return True
    return spec.action == "pause" and run.failed_in_row >= spec.failure_limit


def counts(at: float, weight_at: float, spec: MetricSpec) -> bool:
    """An evaluation counts when it started at least `initial_delay` after the weight change."""
    return at >= weight_at + spec.initial_delay


def step_gate(
    results: object,
    step_started: float,
    release: str | None = None,
    required: Sequence[str] = (),
) -> str | None:
    """Why a rollout step may not advance yet, or None (README "Progressive delivery").

    Every non-observe metric needs a counted success that started in the
    step (at or after `step_started`). `results` is what the analysis runner
    stores in `ServiceState.extra["analysis"]`; without it nothing blocks,
    except that each name in `required` (the configured non-observe metrics)
    must have results for `release` already.
    """
    releases = results.get("releases") if isinstance(results, Mapping) else None
    if not isinstance(releases, Mapping):
        releases = {}
    if required and release is not None:
        mine = releases.get(release)
        have = mine.get("metrics") if isinstance(mine, Mapping) else None
        for name in required:
            if not isinstance(have, Mapping) or name not in have:
                return f"waiting for analysis {name}"
    for rel, block in releases.items():
        if release is not None and rel != release:
            continue
        metrics = block.get("metrics") if isinstance(block, Mapping) else None
        if not isinstance(metrics, Mapping):
            continue
        for name, raw in metrics.items():
            run = MetricRun.from_json(raw)
            if run.action == "observe":
                continue
            if run.success_at is None or run.success_at < step_started:
                return f"waiting for analysis {name}"
    return None


def one_step(r: rollout_mod.Rollout, now: float) -> rollout_mod.Rollout:
    """Advance a Progressing rollout by exactly one step, the next one starting `now`.

    Why: a step held by `step_gate` must not let `tick` catch up on the
    pauses of the steps after it (each step gets its own pause and its own
    analysis success).
    """
    pause = r.steps[r.step].pause
    if r.state != rollout_mod.PROGRESSING or pause is None:
        return r
    nxt = rollout_mod.tick(r, r.step_started + pause)
    if nxt.state == rollout_mod.PROGRESSING and nxt.step != r.step:
        nxt = replace(nxt, step=r.step + 1, step_started=now)
    return nxt


def analysis_pause(r: rollout_mod.Rollout, now: float, reason: str) -> rollout_mod.Rollout:
    """Hold at the current step (weights unchanged) until the analysis succeeds again."""
    return replace(rollout_mod.pause(r, now), paused_by="analysis", reason=reason)


def analysis_resume(r: rollout_mod.Rollout, now: float) -> rollout_mod.Rollout:
    """Only the analysis's own pause ends by itself; an operator's or the guard's does not."""
    if r.state != rollout_mod.PAUSED or r.paused_by != "analysis":
        from gateway.errors import Conflict

        raise Conflict(f"rollout is {r.state} (paused by {r.paused_by}); not analysis's", "state")
    return rollout_mod.resume(r, now)


def view(specs: tuple[MetricSpec, ...], stored: object) -> dict[str, Any] | None:
    """The `analysis` block of `GET /admin/services/{s}`: config and last results per metric."""
    if not specs:
        return None
    block = stored if isinstance(stored, Mapping) else {}
    lease = block.get("lease")
    releases = block.get("releases")
    out: dict[str, Any] = {}
    for rel, rb in releases.items() if isinstance(releases, Mapping) else ():
        rb = rb if isinstance(rb, Mapping) else {}
        runs = rb.get("metrics")
        runs = runs if isinstance(runs, Mapping) else {}
        out[str(rel)] = {
            "weight_at": rb.get("weight_at") if _finite(rb.get("weight_at")) else None,
            "metrics": {s.name: MetricRun.from_json(runs.get(s.name)).to_json() for s in specs},
        }
    return {
        "evaluator": lease.get("owner") if isinstance(lease, Mapping) else None,
        "metrics": [
            {
                "name": s.name,
                "action": s.action,
                "interval_s": s.interval,
                "initial_delay_s": s.initial_delay,
                "failure_limit": s.failure_limit,
                "inconclusive_limit": s.inconclusive_limit,
                "min_requests": s.min_requests,
                "compare": s.compare,
                "max": s.max,
                "min": s.min,
                "max_drop": s.max_drop,
                "max_increase": s.max_increase,
            }
            for s in specs
        ],
        "releases": out,
    }
