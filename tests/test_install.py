"""Where no C compiler works, `pip install .` gives the pure build with one warning line.

Why: README.md, "Install": the compiled build is the default, but its absence must not
stop an install; the installer is told once, and `gateway --version` keeps saying why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.install_helpers import demo, get, pip_install, probe, run, warning_lines

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
