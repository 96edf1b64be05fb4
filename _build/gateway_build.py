"""The PEP 517 build backend: setuptools, plus mypy when the per-request modules are compiled.

Why: `pip install .` should give the compiled (mypyc) build wherever it can be made, and
the pure-Python build, with one warning line saying why, where it cannot (README.md,
"Install"). PEP 517 lets a backend name build requirements per build
(`get_requires_for_build_wheel`, PEP 517 §"get_requires_for_build_wheel"), so the
isolated build environment gets the pinned mypy only when it will compile, as black and
charset-normalizer do. The hooks delegate to setuptools.build_meta; setup.py asks
`current_choice()` whether to compile.

The choice, in order: `GATEWAY_COMPILE=1` compiles or fails loudly (the Dockerfile);
editable installs stay pure (edits take effect); `GATEWAY_PURE=1` opts out; otherwise
compile when the interpreter is CPython and the configured C compiler (`$CC`, else the
one CPython was built with) compiles a test file that includes Python.h, and fall back
to pure, with the warning, when it does not or when mypyc fails.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import build_sdist, get_requires_for_build_sdist

__all__ = [
    "MYPY",
    "Choice",
    "build_editable",
    "build_sdist",
    "build_wheel",
    "choose",
    "current_choice",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_editable",
    "prepare_metadata_for_build_wheel",
]

# Exactly the mypy the project's type checks run with: mypyc's output depends on it.
MYPY = "mypy==2.4.1"
# Runtime dependencies whose types the compiled modules call into (routing's and the
# balancer's mmh3 hashes, the engine's httptools parsers, the metrics' prometheus_client).
# Missing from the isolated build environment, mypy treats them as Any and mypyc emits
# generic calls with boxed results: the request handler alone ran ~6,500 instructions per
# request more (benchmarks/callgrind.py). The specifiers are pyproject.toml's.
TYPED_RUNTIME = ("mmh3>=4.0", "httptools>=0.6", "prometheus-client>=0.19")
WARNING = "gray-gateway: WARNING: "
_TRUE = ("1", "true", "yes")


class BuildError(RuntimeError):
    """A build that was asked for and cannot be made (GATEWAY_COMPILE=1, contradictory flags)."""


@dataclass(frozen=True)
class Choice:
    """Compile or not, and why not: what setup.py builds and the wheel records."""

    compile: bool
    strict: bool = False  # GATEWAY_COMPILE=1: failing to compile fails the build
    why: str = ""  # why the build is pure ("" when compiled)
    warn: bool = False  # a fallback the installer did not ask for: one warning line

    def record(self) -> dict[str, str]:
        """What the wheel records for `gateway --version` and the startup log."""
        return {"build": "compiled" if self.compile else "pure", "why": self.why}


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in _TRUE


def c_compiler_problem(env: Mapping[str, str]) -> str | None:
    """Why no extension can be compiled here, or None: compile a file including Python.h.

    Uses the compiler setuptools would use ($CC, else the one CPython was built with).
    """
    cc = env.get("CC") or sysconfig.get_config_var("CC") or "cc"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        return f"no Python headers (Python.h) in {include}: install the python3-dev package"
    with tempfile.TemporaryDirectory(prefix="gateway-cc-") as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("#include <Python.h>\nint gateway_probe(void) { return 0; }\n")
        argv = [*shlex.split(cc), f"-I{include}", "-c", str(src), "-o", str(Path(tmp) / "p.o")]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        except OSError as exc:
            return f"no C compiler: CC={cc!r} cannot run ({exc.strerror})"
        except subprocess.TimeoutExpired:
            return f"no usable C compiler: CC={cc!r} took over 120 s on a test file"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        detail = f": {lines[-1].strip()[:200]}" if lines else ""
        return f"no working C compiler: CC={cc!r} failed on a test file (exit {done.returncode}{detail})"
    return None


def choose(
    env: Mapping[str, str],
    *,
    editable: bool = False,
    implementation: str | None = None,
    compiler_problem: Callable[[Mapping[str, str]], str | None] = c_compiler_problem,
) -> Choice:
    """Compiled or pure, from the environment; raises BuildError for a build that cannot be."""
    want, pure = _flag(env, "GATEWAY_COMPILE"), _flag(env, "GATEWAY_PURE")
    if want and pure:
        raise BuildError("GATEWAY_COMPILE=1 and GATEWAY_PURE=1 contradict each other: unset one")
    if editable:
        if want:
            raise BuildError(
                "GATEWAY_COMPILE=1: editable installs stay pure (compiled modules would "
                "shadow edited sources); use `pip install .` for the compiled build"
            )
        return Choice(False, why="editable install")
    if pure:
        return Choice(False, why="GATEWAY_PURE=1")
    implementation = implementation or platform.python_implementation()
    if implementation != "CPython":
        problem: str | None = f"mypyc compiles for CPython only, this is {implementation}"
    else:
        problem = compiler_problem(env)
    if problem is not None:
        if want:
            raise BuildError(f"GATEWAY_COMPILE=1: {problem}")
        return Choice(False, why=problem, warn=True)
    return Choice(True, strict=want)


# What setup.py builds in this process: set by the hooks below, else decided from the
# environment (`GATEWAY_COMPILE=1 python setup.py build_ext --inplace`).
_current: Choice | None = None


def current_choice() -> Choice:
    return _current if _current is not None else choose(os.environ)


@contextmanager
def _building(choice: Choice) -> Iterator[None]:
    global _current
    previous, _current = _current, choice
    try:
        yield
    finally:
        _current = previous


# Metadata and requirement hooks run setup.py too; they never need the extensions.
_NO_EXTENSIONS = Choice(False, why="metadata only")


def warn(why: str) -> None:
    """The one warning line of a pure fallback (pip shows it with -v; the wheel records it)."""
    print(
        f"{WARNING}building the pure-Python gateway ({why}); it works the same, with more "
        "CPU per request. For the compiled build install a C compiler and the Python "
        "headers (e.g. apt-get install gcc python3-dev) and reinstall.",
        file=sys.stderr,
        flush=True,
    )


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    with _building(_NO_EXTENSIONS):
        requires = list(_setuptools.get_requires_for_build_wheel(config_settings))
    return [*requires, MYPY, *TYPED_RUNTIME] if choose(os.environ).compile else requires


def prepare_metadata_for_build_wheel(
    metadata_directory: str, config_settings: dict[str, Any] | None = None
) -> str:
    with _building(_NO_EXTENSIONS):
        return str(
            _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)
        )


def _mypy_missing() -> str | None:
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return f"mypy is not installed in the build environment (pip install '{MYPY}')"
    return None


def build_wheel(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    choice = choose(os.environ)
    if choice.compile:
        missing = _mypy_missing()
        if missing is not None:
            if choice.strict:
                raise BuildError(f"GATEWAY_COMPILE=1: {missing}")
            choice = Choice(False, why=missing, warn=True)
    if choice.compile and not choice.strict:
        try:
            with _building(choice):
                return str(
                    _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
                )
        except (Exception, SystemExit) as exc:  # mypyc exits on errors it reports
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            choice = Choice(False, why=f"the mypyc compile failed: {first}", warn=True)
    if choice.warn:
        warn(choice.why)
    with _building(choice):
        return str(_setuptools.build_wheel(wheel_directory, config_settings, metadata_directory))


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    choose(os.environ, editable=True)  # refuses GATEWAY_COMPILE=1 up front
    with _building(_NO_EXTENSIONS):
        return list(_setuptools.get_requires_for_build_editable(config_settings))


def prepare_metadata_for_build_editable(
    metadata_directory: str, config_settings: dict[str, Any] | None = None
) -> str:
    with _building(_NO_EXTENSIONS):
        return str(
            _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)
        )


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    with _building(choose(os.environ, editable=True)):
        return str(_setuptools.build_editable(wheel_directory, config_settings, metadata_directory))
