"""benchmarks/callgrind.py: reading callgrind's totals and inclusive counts per function."""

from __future__ import annotations

import pytest

from benchmarks.callgrind import inclusive, totals

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
