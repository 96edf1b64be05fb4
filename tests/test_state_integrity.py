"""State-store integrity (issue 10 item 1): removed file, checksum-valid bad values, start."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway import config as C
from gateway.app import Gateway
from gateway.config import ConsulConfig
from gateway.errors import StateError
from gateway.store import decode
from gateway.store.consul import ConsulStore
from gateway.store.doc import checksum
from tests.conftest import start_app
from tests.consul_double import ConsulDouble


def signed(body: dict[str, Any]) -> bytes:
    """A document with a correct checksum, whatever it holds (it passes the checksum gate)."""
    return json.dumps({**body, "checksum": checksum(body)}, indent=1).encode()


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` the way another writer would (readers never see a torn file)."""
    tmp = path.with_name(path.name + ".test-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def good_body(version: int = 1, gray: float = 10) -> dict[str, Any]:
    return {
        "format": 1,
        "version": version,
        "services": {"svc": {"weights": {"stable": 90, "gray": gray}, "guard": {}}},
    }


def _rollout(**kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "release": "gray",
        "state": "Progressing",
        "step": 0,
        "step_started": 1.0,
        "paused_left": None,
        "reason": None,
        "steps": [{"weight": 10, "pause": None}],
    }
    r.update(kw)
    return r


def _with(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    body = good_body(version=2)
    fn(body)
    return body


def _svc(b: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = b["services"]["svc"]
    return s


# (id, document with a correct checksum but a bad value, the field the error names)
BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    (
        "rollout-steps-empty",
        _with(lambda b: _svc(b).update(rollout=_rollout(steps=[]))),
        "services.svc.rollout.steps",
    ),
    (
        "weight-10**400",
        _with(lambda b: _svc(b)["weights"].update(gray=10**400)),
        "services.svc.weights.gray",
    ),
    (
        "weight-1e308",
        _with(lambda b: _svc(b)["weights"].update(gray=1e308)),
        "services.svc.weights.gray",
    ),
    (
        "weight-1e-320",
        _with(lambda b: _svc(b)["weights"].update(gray=1e-320)),
        "services.svc.weights.gray",
    ),
    (
        "rollout-unknown-state",
        _with(lambda b: _svc(b).update(rollout=_rollout(state="Exploded"))),
        "services.svc.rollout.state",
    ),
    (
        "rollout-step-out-of-range",
        _with(lambda b: _svc(b).update(rollout=_rollout(step=5))),
        "services.svc.rollout.step",
    ),
    (
        "rollout-step-started-string",
        _with(lambda b: _svc(b).update(rollout=_rollout(step_started="yesterday"))),
        "services.svc.rollout.step_started",
    ),
    (
        "rollout-pause-10**400",
        _with(lambda b: _svc(b).update(rollout=_rollout(steps=[{"weight": 5, "pause": 10**400}]))),
        "services.svc.rollout.steps[0].pause",
    ),
    (
        "guard-min-requests-10**400",
        _with(lambda b: _svc(b)["guard"].update(min_requests=10**400)),
        "services.svc.guard.min_requests",
    ),
    ("weights-a-string", _with(lambda b: _svc(b).update(weights="50")), "services.svc.weights"),
    (
        "weights-all-zero",
        _with(lambda b: _svc(b).update(weights={"stable": 0, "gray": 0})),
        "services.svc.weights",
    ),
    ("version-10**400", _with(lambda b: b.update(version=10**400)), "version"),
    ("service-a-list", _with(lambda b: b["services"].update(svc=[1])), "services.svc"),
    ("changed-a-string", _with(lambda b: _svc(b).update(changed="2")), "services.svc.changed"),
    ("changed-negative", _with(lambda b: _svc(b).update(changed=-1)), "services.svc.changed"),
    ("changed-a-bool", _with(lambda b: _svc(b).update(changed=True)), "services.svc.changed"),
    ("changed-10**400", _with(lambda b: _svc(b).update(changed=10**400)), "services.svc.changed"),
]
BAD_IDS = [c[0] for c in BAD_VALUES]


def file_config(state: Path, stable_url: str, gray_url: str, **svc: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token_env": None},
        "state": {"store": "file", "path": str(state), "poll_interval": "20ms"},
        "drain_timeout": "1s",
        "services": {
            "svc": {
                "releases": {
                    "stable": {"weight": 100, "upstreams": [stable_url]},
                    "gray": {"weight": 0, "upstreams": [gray_url]},
                },
                **svc,
            }
        },
    }


async def until(cond: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def stays_false(cond: Callable[[], bool], within: float) -> bool:
    """True when `cond` never became true within `within` seconds (an absence check)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if cond():
            return False
        await asyncio.sleep(0.02)
    return True


def _failing_app() -> web.Application:
    async def boom(request: web.Request) -> web.Response:
        return web.json_response({"release": "gray"}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", boom)
    return app


# --------------------------------------------------------------------------- removed at run time


async def test_removed_state_file_is_recreated_and_the_guard_still_rolls_back(
    tmp_path: Path, upstreams: Any, gateway: Callable[..., Awaitable[Gateway]], caplog: Any
) -> None:
    caplog.set_level(logging.INFO, "gateway")
    stable = await upstreams("stable")
    gray = await start_app(_failing_app())
    state = tmp_path / "state.json"
    state.write_bytes(signed(good_body(version=1)))
    try:
        guard = {"error_rate": 0.05, "min_requests": 20, "window": "30s", "for": "0s"}
        cfg = file_config(state, stable.url, gray.url, guard=guard)
        gw = await gateway(cfg, guard_interval=0.1)
        assert gw.holder.current.version == 1
        admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
        async with aiohttp.ClientSession() as s:
            state.unlink()
            await until(lambda: "state file removed" in caplog.text, "the watch to see the rm")
            async with s.put(f"{admin}/weights", json={"stable": 50, "gray": 50}) as r:
                assert r.status == 200, await r.text()
                assert r.headers["ETag"] == '"2"'
            doc = decode(state.read_bytes())  # recreated, and valid for the next start
            assert doc.version == 2 and doc.weights() == {"svc": {"stable": 50, "gray": 50}}
            # The guard's write goes through the same path: a failing gray is rolled back.
            base = f"http://127.0.0.1:{gw.port}"
            codes = []
            for i in range(120):
                async with s.get(f"{base}/", headers={"X-User-ID": f"user-{i}"}) as r:
                    codes.append(r.status)
            assert 500 in codes
            await until(
                lambda: gw.holder.current.services["svc"].releases["gray"].raw_weight == 0,
                "the guard to roll gray back",
            )
        doc = decode(state.read_bytes())
        assert doc.version == 3 and doc.weights()["svc"]["gray"] == 0
        assert doc.services["svc"].extra["rollout"]["state"] == "CircuitBreak"  # until confirm
        assert "conflict" not in caplog.text.lower()
    finally:
        await gray.runner.cleanup()


async def test_load_after_removal_keeps_the_last_applied_state(tmp_path: Path) -> None:
    from gateway.store.file import FileStore

    state = tmp_path / "state.json"
    store = FileStore(state, poll_interval=0.02)
    first = await store.write(decode(signed(good_body(version=0))), 0)
    state.unlink()
    assert store.load() == first  # not EMPTY: a retry must not fall back to version 0
    second = await store.write(first, 1)
    assert second.version == 2 and decode(state.read_bytes()) == second


# --------------------------------------------------------------------------- bad values, run time


@pytest.mark.parametrize(("body", "field"), [c[1:] for c in BAD_VALUES], ids=BAD_IDS)
async def test_checksum_valid_bad_value_is_ignored_once_at_run_time(
    tmp_path: Path, upstreams: Any, gateway: Any, caplog: Any, body: dict[str, Any], field: str
) -> None:
    caplog.set_level(logging.INFO)
    stable, gray = await upstreams("stable"), await upstreams("gray")
    state = tmp_path / "state.json"
    state.write_bytes(signed(good_body(version=1)))
    gw = await gateway(file_config(state, stable.url, gray.url))
    assert gw.holder.current.version == 1
    write_atomically(state, signed(body))

    def refusals() -> int:
        return sum(
            1 for r in caplog.records if "not applied" in r.getMessage() and field in r.getMessage()
        )

    await until(lambda: refusals() >= 1, f"the refusal naming {field}")
    # Once per version of the file, not once per poll (the watch polls every 20 ms).
    assert await stays_false(lambda: refusals() > 1, within=1.0)
    assert gw.holder.current.version == 1
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a bad value"
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    async with aiohttp.ClientSession() as s:
        async with s.get(admin) as r:
            assert r.status == 200 and (await r.json())["state_version"] == 1
        async with s.get(f"http://127.0.0.1:{gw.port}/") as r:
            assert r.status == 200  # still serving on the last good state
        async with s.put(f"{admin}/weights", json={"gray": 7}) as r:
            assert r.status == 200, await r.text()
    # The write replaced the bad file with the last good state plus the change.
    doc = decode(state.read_bytes())
    assert doc.version == 2 and doc.weights() == {"svc": {"stable": 90, "gray": 7}}


async def test_consul_store_ignores_a_bad_value_once_and_the_next_write_replaces_it(
    caplog: Any,
) -> None:
    caplog.set_level(logging.INFO, "gateway.store")
    async with ConsulDouble(jitter=False) as consul:
        url = f"{consul.address}/v1/kv/gw/t/state"
        store = ConsulStore(ConsulConfig(address=consul.address, kv_prefix="gw/t"), wait=0.2)
        await store.open()
        try:
            good = await store.write(decode(signed(good_body(version=0))), 0)
            _, bad, field = BAD_VALUES[0]
            watch = store.watch()
            pending = asyncio.ensure_future(watch.__anext__())
            async with aiohttp.ClientSession() as s:
                async with s.put(url, data=signed(bad)) as r:
                    assert r.status == 200

            def refusals() -> int:
                return sum(1 for r in caplog.records if "not applied" in r.getMessage())

            await until(lambda: refusals() == 1, "the refusal")
            assert field in caplog.text and "consul:gw/t/state" in caplog.text
            # Blocking queries of 0.2 s keep coming back with the same index: no new lines.
            assert await stays_false(lambda: refusals() > 1, within=1.0)
            assert not pending.done() and store.load() == good
            stored = await store.write(good, good.version)  # CAS on the bad document's index
            assert stored.version == 2
            assert (await asyncio.wait_for(pending, 10)).version == 2
            await watch.aclose()
        finally:
            await store.close()


# --------------------------------------------------------------------------- bad values at start


@pytest.mark.parametrize(("body", "field"), [c[1:] for c in BAD_VALUES], ids=BAD_IDS)
async def test_checksum_valid_bad_value_refuses_to_start_naming_file_and_field(
    tmp_path: Path, body: dict[str, Any], field: str
) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(signed(body))
    gw = Gateway(C.build(file_config(state, "http://127.0.0.1:9", "http://127.0.0.1:9"), env={}))
    with pytest.raises(StateError) as e:
        await gw.start()
    assert str(state) in e.value.message and field in e.value.message
    assert gw.port is None and gw.admin_port is None


@pytest.mark.parametrize(
    ("body", "field"),
    [c[1:] for c in BAD_VALUES if c[0] in ("rollout-steps-empty", "weight-10**400")],
    ids=["rollout-steps-empty", "weight-10**400"],
)
def test_gateway_run_exits_2_naming_file_and_field(
    tmp_path: Path, body: dict[str, Any], field: str
) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(signed(body))
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(file_config(state, "http://127.0.0.1:9", "http://127.0.0.1:9")))
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert str(state) in r.stderr and field in r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- state directory


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root ignores mode bits: use /proc)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").touch()
    except OSError:
        return d
    (d / "probe").unlink()
    return Path("/proc")


def test_read_only_state_dir_exits_2_at_start_naming_it(tmp_path: Path) -> None:
    ro = _unwritable_dir(tmp_path)
    try:
        cfg = tmp_path / "gateway.yaml"
        doc = file_config(ro / "state.json", "http://127.0.0.1:9", "http://127.0.0.1:9")
        cfg.write_text(yaml.safe_dump(doc))
        r = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r.stderr
        assert "state.path" in r.stderr and repr(str(ro)) in r.stderr
        assert "not writable" in r.stderr and "Traceback" not in r.stderr
    finally:
        if ro != Path("/proc"):
            ro.chmod(0o755)


async def test_read_only_state_dir_refuses_in_process_start(tmp_path: Path) -> None:
    ro = _unwritable_dir(tmp_path)
    try:
        gw = Gateway(
            C.build(file_config(ro / "s.json", "http://127.0.0.1:9", "http://127.0.0.1:9"), env={})
        )
        with pytest.raises(StateError) as e:
            await gw.start()
        assert e.value.field == "state.path" and str(ro) in e.value.message
    finally:
        if ro != Path("/proc"):
            ro.chmod(0o755)


async def test_consul_key_deleted_at_run_time_is_recreated_by_the_next_write() -> None:
    async with ConsulDouble(jitter=False) as consul:
        url = f"{consul.address}/v1/kv/gw/t/state"
        store = ConsulStore(ConsulConfig(address=consul.address, kv_prefix="gw/t"), wait=0.2)
        await store.open()
        try:
            first = await store.write(decode(signed(good_body(version=0))), 0)
            watch = store.watch()
            pending = asyncio.ensure_future(watch.__anext__())
            async with aiohttp.ClientSession() as s:
                async with s.delete(url) as r:
                    assert r.status == 200
            await until(lambda: store._modify == 0, "the watch to see the delete")
            assert store.load() == first  # the last applied state still holds
            second = await store.write(first, 1)  # cas=0 creates the key again
            assert second.version == 2
            assert (await asyncio.wait_for(pending, 10)).version == 2
            await watch.aclose()
            async with aiohttp.ClientSession() as s:
                async with s.get(url, params={"raw": "true"}) as r:
                    assert decode(await r.read()).version == 2
        finally:
            await store.close()


async def test_a_store_that_cannot_write_answers_json_503_and_changes_nothing(
    tmp_path: Path, upstreams: Any, gateway: Any
) -> None:
    stable, gray = await upstreams("stable"), await upstreams("gray")
    var = tmp_path / "var"
    gw = await gateway(file_config(var / "state.json", stable.url, gray.url))
    # The directory turns into a plain file at run time: no write can succeed (even as root).
    for p in var.iterdir():
        p.unlink()
    var.rmdir()
    var.write_text("not a directory")
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc/weights"
        async with s.put(url, json={"gray": 5}) as r:
            assert r.status == 503 and r.content_type == "application/json"
            assert (await r.json())["field"] == "state"
    assert gw.holder.current.version == 0


async def test_guard_rolls_back_a_gray_that_had_all_the_traffic(
    tmp_path: Path, upstreams: Any, gateway: Any
) -> None:
    stable = await upstreams("stable")
    gray = await start_app(_failing_app())
    try:
        guard = {"error_rate": 0.05, "min_requests": 20, "window": "30s", "for": "0s"}
        cfg = file_config(tmp_path / "state.json", stable.url, gray.url, guard=guard)
        cfg["services"]["svc"]["releases"]["stable"]["weight"] = 0
        cfg["services"]["svc"]["releases"]["gray"]["weight"] = 100
        gw = await gateway(cfg, guard_interval=0.1)
        async with aiohttp.ClientSession() as s:
            for i in range(60):
                async with s.get(f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": f"u{i}"}):
                    pass
        # Weight 0 for gray alone would leave no release: the baseline takes the traffic.
        await until(lambda: gw.holder.current.version >= 1, "the guard's rollback")
        rv = gw.holder.current.services["svc"].releases
        assert rv["gray"].raw_weight == 0 and rv["stable"].raw_weight == 100
        assert decode((tmp_path / "state.json").read_bytes()).version == 1
    finally:
        await gray.runner.cleanup()
