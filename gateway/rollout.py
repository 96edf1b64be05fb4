"""The rollout state machine (README "Guard and rollouts") — pure.

Why explicit transitions: `Pending → Progressing ⇄ Paused → Promoted` and
`Progressing|Paused → CircuitBreak → RolledBack` (`confirm`, or by itself
after `rollout.confirm_timeout`) and `CircuitBreak|RolledBack → Progressing`
(`retry`, from step 1), as Argo Rollouts and Flagger operators know them;
every move is a function that returns the new immutable state or raises, so
the admin API can answer 409 on an impossible request and the state persists
as plain JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gateway.errors import BadRequest, Conflict

PENDING = "Pending"
PROGRESSING = "Progressing"
PAUSED = "Paused"
PROMOTED = "Promoted"
CIRCUIT_BREAK = "CircuitBreak"
ROLLED_BACK = "RolledBack"
STATES = (PENDING, PROGRESSING, PAUSED, PROMOTED, CIRCUIT_BREAK, ROLLED_BACK)
ACTIVE = (PROGRESSING, PAUSED)
MAX_STEPS = 100
MAX_PAUSE = 30 * 86400.0  # seconds: a step held longer than 30 days waits for promote instead
MANUAL = "manual"  # a step pause that waits for `promote`
# Who holds a Paused (or Pending) rollout: an operator (None), a guard `pause` rule, an
# analysis `pause` (gateway/analysis_runner.py), a confirm hook, or the progress deadline
# (then only an operator's `resume` continues).
PAUSED_BY = (None, "guard", "analysis", "hook", "deadline")
WAITING_FOR_TRAFFIC = "waiting for traffic"
_FLOAT_MAX = 1.7976931348623157e308


def _finite(v: object) -> bool:
    """A number that is not a bool and fits a finite float (no OverflowError on huge ints)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return -_FLOAT_MAX <= v <= _FLOAT_MAX
    return isinstance(v, float) and v - v == 0.0


@dataclass(frozen=True, slots=True)
class Step:
    weight: float  # percent of traffic for the release
    pause: float | None  # seconds to hold before the next step; None = wait for promote


