"""The layering of docs/architecture.md holds: who may import whom.

Read with `ast`, so imports inside functions (the lazy ones) count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "gateway"

# Policy: plain values in, plain values out; time and randomness passed in.
PURE = (
    "analysis",
    "analysis_config",
    "balancer",
    "changes",
    "config_syntax",
    "decide",
    "errors",
    "guard",
    "headers",
    "lease",
    "paths",
    "propagation",
    "ratelog",
    "readiness",
    "retry",
    "rollout",
    "routing",
    "rules",
    "segments",
    "segments_config",
    "state",
    "statedoc",
    "steering_config",
    "strategy",
    "tally",
    "trust",
)
# Whatever does I/O, waits or serves: never imported by policy.
IO_LIBRARIES = ("aiohttp", "asyncio", "uvloop", "httptools", "prometheus_client", "opentelemetry")
# The modules that wire or serve; policy never reaches up into them.
UPPER = (
    "gateway.admin",
    "gateway.alerts",
    "gateway.app",
    "gateway.audit",
    "gateway.cli",
    "gateway.cli_admin",
    "gateway.control",
    "gateway.demo",
    "gateway.discovery",
    "gateway.engine",
    "gateway.guardian",
    "gateway.handler",
    "gateway.healthcheck",
    "gateway.metrics",
    "gateway.store",
    "gateway.telemetry",
)
# The engine sits below the handler: it knows its own interface, the config's
# timeouts, the hop-by-hop rules and the TLS contexts it dials and serves with
# (gateway/tls.py, gateway/tls_config.py), nothing of routing or the control plane.
ENGINE_MAY_IMPORT = (
    "gateway.engine",
    "gateway.config",
    "gateway.headers",
    "gateway.errors",
    "gateway.tls",
    "gateway.tls_config",
)


def imports(path: Path) -> Iterator[str]:
    """Every module `path` imports, as dotted names (`from gateway import x` -> gateway.x)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", PURE, ids=PURE)
def test_policy_modules_import_no_io_and_nothing_above_them(module: str) -> None:
    path = PKG / f"{module}.py"
    bad = sorted({n for n in imports(path) if _under(n, IO_LIBRARIES) or _under(n, UPPER)})
    assert not bad, (
        f"gateway/{module}.py is pure policy (docs/architecture.md) but imports {bad}: "
        "pass the values in instead, or move the I/O to the control plane or the engine"
    )


ENGINE_MODULES = sorted(p.stem for p in (PKG / "engine").glob("*.py"))


@pytest.mark.parametrize("module", ENGINE_MODULES, ids=ENGINE_MODULES)
def test_the_engine_imports_only_its_interface_config_and_header_rules(module: str) -> None:
    names = {n for n in imports(PKG / "engine" / f"{module}.py") if n.startswith("gateway")}
    bad = sorted(n for n in names if not _under(n, ENGINE_MAY_IMPORT))
    assert not bad, (
        f"gateway/engine/{module}.py imports {bad}: the engine talks to the rest of the "
        "gateway only through gateway/engine/api.py (docs/architecture.md)"
    )


def test_every_listed_module_exists() -> None:
    """A renamed module must be renamed here too, or the rule above checks nothing."""
    assert all((PKG / f"{m}.py").exists() for m in PURE)
    assert all(
        (PKG / (u.split(".", 1)[1] + ".py")).exists() or (PKG / u.split(".", 1)[1]).is_dir()
        for u in UPPER
    )


def test_the_rule_catches_an_io_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import asyncio\n    from gateway import control\n")
    found = set(imports(f))
    assert _under("asyncio", IO_LIBRARIES) and "asyncio" in found
    assert "gateway.control" in found and _under("gateway.control", UPPER)
