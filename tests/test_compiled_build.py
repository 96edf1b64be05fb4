"""The compiled (mypyc) build: the Dockerfile's two stages, and the data-path tests run on it.

Why: the container ships the per-request modules compiled (setup.py, GATEWAY_COMPILE=1) and
the benchmark figures are taken on that build, so the same functional tests must hold there
too: compiled classes reject what interpreted ones allow (unknown attributes, monkeypatching).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.build import copy_sources
from tests.test_dockerfile import BUILD_STEP, PROBE, ROOT, _run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("cc") is None, reason="no C compiler: the compiled build needs one"
    ),
]

# Data-path suites re-run on the compiled modules (the rest never touch them per request).
SUITES = [
    "test_engine_fast.py",
    "test_fuzz_engine.py",
    "test_proxy_e2e.py",
    "test_trace_e2e.py",
    "test_split_e2e.py",
    "test_guard.py",
    "test_headers.py",
    "test_propagation.py",
    "test_routing.py",
    "test_balancer.py",
]


@pytest.fixture(scope="module")
def compiled_wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The builder stage: a fresh venv with mypy, then the Dockerfile's wheel step."""
    tmp = tmp_path_factory.mktemp("compiled")
    build, wheels, src = tmp / "build", tmp / "wheels", tmp / "src"
    subprocess.run([sys.executable, "-m", "venv", str(build)], check=True, timeout=120)
    pip = _run(
        [str(build / "bin" / "pip"), "install", "-q", "mypy>=1.10", "setuptools>=68", "wheel"],
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    copy_sources(src)  # the builder's WORKDIR: only what the Dockerfile copies
    wheel = _run(
        [str(build / "bin" / "pip"), *BUILD_STEP.split()[2:-2], str(wheels), "."],
        cwd=src,
        env={**os.environ, "GATEWAY_COMPILE": "1"},
        timeout=900,
    )
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    built = sorted(wheels.glob("gray_gateway-*.whl"))
    assert len(built) == 1 and "none-any" not in built[0].name, built  # a platform wheel
    yield built[0]


def test_runtime_stage_installs_only_the_wheel(compiled_wheel: Path, tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    subprocess.run([sys.executable, "-m", "venv", str(runtime)], check=True, timeout=120)
    pip = _run(
        [str(runtime / "bin" / "pip"), "install", "-q", "--no-compile", str(compiled_wheel)],
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    py, gw = str(runtime / "bin" / "python"), str(runtime / "bin" / "gateway")
    probe = _run([py, "-c", PROBE], cwd=tmp_path)  # no mypy in this venv: self-contained
    assert probe.stdout.strip() == "True", probe.stderr
    check = _run([gw, "check", "-c", str(ROOT / "config" / "gateway.yaml")], cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    ver = _run(
        [gw, "--version"],
        cwd=tmp_path,
        env={"GATEWAY_BUILD_VERSION": "v1.2.3", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert ver.stdout.strip() == "gateway v1.2.3"


def test_data_path_suites_pass_on_the_compiled_modules(
    compiled_wheel: Path, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"  # the wheel's compiled package next to a copy of the tests
    with zipfile.ZipFile(compiled_wheel) as z:
        z.extractall(tree)
    shutil.copytree(ROOT / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    (tree / "tests" / "test_zz_compiled.py").write_text(
        "from gateway.version import compiled\n\n\n"
        "def test_these_tests_ran_on_the_compiled_modules() -> None:\n"
        "    assert compiled()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}  # gateway worker processes inherit it
    run = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-x",
            *(f"tests/{name}" for name in [*SUITES, "test_zz_compiled.py"]),
        ],
        cwd=tree,
        env=env,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "test_zz_compiled" not in run.stdout, run.stdout[-2000:]
