"""ConsulDiscovery against the Consul double on 127.0.0.1, plus its pure parts as tables.

Synchronisation is by events only: the double records each request (and whether it
is parked in a blocking query), discovery reports updates and errors; every wait
has a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway import config as C
from gateway.config import ConsulConfig, ConsulSelector, Endpoint
from gateway.discovery import ConsulDiscovery, Pacing, consul_selectors, merge_endpoints
from gateway.discovery.consul import (
    EndpointSets,
    WatchKey,
    endpoint_of,
    go_duration,
    next_index,
    parse_health,
)
from gateway.discovery.metrics import DiscoveryMetrics
from gateway.discovery.pacing import Backoff, TokenBucket
from gateway.errors import ConfigError
from tests.conftest import gateway_config
from tests.consul_double import ALL, AclToken, ConsulDouble, RecordedRequest, management_token

FAST = Pacing(rate=1000.0, burst=2, backoff_base=0.01, backoff_cap=0.05, slack=2.0)
GRAY = ("web", "gray")
STABLE = ("web", "stable")


# =========================================================================== helpers


class Updates:
    """The on_update callback: records every mapping and lets a test await one."""

    def __init__(self) -> None:
        self.items: list[EndpointSets] = []
        self._changed = asyncio.Event()

    def __call__(self, mapping: EndpointSets) -> None:
        self.items.append(mapping)
        self._changed.set()

    async def wait_for(
        self, pred: Callable[[EndpointSets], bool], *, within: float = 10.0
    ) -> EndpointSets:
        async with asyncio.timeout(within):
            while not (self.items and pred(self.items[-1])):
                self._changed.clear()
                await self._changed.wait()
        return self.items[-1]


class Observer:
    """A DiscoveryObserver that tests can await."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.oks = 0
        self._changed = asyncio.Event()

    def watch_ok(self, releases: tuple[tuple[str, str], ...]) -> None:
        self.oks += 1
        self._changed.set()

    def watch_error(self, releases: tuple[tuple[str, str], ...], kind: str) -> None:
        self.errors.append(kind)
        self._changed.set()

    async def until(self, pred: Callable[[Observer], bool], *, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while not pred(self):
                self._changed.clear()
                await self._changed.wait()


def ttl(sid: str, tags: list[str], status: str = "passing", **extra: Any) -> dict[str, Any]:
    return {
        "Name": "web",
        "ID": sid,
        "Tags": tags,
        "Address": "127.0.0.1",
        "Port": 9000 + int(sid.rsplit("-", 1)[1]),
        "Check": {"CheckID": f"service:{sid}", "TTL": "60s", "Status": status},
        **extra,
    }


def ep(port: int, weight: int = 1, host: str = "127.0.0.1") -> Endpoint:
    return Endpoint(host, port, weight)


def parked(service: str = "web") -> Callable[[RecordedRequest], bool]:
    return lambda r: r.timeout is not None and r.path == f"/v1/health/service/{service}"


@pytest.fixture
async def consul() -> AsyncIterator[ConsulDouble]:
    async with ConsulDouble(jitter=False) as d:
        yield d


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


Factory = Callable[..., ConsulDiscovery]


@pytest.fixture
async def discovery() -> AsyncIterator[Factory]:
    """Factory: discovery(double_or_address, selectors, updates, **kw); stopped at teardown."""
    made: list[ConsulDiscovery] = []

    def make(
        target: ConsulDouble | str,
        selectors: dict[tuple[str, str], ConsulSelector],
        updates: Updates,
        *,
        token: str | None = None,
        poll_wait: float = 60.0,
        **kw: Any,
    ) -> ConsulDiscovery:
        address = target if isinstance(target, str) else target.address
        cfg = ConsulConfig(address=address, token=token, poll_wait=poll_wait)
        kw.setdefault("pacing", FAST)
        kw.setdefault("rng", random.Random(7))
        d = ConsulDiscovery(cfg, selectors, updates, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        await d.stop()


async def agent_put(http: aiohttp.ClientSession, consul: ConsulDouble, path: str) -> None:
    async with http.put(f"{consul.address}{path}") as r:
        assert r.status == 200, await r.text()


# =========================================================================== pure parts


@pytest.mark.parametrize(
    ("steps", "want"),
    [
        ([0.0, 0.0], [0.0, 0.0]),  # burst of 2
        ([0.0, 0.0, 0.0], [0.0, 0.0, 15.0]),  # then one per 1/rate
        ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 15.0, 30.0]),  # reservations queue up
        ([0.0, 0.0, 7.5], [0.0, 0.0, 7.5]),
        ([0.0, 0.0, 100.0, 100.0, 100.0], [0.0, 0.0, 0.0, 0.0, 15.0]),  # refills to burst only
    ],
    ids=["burst", "steady", "queue", "partial-refill", "refill-capped"],
)
def test_token_bucket(steps: list[float], want: list[float]) -> None:
    b = TokenBucket(rate=1 / 15, burst=2, now=0.0)
    assert [pytest.approx(b.delay(t)) for t in steps] == want


