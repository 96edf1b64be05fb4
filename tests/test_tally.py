"""gateway/tally.py: one release's exchanges between two accounting flushes."""

from __future__ import annotations

import pytest

from gateway.tally import Tally


@pytest.mark.parametrize(
    ("events", "n", "codes", "failed", "odd"),
    [
        ([], 0, {}, 0, []),
        ([(200, 0.01, None), (200, 0.02, None)], 2, {200: 2}, 0, []),
        ([(503, 0.1, None)], 1, {503: 1}, 1, []),
        ([(0, 2.0, "connect")], 1, {}, 0, [(0, 2.0, "connect")]),
        ([(504, 30.0, "timeout")], 1, {}, 0, [(504, 30.0, "timeout")]),
        ([(0, 0.5, None)], 1, {}, 0, [(0, 0.5, None)]),
        (
            [
                (200, 0.1, None),
                (404, 0.1, None),
                (200, 0.1, None),
                (503, 0.2, None),
                (404, 0.1, None),
                (0, 1.0, "reset"),
            ],
            6,
            {200: 2, 404: 2, 503: 1},
            1,
            [(0, 1.0, "reset")],
        ),
    ],
    ids=[
        "nothing",
        "two-ok",
        "a-5xx-answer",
        "engine-error",
        "timeout-with-status",
        "no-status",
        "statuses-interleaved",
    ],
)
def test_add_sorts_answers_from_odd_outcomes(
    events: list[tuple[int, float, str | None]],
    n: int,
    codes: dict[int, int],
    failed: int,
    odd: list[tuple[int, float, str | None]],
) -> None:
    t = Tally("user-api", "gray")
    for status, seconds, error in events:
        t.add(status, seconds, error)
    assert (t.n, t.codes, t.failed, t.odd) == (n, codes, failed, odd)
    assert len(t.seconds) == sum(codes.values())


def test_clear_empties_it_for_the_next_flush() -> None:
    t = Tally("user-api", "gray")
    t.add(500, 0.1, None)
    t.add(0, 1.0, "reset")
    t.clear()
    assert (t.n, t.codes, t.seconds, t.failed, t.odd) == (0, {}, [], 0, [])
    assert (t.service, t.release) == ("user-api", "gray")


def test_after_a_clear_the_next_status_counts_from_zero() -> None:
    t = Tally("user-api", "gray")
    t.add(200, 0.1, None)
    t.add(200, 0.1, None)
    t.clear()
    t.add(404, 0.1, None)
    t.add(200, 0.1, None)
    t.add(404, 0.1, None)
    assert (t.n, t.codes, len(t.seconds)) == (3, {404: 2, 200: 1}, 3)
