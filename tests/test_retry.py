"""gateway/retry.py: when a failed attempt may fail over, and the retry budget — tables."""

from __future__ import annotations

import pytest

from gateway.retry import BUDGET_MIN, RetryBudget, may_retry


@pytest.mark.parametrize(
    ("kind", "attempts", "retries", "left", "ok"),
    [
        ("connect", 0, 2, None, True),
        ("reset", 1, 2, 5.0, True),
        ("timeout", 0, 2, None, True),
        ("connect", 2, 2, None, False),
        ("connect", 0, 0, None, False),
        ("connect", 0, 2, 0.0, False),
        ("protocol", 0, 2, None, False),
        ("client", 0, 2, None, False),
    ],
    ids=[
        "connect",
        "reset-with-time",
        "timeout",
        "limit-reached",
        "no-retries",
        "no-time",
        "protocol-not-retried",
        "client-not-retried",
    ],
)
def test_may_retry(kind: str, attempts: int, retries: int, left: float | None, ok: bool) -> None:
    assert may_retry(kind, attempts, retries, left) is ok


@pytest.mark.parametrize(
    ("in_flight", "limit"),
    [(0, BUDGET_MIN), (10, BUDGET_MIN), (15, 3), (100, 20), (1000, 200)],
    ids=["idle", "few", "at-minimum", "hundred", "thousand"],
)
def test_the_budget_is_a_share_of_requests_in_flight(in_flight: int, limit: int) -> None:
    assert RetryBudget().limit(in_flight) == limit


def test_admit_takes_tokens_until_the_limit_and_release_gives_them_back() -> None:
    b = RetryBudget(ratio=0.2, minimum=2)
    assert [b.admit(5) for _ in range(3)] == [True, True, False]
    b.release()
    assert b.active == 1 and b.admit(5)
    for _ in range(5):
        b.release()
    assert b.active == 0  # never below zero
    assert "active=0" in repr(b)
