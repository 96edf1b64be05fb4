"""Guard windows and trip decisions (README "Guard rules"), on a fake clock."""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable

import pytest

from gateway.config import GuardConfig
from gateway.guard import _BOUNDS, Guard, ReleaseWindow, WindowStats, _bucket, is_failure
from gateway.rules import Holds, evaluate, first_due, rules_of
from gateway.tally import Tally

CFG = GuardConfig(
    error_rate=0.01,
    latency_p95_ms=800,
    latency_p95_delta_ms=200,
    window=60,
    min_requests=100,
    hold=0,
    min_endpoints=0,
)


def decide(stats: WindowStats, baseline: WindowStats | None) -> str | None:
    """The first rollback rule due at once (`for: 0s`) for these windows."""
    verdicts = evaluate(
        "svc",
        "gray",
        rules_of(CFG),
        lambda w: stats,
        lambda w: baseline or WindowStats(0, 0, None),
        1,
        CFG.min_requests,
        Holds(),
        0.0,
    )
    v = first_due(verdicts, "rollback")
    return v.rule.metric if v else None


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_window_counts_and_expires() -> None:
    w = ReleaseWindow(10)
    for i in range(100):
        w.record(1000 + i * 0.05, 0.010, failed=i % 10 == 0)
    s = w.stats(1005)
    assert (s.requests, s.failures) == (100, 10)
    assert s.p95_ms is not None and 9 <= s.p95_ms <= 11.5
    assert w.stats(1020).requests == 0  # all outside the 10 s window


@pytest.mark.parametrize(
    ("latencies", "p95"),
    [([0.1] * 95 + [2.0] * 5, 100), ([0.1] * 90 + [2.0] * 10, 2000), ([0.5] * 100, 500)],
    ids=["tail-below-p95", "tail-at-p95", "flat"],
)
def test_p95_estimate_within_ten_percent(latencies: list[float], p95: float) -> None:
    w = ReleaseWindow(60)
    for x in latencies:
        w.record(1000, x, False)
    got = w.stats(1000).p95_ms
    assert got is not None and abs(got - p95) / p95 <= 0.1


@pytest.mark.parametrize(
    ("stats", "baseline", "reason"),
    [
        (WindowStats(99, 50, 10.0), None, None),  # below min_requests
        (WindowStats(1000, 10, 10.0), None, None),  # exactly 1 % is not above
        (WindowStats(1000, 11, 10.0), None, "error_rate"),
        (WindowStats(1000, 0, 900.0), None, "latency_p95_ms"),
        (WindowStats(1000, 0, 500.0), WindowStats(1000, 0, 250.0), "latency_p95_delta_ms"),
        (WindowStats(1000, 0, 500.0), WindowStats(50, 0, 250.0), None),  # thin baseline
        (WindowStats(1000, 0, 400.0), WindowStats(1000, 0, 250.0), None),
    ],
    ids=["few", "at-rate", "over-rate", "slow", "delta", "thin-baseline", "fine"],
)
def test_decide(stats: WindowStats, baseline: WindowStats | None, reason: str | None) -> None:
    assert decide(stats, baseline) == reason


@pytest.mark.parametrize(
    ("status", "error", "failed"),
    [
        (200, None, False),
        (404, None, False),
        (500, None, True),
        (503, None, True),
        (502, "connect", True),
        (504, "timeout", True),
        (0, "reset", True),
        (200, "client_abort", False),
    ],
    ids=["ok", "4xx", "500", "503", "connect", "timeout", "reset", "client-abort"],
)
def test_is_failure(status: int, error: str | None, failed: bool) -> None:
    assert is_failure(status, error) is failed


def test_window_reads_a_shorter_span_of_the_same_buckets() -> None:
    clock = Clock()
    g = Guard(clock)
    g.configure({"svc": 60})
    for i in range(200):
        g.record("svc", "gray", 500 if i < 10 else 200, 0.01, None)
    clock.t += 5
    for _ in range(100):
        g.record("svc", "gray", 200, 0.01, None)
    assert (g.stats("svc", "gray").requests, g.stats("svc", "gray").failures) == (300, 10)
    assert (g.stats("svc", "gray", 3).requests, g.stats("svc", "gray", 3).failures) == (100, 0)
    clock.t += 120
    assert g.stats("svc", "gray").requests == 0


