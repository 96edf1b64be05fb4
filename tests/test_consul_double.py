"""Pins every rule of Consul's HTTP API the double implements on it — or on a real agent when asked.

A real agent is used only when GATEWAY_TEST_REAL_CONSUL=1 (its address from the
standard CONSUL_HTTP_ADDR, default 127.0.0.1:8500): a developer who merely has
CONSUL_HTTP_ADDR exported for their own work must not have tests write to it.

Why both: a double that departs from the real agent proves nothing. The `agent`
fixture yields the double's address, or the real agent's
(names get a unique prefix and are cleaned up); tests that need the double's hooks
(ACL tokens, kill, snapshot restore, jitter switch) are skipped against a real agent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from tests.consul_double import (
    AclToken,
    ConsulDouble,
    GoParseError,
    compile_filter,
    filter_non_passing,
    management_token,
    parse_go_bool,
    parse_go_duration,
    parse_go_uint,
    read_only_token,
    rpc_query_timeout,
)

REAL_ADDR = (
    os.environ.get("CONSUL_HTTP_ADDR") or "127.0.0.1:8500"
    if os.environ.get("GATEWAY_TEST_REAL_CONSUL") == "1"
    else ""
)
Params = Sequence[tuple[str, str]] | dict[str, str]


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def index(self) -> int:
        return int(self.headers["X-Consul-Index"])


@dataclass
class Agent:
    """What a test talks to: HTTP helpers plus, on the double, its hooks."""

    address: str
    http: aiohttp.ClientSession
    double: ConsulDouble | None
    token: str | None = None
    prefix: str = ""
    registered: list[str] = field(default_factory=list)

    def hooks(self) -> ConsulDouble:
        if self.double is None:
            pytest.skip("needs the double's test hooks (not available on a real agent)")
        return self.double

    def name(self, base: str) -> str:
        return f"{self.prefix}{base}"

    async def call(
        self,
        method: str,
        path: str,
        params: Params = (),
        *,
        data: bytes | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        h = dict(headers or {})
        if self.token and "X-Consul-Token" not in h:
            h["X-Consul-Token"] = self.token
        kw: dict[str, Any] = {"params": params, "headers": h}
        if body is not None:
            kw["json"] = body
        elif data is not None:
            kw["data"] = data
        async with self.http.request(method, f"{self.address}{path}", **kw) as r:
            return Reply(r.status, r.headers, await r.read())

    async def get(self, path: str, params: Params = (), **kw: Any) -> Reply:
        return await self.call("GET", path, params, **kw)

    async def put(self, path: str, params: Params = (), **kw: Any) -> Reply:
        return await self.call("PUT", path, params, **kw)

    async def health(self, service: str, params: Params = (), **kw: Any) -> Reply:
        return await self.get(f"/v1/health/service/{service}", params, **kw)

    async def settle(self, service: str, before: int) -> Reply:
        """Block until the service's index passes `before` (a real agent syncs asynchronously)."""
        r = await self.health(service, {"index": str(before), "wait": "5s"})
        assert r.index > before, "the change never became visible"
        return r

    async def register(self, body: dict[str, Any], *, settle: bool = True) -> None:
        before = (await self.health(body["Name"])).index
        r = await self.put("/v1/agent/service/register", body=body)
        assert r.status == 200, r.text
        self.registered.append(body.get("ID", body["Name"]))
        if settle:
            await self.settle(body["Name"], before)

    async def check(self, service: str, verb: str, check_id: str, **kw: Any) -> Reply:
        before = (await self.health(service)).index
        r = await self.put(f"/v1/agent/check/{verb}/{check_id}", **kw)
        if r.status == 200:
            await self.settle(service, before)
        return r

    async def deregister(self, service: str, sid: str) -> None:
        before = (await self.health(service)).index
        assert (await self.put(f"/v1/agent/service/deregister/{sid}")).status == 200
        await self.settle(service, before)


def ttl_service(name: str, sid: str, status: str = "passing", **extra: Any) -> dict[str, Any]:
    return {
        "Name": name,
        "ID": sid,
        "Port": 8080,
        "Check": {"CheckID": f"service:{sid}", "TTL": "60s", "Status": status},
        **extra,
    }


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    async with aiohttp.ClientSession() as http:
        if REAL_ADDR:
            addr = REAL_ADDR if "://" in REAL_ADDR else f"http://{REAL_ADDR}"
            a = Agent(
                addr.rstrip("/"),
                http,
                None,
                os.environ.get("CONSUL_HTTP_TOKEN") or None,
                prefix=f"dbl-{uuid.uuid4().hex[:8]}-",
            )
            try:
                yield a
            finally:
                for sid in a.registered:
                    await a.put(f"/v1/agent/service/deregister/{sid}")
                await a.call("DELETE", f"/v1/kv/{a.prefix}", {"recurse": ""})
        else:
            async with ConsulDouble() as d:
                yield Agent(d.address, http, d)


@pytest.fixture
async def acl_agent() -> AsyncIterator[Agent]:
    """A double with ACLs on (default deny): `mgmt`, `reader`, `web-only`, `kv-app` tokens."""
    if REAL_ADDR:
        pytest.skip("ACL cases need the double's configured tokens")
    tokens = [
        management_token("mgmt"),
        read_only_token("reader"),
        AclToken("web-only", service_read=("web",), node_read=("",)),
        AclToken("no-read", key_read=("x",)),
        AclToken("kv-app", key_read=("app/",), key_write=("app/",)),
    ]
    async with (
        aiohttp.ClientSession() as http,
        ConsulDouble(acl_tokens=tokens, default_policy="deny") as d,
    ):
        yield Agent(d.address, http, d, token="mgmt")