def test_backoff_grows_caps_jitters_and_resets() -> None:
    b = Backoff(0.5, 4.0, random.Random(1))
    got = [b.next() for _ in range(6)]
    for d, hi in zip(got, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0], strict=True):
        assert hi / 2 <= d <= hi
    b.reset()
    assert b.next() <= 0.5


@pytest.mark.parametrize(
    ("prev", "got", "want"),
    [(0, 0, 1), (0, 7, 7), (7, 7, 7), (7, 9, 9), (9, 3, 0), (5, 0, 0)],
    ids=["zero-sanity", "first", "same", "rising", "backwards-reset", "zero-after"],
)
def test_next_index(prev: int, got: int, want: int) -> None:
    assert next_index(prev, got) == want


def _entry(**svc: Any) -> dict[str, Any]:
    checks = svc.pop("checks", ["passing", "passing"])
    node = svc.pop("node", {"Address": "10.0.0.9"})
    return {
        "Node": node,
        "Service": {"Address": "10.0.0.1", "Port": 80, **svc},
        "Checks": [{"Status": s} for s in checks],
    }


@pytest.mark.parametrize(
    ("entry", "want"),
    [
        (_entry(), Endpoint("10.0.0.1", 80, 1)),
        (_entry(Address=""), Endpoint("10.0.0.9", 80, 1)),
        (_entry(Weights={"Passing": 10, "Warning": 1}), Endpoint("10.0.0.1", 80, 10)),
        (_entry(Weights=None), Endpoint("10.0.0.1", 80, 1)),
        (_entry(Weights={"Passing": 0}), Endpoint("10.0.0.1", 80, 1)),
        (_entry(Address="::1"), Endpoint("::1", 80, 1)),
        (_entry(checks=[]), Endpoint("10.0.0.1", 80, 1)),
        (_entry(checks=["passing", "warning"]), None),
        (_entry(checks=["critical"]), None),
        (_entry(Port=0), None),
        (_entry(Port="80"), None),
        (_entry(Address="", node=None), None),
        ({"Service": None}, None),
        ("junk", None),
    ],
    ids=["plain", "node-address", "weights", "weights-null", "weight-0", "ipv6", "no-checks",
         "warning", "critical", "port-0", "port-str", "no-address", "no-service", "junk"],
)  # fmt: skip
def test_endpoint_of(entry: Any, want: Endpoint | None) -> None:
    assert endpoint_of(entry) == want


def test_parse_health_sorts_dedupes_and_counts_skips() -> None:
    body = (
        b'[{"Service":{"Address":"b","Port":2},"Checks":[]},'
        b'{"Service":{"Address":"a","Port":1,"Weights":{"Passing":3}},"Checks":[]},'
        b'{"Service":{"Address":"a","Port":1},"Checks":[]},'
        b'{"Service":{"Address":"c","Port":3},"Checks":[{"Status":"warning"}]}]'
    )
    eps, skipped = parse_health(body)
    assert eps == (Endpoint("a", 1, 3), Endpoint("b", 2, 1)) and skipped == 1
    for bad in (b"{}", b"not json", b'"x"'):
        with pytest.raises(ValueError):
            parse_health(bad)


