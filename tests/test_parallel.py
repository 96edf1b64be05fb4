"""The suite's parallel test workers (tests/parallel.py) and the port claims between them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PORT_CLAIMS_ENV, ROOT
from tests.parallel import LONGEST_FIRST, WORKERS, file_rank, workers_for


@pytest.mark.parametrize(
    ("whole_suite", "numprocesses", "dist", "usepdb", "expect"),
    [
        (True, None, "no", False, WORKERS),
        (False, None, "no", False, None),
        (True, 0, "no", False, None),
        (True, 3, "no", False, None),
        (True, "auto", "no", False, None),
        (True, None, "load", False, None),
        (True, None, "no", True, None),
    ],
    ids=[
        "whole-suite-gets-workers",
        "chosen-files-stay-in-process",
        "n0-wins",
        "n3-wins",
        "n-auto-wins",
        "dist-given-wins",
        "pdb-stays-in-process",
    ],
)
def test_workers_for(
    whole_suite: bool, numprocesses: object, dist: str, usepdb: bool, expect: int | None
) -> None:
    got = workers_for(whole_suite=whole_suite, numprocesses=numprocesses, dist=dist, usepdb=usepdb)
    assert got == expect


def test_long_files_are_handed_out_first_and_the_rest_keep_their_order() -> None:
    names = ["test_admin.py", "test_install.py", "test_zz.py", "test_compiled_build.py"]
    assert sorted(names, key=file_rank) == [
        "test_compiled_build.py",
        "test_install.py",
        "test_admin.py",
        "test_zz.py",
    ]
    assert all((ROOT / "tests" / name).is_file() for name in LONGEST_FIRST)


def _pytest(*args: str) -> str:
    """pytest from the repository root, as README.md runs it, with extra arguments."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# Only this file is collected (a whole-suite collection per worker takes a minute on a busy
# box), the paths still taken from `testpaths` as by the README's plain `pytest`.
ONLY_THIS_FILE = tuple(
    f"--ignore-glob=*/{glob}" for glob in ("test_[!p]*", "test_p[!a]*", "test_pat*")
)


# Three pytest processes starting on a busy 2-core box: over the per-test default.
@pytest.mark.timeout(300)
def test_the_plain_command_runs_in_workers() -> None:
    out = _pytest(*ONLY_THIS_FILE, "-k", "workers_for")
    assert f"created: {WORKERS}/{WORKERS} workers" in out, out[-3000:]
    passed = r"^\[gw\d\] .*PASSED tests/test_parallel\.py::test_workers_for"
    assert re.search(passed, out, re.M), out[-3000:]


def test_a_chosen_file_runs_in_one_process() -> None:
    out = _pytest("tests/test_parallel.py", "-k", "workers_for")
    assert re.search(r"^tests/test_parallel\.py::test_workers_for\S* PASSED", out, re.M), out
    assert "[gw" not in out and "created:" not in out, out[-3000:]


def test_ports_handed_out_in_two_processes_of_one_run_never_repeat(tmp_path: Path) -> None:
    """Without the shared claims two processes drawing 300 ports each would almost surely
    share one (about 14,000 ports bind(0) hands out here: a birthday collision)."""
    claims = tmp_path / "claims"
    claims.mkdir()
    draw = "print(*(free_port() for _ in range(300)))"
    env = {**os.environ, PORT_CLAIMS_ENV: str(claims)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", f"from {m} import free_port\n{draw}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        # a test worker and a benchmark (benchmarks/procs.py) one of the tests runs
        for m in ("tests.conftest", "benchmarks.procs")
    ]
    outs = [p.communicate(timeout=100)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    first, second = ({int(x) for x in out.split()} for out in outs)
    assert len(first) == len(second) == 300
    assert not first & second
    assert {int(p.name) for p in claims.iterdir()} == first | second