# =========================================================================== Go parsing (pure)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("5m", 300.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("0", 0.0),
        ("-1s", -1.0),
        ("+2s", 2.0),
        (".5s", 0.5),
        ("5.s", 5.0),
        ("1.5h", 5400.0),
        ("100us", 1e-4),
        ("100\u00b5s", 1e-4),
        ("2h45m", 9900.0),
    ],
    ids=lambda v: str(v),
)
def test_go_duration_valid(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10", "", ".", "s", "1x", "1.5", "--1s", "1s2"], ids=repr)
def test_go_duration_invalid(text: str) -> None:
    with pytest.raises(GoParseError):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("text", "ok"),
    [("0", True), ("18446744073709551615", True), ("18446744073709551616", False),
     ("-1", False), ("+1", False), ("1_000", False), ("0x10", False), ("1.0", False)],
    ids=repr,
)  # fmt: skip
def test_go_uint(text: str, ok: bool) -> None:
    if ok:
        assert parse_go_uint(text) == int(text)
    else:
        with pytest.raises(GoParseError):
            parse_go_uint(text)


@pytest.mark.parametrize(
    ("text", "want"),
    [(v, True) for v in ("1", "t", "T", "TRUE", "true", "True")]
    + [(v, False) for v in ("0", "f", "F", "FALSE", "false", "False")]
    + [(v, None) for v in ("yes", "on", "tRUE", "2", " 1")],
    ids=repr,
)
def test_go_bool(text: str, want: bool | None) -> None:
    if want is None:
        with pytest.raises(GoParseError):
            parse_go_bool(text)
    else:
        assert parse_go_bool(text) is want


@pytest.mark.parametrize(
    ("wait", "timeout"),
    [(None, 300.0), (0.0, 300.0), (-5.0, 300.0), (30.0, 30.0), (600.0, 600.0), (1200.0, 600.0)],
    ids=repr,
)
def test_rpc_query_timeout_caps_and_defaults(wait: float | None, timeout: float) -> None:
    assert rpc_query_timeout(wait, 600.0, 300.0) == timeout


def _e(name: str, *statuses: str) -> dict[str, Any]:
    return {"Service": {"ID": name}, "Checks": [{"Status": s} for s in statuses]}


@pytest.mark.parametrize(
    ("entries", "want"),
    [
        ([_e("a", "passing"), _e("b", "critical"), _e("c", "passing"), _e("d", "passing")],
         ["a", "d", "c"]),
        ([_e("a", "warning"), _e("b", "passing")], ["b"]),
        ([_e("a", "passing", "critical"), _e("b", "passing")], ["b"]),
        ([_e("a", "passing"), _e("b", "passing")], ["a", "b"]),
        ([_e("a"), _e("b", "Passing")], ["a"]),
    ],
    ids=["swap-with-last", "warning-excluded", "any-check", "all-pass", "exact-status"],
)  # fmt: skip
def test_filter_non_passing_order(entries: list[dict[str, Any]], want: list[str]) -> None:
    assert [e["Service"]["ID"] for e in filter_non_passing(entries)] == want


# =========================================================================== §1 common rules


async def test_default_acl_policy_header_on_wrapped_endpoints(agent: Agent) -> None:
    svc = agent.name("web")
    agent.registered.append(svc)
    for r in (
        await agent.health(svc),
        await agent.get(f"/v1/kv/{agent.name('nokey')}"),
        await agent.get("/v1/status/leader"),
        await agent.put(f"/v1/kv/{agent.name('k')}", data=b"v"),
        await agent.put("/v1/agent/service/register", body=ttl_service(svc, svc)),
    ):
        assert r.headers.get("X-Consul-Default-ACL-Policy") in ("allow", "deny")


@pytest.mark.parametrize("kind", ["health", "kv-hit", "kv-miss"])
async def test_read_endpoints_carry_query_metadata(agent: Agent, kind: str) -> None:
    key = agent.name("meta/k")
    await agent.put(f"/v1/kv/{key}", data=b"v")
    path = {
        "health": f"/v1/health/service/{agent.name('web')}",
        "kv-hit": f"/v1/kv/{key}",
        "kv-miss": f"/v1/kv/{key}-absent",
    }[kind]
    r = await agent.get(path)
    assert r.status == (404 if kind == "kv-miss" else 200)
    assert r.index >= 1
    assert r.headers["X-Consul-KnownLeader"] in ("true", "false")
    assert int(r.headers["X-Consul-LastContact"]) >= 0
    assert r.headers["X-Consul-Query-Backend"] in ("blocking-query", "streaming")
    assert "X-Consul-Results-Filtered-By-ACLs" not in r.headers  # only when true


@pytest.mark.parametrize(
    ("params", "want"),
    [({}, "leader"), ({"stale": ""}, "stale"), ({"consistent": ""}, "consistent")],
    ids=["default", "stale", "consistent"],
)
async def test_health_effective_consistency(
    agent: Agent, params: dict[str, str], want: str
) -> None:
    r = await agent.health(agent.name("web"), params)
    assert r.headers["X-Consul-Effective-Consistency"] == want


async def test_success_body_is_compact_json_and_pretty_indents(agent: Agent) -> None:
    svc = agent.name("web")
    await agent.register(ttl_service(svc, svc))
    r = await agent.health(svc)
    assert r.headers["Content-Type"].startswith("application/json")
    assert b"\n" not in r.body.strip() and b'": ' not in r.body
    pretty = await agent.health(svc, {"pretty": ""})
    assert b"\n    " in pretty.body and pretty.json() == r.json()


