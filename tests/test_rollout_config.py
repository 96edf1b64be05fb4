"""The `rollout:` config section (docs/configuration.md "Rollouts"): every bad value is
refused naming its field, by `config.build` and by `gateway check` (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as C
from gateway.errors import ConfigError
from gateway.rollout_config import RolloutConfig, Webhook
from tests.conftest import gateway_config, two_releases

HOOK = {"name": "ok", "type": "confirm_step", "url": "http://127.0.0.1:9/hook"}


def _doc(rollout: Any) -> dict[str, Any]:
    return gateway_config(
        two_releases("http://127.0.0.1:9001", "http://127.0.0.1:9002"), rollout=rollout
    )


def test_defaults_and_a_full_section() -> None:
    assert C.build(_doc(None), env={}).rollout == RolloutConfig(
        300.0, 900.0, 1800.0, 1800.0, "pause", ()
    )
    cfg = C.build(
        _doc(
            {
                "min_first_pause": "1m",
                "min_pause": "2m",
                "confirm_timeout": "10m",
                "progress_deadline": "1h",
                "progress_deadline_action": "rollback",
                "lease_ttl": "30s",
                "publish_interval": "1s",
                "webhooks": [
                    HOOK,
                    {**HOOK, "name": "pre", "type": "pre_rollout", "timeout": "3s", "retries": 0},
                ],
            }
        ),
        env={},
    ).rollout
    assert (cfg.min_first_pause, cfg.min_pause, cfg.confirm_timeout) == (60.0, 120.0, 600.0)
    assert (cfg.progress_deadline, cfg.progress_deadline_action) == (3600.0, "rollback")
    assert (cfg.lease_ttl, cfg.publish_interval) == (30.0, 1.0)
    assert (RolloutConfig().lease_ttl, RolloutConfig().publish_interval) == (10.0, 5.0)
    assert cfg.webhooks == (
        Webhook("ok", "confirm_step", HOOK["url"], 10.0, 2),
        Webhook("pre", "pre_rollout", HOOK["url"], 3.0, 0),
    )
    assert cfg.hooks("pre_rollout") == (cfg.webhooks[1],)


BAD: list[tuple[str, Any, str]] = [
    ("not-a-mapping", ["x"], "rollout"),
    ("unknown-key", {"min_pauses": "1m"}, "rollout.min_pauses"),
    ("min-first-word", {"min_first_pause": "soon"}, "rollout.min_first_pause"),
    ("min-first-negative", {"min_first_pause": -1}, "rollout.min_first_pause"),
    ("min-pause-bool", {"min_pause": True}, "rollout.min_pause"),
    ("confirm-zero", {"confirm_timeout": 0}, "rollout.confirm_timeout"),
    ("deadline-zero", {"progress_deadline": "0s"}, "rollout.progress_deadline"),
    ("deadline-list", {"progress_deadline": [1]}, "rollout.progress_deadline"),
    ("action-unknown", {"progress_deadline_action": "panic"}, "rollout.progress_deadline_action"),
    ("action-number", {"progress_deadline_action": 1}, "rollout.progress_deadline_action"),
    ("lease-word", {"lease_ttl": "long"}, "rollout.lease_ttl"),
    ("lease-short", {"lease_ttl": "2s"}, "rollout.lease_ttl"),
    ("lease-zero", {"lease_ttl": 0}, "rollout.lease_ttl"),
    ("lease-huge", {"lease_ttl": "1h"}, "rollout.lease_ttl"),
    ("lease-bool", {"lease_ttl": True}, "rollout.lease_ttl"),
    ("publish-zero", {"publish_interval": "0s"}, "rollout.publish_interval"),
    ("publish-tiny", {"publish_interval": "100ms"}, "rollout.publish_interval"),
    ("publish-huge", {"publish_interval": "1h"}, "rollout.publish_interval"),
    ("publish-list", {"publish_interval": [5]}, "rollout.publish_interval"),
    ("hooks-not-list", {"webhooks": {"a": 1}}, "rollout.webhooks"),
    ("hook-not-mapping", {"webhooks": ["http://x"]}, "rollout.webhooks[0]"),
    ("hook-unknown-key", {"webhooks": [{**HOOK, "secret": 1}]}, "rollout.webhooks[0].secret"),
    ("hook-no-name", {"webhooks": [{**HOOK, "name": None}]}, "rollout.webhooks[0].name"),
    ("hook-bad-name", {"webhooks": [{**HOOK, "name": "a b"}]}, "rollout.webhooks[0].name"),
    ("hook-bad-type", {"webhooks": [{**HOOK, "type": "pre-rollout"}]}, "rollout.webhooks[0].type"),
    ("hook-no-url", {"webhooks": [{"name": "a", "type": "step"}]}, "rollout.webhooks[0].url"),
    ("hook-ftp-url", {"webhooks": [{**HOOK, "url": "ftp://h/"}]}, "rollout.webhooks[0].url"),
    (
        "hook-bad-port",
        {"webhooks": [{**HOOK, "url": "http://h:99999/"}]},
        "rollout.webhooks[0].url",
    ),
    ("hook-timeout-0", {"webhooks": [{**HOOK, "timeout": 0}]}, "rollout.webhooks[0].timeout"),
    ("hook-timeout-1h", {"webhooks": [{**HOOK, "timeout": "1h"}]}, "rollout.webhooks[0].timeout"),
    ("hook-retries-neg", {"webhooks": [{**HOOK, "retries": -1}]}, "rollout.webhooks[0].retries"),
    ("hook-retries-str", {"webhooks": [{**HOOK, "retries": "2"}]}, "rollout.webhooks[0].retries"),
    ("hook-retries-big", {"webhooks": [{**HOOK, "retries": 11}]}, "rollout.webhooks[0].retries"),
    ("hook-twice", {"webhooks": [HOOK, HOOK]}, "rollout.webhooks[1].name"),
]


@pytest.mark.parametrize(("case", "rollout", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_values_name_the_field(case: str, rollout: Any, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        C.build(_doc(rollout), env={})
    assert field in [p for p, _ in e.value.errors], e.value.errors


@pytest.mark.parametrize(
    ("rollout", "field"),
    [
        ({"min_first_pause": "soon"}, "rollout.min_first_pause"),
        ({"webhooks": [{**HOOK, "type": "nope"}]}, "rollout.webhooks[0].type"),
        ({"lease_ttl": "1s"}, "rollout.lease_ttl"),
        ({"publish_interval": "never"}, "rollout.publish_interval"),
    ],
    ids=["duration", "hook-type", "lease-ttl", "publish-interval"],
)
def test_gateway_check_exits_2_naming_the_field(tmp_path: Path, rollout: Any, field: str) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_text(yaml.safe_dump(_doc(rollout)), encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--no-bind", "-c", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "GATEWAY_"))},
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"  {field}: " in r.stderr and "Traceback" not in r.stderr
