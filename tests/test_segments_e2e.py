"""User segments through the real gateway, both engines (issue 13 item 1 acceptance)."""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from gateway.app import Gateway
from tests.conftest import Upstream, gateway_config

GatewayFactory = Callable[..., Awaitable[Gateway]]
UpstreamFactory = Callable[..., Awaitable[Upstream]]


async def _start(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    engine: str,
    segments: list[dict[str, Any]],
    *,
    gray: float = 0,
    gray_release: dict[str, Any] | None = None,
) -> Gateway:
    """stable + gray (gray's own weight `gray`, 0 by default: only a segment reaches it)."""
    st, gr = await upstreams("stable"), await upstreams("gray")
    svc = {
        "svc": {
            "releases": {
                "stable": {"weight": 100 - gray, "upstreams": [st.url]},
                "gray": gray_release or {"weight": gray, "upstreams": [gr.url]},
            },
            "segments": segments,
        }
    }
    return await gateway(gateway_config(svc, engine=engine))


async def _served(
    client: aiohttp.ClientSession,
    gw: Gateway,
    headers: dict[str, str] | None = None,
    path: str = "/",
    method: str = "GET",
) -> str:
    """The release that served a request, checked against the upstream's own answer."""
    async with client.request(
        method, f"http://127.0.0.1:{gw.port}{path}", headers=headers or {}
    ) as r:
        assert r.status == 200
        body = await r.json()
        assert r.headers["X-Release-Stage"] == body["release"]
        return str(body["release"])


async def _metric(client: aiohttp.ClientSession, gw: Gateway, needle: str) -> float:
    async with client.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(needle + " "):
            return float(line.split()[-1])
    return 0.0