ERROR_CASES = [
    ("bad-wait", "GET", "/v1/health/service/{svc}", {"index": "1", "wait": "10"}, 400),
    ("bad-index", "GET", "/v1/health/service/{svc}", {"index": "x"}, 400),
    ("stale+consistent", "GET", "/v1/health/service/{svc}", {"stale": "", "consistent": ""}, 400),
    ("missing-service", "GET", "/v1/health/service/", {}, 400),
    ("bad-passing", "GET", "/v1/health/service/{svc}", {"passing": "yes"}, 400),
    ("unknown-path", "GET", "/v1/no/such/endpoint", {}, 404),
    ("unknown-dc", "GET", "/v1/health/service/{svc}", {"dc": "no-such-dc"}, 500),
    ("bad-filter", "GET", "/v1/health/service/{svc}", {"filter": "Service.Port =="}, 500),
    ("kv-missing-key", "GET", "/v1/kv/", {}, 400),
    ("kv-conflicting", "PUT", "/v1/kv/{svc}", {"cas": "0", "acquire": "s"}, 400),
    ("kv-bad-flags", "PUT", "/v1/kv/{svc}", {"flags": "x"}, 500),
    ("register-no-name", "PUT", "/v1/agent/service/register", {}, 400),
]


@pytest.mark.parametrize(
    ("method", "path", "params", "status"),
    [c[1:] for c in ERROR_CASES],
    ids=[c[0] for c in ERROR_CASES],
)
async def test_errors_are_plain_text(
    agent: Agent, method: str, path: str, params: dict[str, str], status: int
) -> None:
    body = {"Port": 1} if path.endswith("register") else None
    r = await agent.call(method, path.format(svc=agent.name("web")), params, body=body)
    assert r.status == status, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.text and not r.text.lstrip().startswith(("{", "["))


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/health/service/web", {"GET"}),
        ("POST", "/v1/kv/k", {"GET", "PUT", "DELETE"}),
        ("GET", "/v1/agent/service/register", {"PUT"}),
        ("DELETE", "/v1/status/leader", {"GET"}),
    ],
    ids=["health", "kv", "register", "leader"],
)
async def test_wrong_method_is_405_with_allow(
    agent: Agent, method: str, path: str, allowed: set[str]
) -> None:
    r = await agent.call(method, path)
    assert r.status == 405
    got = set(r.headers["Allow"].split(","))
    assert allowed | {"OPTIONS"} <= got and method not in got


# =========================================================================== §2 blocking queries


@pytest.mark.parametrize(
    ("wait", "status"),
    [("10s", 200), ("5m", 200), ("1m30s", 200), ("500ms", 200), ("0", 200), ("", 200),
     ("10", 400), ("abc", 400), ("1x", 400), (".", 400)],
    ids=repr,
)  # fmt: skip
async def test_wait_is_a_go_duration(agent: Agent, wait: str, status: int) -> None:
    r = await agent.health(agent.name("web"), {"wait": wait})  # no index: returns at once
    assert r.status == status, r.text


@pytest.mark.parametrize(
    ("index", "status"),
    [("0", 200), ("1", 200), ("", 200), ("-1", 400), ("+1", 400), ("abc", 400), ("1.5", 400),
     ("18446744073709551616", 400)],
    ids=repr,
)  # fmt: skip
async def test_index_is_parse_uint(agent: Agent, index: str, status: int) -> None:
    svc = agent.name("web")
    await agent.register(ttl_service(svc, svc))  # service index > 1, so index=1 returns at once
    r = await agent.health(svc, {"index": index, "wait": "5s"})
    assert r.status == status, r.text


async def test_index_zero_is_non_blocking(agent: Agent) -> None:
    svc = agent.name("web")
    await agent.register(ttl_service(svc, svc))
    t0 = time.monotonic()
    r = await agent.health(svc, {"index": "0", "wait": "10s"})
    assert r.status == 200 and time.monotonic() - t0 < 2.0


async def test_blocking_returns_on_change_with_higher_index(agent: Agent) -> None:
    svc = agent.name("web")
    await agent.register(ttl_service(svc, f"{svc}-1"))
    first = await agent.health(svc)
    start = len(agent.double.requests) if agent.double else 0
    call = asyncio.create_task(agent.health(svc, {"index": str(first.index), "wait": "30s"}))
    if agent.double is not None:  # prove it really was parked before the change
        await agent.double.wait_for_request(lambda r: r.timeout is not None, start=start)
        assert not call.done()
    await agent.register(ttl_service(svc, f"{svc}-2"), settle=False)
    r = await asyncio.wait_for(call, 10)
    assert r.index > first.index
    async with asyncio.timeout(10):  # a wake-up proves no change (§2): follow until it shows
        while f"{svc}-2" not in {e["Service"]["ID"] for e in r.json()}:
            r = await agent.health(svc, {"index": str(r.index), "wait": "5s"})


async def test_blocking_times_out_with_same_index(agent: Agent) -> None:
    if agent.double is not None:
        agent.double.set_jitter(False)
    svc = agent.name("web")
    await agent.register(ttl_service(svc, svc))
    first = await agent.health(svc)
    t0 = time.monotonic()
    r = await agent.health(svc, {"index": str(first.index), "wait": "300ms"})
    elapsed = time.monotonic() - t0
    assert r.status == 200 and r.index == first.index and r.json() == first.json()
    assert 0.29 <= elapsed < 0.3 * 17 / 16 + 1.0


async def test_jitter_is_within_wait_over_16_and_switchable(agent: Agent) -> None:
    d = agent.hooks()
    svc = agent.name("web")
    await agent.register(ttl_service(svc, svc))
    idx = (await agent.health(svc)).index

    async def timeouts(n: int) -> list[float]:
        start = len(d.requests)
        await asyncio.gather(
            *(agent.health(svc, {"index": str(idx), "wait": "16ms"}) for _ in range(n))
        )
        return [r.timeout for r in d.requests[start:] if r.timeout is not None]

    jittered = await timeouts(20)
    assert len(jittered) == 20 and all(0.016 <= t < 0.017 for t in jittered)
    assert len(set(jittered)) > 1
    d.set_jitter(False)
    assert set(await timeouts(5)) == {0.016}