def test_watch_key_normalises_tags_and_datacenter() -> None:
    a = WatchKey.of(ConsulSelector("web", ("Gray", "v2", "gray"), ""))
    b = WatchKey.of(ConsulSelector("web", ("V2", "GRAY"), None))
    assert a == b == WatchKey("web", ("gray", "v2"), None)


@pytest.mark.parametrize(("s", "want"), [(30.0, "30000ms"), (0.25, "250ms"), (0.0001, "1ms")])
def test_go_duration_always_has_a_unit(s: float, want: str) -> None:
    assert go_duration(s) == want


def test_consul_selectors_and_merge() -> None:
    cfg = C.build(
        {
            "services": {
                "web": {
                    "releases": {
                        "stable": {"weight": 9, "upstreams": ["http://127.0.0.1:1"]},
                        "gray": {"weight": 1, "consul": {"service": "web", "tags": ["gray"]}},
                    }
                }
            }
        },
        env={},
    )
    assert consul_selectors(cfg) == {GRAY: ConsulSelector("web", ("gray",), None)}
    static = {STABLE: (ep(1),), GRAY: (ep(2),)}
    merged = merge_endpoints(static, {GRAY: (ep(2, 5), ep(3))})
    assert merged == {STABLE: (ep(1),), GRAY: (ep(2), ep(3))}


def test_discovery_metrics_count_errors_and_track_up() -> None:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    m = DiscoveryMetrics(reg)
    m.watch_ok((GRAY,))
    labels = {"service": "web", "release": "gray"}
    assert reg.get_sample_value("gateway_discovery_up", labels) == 1
    m.watch_error((GRAY,), "acl_filtered")  # an answer did arrive: still up
    assert reg.get_sample_value("gateway_discovery_up", labels) == 1
    m.watch_error((GRAY,), "connect")
    assert reg.get_sample_value("gateway_discovery_up", labels) == 0
    errs = {**labels, "kind": "connect"}
    assert reg.get_sample_value("gateway_discovery_errors_total", errs) == 1


# =========================================================================== against the double


async def test_initial_fetch_publishes_all_selectors_once(
    consul: ConsulDouble, discovery: Factory
) -> None:
    consul.register(ttl("web-1", ["v1", "stable"]))
    consul.register(ttl("web-2", ["v2", "gray"]))
    updates = Updates()
    d = discovery(
        consul,
        {STABLE: ConsulSelector("web", ("stable",)), GRAY: ConsulSelector("web", ("v2", "gray"))},
        updates,
    )
    await d.start()
    assert updates.items == [{STABLE: (ep(9001),), GRAY: (ep(9002),)}]


async def test_client_obeys_the_blocking_query_rules(
    consul: ConsulDouble, discovery: Factory
) -> None:
    consul.register(ttl("web-1", ["gray", "v2"]))
    d = discovery(
        consul,
        {GRAY: ConsulSelector("web", ("v2", "gray"), "dc1")},
        Updates(),
        token="s3cret",
        poll_wait=7.0,
    )
    await d.start()
    await consul.wait_for_request(parked())
    first, second = consul.requests[0], consul.requests[1]
    for r in (first, second):
        assert r.query.getall("tag") == ["gray", "v2"]
        assert r.query["passing"] == "1" and r.query["dc"] == "dc1"
        assert r.headers["X-Consul-Token"] == "s3cret"
    assert "index" not in first.query  # the first read does not block
    assert int(second.query["index"]) >= 1 and second.query["wait"] == "7000ms"


async def test_new_instance_arrives_by_blocking_wake_up(
    consul: ConsulDouble, discovery: Factory
) -> None:
    consul.register(ttl("web-1", ["gray"]))
    updates = Updates()
    d = discovery(consul, {GRAY: ConsulSelector("web", ("gray",))}, updates, poll_wait=300.0)
    await d.start()
    await consul.wait_for_request(parked())  # parked for 300 s: only a wake-up can answer
    consul.register(ttl("web-2", ["gray"]))
    got = await updates.wait_for(lambda m: len(m.get(GRAY, ())) == 2)
    assert got == {GRAY: (ep(9001), ep(9002))}


