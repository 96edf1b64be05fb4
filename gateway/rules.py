"""Guard rules: which figures breach, for how long, and what is due — pure.

Why a hold time (`for`): one bad second is noise, a breach that lasts is a
fault. Every rule remembers since when it has been breached (or clear), on a
clock passed in, and an action is due only once the breach has lasted the
rule's `for`; a guard `pause` ends once every pause rule has been clear as
long (README.md "Guard rules"). The flat thresholds of `guard` are rollback
rules; `min_endpoints` is the rule "healthy endpoints below N".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from gateway.config import GuardConfig
from gateway.guard import WindowStats

PAUSE: Final = "pause"
ROLLBACK: Final = "rollback"
HEALTHY_ENDPOINTS: Final = "healthy_endpoints"


@dataclass(frozen=True, slots=True)
class Rule:
    key: str  # identity of the rule for its hold timer: the flat field or `rules[i]`
    metric: str  # also the `reason` of an action (a closed set: a metric label)
    threshold: float
    action: str
    window: float
    hold: float

    @property
    def below(self) -> bool:
        return self.metric == HEALTHY_ENDPOINTS

    def describe(self, value: float | None) -> str:
        op = "<" if self.below else ">"
        shown = "n/a" if value is None else f"{value:g}"
        return f"{self.metric} {shown} {op} {self.threshold:g} for {self.hold:g}s"


def rules_of(cfg: GuardConfig) -> tuple[Rule, ...]:
    """The flat fields as rollback rules, then `min_endpoints`, then the extra `rules`."""
    out = [
        Rule("error_rate", "error_rate", cfg.error_rate, ROLLBACK, cfg.window, cfg.hold),
        Rule(
            "latency_p95_ms", "latency_p95_ms", cfg.latency_p95_ms, ROLLBACK, cfg.window, cfg.hold
        ),
        Rule(
            "latency_p95_delta_ms",
            "latency_p95_delta_ms",
            cfg.latency_p95_delta_ms,
            ROLLBACK,
            cfg.window,
            cfg.hold,
        ),
    ]
    if cfg.min_endpoints > 0:
        out.append(
            Rule(
                "min_endpoints",
                HEALTHY_ENDPOINTS,
                float(cfg.min_endpoints),
                ROLLBACK,
                cfg.window,
                cfg.hold,
            )
        )
    for i, r in enumerate(cfg.rules):
        out.append(
            Rule(
                f"rules[{i}]",
                r.metric,
                r.threshold,
                r.action,
                r.window if r.window is not None else cfg.window,
                r.hold if r.hold is not None else cfg.hold,
            )
        )
    return tuple(out)


def measure(
    rule: Rule,
    stats: WindowStats,
    baseline: WindowStats | None,
    healthy: int,
    min_requests: int,
) -> float | None:
    """The rule's figure, or None when there is too little traffic to judge."""
    if rule.metric == HEALTHY_ENDPOINTS:
        return float(healthy)
    if stats.requests < min_requests:
        return None
    if rule.metric == "error_rate":
        return stats.error_rate
    if rule.metric == "latency_p95_ms":
        return stats.p95_ms
    if rule.metric == "latency_p99_ms":
        return stats.p99_ms
    if rule.metric == "latency_p95_delta_ms":
        if baseline is None or baseline.requests < min_requests:
            return None
        if stats.p95_ms is None or baseline.p95_ms is None:
            return None
        return stats.p95_ms - baseline.p95_ms
    return None


def breached(rule: Rule, value: float | None) -> bool:
    """Strict comparisons: at the threshold is not a breach; no figure is no breach."""
    if value is None or math.isnan(value):
        return False
    return value < rule.threshold if rule.below else value > rule.threshold


class Holds:
    """Since when each rule has been in its current state (breached or clear)."""

    __slots__ = ("_since",)

    def __init__(self) -> None:
        self._since: dict[tuple[str, str, str], tuple[bool, float]] = {}

    def observe(self, key: tuple[str, str, str], is_breached: bool, now: float) -> float:
        """Seconds the rule has been in `is_breached` state, including this observation."""
        cur = self._since.get(key)
        if cur is None or cur[0] != is_breached:
            cur = (is_breached, now)
            self._since[key] = cur
        return now - cur[1]

    def breached(self, service: str, release: str) -> bool:
        """A rule of the release is in breach now (acted on or not): a rollout step waits."""
        return any(b for k, (b, _) in self._since.items() if k[0] == service and k[1] == release)

    def forget(self, service: str, release: str) -> None:
        for k in [k for k in self._since if k[0] == service and k[1] == release]:
            del self._since[k]


@dataclass(frozen=True, slots=True)
class Verdict:
    service: str
    release: str
    rule: Rule
    value: float | None
    breached: bool
    held: float  # seconds in the current state (breached or clear)

    @property
    def due(self) -> bool:
        """The breach has lasted the rule's `for`: act now."""
        return self.breached and self.held >= self.rule.hold

    @property
    def clear(self) -> bool:
        """The rule has held (no breach) for its `for`."""
        return not self.breached and self.held >= self.rule.hold


def evaluate(
    service: str,
    release: str,
    rules: tuple[Rule, ...],
    stats: Callable[[float], WindowStats],
    baseline: Callable[[float], WindowStats],
    healthy: int,
    min_requests: int,
    holds: Holds,
    now: float,
) -> list[Verdict]:
    """One verdict per rule; `stats(window)` / `baseline(window)` read the guard windows."""
    out = []
    for rule in rules:
        value: float | None
        if rule.metric == HEALTHY_ENDPOINTS:
            value = float(healthy)
        else:
            base = baseline(rule.window) if rule.metric == "latency_p95_delta_ms" else None
            value = measure(rule, stats(rule.window), base, healthy, min_requests)
        b = breached(rule, value)
        held = holds.observe((service, release, rule.key), b, now)
        out.append(Verdict(service, release, rule, value, b, held))
    return out


def first_due(verdicts: list[Verdict], action: str) -> Verdict | None:
    return next((v for v in verdicts if v.due and v.rule.action == action), None)


def pauses_clear(verdicts: list[Verdict]) -> bool:
    """Every pause rule has held again for its `for` (a guard pause may end)."""
    return all(v.clear for v in verdicts if v.rule.action == PAUSE)