async def test_wait_is_capped_at_max_query_time(agent: Agent) -> None:
    d = agent.hooks()
    d.set_jitter(False)
    svc = agent.name("web")
    await agent.register(ttl_service(svc, svc))
    idx = (await agent.health(svc)).index
    start = len(d.requests)
    for wait, want in (("20m", 600.0), ("", 300.0), ("-3s", 300.0), ("90s", 90.0)):
        call = asyncio.create_task(agent.health(svc, {"index": str(idx), "wait": wait}))
        rec = await d.wait_for_request(lambda r: r.timeout is not None, start=start)
        start = d.requests.index(rec) + 1
        assert rec.timeout == want, wait
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call


async def test_agent_configured_query_limits_apply() -> None:
    if REAL_ADDR:
        pytest.skip("needs a double with short max/default query times")
    async with (
        aiohttp.ClientSession() as http,
        ConsulDouble(max_query_time=0.2, default_query_time=0.1, jitter=False) as d,
    ):
        a = Agent(d.address, http, d)
        for wait, lo in (("1h", 0.2), ("", 0.1)):
            t0 = time.monotonic()
            r = await a.health(
                "web", {"index": "5000", "wait": wait} if wait else {"index": "5000"}
            )
            assert r.status == 200 and lo <= time.monotonic() - t0 < lo + 1.0


async def test_index_is_never_zero(agent: Agent) -> None:
    d = agent.hooks()  # a fresh store is needed to see the rewrite of 0 to 1
    assert (await agent.health("never-registered")).index == 1
    r = await agent.get("/v1/kv/absent")
    assert r.status == 404 and r.index == 1
    assert d is agent.double


async def test_snapshot_restore_wakes_blocked_queries_with_lower_index(agent: Agent) -> None:
    d = agent.hooks()
    svc = agent.name("web")
    for i in range(3):
        await agent.register(ttl_service(svc, f"{svc}-{i}"))
    first = await agent.health(svc)
    start = len(d.requests)
    call = asyncio.create_task(agent.health(svc, {"index": str(first.index), "wait": "60s"}))
    await d.wait_for_request(lambda r: r.timeout is not None, start=start)
    d.restore_snapshot_resetting_indexes()
    r = await asyncio.wait_for(call, 5)
    assert r.index < first.index and len(r.json()) == 3


# =========================================================================== §3 health/service


async def test_unknown_service_is_empty_array_indexed_by_last_extinction(agent: Agent) -> None:
    missing, other = agent.name("missing"), agent.name("other")
    r = await agent.health(missing)
    assert r.status == 200 and r.json() == []
    await agent.register(ttl_service(other, other))
    before = (await agent.health(missing)).index
    call = asyncio.create_task(agent.health(missing, {"index": str(before), "wait": "30s"}))
    await agent.deregister(other, other)  # some other service goes extinct: the missing one wakes
    r = await asyncio.wait_for(call, 10)
    assert r.status == 200 and r.json() == [] and r.index > before


async def test_service_index_is_its_own(agent: Agent) -> None:
    a, b = agent.name("a"), agent.name("b")
    await agent.register(ttl_service(a, a))
    await agent.register(ttl_service(b, b))
    idx_a = (await agent.health(a)).index
    await agent.check(b, "fail", f"service:{b}")
    assert (await agent.health(a)).index == idx_a
    assert (await agent.health(b)).index > idx_a


async def test_deregistering_the_last_instance_raises_the_index(agent: Agent) -> None:
    svc = agent.name("web")
    await agent.register(ttl_service(svc, svc))
    before = (await agent.health(svc)).index
    await agent.deregister(svc, svc)
    r = await agent.health(svc)
    assert r.json() == [] and r.index > before


TAG_CASES = [
    ("all-present", ["v2", "gray"], ["v2", "gray"], True),
    ("subset", ["v2", "gray", "batch-1"], ["gray", "batch-1"], True),
    ("and-not-or", ["v2"], ["v2", "gray"], False),
    ("case-insensitive", ["Gray", "V2"], ["gRAY", "v2"], True),
    ("no-tags-asked", ["x"], [], True),
    ("untagged-instance", [], ["gray"], False),
    ("exact-not-prefix", ["gray-2"], ["gray"], False),
]


@pytest.mark.parametrize(
    ("tags", "query", "visible"), [c[1:] for c in TAG_CASES], ids=[c[0] for c in TAG_CASES]
)
async def test_tag_filter_is_and_and_case_insensitive(
    agent: Agent, tags: list[str], query: list[str], visible: bool
) -> None:
    svc = agent.name("web")
    await agent.register(ttl_service(svc, svc, Tags=tags))
    r = await agent.health(svc, [("tag", t) for t in query])
    assert r.status == 200 and len(r.json()) == (1 if visible else 0)


async def _three_states(agent: Agent) -> str:
    svc = agent.name("web")
    for sid, status in (("a", "passing"), ("b", "warning"), ("c", "critical")):
        await agent.register(ttl_service(svc, f"{svc}-{sid}", status))
    return svc