@dataclass(frozen=True, slots=True)
class Rollout:
    release: str
    steps: tuple[Step, ...]
    state: str = PENDING
    step: int = -1  # index of the step in force
    step_started: float = 0.0
    paused_left: float | None = None  # seconds of the current pause left when paused
    reason: str | None = None
    paused_by: str | None = None  # "guard" when a guard rule paused it (it resumes by itself)
    confirm_by: float | None = None  # CircuitBreak: wall time it confirms itself
    held_since: float | None = None  # Pending/Paused: wall time it started waiting

    def __repr__(self) -> str:
        return f"<Rollout {self.release} {self.state} step={self.step} reason={self.reason!r}>"

    @property
    def weight(self) -> float:
        """Percent of traffic the release should have now."""
        if self.state == PROMOTED:
            return 100.0
        if self.state in (CIRCUIT_BREAK, ROLLED_BACK, PENDING) or self.step < 0:
            return 0.0
        return self.steps[self.step].weight

    def to_json(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "state": self.state,
            "step": self.step,
            "step_started": self.step_started,
            "paused_left": self.paused_left,
            "reason": self.reason,
            "paused_by": self.paused_by,
            "confirm_by": self.confirm_by,
            "held_since": self.held_since,
            "steps": [{"weight": s.weight, "pause": s.pause} for s in self.steps],
            "weight": self.weight,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Rollout:
        """A stored rollout, every field checked: BadRequest naming the field otherwise.

        Why so strict: a stored document is read by every process on every
        change; a value that later breaks `tick` or `weight` (a step index out
        of range, a string where a time belongs) must be refused on reading.
        """
        r = parse_plan(d.get("release"), d.get("steps"))
        state = d.get("state", PENDING)
        if not isinstance(state, str) or state not in STATES:
            raise BadRequest(f"unknown rollout state {state!r}", "state")
        step = d.get("step", -1)
        if not isinstance(step, int) or isinstance(step, bool) or not -1 <= step < len(r.steps):
            raise BadRequest(f"must be an integer between -1 and {len(r.steps) - 1}", "step")
        if step < 0 and state in (*ACTIVE, CIRCUIT_BREAK):
            raise BadRequest(f"a {state} rollout needs a step >= 0", "step")
        started = d.get("step_started", 0.0)
        if not _finite(started):
            raise BadRequest("must be a finite number (seconds since the epoch)", "step_started")
        left = d.get("paused_left")
        if left is not None and not (
            isinstance(left, int | float) and _finite(left) and 0 <= left <= MAX_PAUSE
        ):
            raise BadRequest(f"must be null or seconds between 0 and {MAX_PAUSE:g}", "paused_left")
        reason = d.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise BadRequest("must be null or a string", "reason")
        paused_by = d.get("paused_by")
        if paused_by not in PAUSED_BY:
            raise BadRequest('must be null, "guard", "analysis", "hook" or "deadline"', "paused_by")
        confirm_by = d.get("confirm_by")
        if confirm_by is not None and not _finite(confirm_by):
            raise BadRequest(
                "must be null or a finite number (seconds since the epoch)", "confirm_by"
            )
        held = d.get("held_since")
        if held is not None and not _finite(held):
            raise BadRequest(
                "must be null or a finite number (seconds since the epoch)", "held_since"
            )
        return replace(
            r,
            held_since=None if held is None else float(held),
            state=state,
            step=step,
            step_started=float(started),
            paused_left=None if left is None else float(left),
            reason=reason,
            paused_by=paused_by,
            confirm_by=None if confirm_by is None else float(confirm_by),
        )


def parse_plan(release: object, steps: object) -> Rollout:
    """Validate a step plan `[{weight, pause}]`; errors name the field."""
    if not isinstance(release, str) or not release:
        raise BadRequest("release must be a non-empty string", "release")
    if not isinstance(steps, list) or not steps:
        raise BadRequest("steps must be a non-empty list of {weight, pause}", "steps")
    if len(steps) > MAX_STEPS:
        raise BadRequest(f"at most {MAX_STEPS} steps", "steps")
    out: list[Step] = []
    prev = 0.0
    for i, s in enumerate(steps):
        if not isinstance(s, Mapping):
            raise BadRequest("each step must be an object", f"steps[{i}]")
        w = s.get("weight")
        if not (isinstance(w, int | float) and _finite(w) and 0 <= w <= 100):
            raise BadRequest("weight must be a number between 0 and 100", f"steps[{i}].weight")
        if w < prev:
            raise BadRequest("weights must not decrease", f"steps[{i}].weight")
        prev = float(w)
        p = s.get("pause")
        pause: float | None
        if p is None or p == MANUAL:
            pause = None
        else:
            from gateway.config import parse_duration

            pause = parse_duration(p) if _finite(p) or isinstance(p, str) else None
            if pause is None or not pause <= MAX_PAUSE:
                raise BadRequest(
                    'pause must be a duration such as 5m (at most 30 days), "manual" or null',
                    f"steps[{i}].pause",
                )
        out.append(Step(float(w), pause))
    return Rollout(release, tuple(out))


def check_minimums(r: Rollout, min_first: float, min_later: float) -> None:
    """Refuse steps shorter than `rollout.min_first_pause` / `min_pause` (README "Rollouts").

    Why: a release must be seen under load before it grows; the first step
    and every later non-final step hold at least this long. `manual` (wait
    for `promote`) always passes; the final step may be short.
    """
    last = len(r.steps) - 1
    for i, s in enumerate(r.steps):
        if s.pause is None or (i == last and i > 0):
            continue
        floor = min_first if i == 0 else min_later
        if s.pause < floor:
            which = "the first step" if i == 0 else "a step before the last"
            key = "rollout.min_first_pause" if i == 0 else "rollout.min_pause"
            raise BadRequest(
                f"{which} must pause at least {floor:g}s ({key}), not {s.pause:g}s",
                f"steps[{i}].pause",
            )


def pending(r: Rollout, now: float) -> Rollout:
    """A new plan: Pending until the pre-check passes (`drive`)."""
    return replace(r, state=PENDING, step=-1, held_since=now, reason=None, paused_by=None)


def start(r: Rollout, now: float) -> Rollout:
    if r.state != PENDING:
        raise Conflict(f"rollout is {r.state}; only a Pending rollout starts", "state")
    return replace(
        r, state=PROGRESSING, step=0, step_started=now, held_since=None, reason=None, paused_by=None
    )


def tick(r: Rollout, now: float) -> Rollout:
    """Advance while Progressing and the current step's pause has elapsed.

    A CircuitBreak past its `confirm_by` confirms itself (→ RolledBack).
    """
    if r.state == CIRCUIT_BREAK:
        if r.confirm_by is not None and now >= r.confirm_by:
            return confirm(r, now)
        return r
    if r.state != PROGRESSING:
        return r
    while True:
        s = r.steps[r.step]
        if s.pause is None or now - r.step_started < s.pause:
            return r
        if r.step + 1 >= len(r.steps):
            return replace(r, state=PROMOTED) if s.weight >= 100 else r
        r = replace(r, step=r.step + 1, step_started=r.step_started + s.pause)


def pause(r: Rollout, now: float) -> Rollout:
    if r.state != PROGRESSING:
        raise Conflict(f"rollout is {r.state}; only a Progressing rollout pauses", "state")
    s = r.steps[r.step]
    left = None if s.pause is None else max(0.0, s.pause - (now - r.step_started))
    return replace(r, state=PAUSED, paused_left=left, paused_by=None, held_since=now)


def resume(r: Rollout, now: float) -> Rollout:
    if r.state == PENDING and r.paused_by == "deadline":
        # held by the progress deadline before it started: check again from now
        return replace(r, paused_by=None, reason=None, held_since=now)
    if r.state != PAUSED:
        raise Conflict(f"rollout is {r.state}; only a Paused rollout resumes", "state")
    s = r.steps[r.step]
    started = now if s.pause is None or r.paused_left is None else now - (s.pause - r.paused_left)
    return replace(
        r,
        state=PROGRESSING,
        step_started=started,
        paused_left=None,
        paused_by=None,
        reason=None,
        held_since=None,
    )


def guard_pause(r: Rollout, now: float, reason: str) -> Rollout:
    """A guard `pause` rule: hold at the current step, weights unchanged."""
    return replace(pause(r, now), paused_by="guard", reason=reason)


def guard_resume(r: Rollout, now: float) -> Rollout:
    """The guard's own pause ends once its rules held again; an operator's pause does not."""
    if r.state != PAUSED or r.paused_by != "guard":
        raise Conflict(f"rollout is {r.state} (paused by {r.paused_by}); not the guard's", "state")
    return resume(r, now)


def promote(r: Rollout, now: float) -> Rollout:
    """`promote --full`: skip the remaining steps; the release takes all traffic."""
    if r.state not in (PENDING, *ACTIVE):
        raise Conflict(f"rollout is {r.state}; cannot promote", "state")
    return replace(
        r,
        state=PROMOTED,
        step=len(r.steps) - 1,
        step_started=now,
        paused_left=None,
        paused_by=None,
        reason=None,
        held_since=None,
    )


def promote_step(r: Rollout, now: float) -> Rollout:
    """`promote`: end the current step now (an operator's word overrides every gate).

    Ending the last step, or moving into a final step of weight 100, promotes.
    """
    if r.state not in (PENDING, *ACTIVE):
        raise Conflict(f"rollout is {r.state}; cannot promote", "state")
    nxt = r.step + 1
    if nxt >= len(r.steps) or (nxt == len(r.steps) - 1 and r.steps[nxt].weight >= 100):
        return promote(r, now)
    return replace(
        r,
        state=PROGRESSING,
        step=nxt,
        step_started=now,
        paused_left=None,
        paused_by=None,
        reason=None,
        held_since=None,
    )


def circuit_break(
    r: Rollout, reason: str, now: float = 0.0, confirm_timeout: float | None = None
) -> Rollout:
    """The guard tripped: weight 0; waits for `confirm`, `retry` or `confirm_timeout`."""
    if r.state not in ACTIVE:
        return r
    by = None if confirm_timeout is None else now + confirm_timeout
    return replace(
        r,
        state=CIRCUIT_BREAK,
        reason=reason,
        paused_left=None,
        paused_by=None,
        confirm_by=by,
        held_since=None,
    )


def confirm(r: Rollout, now: float) -> Rollout:
    """An operator (or the confirm timeout) accepts the rollback."""
    if r.state != CIRCUIT_BREAK:
        raise Conflict(f"rollout is {r.state}; only a CircuitBreak is confirmed", "state")
    return replace(r, state=ROLLED_BACK, confirm_by=None)


def retry(r: Rollout, now: float) -> Rollout:
    """Start the same plan again from step 1 with its counters reset."""
    if r.state not in (CIRCUIT_BREAK, ROLLED_BACK):
        raise Conflict(f"rollout is {r.state}; only CircuitBreak or RolledBack retries", "state")
    return replace(
        r,
        state=PROGRESSING,
        step=0,
        step_started=now,
        paused_left=None,
        reason=None,
        paused_by=None,
        confirm_by=None,
        held_since=None,
    )


def rolled_back(r: Rollout) -> Rollout:
    if r.state not in (CIRCUIT_BREAK, *ACTIVE):
        raise Conflict(f"rollout is {r.state}; cannot roll back", "state")
    return replace(r, state=ROLLED_BACK, confirm_by=None)


def abort(r: Rollout, reason: str = "aborted") -> Rollout:
    if r.state not in (PENDING, *ACTIVE):
        raise Conflict(f"rollout is {r.state}; cannot abort", "state")
    return replace(r, state=ROLLED_BACK, reason=reason, paused_by=None, held_since=None)


def weights_for(
    r: Rollout, baseline: str, releases: Sequence[str], current: Mapping[str, float]
) -> dict[str, float]:
    """Weights that give the rollout release `r.weight` % and the baseline the rest."""
    out = {n: (current.get(n, 0.0) if n not in (baseline, r.release) else 0.0) for n in releases}
    others = sum(v for n, v in out.items() if n not in (baseline, r.release))
    w = r.weight
    out[r.release] = w
    out[baseline] = max(0.0, 100.0 - w - others)
    if not any(v > 0 for v in out.values()):
        out[baseline] = 100.0
    return out


# --------------------------------------------------------------------------- driving


@dataclass(frozen=True, slots=True)
class Facts:
    """What the rollout driver observed for one rollout's release just now."""

    healthy: int = 0  # healthy endpoints of the release
    min_endpoints: int = 0  # guard.min_endpoints
    served: int = 0  # requests the release served since its step began (the gateway's count)
    min_requests: int = 0  # guard.min_requests
    breaching: bool = False  # a guard rule is in breach now (not yet acted on)
    analysis: str | None = None  # why analysis holds the step; None: every metric passed
    hooks: str | None = None  # why pre_rollout / step hooks hold; None: all answered 2xx
    confirm_step: str | None = None  # "waiting:<name>" until every confirm_step hook said 2xx
    confirm_promotion: str | None = None  # the same for confirm_promotion


START, STEP, FINISH = "start", "step", "promote"


def next_move(r: Rollout, now: float) -> str | None:
    """What the rollout would do next if every gate opened: start, step, promote or nothing."""
    if r.state == PENDING:
        return None if r.paused_by == "deadline" else START
    if r.state != PROGRESSING:
        return None
    s = r.steps[r.step]
    if s.pause is None or now - r.step_started < s.pause:
        return None
    if r.step + 1 >= len(r.steps):
        return FINISH if s.weight >= 100 else None
    return STEP


def _hold(r: Rollout, reason: str) -> Rollout:
    return r if r.reason == reason else replace(r, reason=reason)


def drive(r: Rollout, now: float, f: Facts) -> Rollout:
    """One driver tick for one rollout (README "Rollouts").

    Pending starts when the pre-check passes (enough healthy endpoints, every
    `pre_rollout` hook 2xx). A step advances only when its pause elapsed, the
    guard holds, the release served `min_requests` in the step, every analysis
    metric had a success and the `step` hooks answered 2xx; a `confirm_*` hook
    that has not said yes holds the rollout Paused with `waiting:<name>`.
    A CircuitBreak past its `confirm_by` confirms itself.
    """
    if r.state == CIRCUIT_BREAK:
        return confirm(r, now) if r.confirm_by is not None and now >= r.confirm_by else r
    if r.state == PAUSED and r.paused_by == "hook":
        waiting = f.confirm_promotion if r.step + 1 >= len(r.steps) else f.confirm_step
        if waiting is not None:
            return _hold(r, waiting)
        r = resume(r, now)
    move = next_move(r, now)
    if move is None:
        return r
    if move == START:
        if f.healthy < f.min_endpoints:
            return _hold(
                r,
                f"pre-check: {f.healthy} healthy endpoint(s) of {r.release}, "
                f"need {f.min_endpoints} (guard.min_endpoints)",
            )
        return _hold(r, f.hooks) if f.hooks is not None else start(r, now)
    if f.breaching:
        return _hold(r, "guard: a rule is in breach")
    if f.served < f.min_requests:
        return _hold(r, WAITING_FOR_TRAFFIC)
    if f.analysis is not None:
        return _hold(r, f.analysis)
    if f.hooks is not None:
        return _hold(r, f.hooks)
    waiting = f.confirm_promotion if move == FINISH else f.confirm_step
    if waiting is not None:
        return replace(pause(r, now), paused_by="hook", reason=waiting)
    if move == FINISH:
        return promote(r, now)
    return replace(r, step=r.step + 1, step_started=now, reason=None)


def overdue(r: Rollout, now: float, deadline: float) -> bool:
    """Pending or Paused longer than `rollout.progress_deadline`, and not acted on yet."""
    return (
        r.state in (PENDING, PAUSED)
        and r.paused_by != "deadline"
        and r.held_since is not None
        and now - r.held_since >= deadline
    )


def miss_deadline(r: Rollout, now: float, action: str, confirm_timeout: float) -> Rollout:
    """`progress_deadline_action`: `pause` holds it for an operator; `rollback` ends it."""
    held = now - (r.held_since if r.held_since is not None else now)
    why = f"progress deadline: {r.state} for {held:.0f}s"
    reason = f"{why} ({r.reason})" if r.reason else why
    if action == "rollback":
        if r.state == PENDING:
            return abort(r, reason)
        return circuit_break(r, reason, now, confirm_timeout)
    return replace(r, paused_by="deadline", reason=reason)
