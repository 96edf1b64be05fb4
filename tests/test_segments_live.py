"""Segments changed live: `PUT/GET/DELETE /admin/services/{s}/segments` and preview by segment.

Issue 13 item 2: persisted in the state store (file and Consul), converged to every
replica like weights, audited with the actor, user files re-read on PUT and on reload,
and every wrong field a 400 naming it with the state version unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import config as C
from gateway import preview
from gateway.app import Gateway
from gateway.routing import WeightTable
from tests.conftest import Upstream, gateway_config
from tests.consul_double import ConsulDouble

GatewayFactory = Callable[..., Awaitable[Gateway]]
UpstreamFactory = Callable[..., Awaitable[Upstream]]
TOKEN = "s3gments-t0ken"

STAFF = {"name": "staff", "match": {"header": {"X-Employee": "true"}}, "release": "gray"}
NORTH = {
    "name": "north",
    "match": {"header": {"X-Region": {"prefix": "cn-north"}}},
    "weights": {"stable": 50, "gray": 50},
}


def _doc(st: Upstream, gr: Upstream, segments: list[Any] | None = None, **top: Any) -> Any:
    svc: dict[str, Any] = {
        "releases": {
            "stable": {"weight": 100, "upstreams": [st.url]},
            "gray": {"weight": 0, "upstreams": [gr.url]},
        }
    }
    if segments is not None:
        svc["segments"] = segments
    return gateway_config({"svc": svc}, **top)


async def _call(
    s: aiohttp.ClientSession,
    gw: Gateway,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Mapping[str, str]]:
    url = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc{path}"
    async with s.request(method, url, json=body, headers=headers or {}) as r:
        return r.status, await r.json(), r.headers


async def _served(s: aiohttp.ClientSession, gw: Gateway, headers: dict[str, str]) -> str:
    async with s.get(f"http://127.0.0.1:{gw.port}/", headers=headers) as r:
        assert r.status == 200
        body = await r.json()
        assert r.headers["X-Release-Stage"] == body["release"]
        return str(body["release"])


async def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20.0  # generous: CI and a shared box are slow
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


@pytest.fixture
async def consul() -> AsyncIterator[ConsulDouble]:
    async with ConsulDouble(jitter=False) as d:
        yield d


async def test_put_segments_routes_persists_audits_and_survives_a_restart(
    tmp_path: Path, upstreams: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"deployer {TOKEN} write\n")
    doc = _doc(
        st,
        gr,
        [NORTH],
        admin={"listen": "127.0.0.1:0", "token_env": None, "tokens_file": str(tokens)},
        state={"store": "file", "path": str(tmp_path / "state.json")},
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    gw = Gateway(C.build(doc, env={}))
    await gw.start()
    try:
        status, got, hdrs = await _call(client, gw, "GET", "/segments", headers=auth)
        assert status == 200 and got["source"] == "config" and got["segments"] == [NORTH]
        assert hdrs["ETag"] == '"0"'
        assert await _served(client, gw, {"X-Employee": "true"}) == "stable"

        status, got, hdrs = await _call(
            client, gw, "PUT", "/segments", [STAFF], {**auth, "If-Match": '"0"'}
        )
        assert status == 200, got
        assert (got["source"], got["segments"], got["state_version"]) == ("live", [STAFF], 1)
        assert hdrs["ETag"] == '"1"'
        assert await _served(client, gw, {"X-Employee": "true"}) == "gray"
        # the config's `north` is no longer in force: the live list replaced it whole
        assert await _served(client, gw, {"X-Region": "cn-north-1", "X-User-ID": "u1"}) == (
            "stable"
        )
        # a stale If-Match changes nothing
        status, got, _ = await _call(
            client, gw, "PUT", "/segments", [], {**auth, "If-Match": '"0"'}
        )
        assert (status, got["field"]) == (409, "If-Match")

        async with client.get(f"http://127.0.0.1:{gw.admin_port}/admin/audit", headers=auth) as r:
            records = (await r.json())["records"]
        rec = [x for x in records if x["action"] == "segments.set"]
        assert len(rec) == 1
        assert rec[0]["actor"] == "deployer" and rec[0]["service"] == "svc"
        assert rec[0]["after"]["segments"] == [STAFF]
        assert "segments" not in (rec[0]["before"] or {})
    finally:
        await gw.stop(1.0)

    # A restart reads the stored list back.
    gw = Gateway(C.build(doc, env={}))
    await gw.start()
    try:
        status, got, _ = await _call(client, gw, "GET", "/segments", headers=auth)
        assert (got["source"], got["segments"], got["state_version"]) == ("live", [STAFF], 1)
        assert await _served(client, gw, {"X-Employee": "true"}) == "gray"
        # DELETE: back to the config's list, audited
        status, got, _ = await _call(client, gw, "DELETE", "/segments", headers=auth)
        assert status == 200, got
        assert (got["source"], got["segments"], got["state_version"]) == ("config", [NORTH], 2)
        assert await _served(client, gw, {"X-Employee": "true"}) == "stable"
        async with client.get(f"http://127.0.0.1:{gw.admin_port}/admin/audit", headers=auth) as r:
            actions = [x["action"] for x in (await r.json())["records"]]
        assert actions.count("segments.clear") == 1
    finally:
        await gw.stop(1.0)


async def test_two_replicas_on_consul_converge(
    consul: ConsulDouble,
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    doc = _doc(
        st,
        gr,
        state={"store": "consul"},
        consul={"address": consul.address, "kv_prefix": "gw/segments"},
    )
    g1, g2 = await gateway(doc), await gateway(doc)
    assert await _served(client, g2, {"X-Employee": "true"}) == "stable"
    status, got, _ = await _call(client, g1, "PUT", "/segments", [STAFF])
    assert status == 200, got

    def converged() -> bool:
        segs = g2.holder.current.services["svc"].cfg.segments
        return segs is not None and segs.doc == [STAFF]

    await _until(converged, "replica 2 did not apply the live segments")
    assert g2.holder.current.version == g1.holder.current.version == 1
    assert await _served(client, g2, {"X-Employee": "true"}) == "gray"
    status, got, _ = await _call(client, g2, "GET", "/segments")
    assert (got["source"], got["segments"]) == ("live", [STAFF])
    # and back, from the other replica
    status, got, _ = await _call(client, g2, "DELETE", "/segments")
    assert status == 200
    await _until(
        lambda: g1.holder.current.services["svc"].cfg.segments is None,
        "replica 1 did not drop the live segments",
    )
    assert await _served(client, g1, {"X-Employee": "true"}) == "stable"


async def test_user_file_is_reread_on_put_and_on_reload(
    tmp_path: Path, upstreams: UpstreamFactory, client: aiohttp.ClientSession
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    users = tmp_path / "beta.txt"
    users.write_text("alice\n")
    cfg_file = tmp_path / "gateway.yaml"
    cfg_file.write_text(yaml.safe_dump(_doc(st, gr)))
    gw = Gateway(C.load(str(cfg_file)))
    await gw.start()
    try:
        beta = [{"name": "beta", "match": {"users": {"file": "beta.txt"}}, "release": "gray"}]
        status, got, _ = await _call(client, gw, "PUT", "/segments", beta)
        assert status == 200, got  # relative to the config file's directory
        assert await _served(client, gw, {"X-User-ID": "alice"}) == "gray"
        assert await _served(client, gw, {"X-User-ID": "bob"}) == "stable"
        users.write_text("bob\n")
        # an unrelated change does not re-read the file ...
        status, _, _ = await _call(client, gw, "PUT", "/weights", {"stable": 100})
        assert status == 200
        assert await _served(client, gw, {"X-User-ID": "bob"}) == "stable"
        # ... a reload does
        async with client.post(f"http://127.0.0.1:{gw.admin_port}/admin/reload") as r:
            assert r.status == 200
        assert await _served(client, gw, {"X-User-ID": "bob"}) == "gray"
        assert await _served(client, gw, {"X-User-ID": "alice"}) == "stable"
        # ... and so does a PUT of the same list
        users.write_text("carol\n")
        status, _, _ = await _call(client, gw, "PUT", "/segments", beta)
        assert status == 200
        assert await _served(client, gw, {"X-User-ID": "carol"}) == "gray"
        assert await _served(client, gw, {"X-User-ID": "bob"}) == "stable"
        # a file that is gone is a 400 naming it, nothing changed
        users.unlink()
        version = gw.holder.current.version
        status, got, _ = await _call(client, gw, "PUT", "/segments", beta)
        assert (status, got["field"]) == (400, "segments[0].match.users.file")
        assert gw.holder.current.version == version
        assert await _served(client, gw, {"X-User-ID": "carol"}) == "gray"
    finally:
        await gw.stop(1.0)


def _seg(**kw: Any) -> dict[str, Any]:
    return {"name": "s", "match": {"header": {"X-A": "1"}}, "release": "gray", **kw}


BAD = [
    ("not-a-list", {"name": "x"}, "segments"),
    ("item-not-object", ["x"], "segments[0]"),
    ("no-name", [{"match": {"header": {"X-A": "1"}}, "release": "gray"}], "segments[0].name"),
    ("bad-name", [_seg(name="a b")], "segments[0].name"),
    ("duplicate-name", [_seg(), _seg()], "segments[1].name"),
    ("unknown-field", [_seg(colour="red")], "segments[0].colour"),
    ("no-match", [{"name": "s", "release": "gray"}], "segments[0].match"),
    ("unknown-match-key", [_seg(match={"planet": "mars"})], "segments[0].match.planet"),
    (
        "bad-regex",
        [_seg(match={"header": {"X-Region": {"regex": "(a"}}})],
        "segments[0].match.header.X-Region.regex",
    ),
    (
        "backtracking-regex",
        [_seg(match={"header": {"X-Region": {"regex": "(a)\\1"}}})],
        "segments[0].match.header.X-Region.regex",
    ),
    ("bad-header-name", [_seg(match={"header": {"X A": "1"}})], "segments[0].match.header.X A"),
    (
        "unknown-test",
        [_seg(match={"cookie": {"c": {"like": "x"}}})],
        "segments[0].match.cookie.c",
    ),
    ("in-empty", [_seg(match={"query": {"q": {"in": []}}})], "segments[0].match.query.q.in"),
    ("bad-path", [_seg(match={"path": "/x"})], "segments[0].match.path"),
    ("bad-method", [_seg(match={"method": "GET"})], "segments[0].match.method"),
    ("cidr-typo", [_seg(match={"cidrs": ["10.1.0.0/33"]})], "segments[0].match.cidrs[0]"),
    ("users-empty", [_seg(match={"users": []})], "segments[0].match.users"),
    (
        "missing-file",
        [_seg(match={"users": {"file": "/nonexistent/users.txt"}})],
        "segments[0].match.users.file",
    ),
    (
        "bad-time-zone",
        [_seg(match={"time": {"from": "22:00", "to": "06:00", "tz": "Mars/Olympus"}})],
        "segments[0].match.time.tz",
    ),
    (
        "bad-clock",
        [_seg(match={"time": {"from": "25:00", "to": "06:00"}})],
        "segments[0].match.time.from",
    ),
    (
        "bad-day",
        [_seg(match={"time": {"from": "22:00", "to": "06:00", "days": ["funday"]}})],
        "segments[0].match.time.days",
    ),
    ("unknown-release", [_seg(release="blue")], "segments[0].release"),
    ("release-and-weights", [_seg(weights={"gray": 1})], "segments[0]"),
    (
        "negative-weight",
        [{**_seg(weights={"stable": 1, "gray": -5}), "release": None}],
        "segments[0]",
    ),
    (
        "weight-unknown-release",
        [{"name": "s", "match": {"header": {"X-A": "1"}}, "weights": {"blue": 5}}],
        "segments[0].weights.blue",
    ),
    (
        "weight-negative",
        [{"name": "s", "match": {"header": {"X-A": "1"}}, "weights": {"gray": -5}}],
        "segments[0].weights.gray",
    ),
    (
        "weights-all-zero",
        [{"name": "s", "match": {"header": {"X-A": "1"}}, "weights": {"gray": 0}}],
        "segments[0].weights",
    ),
    ("sticky-by-without-weights", [_seg(sticky_by={"header": "X-Org"})], "segments[0].sticky_by"),
    (
        "sticky-by-bad",
        [
            {
                "name": "s",
                "match": {"header": {"X-A": "1"}},
                "weights": {"gray": 1},
                "sticky_by": {"query": "x"},
            }
        ],
        "segments[0].sticky_by",
    ),
]


@pytest.mark.parametrize(("body", "field"), [(b, f) for _, b, f in BAD], ids=[i for i, _, _ in BAD])
async def test_bad_put_is_a_400_naming_the_field_and_changes_nothing(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    body: Any,
    field: str,
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(_doc(st, gr, [NORTH]))
    status, got, _ = await _call(client, gw, "PUT", "/segments", body)
    assert status == 400, got
    assert got["field"] == field, got
    assert gw.holder.current.version == 0
    status, got, _ = await _call(client, gw, "GET", "/segments")
    assert (got["source"], got["segments"], got["state_version"]) == ("config", [NORTH], 0)


async def test_malformed_json_and_unknown_service(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(_doc(st, gr))
    url = f"http://127.0.0.1:{gw.admin_port}/admin/services"
    async with client.put(f"{url}/svc/segments", data=b"[{") as r:
        assert (r.status, (await r.json())["field"]) == (400, "body")
    async with client.put(f"{url}/nope/segments", json=[STAFF]) as r:
        assert (r.status, (await r.json())["field"]) == (404, "service")
    async with client.put(f"{url}/svc/segments", json=[], headers={"If-Match": "x"}) as r:
        assert (r.status, (await r.json())["field"]) == (400, "If-Match")
    assert gw.holder.current.version == 0


async def test_preview_of_a_segment_split_matches_the_data_path(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    """`?segment=north&stable=40&gray=60`: the moves of that segment's own split.

    Checked against the gateway itself: the same synthetic keys sent through the data
    path before and after the PUT of the new weights move exactly as previewed.
    """
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(_doc(st, gr, [NORTH]))
    sample = 400
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    async with client.get(
        f"{admin}/preview",
        params={"segment": "north", "stable": "40", "gray": "60", "sample": sample},
    ) as r:
        assert r.status == 200
        pv = await r.json()
    assert pv["segment"] == "north"
    assert pv["weights"] == {"stable": 40.0, "gray": 60.0}
    # what the segment's own tables say (salted <service>/<segment>), not the service's
    old = WeightTable.build("svc/north", {"stable": 50, "gray": 50})
    new = WeightTable.build("svc/north", {"stable": 40, "gray": 60})
    assert pv["moves"] == preview.preview(old, new, sample).moves
    assert set(pv["moves"]) == {"stable->gray"}  # monotone: only into the raised release

    async def releases() -> dict[str, str]:
        out = {}
        for i in range(sample):
            k = preview.sample_key(i)
            out[k] = await _served(client, gw, {"X-Region": "cn-north-1", "X-User-ID": k})
        return out

    before = await releases()
    status, _, _ = await _call(
        client, gw, "PUT", "/segments", [{**NORTH, "weights": {"stable": 40, "gray": 60}}]
    )
    assert status == 200
    after = await releases()
    moved = sum(1 for k in before if before[k] != after[k]) / sample
    assert moved == pytest.approx(pv["moved_share"])
    assert all(
        before[k] == "stable" and after[k] == "gray" for k in before if before[k] != after[k]
    )


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"segment": "south", "gray": "60"}, "segment"),
        ({"segment": "north", "blue": "60"}, "weights.blue"),
        ({"segment": "north", "gray": "-1"}, "weights.gray"),
        ({"segment": "north", "gray": "0", "stable": "0"}, "weights"),
    ],
    ids=["unknown-segment", "unknown-release", "negative", "all-zero"],
)
async def test_preview_of_a_segment_bad_input(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    params: dict[str, str],
    field: str,
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(_doc(st, gr, [NORTH]))
    async with client.get(
        f"http://127.0.0.1:{gw.admin_port}/admin/services/svc/preview", params=params
    ) as r:
        assert (r.status, (await r.json())["field"]) == (400, field)


def test_a_stored_list_that_no_longer_parses_keeps_the_last_good_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A release removed from the config: last known good, else the config's list."""
    caplog.set_level(logging.WARNING, "gateway.segments")
    from gateway.live_segments import LiveSegments
    from gateway.statedoc import ServiceState, StateDoc

    def cfg(releases: list[str], segments: list[Any] | None = None) -> C.Config:
        rel = {r: {"weight": 1, "upstreams": ["http://127.0.0.1:9"]} for r in releases}
        svc: dict[str, Any] = {"releases": rel}
        if segments is not None:
            svc["segments"] = segments
        return C.build({"services": {"svc": svc}}, env={})

    doc = StateDoc(1, {"svc": ServiceState(extra={"segments": [STAFF]})})
    live = LiveSegments({})
    segs = live.overlay(cfg(["stable", "gray"], [NORTH]), doc).services["svc"].segments
    assert segs is not None and segs.doc == [STAFF]
    # the same document after a reload to a config without `gray`: the last good list
    own = [{"name": "own", "match": {"header": {"X-O": "1"}}, "release": "blue"}]
    live.forget()  # what a reload does
    segs = live.overlay(cfg(["stable", "blue"], own), doc).services["svc"].segments
    assert segs is not None and segs.doc == [STAFF]
    assert "the last good list stays in force" in caplog.text
    caplog.clear()
    live.overlay(cfg(["stable", "blue"], own), doc)  # the next apply: no second warning
    assert caplog.text == ""
    # a fresh process (a restart) with that config: the config's own list
    live = LiveSegments({})
    segs = live.overlay(cfg(["stable", "blue"], own), doc).services["svc"].segments
    assert segs is not None and segs.doc == own
    assert "the config's list stays in force" in caplog.text
    plain = cfg(["stable", "gray"])
    assert live.overlay(plain, StateDoc(2, {})) is plain  # nothing stored: the config as is