@pytest.mark.parametrize(
    ("value", "status", "count"),
    [(None, 200, 3), ("", 200, 1)]
    + [(v, 200, 1) for v in ("1", "t", "T", "TRUE", "true", "True")]
    + [(v, 200, 3) for v in ("0", "f", "F", "FALSE", "false", "False")]
    + [(v, 400, None) for v in ("yes", "on", "2", "tRUE")],
    ids=repr,
)
async def test_passing_is_go_parse_bool(
    agent: Agent, value: str | None, status: int, count: int | None
) -> None:
    svc = await _three_states(agent)
    r = await agent.health(svc, {} if value is None else {"passing": value})
    assert r.status == status, r.text
    if count is not None:
        assert len(r.json()) == count
    else:
        assert r.headers["Content-Type"].startswith("text/plain")


async def test_passing_drops_entries_with_a_failing_node_check(agent: Agent) -> None:
    svc = agent.name("web")
    await agent.register(ttl_service(svc, svc))
    before = (await agent.health(svc)).index
    r = await agent.put("/v1/agent/maintenance", {"enable": "true", "reason": "test"})
    assert r.status == 200
    try:
        r = await agent.settle(svc, before)
        checks = {c["CheckID"]: c["Status"] for c in r.json()[0]["Checks"]}
        assert checks["_node_maintenance"] == "critical"
        assert (await agent.health(svc, {"passing": ""})).json() == []
    finally:
        await agent.put("/v1/agent/maintenance", {"enable": "false"})


async def test_passing_reorders_entries(agent: Agent) -> None:
    svc = agent.name("web")
    for sid in "abcd":
        await agent.register(ttl_service(svc, f"{svc}-{sid}"))
    await agent.check(svc, "fail", f"service:{svc}-b")
    ids = [e["Service"]["ID"][-1] for e in (await agent.health(svc, {"passing": ""})).json()]
    assert ids == ["a", "d", "c"]


async def test_index_covers_entries_hidden_by_passing(agent: Agent) -> None:
    svc = agent.name("web")
    await agent.register(ttl_service(svc, svc, "critical"))
    first = await agent.health(svc, {"passing": ""})
    assert first.json() == []
    call = asyncio.create_task(
        agent.health(svc, {"passing": "", "index": str(first.index), "wait": "30s"})
    )
    await agent.check(svc, "warn", f"service:{svc}")
    r = await asyncio.wait_for(call, 10)
    assert r.json() == [] and r.index > first.index  # woke for a change passing hides


async def test_bad_passing_still_blocks_first_and_carries_the_index(agent: Agent) -> None:
    d = agent.hooks()
    d.set_jitter(False)
    svc = agent.name("web")
    await agent.register(ttl_service(svc, svc))
    idx = (await agent.health(svc)).index
    t0 = time.monotonic()
    r = await agent.health(svc, {"passing": "nope", "index": str(idx), "wait": "200ms"})
    assert r.status == 400 and time.monotonic() - t0 >= 0.19 and r.index == idx


async def test_entry_shape_and_normalised_arrays(agent: Agent) -> None:
    svc = agent.name("web")
    await agent.register({"Name": svc, "ID": svc, "Port": 9000})
    [e] = (await agent.health(svc)).json()
    assert e["Service"]["Tags"] == [] and isinstance(e["Checks"], list)
    assert e["Service"]["Meta"] in (None, {})
    assert e["Service"]["Address"] == "" and e["Node"]["Address"]  # empty: use the node's
    assert e["Service"]["Weights"] == {"Passing": 1, "Warning": 1}
    for c in e["Checks"]:
        assert c["Status"] in ("passing", "warning", "critical")
        assert isinstance(c["ServiceTags"], list)
    assert any(c["CheckID"] == "serfHealth" and c["ServiceID"] == "" for c in e["Checks"])


async def test_explicit_weights_and_address_are_returned(agent: Agent) -> None:
    svc = agent.name("web")
    body = ttl_service(svc, svc, Address="10.0.1.5", Weights={"Passing": 10, "Warning": 1})
    await agent.register(body)
    [e] = (await agent.health(svc)).json()
    assert e["Service"]["Address"] == "10.0.1.5"
    assert e["Service"]["Weights"] == {"Passing": 10, "Warning": 1}


FILTER_CASES = [
    ("tag-in", '"gray" in Service.Tags', {"g"}),
    ("tag-not-in", '"gray" not in Service.Tags', {"s"}),
    ("meta-eq", 'Service.Meta.version == "2"', {"g"}),
    ("port-ne", "Service.Port != 8080", {"g"}),
    ("and", '"gray" in Service.Tags and Service.Port == 8081', {"g"}),
    ("or", 'Service.ID == "{svc}-s" or Service.ID == "{svc}-g"', {"s", "g"}),
    ("not-paren", 'not ("gray" in Service.Tags)', {"s"}),
    ("empty", "Service.Meta is empty", {"s"}),
]


@pytest.mark.parametrize(
    ("expr", "want"), [c[1:] for c in FILTER_CASES], ids=[c[0] for c in FILTER_CASES]
)
async def test_filter_subset(agent: Agent, expr: str, want: set[str]) -> None:
    svc = agent.name("web")
    await agent.register(ttl_service(svc, f"{svc}-s", Tags=["stable"]))
    await agent.register(
        ttl_service(svc, f"{svc}-g", Tags=["gray"], Port=8081, Meta={"version": "2"})
    )
    r = await agent.health(svc, {"filter": expr.format(svc=svc)})
    assert r.status == 200, r.text
    assert {e["Service"]["ID"].rsplit("-", 1)[1] for e in r.json()} == want


@pytest.mark.parametrize(
    "expr", ["Service.Port ==", "Nope.X == 1", "(Service.Port == 1", "Service.Port ~ 1"], ids=repr
)
def test_filter_parse_errors_raise(expr: str) -> None:
    with pytest.raises(ValueError):
        compile_filter(expr)


# =========================================================================== §5 registration


