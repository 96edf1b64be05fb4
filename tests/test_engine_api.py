"""gateway/engine/api.py: both engines implement the `Engine` protocol that gateway/app.py drives.

Checked twice: by mypy (strict, on a typed snippet: an engine that stopped satisfying the
protocol fails it, as a class missing members does) and at run time (the member set and
each method's parameters, on the classes as they import).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.engine.aio import AiohttpEngine
from gateway.engine.api import Engine, Forward, Limits, RequestHead, Respond
from gateway.engine.fast import FastEngine
from gateway.upstream_config import DEFAULT_MAX_CONNECTIONS, DEFAULT_QUEUE_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent

SNIPPET = """
from __future__ import annotations

import socket

from gateway.engine.aio import AiohttpEngine
from gateway.engine.api import Engine
from gateway.engine.fast import FastEngine


def fast(e: FastEngine) -> Engine:
    return e


def aio(e: AiohttpEngine) -> Engine:
    return e


class NoShutdown:
    async def serve(self, sock: socket.socket) -> None: ...


def broken(e: NoShutdown) -> Engine:
    return e  # the one error expected
"""


def test_mypy_accepts_both_engines_as_engine_and_refuses_a_class_missing_members(
    tmp_path: Path,
) -> None:
    snippet = tmp_path / "engines_typed.py"
    snippet.write_text(SNIPPET)
    cmd = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental"]
    cmd += ["--cache-dir", str(tmp_path / "cache"), str(snippet)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110).stdout
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 1, out
    assert "the one error expected" in SNIPPET.splitlines()[int(errors[0].split(":")[1]) - 1]
    assert '"NoShutdown", expected "Engine"' in errors[0]


class _Handler:
    def handle(self, head: RequestHead) -> Forward | Respond:
        return Respond(404, b"")

    def error_body(self, status: int, kind: str, fwd: Forward) -> Respond:
        return Respond(status, b"")


def _protocol_members() -> dict[str, object]:
    """Engine's public members (a compiled api.py shows properties as getset descriptors)."""
    return {name: getattr(Engine, name) for name in dir(Engine) if not name.startswith("_")}


def _parameters(method: object) -> list[str] | None:
    """Parameter names but `self`; None where a compiled (mypyc) method does not say."""
    try:
        names = [p for p in inspect.signature(method).parameters if p != "self"]  # type: ignore[arg-type]
    except ValueError:
        return None
    return names or None  # a compiled coroutine method shows `()`


def test_the_protocol_names_what_app_py_calls() -> None:
    assert sorted(_protocol_members()) == [
        "in_flight",
        "serve",
        "set_tls",
        "shutdown",
        "upstream_limits",
    ]


@pytest.mark.parametrize("cls", [FastEngine, AiohttpEngine], ids=["fast", "aiohttp"])
def test_each_engine_has_every_member_with_the_same_parameters(cls: type[object]) -> None:
    engine = cls(_Handler())  # type: ignore[call-arg]
    for name, member in _protocol_members().items():
        assert hasattr(engine, name), f"{cls.__name__} has no {name}"
        if not inspect.isroutine(member):
            continue  # a property: present is what counts
        got = getattr(cls, name)
        assert inspect.isroutine(got), f"{cls.__name__}.{name} is not a method"
        have, want = _parameters(got), _parameters(member)
        if have is not None and want is not None:
            assert have == want, f"{cls.__name__}.{name}{have} != Engine.{name}{want}"


@pytest.mark.parametrize("cls", [FastEngine, AiohttpEngine], ids=["fast", "aiohttp"])
def test_each_engine_takes_no_catch_all_keyword_arguments(cls: type[object]) -> None:
    """A misspelt option must be a TypeError, not silently ignored."""
    try:
        params = inspect.signature(cls).parameters.values()
    except ValueError:  # pragma: no cover - compiled class without a signature
        pytest.skip("compiled class exposes no signature")
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params)
    with pytest.raises(TypeError):
        cls(_Handler(), no_such_option=1)


def test_the_engines_default_limits_are_the_configs() -> None:
    """engine/api.py copies upstream_config's defaults (the engine may not import it)."""
    assert Limits().default == (DEFAULT_MAX_CONNECTIONS, DEFAULT_QUEUE_TIMEOUT)


def test_forward_reports_its_end_to_on_done_through_done() -> None:
    got: list[tuple[int, str | None]] = []

    def first(status: int, kind: str | None) -> None:
        got.append((status, kind))

    fwd = Forward("h", 1, None, None, "svc", "stable", 1.0, 1.0, first)
    assert fwd.on_done is first
    fwd.done(200, None)
    fwd.on_done = lambda status, kind: got.append((-status, kind))
    fwd.done(502, "reset")
    assert got == [(200, None), (-502, "reset")]
    quiet = Forward("h", 1, None, None, "svc", "stable", 1.0, 1.0, None)
    quiet.done(200, None)  # no on_done: nothing to report to
    quiet.on_done(200, None)  # reads as `done`: still a callable
