"""The Dockerfile's install steps, tested without a Docker engine."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_dockerfile_shape() -> None:
    assert re.search(r"^ARG RUN_IMAGE=python:3\.12-slim$", DOCKERFILE, re.M)
    assert re.search(r"^FROM \$\{RUN_IMAGE\}$", DOCKERFILE, re.M)
    assert re.search(r"^ARG VERSION", DOCKERFILE, re.M)
    assert "GATEWAY_BUILD_VERSION=${VERSION}" in DOCKERFILE
    assert re.search(r"^USER (?!root)\w+", DOCKERFILE, re.M)
    assert re.search(r"^HEALTHCHECK .*", DOCKERFILE, re.M) and "/healthz" in DOCKERFILE
    assert 'ENTRYPOINT ["gateway", "run", "-c", "/etc/gateway/gateway.yaml"]' in DOCKERFILE


def test_every_copied_file_exists() -> None:
    for line in re.findall(r"^COPY (?!--from=)(.+)$", DOCKERFILE, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), src


BUILD_STEP = "GATEWAY_COMPILE=1 pip wheel --no-build-isolation --no-deps -w /wheels ."
RUNTIME_STEP = "pip install --no-compile /wheels/*.whl"
PROBE = "from gateway.version import compiled; print(compiled())"


def _run(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, check=False, cwd=cwd, env=env, timeout=timeout
    )


def test_dockerfile_builds_the_compiled_wheel_and_installs_only_it() -> None:
    assert re.search(r"^ARG BUILD_IMAGE=python:3\.12$", DOCKERFILE, re.M)
    assert re.search(r"^FROM \$\{BUILD_IMAGE\} AS build$", DOCKERFILE, re.M)
    assert BUILD_STEP in DOCKERFILE
    assert "COPY --from=build /wheels /wheels" in DOCKERFILE
    assert RUNTIME_STEP in DOCKERFILE
    assert "COPY pyproject.toml setup.py README.md MANIFEST.in ./" in DOCKERFILE
    assert "COPY _build ./_build" in DOCKERFILE  # the in-tree build backend (pyproject.toml)


def test_the_builder_installs_the_pinned_mypy_the_backend_asks_for() -> None:
    pin = re.search(
        r'^MYPY = "(mypy==[\d.]+)"', (ROOT / "_build" / "gateway_build.py").read_text(), re.M
    )
    assert pin is not None and f'"{pin.group(1)}"' in DOCKERFILE


def test_the_builder_installs_the_typed_runtime_dependencies_the_backend_asks_for() -> None:
    """Without them mypyc compiles calls into mmh3/httptools as untyped (slower) calls."""
    found = re.search(
        r"^TYPED_RUNTIME = (\(.*?\))$", (ROOT / "_build" / "gateway_build.py").read_text(), re.M
    )
    assert found is not None
    for spec in ast.literal_eval(found.group(1)):
        assert f'"{spec}"' in DOCKERFILE, spec


@pytest.mark.timeout(600)
def test_the_builder_step_fails_loudly_without_a_compiler(tmp_path: Path) -> None:
    """GATEWAY_COMPILE=1 (the builder stage) never falls back to a pure wheel."""
    from benchmarks.build import copy_sources

    builder = tmp_path / "builder"  # the builder stage's tools, minus mypy and a compiler
    subprocess.run([sys.executable, "-m", "venv", str(builder)], check=True, timeout=120)
    pip = str(builder / "bin" / "pip")
    setup = _run([pip, "install", "-q", "setuptools>=68", "wheel"], timeout=300)
    assert setup.returncode == 0, setup.stderr[-3000:]
    src = copy_sources(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_PURE", "PYTHONPATH")}
    step = BUILD_STEP.split()  # GATEWAY_COMPILE=1 pip wheel ... -w /wheels .
    argv = [pip, *step[2:-2], str(tmp_path / "wheels"), str(src)]
    done = _run(argv, env={**env, "GATEWAY_COMPILE": "1", "CC": "/bin/false"}, timeout=300)
    assert done.returncode != 0
    assert "GATEWAY_COMPILE=1: no working C compiler: CC='/bin/false'" in done.stdout + done.stderr
    assert not list((tmp_path / "wheels").glob("*.whl"))
