"""The build's version string, as reported by `--version` and `X-App-Version`.

Why: like the Go original's `-ldflags -X main.version`, the version is fixed
at build time: the Dockerfile's `ARG VERSION` becomes `GATEWAY_BUILD_VERSION`;
a source checkout reports the package version plus `git describe`.
"""

from __future__ import annotations

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


def compiled() -> bool:
    """True when the per-request modules run as mypyc-compiled extensions (setup.py)."""
    from gateway import handler

    return not handler.__file__.endswith(".py")