async def test_header_segment(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    gw = await _start(
        upstreams,
        gateway,
        engine,
        [{"name": "staff", "match": {"header": {"X-Employee": "true"}}, "release": "gray"}],
    )
    for i in range(10):
        staff = {"X-Employee": "true", "X-User-ID": f"u{i}"}
        assert await _served(client, gw, staff) == "gray"
        assert await _served(client, gw, {"X-Employee": "TRUE", "X-User-ID": f"u{i}"}) == "stable"
        assert await _served(client, gw, {"X-User-ID": f"u{i}"}) == "stable"
    n = await _metric(
        client,
        gw,
        'gateway_segment_requests_total{release="gray",segment="staff",service="svc"}',
    )
    assert n == 10


async def test_user_list_file_of_a_million_ids(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    engine: str,
    tmp_path: Path,
) -> None:
    f = tmp_path / "beta-users.txt"
    f.write_text("".join(f"beta-{i}\n" for i in range(1_000_000)))
    t0 = time.perf_counter()
    gw = await _start(
        upstreams,
        gateway,
        engine,
        [{"name": "beta", "match": {"users": {"file": str(f)}}, "release": "gray"}],
    )
    print(f"\nconfig with a 1,000,000-id user list loaded and started in "
          f"{time.perf_counter() - t0:.2f} s")  # fmt: skip
    rng = random.Random(5)
    for i in rng.sample(range(1_000_000), 20):
        assert await _served(client, gw, {"X-User-ID": f"beta-{i}"}) == "gray"
        assert await _served(client, gw, {"X-User-ID": f"other-{i}"}) == "stable"
    # the cookie carries the sticky key too
    assert await _served(client, gw, {"Cookie": "uid=beta-7"}) == "gray"


async def test_cidr_segment(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    gw = await _start(
        upstreams,
        gateway,
        engine,
        [
            # the test client is 127.0.0.1: only the loopback rule can match
            {"name": "office", "match": {"cidrs": ["10.0.0.0/8"]}, "release": "gray"},
            {
                "name": "local",
                "match": {"cidrs": ["192.168.0.0/16", "127.0.0.0/8"], "query": {"try": "1"}},
                "release": "gray",
            },
        ],
    )
    assert await _served(client, gw, path="/x?try=1") == "gray"
    assert await _served(client, gw, path="/x?try=2") == "stable"
    assert await _served(client, gw, path="/x") == "stable"


def _hhmm(t: dt.datetime) -> str:
    return t.strftime("%H:%M")


async def test_time_window_segment(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    hour = dt.timedelta(hours=1)
    gw = await _start(
        upstreams,
        gateway,
        engine,
        [
            {
                "name": "never",  # a window two hours away (the same rule, shifted)
                "match": {
                    "time": {"from": _hhmm(now + 2 * hour), "to": _hhmm(now + 3 * hour)},
                    "header": {"X-Seg": "never"},
                },
                "release": "gray",
            },
            {
                "name": "now",  # a window around the current minute (may wrap midnight)
                "match": {
                    "time": {"from": _hhmm(now - hour), "to": _hhmm(now + hour), "tz": "UTC"},
                    "header": {"X-Seg": "now"},
                },
                "release": "gray",
            },
        ],
    )
    assert await _served(client, gw, {"X-Seg": "now"}) == "gray"
    assert await _served(client, gw, {"X-Seg": "never"}) == "stable"


async def test_segment_release_without_endpoints_falls_back(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    gw = await _start(
        upstreams,
        gateway,
        engine,
        [{"name": "staff", "match": {"header": {"X-Employee": "true"}}, "release": "gray"}],
        # Discovered from Consul, nothing registered: no healthy endpoint.
        gray_release={"weight": 0, "consul": {"service": "svc", "tags": ["gray"]}},
    )
    async with client.get(
        f"http://127.0.0.1:{gw.port}/", headers={"X-Employee": "true"}
    ) as r:  # fmt: skip
        assert r.status == 200
        assert (await r.json())["release"] == "stable"
        assert r.headers["X-Release-Fallback"] == "gray"


async def _explain(client: aiohttp.ClientSession, gw: Gateway, query: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc/explain?{query}"
    async with client.get(url) as r:
        assert r.status == 200, await r.text()
        out: dict[str, Any] = await r.json()
        return out


MIXED = [
    {"name": "staff", "match": {"header": {"X-Employee": "true"}}, "release": "gray"},
    {"name": "beta-cookie", "match": {"cookie": {"beta": {"in": ["1", "yes"]}}}, "release": "gray"},
    {"name": "ab", "match": {"query": {"ab": "new ui"}, "method": ["GET"]}, "release": "gray"},
    {"name": "search-nights", "match": {"path": {"prefix": "/search"},
     "header": {"X-Region": {"regex": "cn-[a-z]+-[0-9]"}}},
     "weights": {"stable": 50, "gray": 50}, "sticky_by": {"header": "X-Org"}},
    {"name": "half", "match": {"header": {"X-Half": {"present": True}}},
     "weights": {"stable": 50, "gray": 50}},
    {"name": "vip", "match": {"users": ["u1", "u2", "u3", "u5", "u8"]}, "release": "stable"},
]  # fmt: skip


def _mixed_request(rng: random.Random) -> tuple[dict[str, str], str, str]:
    """(headers, path with query, method): a random mix of every kind of input."""
    h: dict[str, str] = {}
    if rng.random() < 0.7:
        h["X-User-ID"] = f"u{rng.randrange(40)}"
    if rng.random() < 0.15:
        h["X-Employee"] = rng.choice(["true", "false"])
    if rng.random() < 0.2:
        h["Cookie"] = f"beta={rng.choice(['1', 'yes', 'no'])}; other=x"
    if rng.random() < 0.3:
        h["X-Region"] = rng.choice(["cn-north-1", "cn-south-x", "us-east-1"])
        h["X-Org"] = f"org{rng.randrange(10)}"
    if rng.random() < 0.2 and "X-User-ID" in h:  # keyless: a random draw on either side
        h["X-Half"] = ""
    if rng.random() < 0.1:
        h["X-Release-Stage"] = rng.choice(["gray", "stable", "nope"])
    path = rng.choice(["/", "/search", "/search/deep", "/other"])
    if rng.random() < 0.3:
        path += "?" + rng.choice(["ab=new+ui", "ab=new%20ui&x=1", "ab=old", "x=1"])
    return h, path, rng.choice(["GET", "GET", "POST"])


async def test_explain_agrees_with_the_data_path_for_mixed_requests(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    gw = await _start(upstreams, gateway, engine, MIXED, gray=20)
    rng = random.Random(13)
    reasons: set[str] = set()
    segments: set[str | None] = set()
    n = 0
    while n < 300:
        headers, target, method = _mixed_request(rng)
        ex_params = [f"header={quote(f'{k}:{v}')}" for k, v in headers.items() if k != "Cookie"]
        if "Cookie" in headers:
            ex_params += [f"cookie={quote(c.strip())}" for c in headers["Cookie"].split(";")]
        path, _, query = target.partition("?")
        ex_params += [f"path={quote(path)}", f"query={quote(query)}", f"method={method}"]
        ex = await _explain(client, gw, "&".join(ex_params))
        if ex["reason"] == "random":
            continue  # no key: a fresh draw per request on either side
        n += 1
        served = await _served(client, gw, headers, target, method)
        assert served == ex["release"], (headers, target, method, ex)
        reasons.add(ex["reason"])
        segments.add(ex["segment"])
    assert {"segment", "hash", "header"} <= reasons
    assert {s["name"] for s in MIXED} | {None} == segments


async def test_weighted_segment_split_through_the_data_path(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    """The pure share/monotone test runs over 100,000 users; here the data path agrees."""
    gw = await _start(
        upstreams,
        gateway,
        engine,
        [
            {
                "name": "half",
                "match": {"header": {"X-Beta": "1"}},
                "weights": {"stable": 50, "gray": 50},
            }
        ],
    )
    got = {}
    for i in range(200):
        h = {"X-Beta": "1", "X-User-ID": f"user-{i}"}
        got[i] = await _served(client, gw, h)
        ex = await _explain(client, gw, f"header=X-Beta:1&user=user-{i}")
        assert (ex["release"], ex["reason"], ex["segment"]) == (got[i], "segment", "half")
    assert 60 < sum(r == "gray" for r in got.values()) < 140
    for i in range(0, 200, 10):  # sticky
        assert await _served(client, gw, {"X-Beta": "1", "X-User-ID": f"user-{i}"}) == got[i]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("path=nope", "path"),
        ("path=/a/../..", "path"),
        ("method=G%20T", "method"),
        ("client_ip=10.1", "client_ip"),
    ],
    ids=["path-without-slash", "path-above-root", "method-not-a-token", "client-not-an-ip"],
)
async def test_explain_rejects_bad_request_parts(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    query: str,
    field: str,
) -> None:
    gw = await _start(upstreams, gateway, "aiohttp", MIXED)
    url = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc/explain?{query}"
    async with client.get(url) as r:
        assert r.status == 400
        assert (await r.json())["field"] == field


async def test_explain_takes_path_query_method_and_client(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    segs = [
        {"name": "office", "match": {"cidrs": ["10.1.0.0/16"]}, "release": "gray"},
        *MIXED,
    ]
    gw = await _start(upstreams, gateway, "aiohttp", segs)
    ex = await _explain(client, gw, "query=ab%3Dnew%2Bui&method=get&path=/x")
    assert (ex["release"], ex["segment"]) == ("gray", "ab")
    ex = await _explain(client, gw, "query=ab%3Dnew%2Bui&method=POST")
    assert ex["segment"] is None
    # the path as the data path matches it: normalized (gateway/paths.py)
    ex = await _explain(
        client, gw, "path=/x/..//search/%7Eq&header=X-Region:cn-north-1&header=X-Org:o"
    )
    assert ex["segment"] == "search-nights"
    ex = await _explain(client, gw, "client_ip=10.1.2.3")
    assert (ex["release"], ex["reason"], ex["segment"]) == ("gray", "segment", "office")


async def test_a_backtracking_regex_cannot_stall_the_data_path(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    """`(a+)+$` on an 8,000-byte header through the gateway (the unit test takes 100 KB).

    8,000 bytes: the echo upstream (aiohttp) refuses longer fields. Python's `re`
    would backtrack for longer than the age of the universe on this value.
    """
    gw = await _start(
        upstreams,
        gateway,
        engine,
        [{"name": "evil", "match": {"header": {"X-Evil": {"regex": "(a+)+$"}}}, "release": "gray"}],
    )
    timeout = aiohttp.ClientTimeout(total=30)
    evil = {"X-Evil": "a" * 8_000 + "!"}
    async with client.get(f"http://127.0.0.1:{gw.port}/", headers=evil, timeout=timeout) as r:
        assert r.status == 200 and (await r.json())["release"] == "stable"
    plain = {"X-Evil": "a" * 8_000}
    async with client.get(f"http://127.0.0.1:{gw.port}/", headers=plain, timeout=timeout) as r:
        assert r.status == 200 and (await r.json())["release"] == "gray"
