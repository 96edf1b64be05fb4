"""Which gateway build the benchmark runs: compiled (as the container ships) or pure Python.

Why: the Dockerfile compiles the per-request modules with mypyc (setup.py, GATEWAY_COMPILE=1);
the figures that matter are that build's. The same step runs here, in a copy of the sources,
so the checkout itself never holds compiled modules that would shadow edited ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE = "from gateway.version import compiled; print(compiled())"


@dataclass(frozen=True)
class Build:
    kind: str  # "compiled" | "pure"
    pythonpath: Path | None  # prepended to the gateway's PYTHONPATH, None = the installed package
    note: str = ""


def missing_for_compiled(python: str = sys.executable) -> str | None:
    """Why the compiled build cannot be made here with `python`, or None."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return "no C compiler (apt-get install gcc)"
    probe = [python, "-c", "import mypyc"]
    if subprocess.run(probe, capture_output=True, timeout=60, check=False).returncode != 0:
        return f"mypy is not installed for {python} (pip install -e '.[dev]')"
    return None


def gateway_python_missing(python: str) -> str | None:
    """Why `python` cannot run the gateway under test (not installed in its venv), or None."""
    probe = "import gateway.cli, httptools, mmh3, prometheus_client, uvloop, yaml"
    try:
        done = subprocess.run(
            [python, "-c", probe], cwd="/", capture_output=True, text=True, timeout=60, check=False
        )
    except OSError as exc:
        return f"cannot run it ({exc.strerror})"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return (
            f"the gateway is not installed for it ({last}); make a venv with it: "
            f"{python} -m venv DIR && DIR/bin/pip install -e '{REPO}[dev]'"
        )
    return None


def installed_build(python: str) -> str:
    """Which build of the gateway `python` imports from its own install: compiled or pure.

    Probed in that interpreter, away from the checkout and without PYTHONPATH, as the
    gateway under test runs when no build of the harness is put in front of it.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [python, "-c", PROBE], cwd="/", env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    return "compiled" if done.stdout.strip() == "True" else "pure"


def copy_sources(src: Path) -> Path:
    """What the Dockerfile's builder stage copies: the build files, the backend, the package."""
    src.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "_build",
        src / "_build",
        ignore=shutil.ignore_patterns("__pycache__"),
        dirs_exist_ok=True,
    )
    shutil.copytree(
        REPO / "gateway",
        src / "gateway",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
        dirs_exist_ok=True,
    )
    return src


def compile_tree(
    dest: Path, log: Callable[[str], None] = print, python: str = sys.executable
) -> Path:
    """Copy the package sources into `dest` and build the compiled modules in place there.

    `python` is the interpreter that will run them: extension modules are built per interpreter.
    """
    src = copy_sources(dest / "src")
    log("== compiling the gateway's per-request modules with mypyc (setup.py, ~30 s)")
    done = subprocess.run(
        [python, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=src,
        env={**os.environ, "GATEWAY_COMPILE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"compiled build failed:\n{done.stderr[-3000:]}")
    probe = subprocess.run(
        [python, "-c", PROBE],
        cwd=dest,
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.stdout.strip() != "True":
        raise RuntimeError(f"the compiled modules do not load:\n{probe.stderr[-3000:]}")
    return src


def prepare(
    want: str, tmp: Path, log: Callable[[str], None] = print, python: str = sys.executable
) -> Build:
    """`want` is auto | compiled | pure; auto falls back to the installed package with a note.

    The note and the kind say what that package is (a plain ``pip install .`` is the
    compiled build); `pure` measures a pure copy of the sources when it is compiled.
    """
    if want == "pure":
        if installed_build(python) == "pure":
            return Build("pure", None)
        return Build("pure", copy_sources(tmp / "pure" / "src"))
    why = missing_for_compiled(python)
    if why is None:
        try:
            return Build("compiled", compile_tree(tmp / "compiled", log, python))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            why = str(exc)
    if want == "compiled":
        raise RuntimeError(f"--build compiled: {why}")
    kind = installed_build(python)
    note = (
        f"no compiled build of the checkout ({why.splitlines()[0]}): measuring the package "
        f"installed for {python}, which is the {kind} build"
    )
    log(f"!! {note}")
    return Build(kind, None, note)
