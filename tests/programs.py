"""Outside programs a test needs (nginx, wrk, haproxy, a C compiler): skip locally, fail in CI.

Why: `.ci/run` installs them, so under `CI=true` a missing one is a broken CI machine, and a
silently skipped test would pass for a tested feature.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.tools import find_tool


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def need(program: str, why: str) -> str:
    """The program's path; else skip the test, or fail it under CI=true."""
    path = find_tool(program)
    if path is not None:
        return path
    message = f"{program} is not installed ({why})"
    if in_ci():
        pytest.fail(f"{message}; CI=true: .ci/run installs it, so this is a broken CI machine")
    pytest.skip(message)