async def test_new_checks_start_critical_unless_status_given(agent: Agent) -> None:
    svc = agent.name("web")
    await agent.register({"Name": svc, "ID": f"{svc}-1", "Check": {"TTL": "60s"}})
    await agent.register(
        {"Name": svc, "ID": f"{svc}-2", "Check": {"TTL": "60s", "Status": "passing"}}
    )
    status = {
        e["Service"]["ID"]: [c["Status"] for c in e["Checks"] if c["ServiceID"]]
        for e in (await agent.health(svc)).json()
    }
    assert status == {f"{svc}-1": ["critical"], f"{svc}-2": ["passing"]}


async def test_auto_generated_check_ids(agent: Agent) -> None:
    svc = agent.name("web")
    await agent.register({"Name": svc, "ID": f"{svc}-1", "Check": {"TTL": "60s"}})
    await agent.register(
        {"Name": svc, "ID": f"{svc}-2", "Checks": [{"TTL": "60s"}, {"TTL": "60s"}]}
    )
    ids = {
        c["CheckID"]
        for e in (await agent.health(svc)).json()
        for c in e["Checks"]
        if c["ServiceID"]
    }
    assert ids == {f"service:{svc}-1", f"service:{svc}-2:1", f"service:{svc}-2:2"}


async def test_registration_accepts_snake_case_and_defaults_id_to_name(agent: Agent) -> None:
    svc = agent.name("web")
    before = (await agent.health(svc)).index
    body = {
        "name": svc,
        "port": 81,
        "tags": ["a"],
        "enable_tag_override": True,
        "weights": {"passing": 3, "warning": 1},
    }
    assert (await agent.put("/v1/agent/service/register", body=body)).status == 200
    agent.registered.append(svc)
    [e] = (await agent.settle(svc, before)).json()
    assert e["Service"]["ID"] == svc and e["Service"]["EnableTagOverride"] is True
    assert e["Service"]["Weights"] == {"Passing": 3, "Warning": 1}


@pytest.mark.parametrize(
    ("data", "status"),
    [(b"{not json", 400), (b'{"Port": 80}', 400)],
    ids=["malformed", "no-name"],
)
async def test_registration_errors(agent: Agent, data: bytes, status: int) -> None:
    r = await agent.put("/v1/agent/service/register", data=data)
    assert r.status == status and r.headers["Content-Type"].startswith("text/plain")


async def test_deregistering_an_unknown_service_is_a_no_op(agent: Agent) -> None:
    r = await agent.put(f"/v1/agent/service/deregister/{agent.name('nope')}")
    assert r.status == 200


@pytest.mark.parametrize(
    ("verb", "body", "status"),
    [
        ("pass", None, "passing"),
        ("warn", None, "warning"),
        ("fail", None, "critical"),
        ("update", {"Status": "warning", "Output": "slow"}, "warning"),
    ],
    ids=["pass", "warn", "fail", "update"],
)
async def test_ttl_check_updates(agent: Agent, verb: str, body: Any, status: str) -> None:
    svc = agent.name("web")
    start = "critical" if status == "passing" else "passing"
    await agent.register(ttl_service(svc, svc, start))
    r = await agent.check(svc, verb, f"service:{svc}", params={"note": "n"}, body=body)
    assert r.status == 200, r.text
    [e] = (await agent.health(svc)).json()
    assert [c["Status"] for c in e["Checks"] if c["ServiceID"]] == [status]


async def test_ttl_expiry_turns_the_check_critical(agent: Agent) -> None:
    svc = agent.name("web")
    await agent.register(
        {
            "Name": svc,
            "ID": svc,
            "Check": {"TTL": "1s" if REAL_ADDR else "150ms", "Status": "passing"},
        }
    )
    r = await agent.health(svc)
    assert r.json()[0]["Checks"][-1]["Status"] == "passing"
    async with asyncio.timeout(20):
        while r.json()[0]["Checks"][-1]["Status"] == "passing":
            r = await agent.health(svc, {"index": str(r.index), "wait": "5s"})
    assert r.json()[0]["Checks"][-1]["Status"] == "critical"


# =========================================================================== §4 KV


async def test_kv_get_is_a_one_element_array_with_base64_value(agent: Agent) -> None:
    key = agent.name("cfg/weights")
    assert (await agent.put(f"/v1/kv/{key}", data=b'{"gray": 5}')).text == "true"
    r = await agent.get(f"/v1/kv/{key}")
    [e] = r.json()
    assert base64.b64decode(e["Value"]) == b'{"gray": 5}'
    assert e["Key"] == key and e["Flags"] == 0 and e["LockIndex"] == 0
    assert e["CreateIndex"] == e["ModifyIndex"] == r.index
    await agent.put(f"/v1/kv/{key}", data=b"")
    assert (await agent.get(f"/v1/kv/{key}")).json()[0]["Value"] is None


async def test_kv_absent_key_is_404_with_index_headers(agent: Agent) -> None:
    r = await agent.get(f"/v1/kv/{agent.name('absent')}")
    assert r.status == 404 and r.body == b""
    assert r.index >= 1 and "X-Consul-KnownLeader" in r.headers
    assert "X-Consul-LastContact" in r.headers


async def test_kv_missing_key_index_follows_any_write(agent: Agent) -> None:
    missing, other = agent.name("missing"), agent.name("other")
    first = await agent.get(f"/v1/kv/{missing}")
    call = asyncio.create_task(
        agent.get(f"/v1/kv/{missing}", {"index": str(first.index), "wait": "30s"})
    )
    await agent.put(f"/v1/kv/{other}", data=b"x")  # an unrelated write wakes the watcher
    r = await asyncio.wait_for(call, 10)
    assert r.status == 404 and r.index > first.index