@pytest.mark.parametrize("verb", ["fail", "warn"])
async def test_a_failing_or_warning_ttl_check_removes_the_instance(
    consul: ConsulDouble, discovery: Factory, http: aiohttp.ClientSession, verb: str
) -> None:
    consul.register(ttl("web-1", ["gray"]))
    consul.register(ttl("web-2", ["gray"]))
    updates = Updates()
    d = discovery(consul, {GRAY: ConsulSelector("web", ("gray",))}, updates)
    await d.start()
    await agent_put(http, consul, f"/v1/agent/check/{verb}/service:web-1")
    assert await updates.wait_for(lambda m: len(m[GRAY]) == 1) == {GRAY: (ep(9002),)}
    await agent_put(http, consul, "/v1/agent/check/pass/service:web-1")
    await updates.wait_for(lambda m: len(m[GRAY]) == 2)


async def test_a_failing_node_check_removes_every_instance_on_it(
    consul: ConsulDouble, discovery: Factory
) -> None:
    consul.register(ttl("web-1", ["gray"]))
    updates = Updates()
    d = discovery(consul, {GRAY: ConsulSelector("web", ("gray",))}, updates)
    await d.start()
    assert updates.items == [{GRAY: (ep(9001),)}]
    consul.set_node_check("critical")
    await updates.wait_for(lambda m: m[GRAY] == ())  # a real, healthy answer: empty is published
    assert updates.items[-1] == {GRAY: ()} and d.snapshot() == {GRAY: ()}


async def test_multi_tag_selection_is_and(consul: ConsulDouble, discovery: Factory) -> None:
    consul.register(ttl("web-1", ["v2", "gray"]))
    consul.register(ttl("web-2", ["v2"]))
    consul.register(ttl("web-3", ["gray", "batch-1", "v2"]))
    updates = Updates()
    batch = ("web", "batch-1")
    d = discovery(
        consul,
        {
            GRAY: ConsulSelector("web", ("v2", "gray")),
            batch: ConsulSelector("web", ("v2", "gray", "batch-1")),
        },
        updates,
    )
    await d.start()
    assert updates.items[-1] == {GRAY: (ep(9001), ep(9003)), batch: (ep(9003),)}


async def test_tags_are_case_insensitive_and_share_one_watch(
    consul: ConsulDouble, discovery: Factory
) -> None:
    consul.register(ttl("web-1", ["gray", "v2"]))
    updates = Updates()
    other = ("web", "gray-too")
    d = discovery(
        consul,
        {GRAY: ConsulSelector("web", ("Gray", "V2")), other: ConsulSelector("web", ("v2", "GRAY"))},
        updates,
    )
    await d.start()
    assert updates.items[-1] == {GRAY: (ep(9001),), other: (ep(9001),)}
    await consul.wait_for_request(parked())
    assert sum(1 for r in consul.requests if r.path == "/v1/health/service/web") == 2


async def test_empty_service_address_falls_back_to_node_address(discovery: Factory) -> None:
    async with ConsulDouble(node_address="127.0.0.9", jitter=False) as consul:
        consul.register(ttl("web-1", ["gray"], Address=""))
        updates = Updates()
        d = discovery(consul, {GRAY: ConsulSelector("web", ("gray",))}, updates)
        await d.start()
        assert updates.items[-1] == {GRAY: (ep(9001, host="127.0.0.9"),)}
        await d.stop()


async def test_weights_passing_is_the_endpoint_weight(
    consul: ConsulDouble, discovery: Factory
) -> None:
    consul.register(ttl("web-1", ["gray"], Weights={"Passing": 10, "Warning": 1}))
    consul.register(ttl("web-2", ["gray"]))  # agent default {"Passing": 1, "Warning": 1}
    updates = Updates()
    d = discovery(consul, {GRAY: ConsulSelector("web", ("gray",))}, updates)
    await d.start()
    assert updates.items[-1] == {GRAY: (ep(9001, 10), ep(9002, 1))}


