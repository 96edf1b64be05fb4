"""config/strategy.example.yaml validates against config/gateway.yaml and plans what it says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway import cli, config, strategy
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "strategy.example.yaml"
CONFIG = ROOT / "config" / "gateway.yaml"


def test_the_example_validates_against_the_example_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["strategy", "validate", str(EXAMPLE), "-c", str(CONFIG)]) == 0
    assert "OK (3 target(s), traffic 20%" in capsys.readouterr().out


def test_the_example_plans_the_weights_its_comments_state(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["strategy", "plan", str(EXAMPLE), "-c", str(CONFIG)]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "user-api": {"gray": 20, "stable": 80},
        "catalog": {"batch-1": 15, "batch-2": 5, "stable": 80},
    }


def test_a_broken_copy_of_the_example_is_refused_naming_the_field() -> None:
    cfg = config.load(str(CONFIG))
    text = EXAMPLE.read_text().replace("version: batch-2", "version: batch-9")
    with pytest.raises(ConfigError) as e:
        strategy.load_text(text, cfg)
    assert [p for p, _ in e.value.errors] == ["targets[2].version"]


def test_the_readme_points_to_the_example() -> None:
    assert "config/strategy.example.yaml" in (ROOT / "README.md").read_text()