async def test_kv_deleting_the_watched_key_gives_404_with_higher_index(agent: Agent) -> None:
    key = agent.name("k")
    await agent.put(f"/v1/kv/{key}", data=b"x")
    first = await agent.get(f"/v1/kv/{key}")
    call = asyncio.create_task(agent.get(f"/v1/kv/{key}", {"index": str(first.index)}))
    assert (await agent.call("DELETE", f"/v1/kv/{key}")).text == "true"
    r = await asyncio.wait_for(call, 10)
    assert r.status == 404 and r.index > first.index


async def test_kv_recurse_is_sorted_and_404_when_empty(agent: Agent) -> None:
    p = agent.name("tree/")
    for k in ("b", "a", "c/d"):
        await agent.put(f"/v1/kv/{p}{k}", data=k.encode())
    r = await agent.get(f"/v1/kv/{p}", {"recurse": "any"})
    assert [e["Key"] for e in r.json()] == [f"{p}a", f"{p}b", f"{p}c/d"]
    assert r.index == max(e["ModifyIndex"] for e in r.json())
    assert (await agent.get(f"/v1/kv/{agent.name('void/')}", {"recurse": ""})).status == 404


async def test_kv_recurse_index_includes_tombstones(agent: Agent) -> None:
    p = agent.name("tomb/")
    await agent.put(f"/v1/kv/{p}a", data=b"1")
    await agent.put(f"/v1/kv/{p}b", data=b"2")
    before = (await agent.get(f"/v1/kv/{p}", {"recurse": ""})).index
    await agent.call("DELETE", f"/v1/kv/{p}b")
    r = await agent.get(f"/v1/kv/{p}", {"recurse": ""})
    assert [e["Key"] for e in r.json()] == [f"{p}a"] and r.index > before


async def test_kv_keys_with_separator(agent: Agent) -> None:
    p = agent.name("keys/")
    for k in ("a", "b/c", "b/d", "e/f/g"):
        await agent.put(f"/v1/kv/{p}{k}", data=b"x")
    r = await agent.get(f"/v1/kv/{p}", {"keys": "", "separator": "/"})
    assert r.json() == [f"{p}a", f"{p}b/", f"{p}e/"]
    r = await agent.get(f"/v1/kv/{p}", {"keys": ""})
    assert r.json() == [f"{p}a", f"{p}b/c", f"{p}b/d", f"{p}e/f/g"]
    assert (await agent.get(f"/v1/kv/{agent.name('nokeys/')}", {"keys": ""})).status == 404


async def test_kv_keys_on_an_empty_root_is_an_empty_list(agent: Agent) -> None:
    agent.hooks()  # a real agent's root is rarely empty
    r = await agent.get("/v1/kv/", {"keys": ""})
    assert r.status == 200 and r.json() == []


async def test_kv_raw(agent: Agent) -> None:
    key = agent.name("raw")
    await agent.put(f"/v1/kv/{key}", data=b"\x00bytes")
    r = await agent.get(f"/v1/kv/{key}", {"raw": ""})
    assert r.body == b"\x00bytes"
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Content-Security-Policy"] == "sandbox"


async def test_kv_put_flags_and_no_index_header(agent: Agent) -> None:
    key = agent.name("flags")
    r = await agent.put(f"/v1/kv/{key}", {"flags": "42"}, data=b"x")
    assert r.status == 200 and r.json() is True and "X-Consul-Index" not in r.headers
    assert (await agent.get(f"/v1/kv/{key}")).json()[0]["Flags"] == 42


CAS_CASES = [
    ("create-if-absent", False, "0", True),
    ("create-but-exists", True, "0", False),
    ("matching-index", True, "{idx}", True),
    ("stale-index", True, "1", False),
    ("absent-nonzero", False, "5", False),
]


@pytest.mark.parametrize(
    ("exists", "cas", "applied"), [c[1:] for c in CAS_CASES], ids=[c[0] for c in CAS_CASES]
)
async def test_kv_put_cas(agent: Agent, exists: bool, cas: str, applied: bool) -> None:
    key = agent.name("cas")
    idx = 0
    if exists:
        await agent.put(f"/v1/kv/{key}", data=b"old")
        idx = (await agent.get(f"/v1/kv/{key}")).json()[0]["ModifyIndex"]
    r = await agent.put(f"/v1/kv/{key}", {"cas": cas.format(idx=idx)}, data=b"new")
    assert r.status == 200 and r.json() is applied
    got = await agent.get(f"/v1/kv/{key}", {"raw": ""})
    assert got.body == (b"new" if applied else (b"old" if exists else b""))


DELETE_CAS_CASES = [
    ("matching", "{idx}", True),
    ("stale", "1", False),
    ("zero", "0", False),
]


@pytest.mark.parametrize(
    ("cas", "applied"),
    [c[1:] for c in DELETE_CAS_CASES],
    ids=[c[0] for c in DELETE_CAS_CASES],
)
async def test_kv_delete_cas(agent: Agent, cas: str, applied: bool) -> None:
    key = agent.name("dcas")
    await agent.put(f"/v1/kv/{key}", data=b"v")
    idx = (await agent.get(f"/v1/kv/{key}")).json()[0]["ModifyIndex"]
    r = await agent.call("DELETE", f"/v1/kv/{key}", {"cas": cas.format(idx=idx)})
    assert r.status == 200 and r.json() is applied
    assert (await agent.get(f"/v1/kv/{key}")).status == (404 if applied else 200)


