"""The audit trail and named admin tokens, end to end (README.md "Audit").

Two named tokens (one read-only), every change in `GET /admin/audit` with its
actor and in the log, the trail surviving a restart (file store) and shared by
replicas (Consul store, on the Consul double).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import cli
from gateway.app import Gateway
from tests.conftest import gateway_config, two_releases
from tests.consul_double import ConsulDouble

WRITE, READ = "d3ploy-s3cret", "v1ew-only"


def _tokens(tmp_path: Path) -> str:
    f = tmp_path / "tokens"
    f.write_text(f"# name token role\ndeployer {WRITE} write\nviewer {READ} read\n")
    return str(f)


async def _call(
    s: aiohttp.ClientSession,
    method: str,
    url: str,
    token: str | None,
    body: Any = None,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with s.request(method, url, json=body, headers=headers) as r:
        return r.status, await r.json()


@pytest.fixture
async def consul() -> AsyncIterator[ConsulDouble]:
    async with ConsulDouble(jitter=False) as d:
        yield d


async def test_named_tokens_roles_and_every_change_audited(
    tmp_path: Path, upstreams: Any, gateway: Any, caplog: Any, capsys: Any, monkeypatch: Any
) -> None:
    caplog.set_level(logging.INFO, "gateway.audit")
    st, gr = await upstreams("stable"), await upstreams("gray")
    doc = gateway_config(
        two_releases(st.url, gr.url, 100, 0),
        admin={"listen": "127.0.0.1:0", "token_env": None, "tokens_file": _tokens(tmp_path)},
        state={"store": "file", "path": str(tmp_path / "state.json")},
    )
    gw: Gateway = await gateway(doc)
    admin = f"http://127.0.0.1:{gw.admin_port}/admin"
    svc = f"{admin}/services/svc"
    async with aiohttp.ClientSession() as s:
        # Authentication and roles: nothing changes on a refusal.
        assert (await _call(s, "GET", svc, None))[0] == 401
        assert (await _call(s, "GET", svc, "wrong"))[0] == 401
        assert (await _call(s, "GET", svc, READ))[0] == 200
        for header in (f"Basic {READ}", "Bearer", f"Bearer {READ}x", f"{READ}"):
            async with s.get(svc, headers={"Authorization": header}) as r:
                assert r.status == 401 and (await r.json())["field"] == "Authorization"
        status, err = await _call(s, "PUT", f"{svc}/weights", READ, {"gray": 50})
        assert (status, err["field"]) == (403, "Authorization") and "viewer" in err["error"]
        status, err = await _call(s, "POST", f"{svc}/rollout/retry", READ)
        assert status == 403
        assert gw.holder.current.version == 0
        # Every accepted change, as the deployer.
        assert (await _call(s, "PUT", f"{svc}/weights", WRITE, {"gray": 10}))[0] == 200
        body = {"service": "svc", "gray_weight": 5, "metrics_threshold": {"error_rate": 0.02}}
        assert (await _call(s, "POST", f"{admin}/weights", WRITE, body))[0] == 200
        plan = {"release": "gray", "steps": [{"weight": 20, "pause": "1h"}, {"weight": 100}]}
        assert (await _call(s, "POST", f"{svc}/rollout", WRITE, plan))[0] == 200
        assert (await _call(s, "POST", f"{svc}/pause", WRITE))[0] == 200
        assert (await _call(s, "POST", f"{svc}/abort", WRITE))[0] == 200
        assert (await _call(s, "POST", f"{svc}/rollout/retry", WRITE))[0] == 200
        status, audit = await _call(s, "GET", f"{admin}/audit?service=svc", READ)
        assert status == 200
        # Bad query parameters: 400 naming the parameter.
        for q, field in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=x", "limit"),
            ("since=yesterday", "since"),
            ("who=me", "who"),
        ]:
            status, err = await _call(s, "GET", f"{admin}/audit?{q}", READ)
            assert (status, err["field"]) == (400, field), q
        status, err = await _call(s, "GET", f"{admin}/audit?service=nope", READ)
        assert (status, err["field"]) == (404, "service")
        status, last = await _call(s, "GET", f"{admin}/audit?limit=1&since=1h", READ)
        assert status == 200 and last["count"] == 1
    recs = audit["records"]
    assert [(r["actor"], r["source"], r["action"]) for r in recs] == [
        ("deployer", "admin", "weights.set"),
        ("deployer", "admin", "weights.platform"),
        ("deployer", "admin", "rollout.start"),
        ("deployer", "admin", "rollout.pause"),
        ("deployer", "admin", "rollout.abort"),
        ("deployer", "admin", "rollout.retry"),
    ]
    assert [r["state_version"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[0]["before"] == {"weights": {"stable": 100, "gray": 0}}
    assert recs[0]["after"] == {"weights": {"stable": 100, "gray": 10}}
    assert recs[1]["after"]["guard"] == {"error_rate": 0.02}
    assert last["records"] == recs[-1:]
    logged = [json.loads(m)["audit"] for m in caplog.messages if m.startswith('{"audit"')]
    assert logged == recs
    # The CLI prints the same records, one JSON line each.
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", READ)
    rc = await asyncio.to_thread(
        cli.main, ["audit", "svc", "--since", "10m", "--admin", f"http://127.0.0.1:{gw.admin_port}"]
    )
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and [json.loads(line) for line in out] == recs
    # A restart keeps the trail (file store: beside the state file).
    await gw.stop(1.0)
    again = await gateway(doc)
    async with aiohttp.ClientSession() as s:
        status, audit2 = await _call(
            s, "GET", f"http://127.0.0.1:{again.admin_port}/admin/audit", READ
        )
    assert status == 200 and audit2["records"] == recs
    assert (tmp_path / "state.json.audit.jsonl").exists()


async def test_replicas_share_the_audit_on_consul(
    consul: ConsulDouble, tmp_path: Path, upstreams: Any, gateway: Any
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    doc = gateway_config(
        two_releases(st.url, gr.url, 95, 5),
        admin={"listen": "127.0.0.1:0", "token_env": None, "tokens_file": _tokens(tmp_path)},
        state={"store": "consul"},
        consul={"address": consul.address, "kv_prefix": "gw/audit"},
    )
    g1, g2 = await gateway(doc), await gateway(doc)
    async with aiohttp.ClientSession() as s:
        for i, g in enumerate((g1, g2, g1)):
            url = f"http://127.0.0.1:{g.admin_port}/admin/services/svc/weights"
            assert (await _call(s, "PUT", url, WRITE, {"gray": 10 + i}))[0] == 200
            # the next replica must have heard of this change before it writes the next
            await asyncio.wait_for(_converged(g1, g2, i + 1), 20)
        status, audit = await _call(s, "GET", f"http://127.0.0.1:{g2.admin_port}/admin/audit", READ)
    assert status == 200, audit
    assert [
        (r["actor"], r["after"]["weights"]["gray"], r["state_version"]) for r in audit["records"]
    ] == [("deployer", 10, 1), ("deployer", 11, 2), ("deployer", 12, 3)]


async def _converged(a: Gateway, b: Gateway, version: int) -> None:
    """Both replicas applied `version` (each holder announces every swap)."""
    changed = asyncio.Event()
    for g in (a, b):
        g.holder.subscribe(lambda snap: changed.set())
    while not (a.holder.current.version == b.holder.current.version == version):
        await changed.wait()
        changed.clear()


async def test_audit_on_a_dead_consul_is_a_503_naming_it(
    consul: ConsulDouble, tmp_path: Path, upstreams: Any, gateway: Any
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    doc = gateway_config(
        two_releases(st.url, gr.url, 95, 5),
        state={"store": "consul"},
        consul={"address": consul.address, "kv_prefix": "gw/dead"},
    )
    gw = await gateway(doc)
    await consul.kill()
    async with aiohttp.ClientSession() as s:
        status, err = await _call(s, "GET", f"http://127.0.0.1:{gw.admin_port}/admin/audit", None)
    assert (status, err["field"]) == (503, "consul.address")


@pytest.mark.parametrize("store", ["file", "memory"], ids=["file", "memory"])
async def test_only_the_last_records_are_kept(tmp_path: Path, store: str) -> None:
    from gateway.audit import FileAudit, MemoryAudit

    path = tmp_path / "a.jsonl"
    trail = FileAudit(path, max_bytes=2_000, keep=50) if store == "file" else MemoryAudit(keep=50)
    for i in range(300):
        await trail.append({"n": i, "action": "x"})
    assert [r["n"] for r in await trail.read()] == list(range(250, 300))
    if store == "file":  # trimmed as it grew: never far past max_bytes or `keep` records
        assert len(path.read_text().splitlines()) <= 50 + 2_000 // 20


async def test_the_token_env_token_is_named_admin(tmp_path: Path, upstreams: Any) -> None:
    from gateway import config as C

    st, gr = await upstreams("stable"), await upstreams("gray")
    doc = gateway_config(
        two_releases(st.url, gr.url, 95, 5),
        admin={"listen": "127.0.0.1:0", "token_env": "TOK", "tokens_file": _tokens(tmp_path)},
    )
    gw = Gateway(C.build(doc, env={"TOK": "env-s3cret"}))
    await gw.start()
    try:
        url = f"http://127.0.0.1:{gw.admin_port}/admin"
        async with aiohttp.ClientSession() as s:
            status, _ = await _call(
                s, "PUT", f"{url}/services/svc/weights", "env-s3cret", {"gray": 9}
            )
            assert status == 200
            status, _ = await _call(s, "PUT", f"{url}/services/svc/weights", WRITE, {"gray": 8})
            assert status == 200
            status, audit = await _call(s, "GET", f"{url}/audit", READ)
    finally:
        await gw.stop(1.0)
    assert [r["actor"] for r in audit["records"]] == ["admin", "deployer"]
