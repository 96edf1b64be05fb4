"""benchmarks/callgrind.py: reading callgrind's totals and inclusive counts per function."""

from __future__ import annotations

import pytest

from benchmarks.callgrind import Counts, inclusive, ratio_change, table, totals

ANNOTATE = """\
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
426,144,630 (100.0%)  PROGRAM TOTALS
214,646,821 (50.37%)  /b/__native_1.c:CPyPy_fast_client___ClientConn___data_received [/x.so]
214,386,821 (50.31%)  /b/__native_1.c:CPyDef_fast_client___ClientConn___data_received [/x.so]
 10,016,760 ( 2.35%)  /b/__native_1.c:CPyDef_fast_upstream___Upstream___on_header [/x.so]
  9,000,000 ( 2.00%)  /b/object.h:CPyDef_fast_client___ClientConn___data_received
  7,081,175 ( 1.66%)  /b/__native_1.c:CPyDef_fast_upstream___Upstream___on_headers_complete [/x]
"""


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("ClientConn___data_received", 214_386_821),  # the CPyDef line, the first one
        ("Upstream___on_header", 10_016_760),  # not on_headers_complete
        ("Upstream___on_headers_complete", 7_081_175),
        ("Upstream___data_received", None),  # absent: not in the result
    ],
    ids=["first-cpydef", "no-prefix-match", "longer-name", "absent"],
)
def test_inclusive_counts_by_function(name: str, want: int | None) -> None:
    assert inclusive(ANNOTATE, [name]).get(name) == want


def test_totals_line() -> None:
    assert totals("events: Ir\nsummary: 12\ntotals: 345\n") == 345
    with pytest.raises(ValueError):
        totals("events: Ir\n")


@pytest.mark.parametrize(
    ("plain", "variant", "user_share", "want"),
    [
        (100_000, 100_000, 1.0, 0.0),  # same work: no change
        (100_000, 102_000, 1.0, 0.8 * (1 - 100_000 / 102_000)),  # all CPU scales with Ir
        (100_000, 102_000, 0.5, 0.8 * (1 - 1 / 1.01)),  # half the CPU is system calls
        (100_000, 98_000, 1.0, 0.8 * (1 - 100_000 / 98_000)),  # less work: the ratio rises
    ],
    ids=["equal", "user-only", "half-syscalls", "less-work"],
)
def test_ratio_change_scales_with_the_user_share(
    plain: float, variant: float, user_share: float, want: float
) -> None:
    assert ratio_change(0.8, plain, variant, user_share) == pytest.approx(want)


def test_timer_work_is_taken_per_second_and_spread_over_the_real_rate() -> None:
    c = Counts(
        config="rollout_on",
        requests=1_000,
        load_s=100.0,
        load_ir=90_000_000,
        idle_s=20.0,
        idle_ir=40_000_000,
        inclusive={"ClientConn___data_received": 50_000_000, "ProxyHandler___flush": 10_000_000},
    )
    per = c.per_request(rate=20_000)
    assert per["total"] == 90_000  # as counted, timer work included
    assert per["data_path"] == 60_000  # Upstream___data_received absent: counted as 0
    assert per["timer_per_s"] == 2_000_000
    assert per["timer_at_rate"] == 100
    assert per["work"] == 60_100
    lines = table([c, c], rate=20_000, ratio=0.8, user_share=0.4)
    assert lines[0].split() == ["Ir", "per", "request", "rollout_on", "rollout_on"]
    assert lines[-2].endswith("0.0000") and lines[-1].endswith("0.0000")  # against itself
