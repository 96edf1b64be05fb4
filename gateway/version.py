"""The build's version string, as reported by `--version` and `X-App-Version`.

Why: like the Go original's `-ldflags -X main.version`, the version is fixed
at build time: the Dockerfile's `ARG VERSION` becomes `GATEWAY_BUILD_VERSION`;
a source checkout reports the package version plus `git describe`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from functools import cache
from pathlib import Path

from gateway import __version__


@cache
def build_version() -> str:
    baked = os.environ.get("GATEWAY_BUILD_VERSION", "").strip()
    if baked:
        return baked
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            out = subprocess.run(
                ["git", "-C", str(root), "describe", "--tags", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=2,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return __version__
        desc = out.stdout.strip()
        if out.returncode == 0 and desc:
            return f"{__version__}+git.{desc}"
    return __version__


# The modules setup.py's COMPILED list compiles with mypyc (the per-request path).
COMPILED_MODULES: tuple[str, ...] = (
    "gateway.engine.api",
    "gateway.engine.fast",
    "gateway.engine.fast_client",
    "gateway.engine.fast_head",
    "gateway.engine.fast_pool",
    "gateway.engine.fast_timers",
    "gateway.engine.fast_upstream",
    "gateway.engine.fast_reply",
    "gateway.engine.fast_wire",
    "gateway.engine.tls_conn",
    "gateway.balancer",
    "gateway.decide",
    "gateway.guard",
    "gateway.handler",
    "gateway.headers",
    "gateway.metrics",
    "gateway.propagation",
    "gateway.routing",
    "gateway.segments",
    "gateway.tally",
    "gateway.trust",
    "gateway.state",
    "gateway.sampling",
)


def _is_extension(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    origin = spec.origin if spec is not None else None
    return origin is not None and not origin.endswith(".py")


def pure_modules() -> list[str]:
    """The per-request modules that run as Python source (none in a compiled build)."""
    return [m for m in COMPILED_MODULES if not _is_extension(m)]


def compiled() -> bool:
    """True when every per-request module runs as a mypyc-compiled extension (setup.py)."""
    return not pure_modules()


def _recorded_why() -> str:
    """Why the build is pure, as the build recorded it (setup.py writes _build.json)."""
    try:
        record = json.loads((Path(__file__).resolve().parent / "_build.json").read_text())
    except (OSError, ValueError):
        return "a source checkout or editable install"
    why = record.get("why") if isinstance(record, dict) else None
    return str(why) if why else "no reason recorded"


def build_description() -> str:
    """Which build serves, for `gateway --version` and the startup log (README.md, "Install")."""
    pure = pure_modules()
    if not pure:
        return "compiled build: mypyc"
    if len(pure) < len(COMPILED_MODULES):
        return f"partly compiled build: {', '.join(pure)} run as Python source"
    return f"pure-Python build: {_recorded_why()}"