def test_record_tally_counts_like_record_one_by_one() -> None:
    items = [
        ("gray" if i % 3 else "stable", 500 if i % 7 == 0 else 200, 0.001 * i, None)
        for i in range(300)
    ] + [
        ("gray", 0, 0.5, "connect"),
        ("gray", 502, 0.2, "reset"),
        ("stable", 0, 0.1, "client_abort"),
    ]
    one, tallied = Guard(Clock()), Guard(Clock())
    tallies = {rel: Tally("svc", rel) for rel in ("stable", "gray")}
    for rel, status, seconds, error in items:
        one.record("svc", rel, status, seconds, error)
        tallies[rel].add(status, seconds, error)
    for t in tallies.values():
        tallied.record_tally(t)
    for release in ("gray", "stable"):
        assert tallied.stats("svc", release) == one.stats("svc", release)
    assert tallied.stats("svc", "gray").failures == one.stats("svc", "gray").failures > 0


def test_tally_sorts_plain_answers_from_engine_errors() -> None:
    t = Tally("svc", "gray")
    for status, error in [(200, None), (200, None), (503, None), (502, "connect"), (0, "reset")]:
        t.add(status, 0.01, error)
    assert (t.n, t.codes, t.failed, len(t.seconds)) == (5, {200: 2, 503: 1}, 1, 3)
    assert t.odd == [(502, 0.01, "connect"), (0, 0.01, "reset")]
    t.clear()
    assert (t.n, t.codes, t.seconds, t.failed, t.odd) == (0, {}, [], 0, [])


def test_bucket_is_bisect_left_over_the_bounds() -> None:
    """The computed latency bucket equals `bisect_left` (the rule `record` always had)."""
    xs = [0.0, -1.0, math.nan, math.inf, -math.inf, 5e-324, 1e300]
    for b in _BOUNDS:
        xs += [b, math.nextafter(b, 0.0), math.nextafter(b, math.inf)]
    rng = random.Random(5)
    xs += [rng.expovariate(100.0) for _ in range(20_000)]
    xs += [rng.uniform(0.0, 200.0) for _ in range(5_000)]
    for x in xs:
        assert _bucket(x) == bisect.bisect_left(_BOUNDS, x), x


def _stats_of_every_slot(
    records: list[tuple[float, float, bool]], now: float, span: int
) -> WindowStats:
    """What `stats` must answer: every record in the span, each latency slot by bisect_left."""
    since = int(now) - span
    kept = [(x, failed) for t, x, failed in records if int(t) > since]
    if not kept:
        return WindowStats(0, 0, None, None)
    hist = [0] * (len(_BOUNDS) + 1)
    for x, _ in kept:
        hist[bisect.bisect_left(_BOUNDS, x)] += 1

    def quantile_ms(q: float) -> float:
        acc, rank = 0, math.ceil(q * len(kept))
        for i, c in enumerate(hist):
            acc += c
            if acc >= rank:
                return _BOUNDS[min(i, len(_BOUNDS) - 1)] * 1000.0
        raise AssertionError("rank beyond the total")

    failures = sum(failed for _, failed in kept)
    return WindowStats(len(kept), failures, quantile_ms(0.95), quantile_ms(0.99))


@pytest.mark.parametrize(
    ("latency", "seconds", "span"),
    [
        (lambda r: r.expovariate(1000.0), 30, 0),
        (lambda r: r.choice([0.0001, 0.002, 0.002, 90.0]), 30, 0),
        (lambda r: r.uniform(0.0, 200.0), 30, 0),
        (lambda r: r.expovariate(1000.0), 30, 7),
        (lambda r: r.choice([0.0, math.inf, 0.05]), 5, 0),
    ],
    ids=["proxy-latencies", "far-apart-slots", "every-slot", "shorter-span", "edges"],
)
def test_stats_read_only_the_used_slots_and_answer_as_every_slot(
    latency: Callable[[random.Random], float], seconds: int, span: int
) -> None:
    # Buckets reused after the window wrapped, and slots used in some seconds only:
    # the totals and quantiles are those of a sum over every slot.
    rng = random.Random(11)
    w = ReleaseWindow(20)
    records = []
    for s in range(seconds):
        for _ in range(rng.randrange(0, 40)):
            t, x, failed = 1000 + s + rng.random(), latency(rng), rng.random() < 0.1
            w.record(t, x, failed)
            records.append((t, x, failed))
    now = 1000 + seconds - 1
    assert w.stats(now, span) == _stats_of_every_slot(records, now, span or 20)
