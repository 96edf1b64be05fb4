"""Config loading: defaults, env overrides, and every error reported with its path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import config as C
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
MINIMAL: dict[str, Any] = {
    "services": {
        "svc": {"releases": {"stable": {"weight": 1, "upstreams": ["http://127.0.0.1:1"]}}}
    }
}


def test_defaults_for_everything_but_services() -> None:
    cfg = C.build(MINIMAL, env={})
    assert cfg.listen == C.HostPort("0.0.0.0", 8080)
    assert cfg.admin.listen == C.HostPort("127.0.0.1", 9901)
    assert cfg.workers == 1 and cfg.state.store == "file"
    assert cfg.routing.stage_header == "X-Release-Stage" and cfg.routing.trust_overrides is True
    svc = cfg.services["svc"]
    assert svc.baseline == "stable" and svc.balancer == "p2c" and svc.salt == "svc"
    assert svc.timeouts == C.Timeouts(2.0, 30.0, None)


def test_example_config_is_valid() -> None:
    cfg = C.load(str(ROOT / "config" / "gateway.yaml"), env={})
    assert "user-api" in cfg.services
    assert cfg.services["user-api"].releases["gray"].upstreams[0].weight == 2
    assert cfg.services["user-api"].timeouts.read == 10.0


def test_env_overrides() -> None:
    env = {
        "GATEWAY_CONFIG": str(ROOT / "config" / "gateway.yaml"),
        "CONSUL_HTTP_ADDR": "10.0.0.5:8500",
        "CONSUL_HTTP_TOKEN": "t0k",
        "GATEWAY_ADMIN_TOKEN": "secret",
    }
    cfg = C.load(None, env=env)
    assert cfg.source == env["GATEWAY_CONFIG"]
    assert cfg.consul.address == "http://10.0.0.5:8500" and cfg.consul.token == "t0k"
    assert cfg.admin.token == "secret"


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({}, "services"),
        ({"services": {"s": {"releases": {}}}}, "services.s.releases"),
        (
            {"services": {"s": {"releases": {"stable": {"upstreams": ["http://h:1"]}}}}},
            "services.s.releases.stable.weight",
        ),
        (
            {"services": {"s": {"releases": {"stable": {"weight": "x", "upstreams": ["h:1"]}}}}},
            "services.s.releases.stable.weight",
        ),
        (
            {"services": {"s": {"releases": {"stable": {"weight": 1, "upstreams": ["ftp://h"]}}}}},
            "services.s.releases.stable.upstreams[0]",
        ),
        (
            {"services": {"s": {"releases": {"stable": {"weight": 0, "upstreams": ["h:1"]}}}}},
            "services.s.releases",
        ),
        (
            {
                "services": {
                    "s": {
                        "baseline": "x",
                        "releases": {"stable": {"weight": 1, "upstreams": ["h:1"]}},
                    }
                }
            },
            "services.s.baseline",
        ),
        (
            {**MINIMAL, "routing": {"trust_overrides": ["10.0.0.0/33"]}},
            "routing.trust_overrides[0]",
        ),
        ({**MINIMAL, "timeouts": {"connect": "soon"}}, "timeouts.connect"),
        ({**MINIMAL, "workers": 0}, "workers"),
        ({**MINIMAL, "listen": 8080}, "listen"),
        ({**MINIMAL, "bogus": 1}, "bogus"),
        ({**MINIMAL, "state": {"store": "redis"}}, "state.store"),
    ],
    ids=[
        "no-services",
        "no-releases",
        "missing-weight",
        "weight-type",
        "bad-upstream",
        "all-zero",
        "bad-baseline",
        "bad-cidr",
        "bad-duration",
        "workers",
        "listen-type",
        "unknown-field",
        "bad-store",
    ],
)
def test_errors_name_their_path(doc: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as e:
        C.build(doc, env={})
    assert path in [p for p, _ in e.value.errors]


def test_every_error_is_reported() -> None:
    doc = {
        "listen": "nope",
        "services": {
            "user-api": {
                "balancer": "fastest",
                "releases": {
                    "stable": {"weight": 95, "upstreams": ["http://127.0.0.1:9001"]},
                    "gray": {"weight": -5, "upstreams": ["http://127.0.0.1:9011"]},
                },
            }
        },
    }
    with pytest.raises(ConfigError) as e:
        C.build(doc, env={})
    paths = {p for p, _ in e.value.errors}
    assert paths == {
        "listen",
        "services.user-api.balancer",
        "services.user-api.releases.gray.weight",
    }
    assert any("must be a number >= 0" in m for _, m in e.value.errors)


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_command_exit_codes(tmp_path: Path) -> None:
    # --no-bind: the example's ports (8080, 9901) may be taken on a shared machine
    ok = _check("--no-bind", str(ROOT / "config" / "gateway.yaml"))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listen: nope\nservices:\n  user-api:\n    balancer: fastest\n    releases:\n"
        "      stable: {weight: 95, upstreams: ['http://127.0.0.1:9001']}\n"
        "      gray: {weight: -5, upstreams: ['http://127.0.0.1:9011']}\n"
    )
    r = _check("-c", str(bad))
    assert r.returncode == 2
    for p in ("listen:", "services.user-api.balancer:", "services.user-api.releases.gray.weight:"):
        assert p in r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("services: [unclosed\n")
    assert _check("-c", str(broken)).returncode == 2
    assert _check("-c", str(tmp_path / "missing.yaml")).returncode == 2


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("2s", 2.0),
        ("300ms", 0.3),
        ("5m", 300.0),
        (3, 3.0),
        ("1.5h", 5400.0),
        ("x", None),
        (-1, None),
        (True, None),
    ],
    ids=["s", "ms", "m", "int", "h", "garbage", "negative", "bool"],
)
def test_parse_duration(raw: object, want: float | None) -> None:
    assert C.parse_duration(raw) == want
