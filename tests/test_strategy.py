"""Strategy DSL (README "Admin API") and the admin CLI (`gateway weights`, `gateway strategy`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import cli, strategy
from gateway import config as C
from gateway.app import Gateway
from gateway.errors import ConfigError

SPEC_EXAMPLE = """\
version: v1
traffic: 20%
targets:
  - {service: user-api, version: "v2.1", weight: 80}
  - {service: user-api, version: "v2.0", weight: 20}
"""

FOUR_MISTAKES = """\
version: v1
traffic: 120%
targets:
  - {service: user-api, version: "v9", weight: 80}
  - {service: x, version: "v2.0", weight: 20}
  - {service: user-api, version: "v2.0", weight: -5}
"""


# Label routing and time windows (seed §4.1) beside the traffic split.
SEGMENTS_EXAMPLE = """\
version: v1
traffic: 20%
targets:
  - {service: user-api, version: "v2.1", weight: 80}
  - {service: user-api, version: "v2.0", weight: 20}
segments:
  user-api:
    - name: beta
      match: {header: {X-Beta: "true"}}
      release: "v2.1"
    - name: night
      match: {time: {from: "22:00", to: "06:00", tz: Asia/Shanghai, days: [mon, tue]}}
      weights: {stable: 80, "v2.0": 20}
  catalog:
    - name: staff
      match: {cookie: {role: {in: [staff, admin]}}}
      release: v3
