"""The in-tree build backend: its choice (compiled or pure, and why) as a table; hooks for real."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest

from benchmarks.build import copy_sources
from gateway.version import COMPILED_MODULES, build_description, compiled, pure_modules
from tests.programs import need

ROOT = Path(__file__).resolve().parent.parent


def _backend() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gateway_build_under_test", ROOT / "_build" / "gateway_build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gb = _backend()


def _works(env: Mapping[str, str]) -> str | None:
    return None


def _no_cc(env: Mapping[str, str]) -> str | None:
    return "no C compiler: CC='cc' cannot run (No such file or directory)"


@pytest.mark.parametrize(
    ("env", "editable", "impl", "cc", "expect"),
    [
        ({}, False, "CPython", _works, gb.Choice(True)),
        ({"GATEWAY_COMPILE": "1"}, False, "CPython", _works, gb.Choice(True, strict=True)),
        ({"GATEWAY_COMPILE": "true"}, False, "CPython", _works, gb.Choice(True, strict=True)),
        ({"GATEWAY_PURE": "1"}, False, "CPython", _works, gb.Choice(False, why="GATEWAY_PURE=1")),
        ({"GATEWAY_PURE": "0"}, False, "CPython", _works, gb.Choice(True)),
        ({}, True, "CPython", _works, gb.Choice(False, why="editable install")),
        ({"GATEWAY_PURE": "1"}, True, "CPython", _works, gb.Choice(False, why="editable install")),
        ({}, False, "CPython", _no_cc, gb.Choice(False, why=_no_cc({}) or "", warn=True)),
        (
            {},
            False,
            "PyPy",
            _works,
            gb.Choice(False, why="mypyc compiles for CPython only, this is PyPy", warn=True),
        ),
        ({"GATEWAY_PURE": "yes"}, False, "PyPy", _no_cc, gb.Choice(False, why="GATEWAY_PURE=1")),
    ],
    ids=[
        "default-compiles",
        "compile-flag-strict",
        "compile-flag-true",
        "pure-opt-out",
        "pure-0-is-not-set",
        "editable-pure",
        "editable-beats-pure-flag",
        "no-compiler-warns",
        "not-cpython-warns",
        "opt-out-needs-no-probe",
    ],
)
def test_choice(env: dict[str, str], editable: bool, impl: str, cc: object, expect: object) -> None:
    got = gb.choose(env, editable=editable, implementation=impl, compiler_problem=cc)
    assert got == expect


@pytest.mark.parametrize(
    ("env", "editable", "impl", "cc", "message"),
    [
        ({"GATEWAY_COMPILE": "1"}, False, "CPython", _no_cc, "GATEWAY_COMPILE=1: no C compiler"),
        ({"GATEWAY_COMPILE": "1"}, False, "PyPy", _works, "GATEWAY_COMPILE=1: mypyc compiles"),
        ({"GATEWAY_COMPILE": "1"}, True, "CPython", _works, "editable installs stay pure"),
        ({"GATEWAY_COMPILE": "1", "GATEWAY_PURE": "1"}, False, "CPython", _works, "contradict"),
    ],
    ids=["compile-no-compiler", "compile-not-cpython", "compile-editable", "both-flags"],
)
def test_impossible_builds_fail_loudly(
    env: dict[str, str], editable: bool, impl: str, cc: object, message: str
) -> None:
    with pytest.raises(gb.BuildError, match=message):
        gb.choose(env, editable=editable, implementation=impl, compiler_problem=cc)


def test_the_compiler_probe_for_real() -> None:
    need("gcc", "the probe compiles a file including Python.h")
    assert gb.c_compiler_problem({}) is None
    why = gb.c_compiler_problem({"CC": "/bin/false"})
    assert why == "no working C compiler: CC='/bin/false' failed on a test file (exit 1)"
    why = gb.c_compiler_problem({"CC": "/nonexistent/cc -O2"})
    assert why == "no C compiler: CC='/nonexistent/cc -O2' cannot run (No such file or directory)"


def _hook(src: Path, call: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Call a backend hook as a PEP 517 frontend does: in the source dir, _build on sys.path."""
    code = "import json, sys; sys.path.insert(0, '_build'); import gateway_build as b; "
    code += f"print(json.dumps({call}))"
    base = {
        k: v for k, v in os.environ.items() if k not in ("GATEWAY_COMPILE", "GATEWAY_PURE", "CC")
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=src,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("hook", "env", "mypy"),
    [
        ("get_requires_for_build_wheel()", {}, True),
        ("get_requires_for_build_wheel()", {"CC": "/bin/false"}, False),
        ("get_requires_for_build_wheel()", {"GATEWAY_PURE": "1"}, False),
        ("get_requires_for_build_editable()", {}, False),
    ],
    ids=["wheel-compiles", "wheel-no-compiler", "wheel-opted-out", "editable"],
)
def test_mypy_is_a_build_requirement_only_when_compiling(
    tmp_path: Path, hook: str, env: dict[str, str], mypy: bool
) -> None:
    need("gcc", "the hook probes the C compiler")
    done = _hook(copy_sources(tmp_path / "src"), f"b.{hook}", **env)
    assert done.returncode == 0, done.stderr[-3000:]
    requires = json.loads(done.stdout.strip().splitlines()[-1])
    assert (gb.MYPY in requires) is mypy, requires
    assert not any(r.startswith("mypy") and r != gb.MYPY for r in requires)
    # mypyc types its calls into these only when they are in the build environment
    assert all((r in requires) is mypy for r in gb.TYPED_RUNTIME), requires


def test_editable_with_the_compile_flag_is_refused(tmp_path: Path) -> None:
    done = _hook(
        copy_sources(tmp_path / "src"), "b.get_requires_for_build_editable()", GATEWAY_COMPILE="1"
    )
    assert done.returncode != 0 and "editable installs stay pure" in done.stderr


def test_mypy_is_pinned_to_the_version_the_type_checks_use() -> None:
    assert gb.MYPY.startswith("mypy==") and gb.MYPY.count(".") == 2
    try:
        from mypy.version import __version__
    except ImportError:  # a venv without the test extra
        return
    assert gb.MYPY == f"mypy=={__version__.split('+')[0]}"


def test_the_typed_runtime_build_requirements_are_the_runtime_dependencies() -> None:
    """The compiled build asks for the runtime packages whose types it compiles against,
    with pyproject.toml's own specifiers (so the build never types against another range)."""
    deps = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert gb.TYPED_RUNTIME and set(gb.TYPED_RUNTIME) <= deps, gb.TYPED_RUNTIME


def test_setup_compiles_exactly_the_modules_compiled_checks() -> None:
    tree = ast.parse((ROOT / "setup.py").read_text())
    assigned = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", "") == "COMPILED" for t in node.targets)
    )
    paths = ast.literal_eval(assigned)
    assert tuple(p.removesuffix(".py").replace("/", ".") for p in paths) == COMPILED_MODULES


def test_this_checkout_runs_the_pure_build_and_says_why() -> None:
    assert not compiled() and pure_modules() == list(COMPILED_MODULES)
    assert build_description() == "pure-Python build: a source checkout or editable install"
