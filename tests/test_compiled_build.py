"""The default install is the compiled (mypyc) build, and the data-path tests pass on it.

Why: a plain `pip install .` compiles the per-request modules where a C compiler is
(README.md, "Install"; _build/gateway_build.py), and the benchmark figures are taken on
that build, so the same functional tests must hold there too: compiled classes reject
what interpreted ones allow (unknown attributes, monkeypatching). One install, shared by
every test of this module, keeps the suite's time in bounds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.install_helpers import (
    ROOT,
    Installed,
    demo,
    get,
    pip_install,
    probe,
    run,
    stable_port,
    warning_lines,
)
from tests.programs import need

# The install compiles (minutes on a busy 2-core box): far over the per-test default.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

# Data-path suites re-run on the compiled modules (the rest never touch them per request).
SUITES = [
    "test_engine_fast.py",
    "test_fast_pool.py",
    "test_fast_timers.py",
    "test_fuzz_engine.py",
    "test_proxy_e2e.py",
    "test_trace_e2e.py",
    "test_split_e2e.py",
    "test_guard.py",
    "test_headers.py",
    "test_request_head.py",
    "test_fast_head.py",
    "test_propagation.py",
    "test_routing.py",
    "test_balancer.py",
    "test_tls_conn.py",
    "test_tls_edges.py",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """A fresh venv and a plain `pip install .`, with no flag and no mypy installed by hand."""
    need("gcc", "the default install compiles with the C compiler CPython names")
    yield pip_install(tmp_path_factory.mktemp("compiled"))


def test_a_plain_install_is_compiled_and_self_contained(
    installed: Installed, tmp_path: Path
) -> None:
    assert warning_lines(installed.pip_output) == []
    assert (
        probe(installed, "from gateway.version import compiled; print(compiled())", tmp_path)
        == "True"
    )
    assert (
        probe(installed, "import importlib.util as u; print(u.find_spec('mypy'))", tmp_path)
        == "None"
    )
    record = installed.site_packages() / "gateway" / "_build.json"
    assert record.read_text().strip() == '{"build": "compiled", "why": ""}'
    ver = run(
        [installed.gateway, "--version"],
        cwd=tmp_path,
        env={"GATEWAY_BUILD_VERSION": "v1.2.3", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert ver.stdout.strip() == "gateway v1.2.3 (compiled build: mypyc)", ver.stderr
    check = run(
        [installed.gateway, "check", "-c", str(ROOT / "config" / "gateway.yaml")],
        cwd=tmp_path,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr


def test_the_compiled_install_serves_and_says_so(installed: Installed, tmp_path: Path) -> None:
    """The README's first command (`gateway demo`), then `gateway run` whose log names the build."""
    with demo(installed, tmp_path) as (port, lines):
        assert "(compiled build: mypyc)" in lines[0], lines
        status, release, _ = get(port, "/hello", "alice")
        assert status == 200 and release in ("stable", "gray")
        upstream = f"http://127.0.0.1:{stable_port(lines)}"
        gw_port = free_port()
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{gw_port}",
                    "admin": {"listen": f"127.0.0.1:{free_port()}"},
                    "state": {"store": "memory"},
                    "services": {
                        "svc": {"releases": {"stable": {"weight": 1, "upstreams": [upstream]}}}
                    },
                }
            )
        )
        log = tmp_path / "run.log"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with log.open("w") as f:
            proc = subprocess.Popen(
                [installed.gateway, "run", "-c", str(cfg)],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                env=env,
            )
        try:
            deadline = time.monotonic() + 60
            while "serving:" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)  # polling the log file with a deadline
            assert "engine fast, compiled build: mypyc" in log.read_text()
            status, release, body = get(gw_port, "/x", "bob")
            assert (status, release) == (200, "stable") and b"stable" in body
        finally:
            proc.terminate()
            assert proc.wait(30) == 0


def _package_tree(installed: Installed, tree: Path) -> None:
    """What the install put in site-packages (its RECORD), minus scripts outside it."""
    site = installed.site_packages()
    record = next(site.glob("gray_gateway-*.dist-info")) / "RECORD"
    for line in record.read_text().splitlines():
        rel = line.rsplit(",", 2)[0]
        if not rel or rel.startswith(".."):
            continue
        dest = tree / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(site / rel, dest)


def test_data_path_suites_pass_on_the_compiled_modules(
    installed: Installed, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"  # the installed compiled package next to a copy of the tests
    _package_tree(installed, tree)
    shutil.copytree(ROOT / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        ROOT / "benchmarks",
        tree / "benchmarks",
        ignore=shutil.ignore_patterns("__pycache__", "results"),
    )
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    (tree / "tests" / "test_zz_compiled.py").write_text(
        "from gateway.version import compiled\n\n\n"
        "def test_these_tests_ran_on_the_compiled_modules() -> None:\n"
        "    assert compiled()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}  # gateway worker processes inherit it
    done = run(
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
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "test_zz_compiled" not in done.stdout, done.stdout[-2000:]
