"""Where the compiled build cannot be made, `pip install .` gives the pure one, with one warning.

Why: README.md, "Install": the compiled build is the default, but its absence must not
stop an install; the installer is told once, and `gateway --version` keeps saying why.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks.build import copy_sources
from tests.install_helpers import BUILD_VARS, demo, get, pip_install, probe, run, warning_lines
from tests.programs import need

# A fresh venv with every dependency (no compile): well over the per-test default on 2 cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_no_compiler_installs_the_pure_build_with_one_warning(tmp_path: Path) -> None:
    installed = pip_install(tmp_path, CC="/bin/false")
    warnings = warning_lines(installed.pip_output)
    assert len(warnings) == 1, warnings
    assert "building the pure-Python gateway (no working C compiler: CC='/bin/false'" in warnings[0]
    assert "mypy==" not in installed.pip_output  # the hook asked for no mypy: nothing to compile
    out = tmp_path / "out"
    out.mkdir()
    assert (
        probe(installed, "from gateway.version import compiled; print(compiled())", out) == "False"
    )
    ver = run([installed.gateway, "--version"], cwd=out, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert ver.stdout.strip().endswith(
        "(pure-Python build: no working C compiler: CC='/bin/false' failed on a test file (exit 1))"
    ), ver.stdout + ver.stderr
    with demo(installed, out) as (port, lines):
        assert "(pure-Python build: no working C compiler" in lines[0], lines
        status, release, body = get(port, "/hello", "alice")
        assert status == 200 and release in ("stable", "gray") and release.encode() in body


def test_a_failing_mypyc_compile_falls_back_to_the_pure_wheel(tmp_path: Path) -> None:
    """A compiler that passes the probe but fails on mypyc's C: a pure wheel, one warning."""
    need("gcc", "the probe must pass for the compile to start")
    cc = tmp_path / "picky-cc"
    cc.write_text(
        '#!/bin/sh\ncase "$*" in *gateway-cc-*) exec gcc "$@";; esac\n'
        'echo "picky-cc: refusing $*" >&2\nexit 1\n'
    )
    cc.chmod(0o755)
    src, wheels = copy_sources(tmp_path / "src"), tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k not in BUILD_VARS}
    done = run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(wheels), str(src)],
        env={**env, "CC": str(cc)},
        timeout=1200,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "picky-cc: refusing" in output  # the compile was tried
    warnings = warning_lines(output)
    assert len(warnings) == 1, warnings
    assert "building the pure-Python gateway (the mypyc compile failed: " in warnings[0]
    (wheel,) = wheels.glob("gray_gateway-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")  # no extension slipped in
    with zipfile.ZipFile(wheel) as z:
        record = json.loads(z.read("gateway/_build.json"))
        assert not [n for n in z.namelist() if n.endswith(".so")]
    assert record["build"] == "pure" and record["why"].startswith("the mypyc compile failed: ")