"""


def config_doc(admin_port: int = 0, token_env: str | None = None) -> dict[str, Any]:
    up = ["http://127.0.0.1:9"]
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token_env": token_env},
        "state": {"store": "memory"},
        "drain_timeout": "1s",
        "services": {
            "user-api": {
                "releases": {
                    "stable": {"weight": 100, "upstreams": up},
                    "v2.1": {"weight": 0, "upstreams": up},
                    "v2.0": {"weight": 0, "upstreams": up},
                }
            },
            "catalog": {
                "match": {"path_prefix": "/catalog"},
                "releases": {
                    "stable": {"weight": 90, "upstreams": up},
                    "v3-canary": {
                        "weight": 10,
                        "consul": {"service": "catalog", "tags": ["v3", "gray"]},
                    },
                    "old": {"weight": 0, "consul": {"service": "catalog", "tags": ["v1", "gray"]}},
                },
            },
        },
    }


CFG = C.build(config_doc(), env={})


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config_doc()))
    (tmp_path / "spec.yaml").write_text(SPEC_EXAMPLE)
    (tmp_path / "four.yaml").write_text(FOUR_MISTAKES)
    return tmp_path


def test_validate_spec_example_exits_0(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(
        ["strategy", "validate", str(files / "spec.yaml"), "-c", str(files / "gateway.yaml")]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "OK" in out.out


def test_validate_four_mistakes_exits_2_naming_four_paths(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main(
        ["strategy", "validate", str(files / "four.yaml"), "-c", str(files / "gateway.yaml")]
    )
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln.strip() for ln in err.splitlines()[1:]]
    assert [ln.split(":")[0] for ln in lines] == [
        "traffic",
        "targets[0].version",
        "targets[1].service",
        "targets[2].weight",
    ]
    assert "4 error(s)" in err.splitlines()[0]
    assert "targets[1].service: unknown service 'x'" in err


def test_plan_prints_16_4_80(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["strategy", "plan", str(files / "spec.yaml"), "-c", str(files / "gateway.yaml")])
    assert rc == 0
    assert json.loads(capsys.readouterr().out) == {
        "user-api": {"v2.1": 16, "v2.0": 4, "stable": 80}
    }


def test_strategy_with_a_broken_config_exits_2(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (files / "bad.yaml").write_text("services: {}\n")
    rc = cli.main(["strategy", "validate", str(files / "spec.yaml"), "-c", str(files / "bad.yaml")])
    assert rc == 2 and "services" in capsys.readouterr().err


ERRORS = [
    ("not-mapping", "[1, 2]", ["(root)"]),
    ("bad-yaml", "traffic: [", ["(yaml)"]),
    ("missing-all", "version: v1\n", ["traffic", "targets"]),
    (
        "version",
        "version: v2\ntraffic: 5\ntargets: [{service: user-api, version: v2.1}]",
        ["version"],
    ),
    (
        "unknown-fields",
        "traffic: 5\nfoo: 1\ntargets: [{service: user-api, version: v2.1, w: 1}]",
        ["foo", "targets[0].w"],
    ),
    (
        "traffic-negative",
        "traffic: -5%\ntargets: [{service: user-api, version: v2.1}]",
        ["traffic"],
    ),
    ("traffic-text", "traffic: lots\ntargets: [{service: user-api, version: v2.1}]", ["traffic"]),
    ("traffic-bool", "traffic: true\ntargets: [{service: user-api, version: v2.1}]", ["traffic"]),
    ("targets-empty", "traffic: 5\ntargets: []", ["targets"]),
    ("target-not-mapping", "traffic: 5\ntargets: [user-api]", ["targets[0]"]),
    (
        "version-number",
        "traffic: 5\ntargets: [{service: user-api, version: 2.1}]",
        ["targets[0].version"],
    ),
    (
        "baseline-target",
        "traffic: 5\ntargets: [{service: user-api, version: stable}]",
        ["targets[0].version"],
    ),
    (
        "ambiguous-tag",
        "traffic: 5\ntargets: [{service: catalog, version: gray}]",
        ["targets[0].version"],
    ),
    (
        "duplicate",
        "traffic: 5\ntargets: [{service: user-api, version: v2.1},"
        " {service: user-api, version: v2.1}]",
        ["targets[1]"],
    ),
    (
        "weight-bool",
        "traffic: 5\ntargets: [{service: user-api, version: v2.1, weight: true}]",
        ["targets[0].weight"],
    ),
    (
        "zero-sum",
        "traffic: 5\ntargets: [{service: user-api, version: v2.1, weight: 0}]",
        ["targets"],
    ),
    (
        "duplicate-key",
        "traffic: 5\ntraffic: 50\ntargets: [{service: user-api, version: v2.1}]",
        ["traffic"],
    ),
    ("segments-not-mapping", "segments: [1]", ["segments"]),
    (
        "segments-unknown-service",
        "segments: {nope: []}",
        ["segments.nope"],
    ),
    ("segments-not-list", "segments: {user-api: {name: x}}", ["segments.user-api"]),
    (
        "segment-bad-regex",
        "segments: {user-api: [{name: a, match: {header: {X-A: {regex: '(a'}}}, release: v2.1}]}",
        ["segments.user-api[0].match.header.X-A.regex"],
    ),
    (
        "segment-unknown-release",
        "segments: {user-api: [{name: a, match: {header: {X-A: '1'}}, release: blue}]}",
        ["segments.user-api[0].release"],
    ),
    (
        "segment-ambiguous-tag",
        "segments: {catalog: [{name: a, match: {header: {X-A: '1'}}, release: gray}]}",
        ["segments.catalog[0].release"],
    ),
    (
        "segment-bad-time-zone",
        "segments: {user-api: [{name: a, match: {time: {from: '22:00', to: '06:00',"
        " tz: Nowhere/Land}}, weights: {v2.1: 1}}]}",
        ["segments.user-api[0].match.time.tz"],
    ),
    (
        "segment-negative-weight",
        "segments: {user-api: [{name: a, match: {header: {X-A: '1'}}, weights: {v2.1: -1}}]}",
        ["segments.user-api[0].weights.v2.1"],
    ),
    (
        "segment-missing-file",
        "segments: {user-api: [{name: a, match: {users: {file: /no/such/users.txt}},"
        " release: v2.1}]}",
        ["segments.user-api[0].match.users.file"],
    ),
    (
        "segments-with-half-a-split",
        "traffic: 5\nsegments: {user-api: []}",
        ["targets"],
    ),
]


@pytest.mark.parametrize(("text", "paths"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_every_error_is_reported_with_its_path(text: str, paths: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        strategy.load_text(text, CFG)
    assert [p for p, _ in e.value.errors] == paths


PLANS = [
    ("spec", SPEC_EXAMPLE, {"user-api": {"v2.1": 16, "v2.0": 4, "stable": 80}}),
    (
        "percent-number",
        "traffic: 50\ntargets: [{service: user-api, version: v2.1}]",
        {"user-api": {"v2.1": 50, "stable": 50, "v2.0": 0}},
    ),
    (
        "zero-traffic",
        "traffic: 0%\ntargets: [{service: user-api, version: v2.1, weight: 0}]",
        {"user-api": {"v2.1": 0, "stable": 100, "v2.0": 0}},
    ),
    (
        "all-traffic",
        "traffic: 100%\ntargets: [{service: user-api, version: v2.0}]",
        {"user-api": {"v2.0": 100, "stable": 0, "v2.1": 0}},
    ),
    (
        "consul-tag",
        "traffic: 10%\ntargets: [{service: catalog, version: v3}]",
        {"catalog": {"v3-canary": 10, "stable": 90, "old": 0}},
    ),
    (
        "two-services",
        "traffic: 12.5 %\ntargets: [{service: catalog, version: v1},"
        " {service: user-api, version: v2.1, weight: 3}, {service: user-api, version: v2.0}]",
        {
            "catalog": {"old": 12.5, "stable": 87.5, "v3-canary": 0},
            "user-api": {"v2.1": 9.375, "v2.0": 3.125, "stable": 87.5},
        },
    ),
]


@pytest.mark.parametrize(("text", "expected"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_plan_table(text: str, expected: dict[str, dict[str, float]]) -> None:
    assert strategy.plan(strategy.load_text(text, CFG), CFG) == expected


def test_segments_are_checked_and_resolved_like_targets() -> None:
    st = strategy.load_text(SEGMENTS_EXAMPLE, CFG)
    assert strategy.plan(st, CFG) == {"user-api": {"v2.1": 16, "v2.0": 4, "stable": 80}}
    assert st.segments["user-api"][0] == {
        "name": "beta",
        "match": {"header": {"X-Beta": "true"}},
        "release": "v2.1",
    }
    assert st.segments["user-api"][1]["weights"] == {"stable": 80, "v2.0": 20}
    # a Consul tag resolves to its release, as for targets
    assert st.segments["catalog"][0]["release"] == "v3-canary"


def test_a_strategy_of_segments_alone_changes_no_weights() -> None:
    st = strategy.load_text("segments: {user-api: []}", CFG)
    assert strategy.plan(st, CFG) == {}
    assert st.segments == {"user-api": []}


def test_plan_with_segments_prints_both(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "seg.yaml").write_text(SEGMENTS_EXAMPLE)
    rc = cli.main(["strategy", "plan", str(files / "seg.yaml"), "-c", str(files / "gateway.yaml")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weights"] == {"user-api": {"v2.1": 16, "v2.0": 4, "stable": 80}}
    assert [x["name"] for x in out["segments"]["user-api"]] == ["beta", "night"]


# --------------------------------------------------------------------------- against a live admin


@pytest.fixture
async def live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Gateway, Path]]:
    monkeypatch.setenv("GW_STRATEGY_TOKEN", "t0ken")
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "t0ken")
    gw = Gateway(C.build(config_doc(token_env="GW_STRATEGY_TOKEN")), data=False)
    await gw.start()
    monkeypatch.setenv("GATEWAY_ADMIN_URL", f"http://127.0.0.1:{gw.admin_port}")
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config_doc()))
    (tmp_path / "spec.yaml").write_text(SPEC_EXAMPLE)
    try:
        yield gw, tmp_path
    finally:
        await gw.stop(0)


async def _cli(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


async def test_strategy_apply_sends_the_plan_through_the_admin_api(
    live: tuple[Gateway, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    gw, d = live
    rc = await _cli("strategy", "apply", str(d / "spec.yaml"), "-c", str(d / "gateway.yaml"))
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["user-api"]["weights"] == {"stable": 80, "v2.1": 16, "v2.0": 4}
    assert gw.holder.current.services["user-api"].table.raw == {"stable": 80, "v2.1": 16, "v2.0": 4}


async def test_strategy_apply_puts_each_services_segments(
    live: tuple[Gateway, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    gw, d = live
    (d / "seg.yaml").write_text(SEGMENTS_EXAMPLE)
    rc = await _cli("strategy", "apply", str(d / "seg.yaml"), "-c", str(d / "gateway.yaml"))
    out = capsys.readouterr()
    assert rc == 0, out.err
    applied = json.loads(out.out)
    assert applied["user-api"]["weights"] == {"stable": 80, "v2.1": 16, "v2.0": 4}
    assert applied["user-api"]["segments"] == ["beta", "night"]
    assert applied["catalog"]["segments"] == ["staff"]
    snap = gw.holder.current
    assert snap.version == 3  # weights, then each service's segments
    catalog = snap.services["catalog"].cfg.segments
    assert catalog is not None and catalog.segments[0].route.release == "v3-canary"
    user_api = snap.services["user-api"].cfg.segments
    assert user_api is not None and [s.name for s in user_api.segments] == ["beta", "night"]
    # and the data path's decision (explain) routes by them
    url = f"http://127.0.0.1:{gw.admin_port}/admin/services/user-api/explain?header=X-Beta:true"
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer t0ken"}) as s:
        async with s.get(url) as r:
            ex = await r.json()
    assert (ex["reason"], ex["segment"], ex["release"]) == ("segment", "beta", "v2.1")


async def test_weights_get_and_set(
    live: tuple[Gateway, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    gw, _ = live
    assert await _cli("weights", "set", "user-api", "v2.1=5", "stable=95") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["state_version"] == 1
    assert out["weights"] == {"stable": 95, "v2.1": 5, "v2.0": 0}
    assert await _cli("weights", "get", "user-api") == 0
    assert json.loads(capsys.readouterr().out)["percent"]["v2.1"] == 5
    assert await _cli("weights", "set", "user-api", "v2.1=6", "--if-match", "0") == 1
    assert "HTTP 409" in capsys.readouterr().err
    assert await _cli("weights", "set", "user-api", "blue=5") == 1
    assert "weights.blue: unknown release 'blue'" in capsys.readouterr().err
    assert await _cli("weights", "set", "user-api", "v2.1=lots") == 2
    assert "not a number" in capsys.readouterr().err
    assert await _cli("weights", "get", "nope") == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert gw.holder.current.version == 1


async def test_weights_cli_without_token_is_refused(
    live: tuple[Gateway, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN")
    assert await _cli("weights", "get", "user-api") == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_weights_cli_unreachable_admin(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["weights", "get", "user-api", "--admin", url]) == 1
    assert f"cannot reach the admin API at {url}" in capsys.readouterr().err
