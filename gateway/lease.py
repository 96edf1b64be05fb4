"""One replica acts for a service; the fleet's count of a rollout step — pure.

Why a lease: with several replicas on one state store, exactly one may
evaluate a service's analysis, move its rollout and call its hooks, as Argo
Rollouts and Flagger run one controller per rollout (docs/operations.md
"Several replicas"). The lease is `{owner, until}` at
`extra["analysis"]["lease"]` of the service's state, taken and renewed with
the store's compare-and-set write (Consul: `?cas=<ModifyIndex>`,
https://developer.hashicorp.com/consul/api-docs/kv#cas), so two replicas
can never both believe they took it. A lease nobody renews runs out and the
next replica that needs it takes it over.

The rollout driver's bookkeeping sits beside it at `extra["driver"]`:

- `step`: `{release, step, epoch}`, the step in force as the holder saw it
  begin; `epoch` counts step beginnings, so a retry of step 0 is a new step;
- `announced`: `{release, state, step}`, the last change whose notification
  hooks all finished, so a replica that takes over calls only what is left;
- `served`: per replica, `{release, step, epoch, count}`, the requests its
  release served in that step: the holder sums them for `min_requests`.

Wall clocks are compared across replicas: they must agree within a small
part of the lease's TTL (NTP).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# One step instance of one rollout: (release, step index, epoch).
StepId = tuple[str, int, int]
# (release, state, step) of a rollout as last announced.
Seen = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class Lease:
    owner: str
    until: float  # wall time it runs out unless renewed


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _num(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if f - f == 0.0 else None


def read(extra: Mapping[str, Any]) -> Lease | None:
    """The stored lease of a service's state, or None (absent or malformed)."""
    block = extra.get("analysis")
    raw = block.get("lease") if isinstance(block, Mapping) else None
    if not isinstance(raw, Mapping):
        return None
    owner, until = raw.get("owner"), _num(raw.get("until"))
    if not isinstance(owner, str) or until is None:
        return None
    return Lease(owner, until)


def held_by_other(lease: Lease | None, me: str, now: float) -> bool:
    """Another replica holds a lease that has not run out: this one must not act."""
    return lease is not None and lease.owner != me and lease.until > now


def renewal_due(lease: Lease | None, me: str, now: float, ttl: float) -> bool:
    """Take or renew now: no lease, a lease that ran out, or ours with less than half left."""
    if lease is None or lease.owner != me:
        return not held_by_other(lease, me, now)
    return lease.until - now < ttl / 2


def ttl(configured: float, analysis_intervals: tuple[float, ...] = ()) -> float:
    """The lease's lifetime: `rollout.lease_ttl`, longer when analysis runs less often
    (a lease outlives a few missed evaluations)."""
    return max(configured, 3 * min(analysis_intervals, default=0.0))


def with_lease(extra: Mapping[str, Any], me: str, until: float) -> dict[str, Any]:
    """The state's `extra` with this replica holding the lease until `until`."""
    block = extra.get("analysis")
    block = dict(block) if isinstance(block, Mapping) else {}
    block["lease"] = {"owner": me, "until": until}
    return {**extra, "analysis": block}


# ---------------------------------------------------------------------- driver block


@dataclass(frozen=True, slots=True)
class Driver:
    """The rollout driver's stored bookkeeping for one service (see the module docstring)."""

    step: StepId | None = None
    announced: Seen | None = None
    served: Mapping[str, tuple[StepId, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.step is not None:
            out["step"] = {"release": self.step[0], "step": self.step[1], "epoch": self.step[2]}
        if self.announced is not None:
            r, state, step = self.announced
            out["announced"] = {"release": r, "state": state, "step": step}
        out["served"] = {
            who: {"release": s[0], "step": s[1], "epoch": s[2], "count": n}
            for who, (s, n) in sorted(self.served.items())
        }
        return out


def _step_id(raw: object) -> StepId | None:
    if not isinstance(raw, Mapping):
        return None
    rel, step, epoch = raw.get("release"), _int(raw.get("step")), _int(raw.get("epoch"))
    if not isinstance(rel, str) or step is None or epoch is None:
        return None
    return (rel, step, epoch)


def driver(extra: Mapping[str, Any]) -> Driver:
    """The stored driver block; malformed parts read as absent (a newer or older writer)."""
    raw = extra.get("driver")
    if not isinstance(raw, Mapping):
        return Driver()
    ann = raw.get("announced")
    announced: Seen | None = None
    if isinstance(ann, Mapping):
        r, state, step = ann.get("release"), ann.get("state"), _int(ann.get("step"))
        if isinstance(r, str) and isinstance(state, str) and step is not None:
            announced = (r, state, step)
    served: dict[str, tuple[StepId, int]] = {}
    rs = raw.get("served")
    for who, entry in rs.items() if isinstance(rs, Mapping) else ():
        sid, n = _step_id(entry), _int(entry.get("count")) if isinstance(entry, Mapping) else None
        if isinstance(who, str) and sid is not None and n is not None and n >= 0:
            served[who] = (sid, n)
    return Driver(_step_id(raw.get("step")), announced, served)


def with_driver(extra: Mapping[str, Any], d: Driver) -> dict[str, Any]:
    return {**extra, "driver": d.to_json()}


def fleet_served(d: Driver, step: StepId, me: str, own: int) -> int:
    """Requests the release served in `step` across replicas: ours live, the others' as
    they last published them (a replica that went away still counts what it served)."""
    return own + sum(n for who, (s, n) in d.served.items() if who != me and s == step)


def publish(d: Driver, me: str, step: StepId, count: int) -> Driver:
    """`d` with our count for `step`; entries of other steps are dropped (they are over)."""
    served = {who: e for who, e in d.served.items() if e[0] == step and who != me}
    served[me] = (step, count)
    return Driver(d.step, d.announced, served)


def publish_due(
    d: Driver,
    me: str,
    step: StepId,
    count: int,
    needed: int,
    last_at: float,
    now: float,
    interval: float,
) -> bool:
    """Whether a replica writes its count now: at most every `interval`, only when it
    changed, and only while the step still waits for traffic (the fleet below `needed`)."""
    if needed <= 0 or now - last_at < interval:
        return False
    mine = d.served.get(me)
    if mine is not None and mine == (step, count):
        return False
    stored = sum(n for _, (s, n) in d.served.items() if s == step)
    return stored < needed