async def test_identical_sets_are_not_republished(
    consul: ConsulDouble, discovery: Factory, http: aiohttp.ClientSession
) -> None:
    consul.register(ttl("web-1", ["gray"]))
    consul.register(ttl("web-2", ["stable"]))
    updates = Updates()
    d = discovery(consul, {GRAY: ConsulSelector("web", ("gray",))}, updates)
    await d.start()
    await consul.wait_for_request(parked())
    n = len(consul.requests)
    await agent_put(http, consul, "/v1/agent/check/fail/service:web-2")  # wakes, same gray set
    await consul.wait_for_request(parked(), start=n)  # the answer was applied, then it re-parked
    assert len(updates.items) == 1


async def test_deregistering_everything_publishes_an_empty_set(
    consul: ConsulDouble, discovery: Factory
) -> None:
    consul.register(ttl("web-1", ["gray"]))
    updates = Updates()
    d = discovery(consul, {GRAY: ConsulSelector("web", ("gray",))}, updates)
    await d.start()
    assert updates.items == [{GRAY: (ep(9001),)}]
    consul.deregister("web-1")
    await updates.wait_for(lambda m: m == {GRAY: ()})
    assert updates.items[-1] == {GRAY: ()} and d.snapshot() == {GRAY: ()}


async def test_dead_consul_keeps_last_known_good_then_recovers(
    consul: ConsulDouble, discovery: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.discovery.consul")
    consul.register(ttl("web-1", ["gray"]))
    updates, seen = Updates(), Observer()
    d = discovery(consul, {GRAY: ConsulSelector("web", ("gray",))}, updates, metrics=seen)
    await d.start()
    await consul.wait_for_request(parked())
    await consul.kill()
    await seen.until(lambda o: len(o.errors) >= 3)
    assert set(seen.errors) == {"connect"}
    assert updates.items == [{GRAY: (ep(9001),)}]  # nothing empty was published
    assert d.snapshot() == {GRAY: (ep(9001),)}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keeping 1 last known endpoint" in warnings[0].getMessage()
    consul.register(ttl("web-2", ["gray"]))  # changed while the agent was away
    await consul.revive()
    await updates.wait_for(lambda m: m == {GRAY: (ep(9001), ep(9002))})
    assert any("recovered" in r.getMessage() for r in caplog.records)


async def test_server_errors_keep_last_known_good(
    consul: ConsulDouble, discovery: Factory, http: aiohttp.ClientSession
) -> None:
    consul.register(ttl("web-1", ["gray"]))
    updates, seen = Updates(), Observer()
    d = discovery(consul, {GRAY: ConsulSelector("web", ("gray",))}, updates, metrics=seen)
    await d.start()
    await consul.wait_for_request(parked())
    consul.set_leader(None)  # reads now fail with 500 "No cluster leader"
    consul.register(ttl("web-2", ["stable"]))  # wakes the parked call; its re-read fails
    await seen.until(lambda o: o.errors.count("http") >= 2)
    assert updates.items == [{GRAY: (ep(9001),)}]
    consul.set_leader("127.0.0.1:8300")
    await seen.until(lambda o: o.oks >= 3)
    await agent_put(http, consul, "/v1/agent/check/fail/service:web-1")
    await updates.wait_for(lambda m: m == {GRAY: ()})


async def test_bad_json_keeps_last_known_good(discovery: Factory) -> None:
    bodies = [b'[{"Service":{"Address":"127.0.0.1","Port":9001},"Checks":[]}]', b"<html>oops"]
    served = asyncio.Event()

    async def health(request: web.Request) -> web.Response:
        body = bodies[0] if not served.is_set() else bodies[1]
        served.set()
        return web.Response(body=body, headers={"X-Consul-Index": "5"})

    app = web.Application()
    app.router.add_get("/v1/health/service/web", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        updates, seen = Updates(), Observer()
        d = discovery(
            f"http://127.0.0.1:{port}",
            {GRAY: ConsulSelector("web", ("gray",))},
            updates,
            metrics=seen,
        )
        await d.start()
        await seen.until(lambda o: o.errors.count("protocol") >= 2)
        assert updates.items == [{GRAY: (ep(9001),)}]
        await d.stop()
    finally:
        await runner.cleanup()


async def test_index_resets_to_zero_when_it_goes_backwards(
    consul: ConsulDouble, discovery: Factory
) -> None:
    for i in range(1, 4):
        consul.register(ttl(f"web-{i}", ["gray"]))
    updates = Updates()
    d = discovery(consul, {GRAY: ConsulSelector("web", ("gray",))}, updates)
    await d.start()
    high = await consul.wait_for_request(parked())
    assert int(high.query["index"]) > 10
    n = len(consul.requests)
    consul.restore_snapshot_resetting_indexes()
    reread = await consul.wait_for_request(lambda r: True, start=n)
    assert "index" not in reread.query  # index 0: a plain read, never blocking with 0
    low = await consul.wait_for_request(parked(), start=n + 1)
    assert low.query["index"] == "1"
    # Blocking with the old, higher index would never see this registration (index 2).
    consul.register(ttl("web-4", ["gray"]))
    await updates.wait_for(lambda m: len(m[GRAY]) == 4)


async def test_acl_filtered_answer_warns_and_keeps_last_known_good(
    discovery: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = [management_token("mgmt"), AclToken("gw", service_read=ALL, node_read=ALL)]
    async with ConsulDouble(acl_tokens=tokens, default_policy="deny", jitter=False) as consul:
        consul.register(ttl("web-1", ["gray"]))
        updates, seen = Updates(), Observer()
        d = discovery(
            consul, {GRAY: ConsulSelector("web", ("gray",))}, updates, token="gw", metrics=seen
        )
        await d.start()
        await consul.wait_for_request(parked())
        consul.tokens["gw"] = AclToken("gw", service_read=("other",), node_read=ALL)  # mis-scoped
        # The parked call resolved its token before the change, like the server's RPC does,
        # so it still answers in full; the next call is the first one filtered.
        n = len(consul.requests)
        consul.register(ttl("web-2", ["gray"]))
        await updates.wait_for(lambda m: len(m[GRAY]) == 2)
        await consul.wait_for_request(parked(), start=n)
        consul.register(ttl("web-3", ["gray"]))
        await seen.until(lambda o: "acl_filtered" in o.errors)
        assert updates.items[-1] == {GRAY: (ep(9001), ep(9002))} == d.snapshot()
        [warn] = [r for r in caplog.records if "ACL" in r.getMessage()]
        assert warn.levelno == logging.WARNING and "service:read" in warn.getMessage()
        await d.stop()


async def test_mis_scoped_token_from_the_start_publishes_nothing(discovery: Factory) -> None:
    tokens = [AclToken("narrow", service_read=("other",), node_read=ALL)]
    async with ConsulDouble(acl_tokens=tokens, default_policy="deny", jitter=False) as consul:
        consul.register(ttl("web-1", ["gray"]))
        updates, seen = Updates(), Observer()
        d = discovery(
            consul, {GRAY: ConsulSelector("web", ("gray",))}, updates, token="narrow", metrics=seen
        )
        await d.start()
        assert seen.errors == ["acl_filtered"] and updates.items == [] and d.snapshot() == {}
        await d.stop()


async def test_unknown_token_is_an_acl_error(discovery: Factory) -> None:
    async with ConsulDouble(acl_tokens=[], default_policy="deny", jitter=False) as consul:
        updates, seen = Updates(), Observer()
        d = discovery(
            consul, {GRAY: ConsulSelector("web", ("gray",))}, updates, token="nope", metrics=seen
        )
        await d.start()
        await seen.until(lambda o: len(o.errors) >= 2)
        assert set(seen.errors) == {"acl"} and updates.items == []
        await d.stop()


async def test_start_does_not_hang_when_consul_is_down(discovery: Factory) -> None:
    consul = ConsulDouble()
    await consul.start()
    address = consul.address
    await consul.close()  # nothing listens there now
    updates, seen = Updates(), Observer()
    d = discovery(address, {GRAY: ConsulSelector("web", ("gray",))}, updates, metrics=seen)
    async with asyncio.timeout(5):
        await d.start()
    assert seen.errors[:1] == ["connect"] and updates.items == []


async def test_churn_is_rate_limited_by_the_token_bucket(
    consul: ConsulDouble, discovery: Factory
) -> None:
    consul.register(ttl("web-1", ["gray"]))
    delays: list[float] = []
    asked = asyncio.Event()

    async def sleep(s: float) -> None:
        delays.append(s)
        asked.set()
        await asyncio.Event().wait()  # park: this test only needs the requested delay

    pace = Pacing()  # the shipped pace
    d = discovery(
        consul,
        {GRAY: ConsulSelector("web", ("gray",))},
        Updates(),
        pacing=pace,
        clock=lambda: 0.0,  # frozen: no refill
        sleep=sleep,
    )
    await d.start()
    for k in range(int(pace.burst) - 1):
        await consul.wait_for_request(parked(), start=k + 1)  # request k + 2 is parked
        consul.register(ttl(f"web-{k + 2}", ["gray"]))  # churn: it returns at once
    async with asyncio.timeout(5):
        await asked.wait()
    assert delays == [pytest.approx(1 / pace.rate)]
    assert len(consul.requests) == pace.burst  # the burst, then the bucket paces


async def test_set_selectors_follows_a_reload(consul: ConsulDouble, discovery: Factory) -> None:
    consul.register(ttl("web-1", ["gray"]))
    consul.register(ttl("web-2", ["stable"]))
    updates = Updates()
    d = discovery(consul, {GRAY: ConsulSelector("web", ("gray",))}, updates)
    await d.start()
    await d.set_selectors({STABLE: ConsulSelector("web", ("stable",))})
    assert updates.items[-1] == {STABLE: (ep(9002),)}


async def test_stop_interrupts_a_parked_watch(consul: ConsulDouble, discovery: Factory) -> None:
    consul.register(ttl("web-1", ["gray"]))
    d = discovery(consul, {GRAY: ConsulSelector("web", ("gray",))}, Updates(), poll_wait=300.0)
    await d.start()
    await consul.wait_for_request(parked())
    async with asyncio.timeout(5):  # a 300 s blocking call must not hold stop up
        await d.stop()
    assert d.snapshot() == {GRAY: (ep(9001),)}  # the last answer, kept
    assert all(w.task is None for w in d._watches.values())


def test_the_shipped_pace_is_the_config_default() -> None:
    c = ConsulConfig()
    assert (Pacing().rate, Pacing().burst) == (c.watch_rate, c.watch_burst)


@pytest.mark.parametrize(
    ("consul", "field"),
    [
        ({"watch_rate": 0}, "consul.watch_rate"),
        ({"watch_rate": "fast"}, "consul.watch_rate"),
        ({"watch_burst": 0.5}, "consul.watch_burst"),
        ({"watch_burst": 1000}, "consul.watch_burst"),
    ],
    ids=["rate-zero", "rate-not-a-number", "burst-under-one", "burst-too-big"],
)
def test_bad_watch_pacing_names_the_field(consul: dict[str, Any], field: str) -> None:
    doc = {
        "consul": consul,
        "services": {"s": {"releases": {"stable": {"weight": 1, "upstreams": ["http://a:1"]}}}},
    }
    with pytest.raises(ConfigError) as e:
        C.build(doc, env={})
    assert [p for p, _ in e.value.errors] == [field]


async def test_the_gateway_paces_its_watches_as_configured(
    consul: ConsulDouble, gateway: Any
) -> None:
    consul.register(ttl("web-1", ["gray"]))
    doc = gateway_config(
        {
            "s": {
                "releases": {
                    "stable": {"weight": 1, "consul": {"service": "web", "tags": ["gray"]}}
                }
            }
        },
        consul={"address": consul.address, "watch_rate": 0.5, "watch_burst": 3},
    )
    gw = await gateway(doc)
    assert gw.discovery is not None
    assert (gw.discovery.pacing.rate, gw.discovery.pacing.burst) == (0.5, 3.0)
    assert [e.port for e in gw.holder.current.services["s"].releases["stable"].endpoints] == [9001]
