"""When the suite runs in parallel test workers (pytest-xdist), and which files go first.

Why: the whole suite is ~2,700 tests whose end-to-end half mostly waits on timers and
sockets (guard windows, scrapes, watches), so two workers on a 2-core box overlap one
worker's waits with the other's work. A worker takes one test file at a time
(`--dist loadfile`): module fixtures (one compiled install, one container) are made once
and a file's tests keep their order. Choosing files (`pytest tests/test_x.py`) keeps one
process, where starting workers would only add their start-up; `-n N` or `-n0` on the
command line wins. tests/conftest.py calls these from its pytest hooks.
"""

from __future__ import annotations

WORKERS = 2
# Handed out first, longest first (each file's summed test time: 710, 424, 292, 255, 253, 122
# and 103 s in one run on a loaded 2-core box): a long file started last would run alone
# while the other worker idles. The rest keep the collection order.
LONGEST_FIRST = (
    "test_compiled_build.py",
    "test_container.py",
    "test_segments_process.py",
    "test_split_e2e.py",
    "test_install.py",
    "test_chaos.py",
    "test_admin_workers.py",
)


def workers_for(*, whole_suite: bool, numprocesses: object, dist: str, usepdb: bool) -> int | None:
    """How many test workers to start, or None to leave pytest's choice alone.

    whole_suite: pytest took the paths from `testpaths` (no path on the command line).
    """
    if numprocesses is not None or dist != "no":  # -n/--dist given: the caller chose
        return None
    if usepdb or not whole_suite:
        return None
    return WORKERS


def file_rank(file_name: str) -> int:
    """Sort key: the long files first in LONGEST_FIRST's order, then every other file."""
    try:
        return LONGEST_FIRST.index(file_name)
    except ValueError:
        return len(LONGEST_FIRST)
