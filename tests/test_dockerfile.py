"""The Dockerfile's install steps, tested without a Docker engine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_dockerfile_shape() -> None:
    assert re.search(r"^FROM python:3\.12-slim$", DOCKERFILE, re.M)
    assert re.search(r"^ARG VERSION", DOCKERFILE, re.M)
    assert "GATEWAY_BUILD_VERSION=${VERSION}" in DOCKERFILE
    assert re.search(r"^USER (?!root)\w+", DOCKERFILE, re.M)
    assert re.search(r"^HEALTHCHECK .*", DOCKERFILE, re.M) and "/healthz" in DOCKERFILE
    assert 'ENTRYPOINT ["gateway", "run", "-c", "/etc/gateway/gateway.yaml"]' in DOCKERFILE


def test_every_copied_file_exists() -> None:
    for line in re.findall(r"^COPY (.+)$", DOCKERFILE, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), src


@pytest.mark.slow
def test_install_step_in_a_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-compile", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    gw = str(venv / "bin" / "gateway")
    check = subprocess.run(
        [gw, "check", "-c", str(ROOT / "config" / "gateway.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr
    ver = subprocess.run(
        [gw, "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"GATEWAY_BUILD_VERSION": "v1.2.3", "PATH": "/usr/bin:/bin"},
    )
    assert ver.stdout.strip() == "gateway v1.2.3"
