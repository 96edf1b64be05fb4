"""Admin API (issue 4, README): validation, auth, CAS, the platform payload, explain, preview.

A real in-process Gateway with a file state store and real upstreams on
127.0.0.1; every admin response these tests see is checked against the
OpenAPI document the gateway serves.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema  # type: ignore[import-untyped]
import pytest
from multidict import CIMultiDict

from gateway import config as C
from gateway.app import Gateway
from gateway.errors import ConfigError
from gateway.openapi import build_openapi
from gateway.preview import sample_key
from tests.conftest import Upstream
from tests.loadclient import releases_for_users, start_fixed_upstream

TOKEN = "s3cret-admin-token"
TOKEN_ENV = "GW_TEST_ADMIN_TOKEN"
OPENAPI = build_openapi("test")


# --------------------------------------------------------------------------- OpenAPI checks


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")


_TEMPLATES = [(t, _template_regex(t)) for t in OPENAPI["paths"]]


def operation(method: str, path: str) -> tuple[str, dict[str, Any]]:
    for template, rx in _TEMPLATES:
        if rx.match(path):
            op = OPENAPI["paths"][template].get(method.lower())
            assert op is not None, f"{method} {template} is not documented"
            return template, op
    raise AssertionError(f"{path} is not documented")


def check_documented(method: str, path: str, status: int, body: object) -> None:
    """The response status is documented for this operation and the body fits its schema."""
    template, op = operation(method, path.split("?")[0])
    resp = op["responses"].get(str(status))
    assert resp is not None, f"{method} {template} -> {status} is not documented"
    schema = resp["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": OPENAPI["components"]}).validate(body)


# --------------------------------------------------------------------------- fixtures


def admin_doc(tmp: Path, stable: str, gray: str, **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token_env": TOKEN_ENV},
        "state": {"store": "file", "path": str(tmp / "state" / "gateway-state.json")},
        "drain_timeout": "2s",
        "routing": {"trust_overrides": ["10.0.0.0/8"]},
        "services": {
            "user-api": {
                "releases": {
                    "stable": {"weight": 95, "upstreams": [stable]},
                    "gray": {"weight": 5, "upstreams": [gray]},
                },
                "guard": {"error_rate": 0.05, "latency_p95_ms": 1000},
            },
            "catalog": {
                "match": {"path_prefix": "/catalog"},
                "releases": {
                    "stable": {"weight": 80, "upstreams": [stable]},
                    "batch-1": {"weight": 15, "upstreams": [gray]},
                    "batch-2": {"weight": 5, "upstreams": [gray]},
                },
            },
        },
    }
    doc.update(top)
    return doc


class Admin:
    """A started gateway plus an authenticated admin client that checks the OpenAPI doc."""

    def __init__(self, gw: Gateway, session: aiohttp.ClientSession, state: Path) -> None:
        self.gw = gw
        self.session = session
        self.state = state
        self.base = f"http://127.0.0.1:{gw.admin_port}"

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = TOKEN,
    ) -> tuple[int, Any, CIMultiDict[str]]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.base + path, json=json, data=data, headers=h
        ) as r:
            body = await r.json(content_type=None)
            check_documented(method, path, r.status, body)
            return r.status, body, CIMultiDict(r.headers)

    async def version(self) -> int:
        _, body, _ = await self.call("GET", "/admin/services")
        v = body["state_version"]
        assert isinstance(v, int)
        return v


@pytest.fixture
async def fixed_upstreams() -> AsyncIterator[dict[str, str]]:
    """Cheap upstreams that answer with their release name (the gateway is what is tested)."""
    servers = []
    urls = {}
    for rel in ("stable", "gray"):
        srv, port = await start_fixed_upstream(rel)
        servers.append(srv)
        urls[rel] = f"http://127.0.0.1:{port}"
    yield urls
    for srv in servers:
        srv.close()
        await srv.wait_closed()


@pytest.fixture
async def admin(tmp_path: Path, fixed_upstreams: dict[str, str]) -> AsyncIterator[Admin]:
    doc = admin_doc(tmp_path, fixed_upstreams["stable"], fixed_upstreams["gray"])
    gw = Gateway(C.build(doc, env={TOKEN_ENV: TOKEN}))
    await gw.start()
    try:
        async with aiohttp.ClientSession() as s:
            yield Admin(gw, s, tmp_path / "state" / "gateway-state.json")
    finally:
        await gw.stop(1.0)


# --------------------------------------------------------------------------- acceptance 1


# fmt: off
BAD_INPUTS = [
    # (id, method, path, raw body or None, json body or None, extra headers, status, field)
    ("malformed-json", "PUT", "/admin/services/user-api/weights", b'{"gray": ', None, {}, 400,
     "body"),
    ("not-utf8", "PUT", "/admin/services/user-api/weights", b"\xff\xfe", None, {}, 400, "body"),
    ("body-array", "PUT", "/admin/services/user-api/weights", b"[1, 2]", None, {}, 400, "body"),
    ("body-string", "PUT", "/admin/services/user-api/weights", b'"gray=5"', None, {}, 400,
     "body"),
    ("body-empty-object", "PUT", "/admin/services/user-api/weights", None, {}, {}, 400,
     "weights"),
    ("unknown-service", "PUT", "/admin/services/nope/weights", None, {"gray": 5}, {}, 404,
     "service"),
    ("unknown-release", "PUT", "/admin/services/user-api/weights", None,
     {"stable": 90, "blue": 10}, {}, 400, "weights.blue"),
    ("negative", "PUT", "/admin/services/user-api/weights", None, {"gray": -1}, {}, 400,
     "weights.gray"),
    ("non-numeric", "PUT", "/admin/services/user-api/weights", None, {"gray": "10"}, {}, 400,
     "weights.gray"),
    ("bool", "PUT", "/admin/services/user-api/weights", None, {"gray": True}, {}, 400,
     "weights.gray"),
    ("null", "PUT", "/admin/services/user-api/weights", None, {"gray": None}, {}, 400,
     "weights.gray"),
    ("object", "PUT", "/admin/services/user-api/weights", None, {"gray": {"w": 1}}, {}, 400,
     "weights.gray"),
    ("nan-literal", "PUT", "/admin/services/user-api/weights", b'{"gray": NaN}', None, {}, 400,
     "body"),
    ("infinity", "PUT", "/admin/services/user-api/weights", b'{"gray": 1e999}', None, {}, 400,
     "weights.gray"),
    ("all-zero", "PUT", "/admin/services/user-api/weights", None, {"stable": 0, "gray": 0}, {},
     400, "weights"),
    ("if-match-garbage", "PUT", "/admin/services/user-api/weights", None, {"gray": 7},
     {"If-Match": "yesterday"}, 400, "If-Match"),
    ("platform-not-object", "POST", "/admin/weights", b"5", None, {}, 400, "body"),
    ("platform-no-service", "POST", "/admin/weights", None, {"gray_weight": 5}, {}, 400,
     "service"),
    ("platform-service-type", "POST", "/admin/weights", None, {"service": 7, "gray_weight": 5},
     {}, 400, "service"),
    ("platform-unknown-service", "POST", "/admin/weights", None,
     {"service": "nope", "gray_weight": 5}, {}, 404, "service"),
    ("platform-over-100", "POST", "/admin/weights", None,
     {"service": "user-api", "gray_weight": 101}, {}, 400, "gray_weight"),
    ("platform-string-weight", "POST", "/admin/weights", None,
     {"service": "user-api", "gray_weight": "5"}, {}, 400, "gray_weight"),
    ("platform-nothing-to-do", "POST", "/admin/weights", None, {"service": "user-api"}, {}, 400,
     "gray_weight"),
    ("platform-unknown-field", "POST", "/admin/weights", None,
     {"service": "user-api", "gray_wieght": 5}, {}, 400, "gray_wieght"),
    ("platform-threshold-range", "POST", "/admin/weights", None,
     {"service": "user-api", "gray_weight": 5, "metrics_threshold": {"error_rate": 2}}, {}, 400,
     "metrics_threshold.error_rate"),
    ("platform-threshold-unknown", "POST", "/admin/weights", None,
     {"service": "user-api", "metrics_threshold": {"p99": 5}}, {}, 400, "metrics_threshold.p99"),
    ("platform-threshold-type", "POST", "/admin/weights", None,
     {"service": "user-api", "metrics_threshold": [1]}, {}, 400, "metrics_threshold"),
    ("platform-ambiguous-gray", "POST", "/admin/weights", None,
     {"service": "catalog", "gray_weight": 5}, {}, 400, "service"),
    ("explain-bad-header", "GET", "/admin/services/user-api/explain?header=nocolon", None, None,
     {}, 400, "header"),
    ("explain-bad-cookie", "GET", "/admin/services/user-api/explain?cookie=noequals", None,
     None, {}, 400, "cookie"),
    ("explain-bad-ip", "GET", "/admin/services/user-api/explain?user=a&client_ip=x", None, None,
     {}, 400, "client_ip"),
    ("explain-unknown-param", "GET", "/admin/services/user-api/explain?usr=a", None, None, {},
     400, "usr"),
    ("explain-unknown-service", "GET", "/admin/services/nope/explain?user=a", None, None, {},
     404, "service"),
    ("preview-sample-zero", "GET", "/admin/services/user-api/preview?gray=10&sample=0", None,
     None, {}, 400, "sample"),
    ("preview-sample-huge", "GET", "/admin/services/user-api/preview?gray=10&sample=2000000",
     None, None, {}, 400, "sample"),
    ("preview-non-numeric", "GET", "/admin/services/user-api/preview?gray=ten", None, None, {},
     400, "weights.gray"),
    ("preview-nan", "GET", "/admin/services/user-api/preview?gray=nan", None, None, {}, 400,
     "weights.gray"),
    ("preview-negative", "GET", "/admin/services/user-api/preview?gray=-5", None, None, {}, 400,
     "weights.gray"),
    ("preview-unknown-release", "GET", "/admin/services/user-api/preview?blue=5", None, None,
     {}, 400, "weights.blue"),
    ("preview-all-zero", "GET", "/admin/services/user-api/preview?gray=0&stable=0", None, None,
     {}, 400, "weights"),
    ("preview-nothing", "GET", "/admin/services/user-api/preview", None, None, {}, 400,
     "weights"),
]
# fmt: on


@pytest.mark.parametrize(
    ("method", "path", "raw", "body", "headers", "status", "field"),
    [c[1:] for c in BAD_INPUTS],
    ids=[c[0] for c in BAD_INPUTS],
)
async def test_bad_input_is_rejected_and_changes_nothing(
    admin: Admin,
    method: str,
    path: str,
    raw: bytes | None,
    body: object,
    headers: dict[str, str],
    status: int,
    field: str,
) -> None:
    await admin.call("PUT", "/admin/services/user-api/weights", json={"gray": 7})  # a file exists
    snap = admin.gw.holder.current
    before_file = admin.state.read_bytes()
    before = {k: admin.gw.holder.current.services["user-api"].table.pick_hash(k) for k in "abc"}
    got, doc, _ = await admin.call(method, path, json=body, data=raw, headers=headers)
    assert (got, doc["field"]) == (status, field), doc
    assert doc["error"]
    # no change: same snapshot object (so the same routing), same version, same bytes on disk
    assert admin.gw.holder.current is snap
    assert await admin.version() == snap.version == 1
    assert admin.state.read_bytes() == before_file
    after = {k: admin.gw.holder.current.services["user-api"].table.pick_hash(k) for k in "abc"}
    assert after == before


@pytest.mark.parametrize(
    ("auth", "path"),
    [
        (None, "/admin/services"),
        ("Bearer wrong-token", "/admin/services"),
        (f"Basic {TOKEN}", "/admin/services"),
        (f"Bearer {TOKEN}x", "/admin/services/user-api"),
        ("", "/admin/openapi.json"),
        (None, "/admin/no-such-thing"),
    ],
    ids=["missing", "wrong", "wrong-scheme", "prefix", "empty", "unknown-path"],
)
async def test_missing_or_wrong_token_is_401_and_changes_nothing(
    admin: Admin, auth: str | None, path: str
) -> None:
    snap = admin.gw.holder.current
    headers = {} if auth is None else {"Authorization": auth}
    async with admin.session.get(admin.base + path, headers=headers) as r:
        body = await r.json()
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert body == {"error": "missing or wrong bearer token", "field": "Authorization"}
    async with admin.session.put(
        admin.base + "/admin/services/user-api/weights", json={"gray": 50}, headers=headers
    ) as r:
        assert r.status == 401
    assert admin.gw.holder.current is snap
    assert not admin.state.exists()


async def test_health_and_metrics_need_no_token(admin: Admin) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        async with admin.session.get(admin.base + path) as r:
            assert r.status == 200, path
    status, _, _ = await admin.call("GET", "/admin/services", token=TOKEN)
    assert status == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3"], ids=["any", "private"])
async def test_non_loopback_admin_without_token_refuses_to_start(tmp_path: Path, host: str) -> None:
    doc = admin_doc(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    doc["admin"] = {"listen": f"{host}:0", "token_env": TOKEN_ENV}
    gw = Gateway(C.build(doc, env={}))
    with pytest.raises(ConfigError) as e:
        await gw.start()
    assert e.value.errors[0][0] == "admin.listen"
    assert TOKEN_ENV in e.value.errors[0][1]
    await gw.stop(0)
    # with a token the same listener is fine (not started here: 10.1.2.3 may not exist)
    C.build(doc, env={TOKEN_ENV: TOKEN})


# --------------------------------------------------------------------------- changes


async def test_put_persists_before_answering_and_returns_the_new_version(admin: Admin) -> None:
    status, doc, headers = await admin.call(
        "PUT", "/admin/services/user-api/weights", json={"stable": 90, "gray": 10}
    )
    assert status == 200
    assert doc["state_version"] == 1 and headers["ETag"] == '"1"'
    assert doc["weights"] == {"stable": 90, "gray": 10}
    assert doc["percent"] == {"stable": 90, "gray": 10}
    from gateway.store import decode

    stored = decode(admin.state.read_bytes())
    assert stored.version == 1
    assert stored.services["user-api"].weights == {"stable": 90, "gray": 10}
    # releases not named keep their weight (monotone single-release change,
    # README "How routing decides")
    _, doc, _ = await admin.call("PUT", "/admin/services/user-api/weights", json={"gray": 30})
    assert doc["weights"] == {"stable": 90, "gray": 30} and doc["state_version"] == 2


async def test_if_match_stale_is_409_and_changes_nothing(admin: Admin) -> None:
    _, doc, headers = await admin.call("PUT", "/admin/services/user-api/weights", json={"gray": 8})
    etag = headers["ETag"]
    status, doc, _ = await admin.call(
        "PUT", "/admin/services/user-api/weights", json={"gray": 9}, headers={"If-Match": etag}
    )
    assert status == 200 and doc["state_version"] == 2
    snap, disk = admin.gw.holder.current, admin.state.read_bytes()
    status, doc, _ = await admin.call(
        "PUT", "/admin/services/user-api/weights", json={"gray": 50}, headers={"If-Match": etag}
    )
    assert status == 409 and doc["field"] == "If-Match"
    assert admin.gw.holder.current is snap and admin.state.read_bytes() == disk
    status, doc, _ = await admin.call(
        "POST",
        "/admin/weights",
        json={"service": "user-api", "gray_weight": 50},
        headers={"If-Match": 'W/"1"'},
    )
    assert status == 409
    assert admin.gw.holder.current is snap and admin.state.read_bytes() == disk
    _, doc, _ = await admin.call("GET", "/admin/services/user-api")
    assert doc["weights"]["gray"] == 9


async def test_if_match_survives_the_rollout_bookkeeping_but_not_a_change(
    tmp_path: Path, fixed_upstreams: dict[str, str]
) -> None:
    """While a rollout runs, its driver renews the lease every half `lease_ttl` (a write
    of the state); a version read before that still makes a conditional move, and a
    version read before the service itself changed does not."""
    doc = admin_doc(
        tmp_path,
        fixed_upstreams["stable"],
        fixed_upstreams["gray"],
        rollout={"min_first_pause": "1s", "min_pause": "1s", "lease_ttl": "3s"},
    )
    gw = Gateway(C.build(doc, env={TOKEN_ENV: TOKEN}))
    await gw.start()
    try:
        async with aiohttp.ClientSession() as s:
            admin = Admin(gw, s, tmp_path / "state" / "gateway-state.json")
            plan = {"release": "gray", "steps": [{"weight": 20, "pause": "1h"}, {"weight": 100}]}
            status, _, _ = await admin.call("POST", "/admin/services/user-api/rollout", json=plan)
            assert status == 200
            _, body, headers = await admin.call("GET", "/admin/services/user-api")
            etag, seen = headers["ETag"], body["state_version"]
            deadline = asyncio.get_running_loop().time() + 30
            while await admin.version() == seen:  # the next lease renewal: ~1.5 s
                assert asyncio.get_running_loop().time() < deadline, "no lease renewal"
                await asyncio.sleep(0.1)
            status, body, _ = await admin.call(
                "POST", "/admin/services/user-api/pause", headers={"If-Match": etag}
            )
            assert status == 200, body
            assert body["rollout"]["state"] == "Paused"
            status, body, _ = await admin.call(
                "POST", "/admin/services/user-api/resume", headers={"If-Match": etag}
            )
            assert (status, body["field"]) == (409, "If-Match")
            assert "changed at state version" in body["error"]
            _, body, _ = await admin.call("GET", "/admin/services/user-api")
            assert body["rollout"]["state"] == "Paused"
    finally:
        await gw.stop(1.0)


async def test_seed_platform_payload_sets_5_95_and_guard_thresholds(admin: Admin) -> None:
    seed = {
        "service": "user-api",
        "gray_weight": 5,
        "metrics_threshold": {"error_rate": 0.01, "latency_p95_ms": 800},
    }
    await admin.call("PUT", "/admin/services/user-api/weights", json={"gray": 40})
    status, doc, _ = await admin.call("POST", "/admin/weights", json=seed)
    assert status == 200
    assert doc["weights"] == {"stable": 95, "gray": 5}
    assert doc["percent"] == {"stable": 95, "gray": 5}
    _, doc, _ = await admin.call("GET", "/admin/services/user-api")
    assert doc["guard"]["thresholds"]["error_rate"] == 0.01
    assert doc["guard"]["thresholds"]["latency_p95_ms"] == 800
    assert doc["guard"]["thresholds"]["latency_p95_delta_ms"] == 200  # untouched: config default
    assert admin.gw.holder.current.services["user-api"].guard.error_rate == 0.01
    # thresholds alone leave the weights as they are
    _, doc, _ = await admin.call(
        "POST",
        "/admin/weights",
        json={"service": "user-api", "metrics_threshold": {"min_requests": 50}},
    )
    assert doc["weights"] == {"stable": 95, "gray": 5}
    assert doc["guard"]["thresholds"] == {
        "error_rate": 0.01,
        "latency_p95_ms": 800,
        "latency_p95_delta_ms": 200,
        "min_requests": 50,
    }


async def test_platform_payload_with_a_single_non_baseline_release(
    tmp_path: Path, upstreams: Callable[..., Awaitable[Upstream]]
) -> None:
    stable, gray = await upstreams("stable"), await upstreams("gray")
    doc = admin_doc(tmp_path, stable.url, gray.url)
    doc["services"] = {
        "orders": {
            "baseline": "v1",
            "releases": {
                "v1": {"weight": 100, "upstreams": [stable.url]},
                "v2": {"weight": 0, "upstreams": [gray.url]},
            },
        }
    }
    gw = Gateway(C.build(doc, env={TOKEN_ENV: TOKEN}))
    await gw.start()
    try:
        async with aiohttp.ClientSession() as s:
            a = Admin(gw, s, tmp_path)
            _, body, _ = await a.call(
                "POST", "/admin/weights", json={"service": "orders", "gray_weight": 12.5}
            )
            assert body["weights"] == {"v1": 87.5, "v2": 12.5}
    finally:
        await gw.stop(1.0)


async def test_delete_weights_goes_back_to_config(admin: Admin) -> None:
    await admin.call(
        "POST",
        "/admin/weights",
        json={"service": "user-api", "gray_weight": 50, "metrics_threshold": {"error_rate": 0.2}},
    )
    status, doc, _ = await admin.call("DELETE", "/admin/services/user-api/weights")
    assert status == 200 and doc["state_version"] == 2
    assert doc["weights"] == {"stable": 95, "gray": 5}
    assert doc["guard"]["thresholds"]["error_rate"] == 0.05


async def test_data_path_follows_a_change_immediately(admin: Admin) -> None:
    port = admin.gw.port
    assert port is not None
    users = [f"u{i}" for i in range(300)]
    await admin.call("PUT", "/admin/services/user-api/weights", json={"stable": 0, "gray": 1})
    got = await releases_for_users(port, users, conns=4)
    assert {v[1] for v in got.values()} == {"gray"}
    await admin.call("PUT", "/admin/services/user-api/weights", json={"stable": 1, "gray": 0})
    got = await releases_for_users(port, users, conns=4)
    assert {v[1] for v in got.values()} == {"stable"}


async def test_concurrent_puts_without_if_match_all_land_in_order(admin: Admin) -> None:
    import asyncio

    results = await asyncio.gather(
        *(
            admin.call("PUT", "/admin/services/user-api/weights", json={"gray": i})
            for i in range(1, 21)
        )
    )
    versions = sorted(doc["state_version"] for _, doc, _ in results)
    assert versions == list(range(1, 21))
    assert await admin.version() == 20


# --------------------------------------------------------------------------- explain / preview


async def test_explain_agrees_with_the_data_path_for_10000_users(admin: Admin) -> None:
    import asyncio

    port = admin.gw.port
    assert port is not None
    await admin.call("PUT", "/admin/services/user-api/weights", json={"stable": 70, "gray": 30})
    users = [f"user-{i}" for i in range(10_000)]
    served = await releases_for_users(port, users, conns=8)
    sem = asyncio.Semaphore(16)

    async def explain(u: str) -> tuple[str, dict[str, Any]]:
        async with sem:
            status, doc, _ = await admin.call("GET", f"/admin/services/user-api/explain?user={u}")
            assert status == 200
            return u, doc

    explained = dict(await asyncio.gather(*(explain(u) for u in users)))
    mismatches = [u for u in users if served[u][1] != explained[u]["release"]]
    assert not mismatches, mismatches[:10]
    assert {d["reason"] for d in explained.values()} == {"hash"}
    assert all(explained[u]["key"] == u for u in users)
    shares = sum(1 for u in users if served[u][1] == "gray") / len(users)
    assert 0.28 < shares < 0.32


# fmt: off
OVERRIDES = [
    # (id, request headers, explain query) -- client 127.0.0.1 is NOT trusted in this config
    ("stage-header-untrusted", {"X-Release-Stage": "gray", "X-User-ID": "alice"},
     "header=X-Release-Stage:gray&user=alice"),
    ("stage-cookie-untrusted", {"Cookie": "release_stage=gray; uid=bob"},
     "cookie=release_stage=gray&cookie=uid=bob"),
    ("uid-cookie", {"Cookie": "uid=carol"}, "cookie=uid=carol"),
    ("header-beats-cookie", {"X-User-ID": "dave", "Cookie": "uid=erin"},
     "header=X-User-ID:dave&cookie=uid=erin"),
    ("blank-user-header", {"X-User-ID": " ", "Cookie": "uid=frank"},
     "header=X-User-ID:%20&cookie=uid=frank"),
]
# fmt: on


@pytest.mark.parametrize(
    ("headers", "query"), [c[1:] for c in OVERRIDES], ids=[c[0] for c in OVERRIDES]
)
async def test_explain_agrees_with_the_data_path_for_overrides_and_cookies(
    admin: Admin, headers: dict[str, str], query: str
) -> None:
    port = admin.gw.port
    for key in (f"k{i}" for i in range(40)):
        h = {k: v.replace("alice", key) for k, v in headers.items()}
        q = query.replace("alice", key)
        async with admin.session.get(f"http://127.0.0.1:{port}/", headers=h) as r:
            assert r.status == 200
            served = r.headers["X-Release-Stage"]
        _, doc, _ = await admin.call("GET", f"/admin/services/user-api/explain?{q}")
        assert doc["release"] == served, (h, doc)
        assert doc["reason"] == "hash" and doc["trusted"] is False


async def test_explain_trusted_override_and_no_key(admin: Admin) -> None:
    _, doc, _ = await admin.call(
        "GET", "/admin/services/user-api/explain?header=X-Release-Stage:gray&client_ip=10.0.0.7"
    )
    assert (doc["release"], doc["reason"], doc["trusted"]) == ("gray", "header", True)
    _, doc, _ = await admin.call(
        "GET", "/admin/services/user-api/explain?cookie=release_stage=gray&client_ip=10.0.0.7"
    )
    assert (doc["release"], doc["reason"]) == ("gray", "cookie")
    _, doc, _ = await admin.call("GET", "/admin/services/user-api/explain")
    assert doc["reason"] == "random" and doc["key"] is None


async def test_preview_matches_the_measured_movement(admin: Admin) -> None:
    port = admin.gw.port
    assert port is not None
    sample = 10_000
    users = [sample_key(i) for i in range(sample)]
    before = await releases_for_users(port, users, conns=8)
    _, pv, _ = await admin.call(
        "GET", f"/admin/services/user-api/preview?stable=80&gray=20&sample={sample}"
    )
    assert pv["sample"] == sample and pv["weights"] == {"stable": 80, "gray": 20}
    snap = admin.gw.holder.current
    await admin.call("PUT", "/admin/services/user-api/weights", json={"stable": 80, "gray": 20})
    assert admin.gw.holder.current is not snap
    after = await releases_for_users(port, users, conns=8)
    moves: dict[str, int] = {}
    for u in users:
        a, b = before[u][1], after[u][1]
        if a != b:
            moves[f"{a}->{b}"] = moves.get(f"{a}->{b}", 0) + 1
    assert pv["moves"] == {k: n / sample for k, n in moves.items()}
    assert pv["moved_share"] == sum(moves.values()) / sample
    assert set(moves) == {"stable->gray"}  # monotone: 5 -> 20 only moves keys into gray
    gray = sum(1 for u in users if after[u][1] == "gray") / sample
    assert pv["shares"]["gray"] == gray
    assert pv["before"]["gray"] == sum(1 for u in users if before[u][1] == "gray") / sample


async def test_preview_default_sample_is_100000(admin: Admin) -> None:
    _, pv, _ = await admin.call("GET", "/admin/services/catalog/preview?batch-1=0")
    assert pv["sample"] == 100_000
    assert set(pv["moves"]) <= {"batch-1->stable", "batch-1->batch-2"}
    assert pv["shares"]["batch-1"] == 0
    assert abs(pv["moved_share"] - 0.15) < 0.005


# --------------------------------------------------------------------------- OpenAPI


async def test_openapi_document_and_router_agree(admin: Admin) -> None:
    status, doc, _ = await admin.call("GET", "/admin/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    jsonschema.Draft202012Validator.check_schema({"$defs": doc["components"]["schemas"]})
    documented = {
        (m.upper(), p)
        for p, item in doc["paths"].items()
        for m in item
        if m in ("get", "put", "post", "delete", "patch")
    }
    routed = set()
    for route in admin.gw.admin_runner.app.router.routes():  # type: ignore[union-attr]
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD":
            routed.add((route.method, path))
    assert documented == routed
    for item in doc["paths"].values():
        for m, op in item.items():
            if m == "parameters":
                continue
            for code, resp in op["responses"].items():
                assert "description" in resp, (m, code)
                for media in resp.get("content", {}).values():
                    assert "schema" in media