async def test_kv_value_size_limit(agent: Agent) -> None:
    key = agent.name("big")
    assert (await agent.put(f"/v1/kv/{key}", data=b"x" * (512 * 1024))).status == 200
    r = await agent.put(f"/v1/kv/{key}", data=b"x" * (512 * 1024 + 1))
    assert r.status == 413 and r.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("PUT", {"cas": "0", "acquire": "s"}),
        ("PUT", {"cas": "0", "release": "s"}),
        ("PUT", {"acquire": "s", "release": "s"}),
        ("DELETE", {"recurse": "", "cas": "1"}),
    ],
    ids=["cas+acquire", "cas+release", "acquire+release", "delete-recurse+cas"],
)
async def test_kv_conflicting_flags(agent: Agent, method: str, params: dict[str, str]) -> None:
    r = await agent.call(method, f"/v1/kv/{agent.name('k')}", params, data=b"v")
    assert r.status == 400


@pytest.mark.parametrize(
    ("method", "params"),
    [("PUT", {"flags": "x"}), ("PUT", {"cas": "x"}), ("PUT", {"flags": "-1"}),
     ("DELETE", {"cas": "abc"})],
    ids=["flags", "cas", "negative-flags", "delete-cas"],
)  # fmt: skip
async def test_kv_non_numeric_flags_or_cas_is_500(
    agent: Agent, method: str, params: dict[str, str]
) -> None:
    key = agent.name("k")
    await agent.put(f"/v1/kv/{key}", data=b"v")
    r = await agent.call(method, f"/v1/kv/{key}", params, data=b"v")
    assert r.status == 500


async def test_kv_empty_key_requires_recurse_or_keys(agent: Agent) -> None:
    assert (await agent.get("/v1/kv/")).status == 400
    assert (await agent.put("/v1/kv/", data=b"x")).status == 400
    assert (await agent.call("DELETE", "/v1/kv/")).status == 400


# =========================================================================== §6 status/leader


async def test_status_leader_is_a_json_string(agent: Agent) -> None:
    r = await agent.get("/v1/status/leader")
    assert r.status == 200 and isinstance(r.json(), str) and ":" in r.json()


async def test_no_leader_gives_empty_string_and_failing_reads(agent: Agent) -> None:
    d = agent.hooks()
    d.set_leader(None)
    assert (await agent.get("/v1/status/leader")).json() == ""
    assert (await agent.health("web")).status == 500
    r = await agent.health("web", {"stale": ""})
    assert r.status == 200 and r.headers["X-Consul-KnownLeader"] == "false"


# =========================================================================== §7 ACLs and outages


@pytest.mark.parametrize(
    ("query", "header", "bearer", "status"),
    [
        ("bogus", "mgmt", None, 403),  # ?token= wins over the header
        (None, "mgmt", "bogus", 200),  # the header wins over Authorization
        (None, None, "mgmt", 200),
        (None, None, "bogus", 403),
        (None, "bogus", None, 403),
    ],
    ids=["query-first", "header-before-bearer", "bearer", "bad-bearer", "bad-header"],
)
async def test_token_precedence(
    acl_agent: Agent, query: str | None, header: str | None, bearer: str | None, status: int
) -> None:
    h = {}
    if header:
        h["X-Consul-Token"] = header
    if bearer:
        h["Authorization"] = f"bEaReR {bearer} trailing"
    acl_agent.token = None
    r = await acl_agent.health("web", {"token": query} if query else {}, headers=h)
    assert r.status == status
    if status == 403:
        assert r.text == "ACL not found"


async def test_token_without_read_gets_empty_200_flagged_as_filtered(acl_agent: Agent) -> None:
    await acl_agent.register(ttl_service("web", "web-1"))
    await acl_agent.register(ttl_service("api", "api-1"))
    for token, svc, n, flagged in (
        ("no-read", "web", 0, True),
        ("web-only", "web", 1, False),
        ("web-only", "api", 0, True),
        ("reader", "api", 1, False),
        (None, "web", 0, False),  # anonymous (default deny): filtered but never flagged
    ):
        acl_agent.token = token
        r = await acl_agent.health(svc)
        assert r.status == 200 and len(r.json()) == n, (token, svc)
        assert (r.headers.get("X-Consul-Results-Filtered-By-ACLs") == "true") is flagged
    assert acl_agent.double is not None
    assert (await acl_agent.get("/v1/status/leader")).headers[
        "X-Consul-Default-ACL-Policy"
    ] == "deny"


async def test_kv_without_permission_is_403(acl_agent: Agent) -> None:
    assert (await acl_agent.put("/v1/kv/app/x", data=b"1")).status == 200
    assert (await acl_agent.put("/v1/kv/other/y", data=b"2")).status == 200
    acl_agent.token = "kv-app"
    assert (await acl_agent.get("/v1/kv/app/x")).status == 200
    assert (await acl_agent.get("/v1/kv/other/y")).status == 403
    assert (await acl_agent.put("/v1/kv/other/y", data=b"3")).status == 403
    r = await acl_agent.get("/v1/kv/", {"recurse": ""})
    assert [e["Key"] for e in r.json()] == ["app/x"]
    assert r.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    acl_agent.token = "bogus"
    assert (await acl_agent.get("/v1/kv/app/x")).status == 403


async def test_kill_refuses_connections_and_revive_keeps_state(agent: Agent) -> None:
    d = agent.hooks()
    svc = agent.name("web")
    await agent.register(ttl_service(svc, svc))
    idx = (await agent.health(svc)).index
    start = len(d.requests)
    parked = asyncio.create_task(agent.health(svc, {"index": str(idx), "wait": "60s"}))
    await d.wait_for_request(lambda r: r.timeout is not None, start=start)
    await d.kill()
    with pytest.raises(aiohttp.ClientConnectionError):
        await asyncio.wait_for(parked, 5)
    with pytest.raises(aiohttp.ClientConnectorError):
        await agent.health(svc)
    await d.revive()
    r = await agent.health(svc)
    assert r.status == 200 and r.index == idx and len(r.json()) == 1
