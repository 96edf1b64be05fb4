"""gateway/ratelog.py: at most N lines per second per key, and the count held back."""

from __future__ import annotations

from gateway.ratelog import RateLimiter


def test_the_first_lines_of_a_second_pass_then_the_rest_are_counted() -> None:
    r = RateLimiter(per_second=2)
    key = ("user-api", "gray", "502")
    assert [r.allow(key, 10.0), r.allow(key, 10.1), r.allow(key, 10.2), r.allow(key, 10.9)] == [
        0,
        0,
        None,
        None,
    ]
    assert r.allow(key, 11.0) == 2  # the next written line says two were dropped
    assert r.allow(key, 11.1) == 0


def test_keys_are_independent() -> None:
    r = RateLimiter(per_second=1)
    assert r.allow(("a",), 0.0) == 0
    assert r.allow(("a",), 0.5) is None
    assert r.allow(("b",), 0.5) == 0
