"""The repository's promises to a newcomer: README commands and CI stay in sync."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def _sh_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", text, re.S)]


def test_readme_gives_demo_and_test_commands_near_the_top() -> None:
    blocks = _sh_blocks(README[:2500])
    assert any("gateway demo" in b and "pip install" in b for b in blocks)
    assert any("pytest" in b and "pip install" in b for b in blocks)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_cmd = next(b for b in _sh_blocks(README) if "pytest" in b and "pip install" in b)
    assert test_cmd in CI
    assert "set -euo pipefail" in CI  # a failing pytest (or exit 5: nothing collected) fails CI
