"""Config reload (issue 4 §7): SIGHUP and POST /admin/reload validate first, then swap."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import config as C
from gateway.app import Gateway
from tests.conftest import run_gateway_process
from tests.loadclient import ThreadedUpstreams, releases_for_users, start_fixed_upstream
from tests.test_admin import check_documented

USERS = [f"u{i}" for i in range(400)]


def doc_for(urls: dict[str, str], state: Path, gray: float = 5) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token_env": None},
        "state": {"store": "file", "path": str(state)},
        "drain_timeout": "1s",
        "services": {
            "user-api": {
                "releases": {
                    "stable": {"weight": 100 - gray, "upstreams": [urls["stable"]]},
                    "gray": {"weight": gray, "upstreams": [urls["gray"]]},
                }
            },
            "catalog": {
                "match": {"path_prefix": "/catalog"},
                "releases": {"stable": {"weight": 1, "upstreams": [urls["stable"]]}},
            },
        },
    }


BROKEN = {
    "services": {
        "user-api": {
            "balancer": "fastest",
            "releases": {
                "stable": {"weight": -1, "upstreams": ["ftp://x"]},
                "gray": {"weight": 5},
            },
        }
    },
    "workers": 0,
}
BROKEN_PATHS = [
    "workers",
    "services.user-api.releases.stable.weight",
    "services.user-api.releases.stable.upstreams[0]",
    "services.user-api.releases.gray",
    "services.user-api.balancer",
]


class Env:
    def __init__(
        self, gw: Gateway, cfg: Path, urls: dict[str, str], session: aiohttp.ClientSession
    ):
        self.gw, self.cfg, self.urls, self.session = gw, cfg, urls, session
        self.admin = f"http://127.0.0.1:{gw.admin_port}"

    async def reload(self) -> tuple[int, Any]:
        async with self.session.post(self.admin + "/admin/reload") as r:
            body = await r.json()
            check_documented("POST", "/admin/reload", r.status, body)
            return r.status, body

    async def served(self) -> set[str]:
        assert self.gw.port is not None
        got = await releases_for_users(self.gw.port, USERS, conns=4)
        assert {s for s, _, _ in got.values()} == {200}
        return {stage for _, stage, _ in got.values()}


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    servers, urls = [], {}
    for rel in ("stable", "gray"):
        srv, port = await start_fixed_upstream(rel)
        servers.append(srv)
        urls[rel] = f"http://127.0.0.1:{port}"
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(doc_for(urls, tmp_path / "state.json", gray=0)))
    gw = Gateway(C.load(str(cfg), env={}))
    await gw.start()
    try:
        async with aiohttp.ClientSession() as s:
            yield Env(gw, cfg, urls, s)
    finally:
        await gw.stop(0.5)
        for srv in servers:
            srv.close()
            await srv.wait_closed()


async def test_reload_with_a_broken_config_keeps_the_old_one_and_reports_every_error(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    assert await env.served() == {"stable"}
    snap = env.gw.holder.current
    env.cfg.write_text(yaml.safe_dump(BROKEN))
    caplog.set_level(logging.ERROR, "gateway.control")
    status, body = await env.reload()
    assert status == 400
    assert sorted(e["field"] for e in body["errors"]) == sorted(BROKEN_PATHS)
    assert body["field"] in BROKEN_PATHS and "running config is kept" in body["error"]
    for path in BROKEN_PATHS:
        assert f"{env.cfg}: {path}: " in caplog.text  # every error logged with its path
    assert env.gw.holder.current is snap
    assert await env.served() == {"stable"}


async def test_reload_with_unparsable_yaml_keeps_the_old_config(env: Env) -> None:
    snap = env.gw.holder.current
    env.cfg.write_text("services: [\n")
    status, body = await env.reload()
    assert status == 400 and body["field"] == "(yaml)"
    assert env.gw.holder.current is snap


async def test_good_reload_applies_the_config_and_keeps_stored_weights(env: Env) -> None:
    async with env.session.put(
        env.admin + "/admin/services/catalog/weights", json={"stable": 3}
    ) as r:
        assert r.status == 200
    doc = doc_for(env.urls, env.cfg.parent / "state.json", gray=100)
    doc["services"]["catalog"]["releases"]["stable"]["weight"] = 7
    doc["services"]["catalog"]["releases"]["canary"] = {
        "weight": 0,
        "upstreams": [env.urls["gray"]],
    }
    doc["listen"] = "127.0.0.1:1"  # needs a restart: warned about, not applied
    env.cfg.write_text(yaml.safe_dump(doc))
    status, body = await env.reload()
    assert status == 200, body
    assert body["state_version"] == 1
    assert body["warnings"] == [f"listen: changed in {env.cfg}; takes effect on restart"]
    assert await env.served() == {"gray"}
    cat = env.gw.holder.current.services["catalog"]
    assert cat.table.raw == {"stable": 3, "canary": 0}  # the stored change still wins
    assert env.gw.holder.current.config.listen.port == 0


async def test_sighup_handler_reloads_in_process(env: Env) -> None:
    env.cfg.write_text(yaml.safe_dump(doc_for(env.urls, env.cfg.parent / "state.json", gray=100)))
    env.gw.request_reload()
    assert await env.served() == {"gray"}


# --------------------------------------------------------------------------- real processes


def _wait(cond: Any, what: str, within: float = 20.0) -> None:
    end = time.monotonic() + within
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _all_served(port: int) -> set[str]:
    got = asyncio.run(releases_for_users(port, USERS, conns=8))
    assert {s for s, _, _ in got.values()} == {200}, "a request failed"
    return {stage for _, stage, _ in got.values()}


@pytest.mark.slow
def test_sighup_with_a_broken_config_keeps_serving_with_workers(tmp_path: Path) -> None:
    with ThreadedUpstreams(["stable", "gray"]) as up:
        urls = {r: up.url(r) for r in ("stable", "gray")}
        doc = doc_for(urls, Path("var/state.json"), gray=0)
        with run_gateway_process(tmp_path, doc, workers=2) as gw:
            cfg_path = tmp_path / "gateway.yaml"
            running = yaml.safe_load(cfg_path.read_text())
            assert _all_served(gw.port) == {"stable"}
            cfg_path.write_text(yaml.safe_dump(BROKEN))
            gw.proc.send_signal(signal.SIGHUP)
            _wait(lambda: "the running config is kept" in gw.log.read_text(), "the reload error")
            log = gw.log.read_text()
            for path in BROKEN_PATHS:
                assert f": {path}: " in log
            assert gw.proc.poll() is None
            for _ in range(3):
                assert _all_served(gw.port) == {"stable"}
            # the fixed file reaches both workers on the next SIGHUP ...
            rels = running["services"]["user-api"]["releases"]
            rels["stable"]["weight"], rels["gray"]["weight"] = 0, 100
            cfg_path.write_text(yaml.safe_dump(running))
            gw.proc.send_signal(signal.SIGHUP)
            _wait(lambda: _all_served(gw.port) == {"gray"}, "workers to reload on SIGHUP")
            # ... and so does POST /admin/reload
            rels["stable"]["weight"], rels["gray"]["weight"] = 100, 0
            cfg_path.write_text(yaml.safe_dump(running))
            req = urllib.request.Request(gw.admin + "/admin/reload", method="POST")
            with urllib.request.urlopen(req, timeout=10) as r:
                assert json.loads(r.read())["status"] == "reloaded"
            _wait(lambda: _all_served(gw.port) == {"stable"}, "workers to reload on the API call")
            for _ in range(5):  # fresh connections land on either worker
                assert _all_served(gw.port) == {"stable"}
