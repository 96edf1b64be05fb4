"""gateway/control.py: how a change is validated, stored and applied, and how a reload swaps.

A real ControlPlane on the in-process memory store (or a file config for reloads):
the order validate -> store -> swap -> hook, and "nothing changed" on every refusal.
The rollout driver is tested in tests/test_rollout*.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as config_mod
from gateway.config import Config, HostPort
from gateway.control import ControlPlane, check_admin_exposure, is_loopback
from gateway.errors import BadRequest, ConfigError, Conflict
from gateway.state import SnapshotHolder, build_snapshot
from gateway.store.memory import MemoryStore

RAW: dict[str, Any] = {
    "state": {"store": "memory"},
    "admin": {"token_env": None},
    "services": {
        "user-api": {
            "releases": {
                "stable": {"weight": 95, "upstreams": ["http://127.0.0.1:9001"]},
                "gray": {"weight": 5, "upstreams": ["http://127.0.0.1:9011"]},
            }
        }
    },
}


def _plane(cfg: Config) -> ControlPlane:
    return ControlPlane(cfg, SnapshotHolder(build_snapshot(cfg)), store=MemoryStore())


@pytest.fixture
async def plane() -> AsyncIterator[ControlPlane]:
    cp = _plane(config_mod.build(RAW, env={}))
    await cp.start(admin=True)
    yield cp
    await cp.stop()


def _weights(cp: ControlPlane) -> dict[str, float]:
    return dict(cp.holder.current.services["user-api"].table.raw)


async def test_an_accepted_change_is_stored_and_applied(plane: ControlPlane) -> None:
    cp = plane
    doc = await cp.set_weights("user-api", {"gray": 10}, None)
    assert doc.version == 1 == cp.holder.current.version
    stored = cp.store.load()
    assert stored.version == 1
    assert stored.services["user-api"].weights == {"stable": 95, "gray": 10}
    assert _weights(cp) == {"stable": 95, "gray": 10}


@pytest.mark.parametrize(
    ("body", "if_match", "error"),
    [
        ({"gray": -1}, None, BadRequest),
        ({"blue": 1}, None, BadRequest),
        ({"stable": 0, "gray": 0}, None, BadRequest),
        ({"gray": 10}, 7, Conflict),
    ],
    ids=["negative", "unknown-release", "all-zero", "stale-if-match"],
)
async def test_a_refused_change_changes_nothing(
    plane: ControlPlane, body: dict[str, float], if_match: int | None, error: type
) -> None:
    cp = plane
    with pytest.raises(error):
        await cp.set_weights("user-api", body, if_match)
    assert cp.store.load().version == 0 and cp.holder.current.version == 0
    assert _weights(cp) == {"stable": 95, "gray": 5} and not cp.store.load().services


async def test_if_match_on_the_current_version_applies(
    plane: ControlPlane,
) -> None:
    cp = plane
    await cp.set_weights("user-api", {"gray": 10}, None)
    await cp.set_weights("user-api", {"gray": 20}, 1)
    assert _weights(cp)["gray"] == 20 and cp.holder.current.version == 2


async def test_clear_goes_back_to_the_config(plane: ControlPlane) -> None:
    cp = plane
    await cp.set_weights("user-api", {"gray": 50}, None)
    await cp.clear("user-api", None)
    assert _weights(cp) == {"stable": 95, "gray": 5}
    # Nothing stored for it any more but the version of this change (If-Match's mark).
    st = cp.store.load().services["user-api"]
    assert (st.weights, st.guard, st.extra) == ({}, {}, {"changed": 2})


async def test_the_platform_payload_is_percent(plane: ControlPlane) -> None:
    cp = plane
    body = {"service": "user-api", "gray_weight": 30, "metrics_threshold": {"error_rate": 0.05}}
    await cp.platform("user-api", body, None)
    assert _weights(cp) == {"stable": 70, "gray": 30}
    assert cp.holder.current.services["user-api"].guard.error_rate == 0.05


async def test_the_guard_trip_sets_weight_zero_once(plane: ControlPlane) -> None:
    cp = plane
    await cp.trip("user-api", "gray", "error_rate", now=1000.0)
    assert _weights(cp)["gray"] == 0
    r = cp.rollout_of("user-api")
    assert r is not None and r.state == "CircuitBreak" and r.reason == "error_rate"
    with pytest.raises(Conflict):  # another worker already rolled it back
        await cp.trip("user-api", "gray", "error_rate", now=1001.0)


# --------------------------------------------------------------------------- reload


def _write(path: Path, raw: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(raw))


async def test_reload_applies_a_good_file_and_keeps_restart_only_fields(tmp_path: Path) -> None:
    f = tmp_path / "gateway.yaml"
    _write(f, RAW)
    cp = _plane(config_mod.load(str(f)))
    await cp.start(admin=True)
    try:
        changed = {
            **RAW,
            "listen": "127.0.0.1:1234",
            "services": {
                "user-api": {
                    "releases": {
                        **RAW["services"]["user-api"]["releases"],
                        "gray": {"weight": 25, "upstreams": ["http://127.0.0.1:9011"]},
                    }
                }
            },
        }
        _write(f, changed)
        result = cp.reload()
        assert result.ok
        assert result.warnings == (f"listen: changed in {f}; takes effect on restart",)
        assert _weights(cp)["gray"] == 25
        assert cp.config.listen == HostPort("0.0.0.0", 8080)  # kept until a restart
    finally:
        await cp.stop()


async def test_reload_of_a_bad_file_keeps_the_running_config(tmp_path: Path) -> None:
    f = tmp_path / "gateway.yaml"
    _write(f, RAW)
    cp = _plane(config_mod.load(str(f)))
    await cp.start(admin=True)
    try:
        running = cp.config
        f.write_text("services: {user-api: {releases: {stable: {weight: -1}}}}\n")
        result = cp.reload()
        assert not result.ok
        assert {p for p, _ in result.errors} >= {"services.user-api.releases.stable.weight"}
        assert cp.config is running
    finally:
        await cp.stop()


async def test_reload_applies_the_adjustment_before_comparing(tmp_path: Path) -> None:
    """`gateway run --port` overrides the file: a reload neither warns nor moves the port."""
    f = tmp_path / "gateway.yaml"
    _write(f, RAW)
    from dataclasses import replace

    def adjust(c: Config) -> Config:
        return replace(c, listen=HostPort("127.0.0.1", 4321))

    cp = _plane(adjust(config_mod.load(str(f))))
    cp.adjust = adjust
    await cp.start(admin=True)
    try:
        result = cp.reload()
        assert result.ok and result.warnings == ()
        assert cp.config.listen == HostPort("127.0.0.1", 4321)
    finally:
        await cp.stop()


async def test_a_config_not_from_a_file_cannot_be_reloaded(
    plane: ControlPlane,
) -> None:
    cp = plane
    result = cp.reload()
    assert not result.ok and result.errors[0][0] == "(file)"


# --------------------------------------------------------------------------- admin exposure


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
    ],
    ids=["v4", "v6", "name", "any", "private"],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_an_exposed_admin_without_a_token_is_refused() -> None:
    cfg = config_mod.build({**RAW, "admin": {"listen": "0.0.0.0:9901", "token_env": None}}, env={})
    with pytest.raises(ConfigError) as e:
        check_admin_exposure(cfg)
    assert e.value.errors[0][0] == "admin.listen"
    with_token = config_mod.build(
        {**RAW, "admin": {"listen": "0.0.0.0:9901", "token_env": "T"}}, env={"T": "secret"}
    )
    check_admin_exposure(with_token)  # no error
