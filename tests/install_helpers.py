"""Installing the package as a user would (a fresh venv, `pip install .`) and serving with it."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.build import copy_sources
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
WARNING = "gray-gateway: WARNING:"  # the backend's one warning line (_build/gateway_build.py)
# Variables that would choose the build for the installer; each test sets its own.
BUILD_VARS = ("GATEWAY_COMPILE", "GATEWAY_PURE", "CC", "PIP_NO_BUILD_ISOLATION", "PYTHONPATH")


@dataclass(frozen=True)
class Installed:
    venv: Path
    pip_output: str

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def gateway(self) -> str:
        return str(self.venv / "bin" / "gateway")

    def site_packages(self) -> Path:
        found = sorted(self.venv.glob("lib/python3.*/site-packages"))
        assert len(found) == 1, found
        return found[0]


def run(
    argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, check=False, cwd=cwd, env=env, timeout=timeout
    )


def pip_install(tmp: Path, **env_vars: str) -> Installed:
    """A fresh venv and `pip install -v <copy of the sources>`: build isolation, no flags.

    -v shows the build backend's output (pip hides it otherwise), where the warning goes.
    """
    venv, src = tmp / "venv", copy_sources(tmp / "src")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in BUILD_VARS}
    env.update(env_vars)
    done = run([str(venv / "bin" / "pip"), "install", "-v", str(src)], env=env, timeout=1200)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return Installed(venv, output)


def warning_lines(pip_output: str) -> list[str]:
    return [line.strip() for line in pip_output.splitlines() if WARNING in line]


def probe(installed: Installed, code: str, cwd: Path) -> str:
    """Run `code` with the installed package (cwd away from any source tree)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = run([installed.python, "-c", code], cwd=cwd, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@contextlib.contextmanager
def demo(installed: Installed, cwd: Path) -> Iterator[tuple[int, list[str]]]:
    """`gateway demo` from the install (the README's first command): its port and first lines."""
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = cwd / "demo.out"
    with out.open("w") as f:
        proc = subprocess.Popen(
            [installed.gateway, "demo", "--port", str(port), "--admin-port", str(admin)],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C" not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)  # polling the demo's output file with a deadline
        yield port, out.read_text().splitlines()
    finally:
        proc.terminate()
        proc.wait(30)


def get(port: int, path: str, user: str) -> tuple[int, str, bytes]:
    """One request through the gateway: status, the release that served it, the body."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"X-User-ID": user})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers.get("X-Release-Stage", ""), r.read()


def stable_port(demo_lines: list[str]) -> int:
    m = re.search(r"stable on :(\d+)", "\n".join(demo_lines))
    assert m is not None, demo_lines
    return int(m.group(1))
