"""Who may steer, colouring tags and lanes through the real gateway, both engines (issue 13).

The chain A → gateway → B → gateway → C: A's and B's handlers are real aiohttp
services that call the gateway again, passing on the `baggage` they received,
so a lane set at the edge must hold across every hop.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import Gateway
from tests.conftest import Upstream, gateway_config, gather_limited

GatewayFactory = Callable[..., Awaitable[Gateway]]
UpstreamFactory = Callable[..., Awaitable[Upstream]]

HOSTILE = "203.0.113.9"  # a client address outside every trusted range (RFC 5737)


def chain_app(name: str, release: str, where: dict[str, Any], nxt: str | None) -> web.Application:
    """Service `name` at `release`: says who it is and what it got; calls `nxt` via the gateway."""

    async def handle(request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "service": name,
            "release": release,
            "headers": dict(request.headers),
        }
        if nxt is not None:
            fwd = {"Host": f"{nxt}.local"}
            if "baggage" in request.headers:
                fwd["baggage"] = request.headers["baggage"]
            session: aiohttp.ClientSession = request.app[SESSION]
            async with session.get(f"http://127.0.0.1:{where['port']}/", headers=fwd) as r:
                body["next"] = await r.json()
                body["next_status"] = r.status
                body["next_headers"] = dict(r.headers)
        return web.json_response(body)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as s:
            app[SESSION] = s
            yield

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


SESSION = web.AppKey("session", aiohttp.ClientSession)


async def _chain(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    engine: str,
    *,
    fallback: str = "baseline",
) -> Gateway:
    where: dict[str, Any] = {}
    ups = {
        (svc, rel): await upstreams(app=chain_app(svc, rel, where, nxt))
        for svc, rel, nxt in [
            ("a", "stable", "b"),
            ("a", "gray", "b"),
            ("b", "stable", "c"),
            ("b", "v2", "c"),
            ("c", "stable", None),
        ]
    }

    def svc(name: str, releases: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {"match": {"hosts": [f"{name}.local"]}, "releases": releases}

    services = {
        "a": svc(
            "a",
            {
                "stable": {"weight": 100, "upstreams": [ups[("a", "stable")].url]},
                "gray": {
                    "weight": 0,
                    "upstreams": [ups[("a", "gray")].url],
                    "tag": {"env": "pre", "group": "v2"},
                },
            },
        ),
        "b": svc(
            "b",
            {
                "stable": {"weight": 100, "upstreams": [ups[("b", "stable")].url]},
                # B's gray release is named v2 and serves the gray lane.
                "v2": {"weight": 0, "upstreams": [ups[("b", "v2")].url], "lanes": ["gray"]},
            },
        ),
        "c": svc("c", {"stable": {"weight": 100, "upstreams": [ups[("c", "stable")].url]}}),
    }
    routing = {
        "lanes": True,
        "lane_fallback": fallback,
        "trusted_proxies": ["127.0.0.1/32"],
        "trust_overrides": ["127.0.0.0/8"],
        "lanes_trust": ["127.0.0.0/8"],
        "tags": {"canary": "gray"},
    }
    gw = await gateway(gateway_config(services, engine=engine, routing=routing))
    where["port"] = gw.port
    return gw


async def _get(
    client: aiohttp.ClientSession, gw: Gateway, headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with client.get(f"http://127.0.0.1:{gw.port}/", headers=headers) as r:
        return r.status, await r.json(), dict(r.headers)


def _members(baggage: str) -> list[tuple[str, str]]:
    out = []
    for m in baggage.split(","):
        k, _, v = m.strip().partition("=")
        out.append((k, v))
    return out


@pytest.mark.parametrize(
    "colour",
    [
        {"X-Traffic-Tag": "canary"},
        {"X-Release-Stage": "gray"},
        {"baggage": "release.stage=gray"},
    ],
    ids=["tag-header", "stage-header", "lane-baggage"],
)
async def test_gray_at_the_edge_holds_across_the_chain(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    engine: str,
    colour: dict[str, str],
) -> None:
    gw = await _chain(upstreams, gateway, engine)
    status, a, a_resp = await _get(client, gw, {"Host": "a.local", **colour})
    assert status == 200
    assert (a["service"], a["release"]) == ("a", "gray")
    assert a_resp["X-Release-Stage"] == "gray"
    bag = _members(a["headers"]["baggage"])
    assert [v for k, v in bag if k == "release.stage"] == ["gray"]
    assert ("gray.tag", "env=pre%3Bgroup=v2") in bag
    b = a["next"]
    assert (b["service"], b["release"]) == ("b", "v2")
    assert a["next_headers"].get("X-Release-Fallback") is None
    # Exactly one release.stage member goes on, and it is still the lane, not B's release name.
    b_bag = _members(b["headers"]["baggage"])
    assert [v for k, v in b_bag if k == "release.stage"] == ["gray"]
    assert ("gray.tag", "env=pre%3Bgroup=v2") in b_bag  # A's gray tag passes through B
    c = b["next"]
    assert (c["service"], c["release"]) == ("c", "stable")
    assert b["next_headers"]["X-Release-Fallback"] == "gray"
    assert [v for k, v in _members(c["headers"]["baggage"]) if k == "release.stage"] == ["gray"]


async def test_lane_reject_answers_503_json(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    engine: str,
) -> None:
    gw = await _chain(upstreams, gateway, engine, fallback="reject")
    status, a, _ = await _get(client, gw, {"Host": "a.local", "X-Traffic-Tag": "canary"})
    assert status == 200 and a["release"] == "gray"
    assert a["next"]["release"] == "v2"
    assert a["next"]["next_status"] == 503
    assert a["next"]["next"] == {"error": "lane unavailable", "lane": "gray"}


@pytest.mark.parametrize(
    "forged",
    [
        {"X-Traffic-Tag": "canary"},
        {"X-Release-Stage": "gray"},
        {"baggage": "release.stage=gray,gray.tag=env=evil"},
        {"baggage": "other=1", "Baggage": "release.stage=gray;p=1"},
    ],
    ids=["tag-header", "stage-header", "baggage", "second-baggage-line"],
)
async def test_untrusted_client_cannot_pick_a_lane(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    engine: str,
    forged: dict[str, str],
) -> None:
    """Behind a trusted proxy (127.0.0.1) the client is the XFF hop: outside every trusted range."""
    gw = await _chain(upstreams, gateway, engine)
    headers = {"Host": "a.local", "X-Forwarded-For": HOSTILE, **forged}
    status, a, _ = await _get(client, gw, headers)
    assert status == 200
    assert (a["release"], a["next"]["release"], a["next"]["next"]["release"]) == (
        "stable",
        "stable",
        "stable",
    )
    got = {k.lower(): v for k, v in a["headers"].items()}
    assert "x-traffic-tag" not in got  # stripped before forwarding
    assert got["x-release-stage"] == "stable"  # the gateway's own, not the forged one
    bag = _members(got["baggage"])
    assert [v for k, v in bag if k == "release.stage"] == ["stable"]
    assert not [k for k, _ in bag if k == "gray.tag"]
    assert "X-Release-Fallback" not in a["next"]["next_headers"]


async def test_forged_forwarded_for_from_untrusted_peer_changes_nothing(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    engine: str,
) -> None:
    """127.0.0.1 is no trusted proxy here: its X-Forwarded-For cannot make it look trusted."""
    st, gr = await upstreams("stable"), await upstreams("gray")
    services = {
        "svc": {
            "releases": {
                "stable": {"weight": 100, "upstreams": [st.url]},
                "gray": {"weight": 0, "upstreams": [gr.url]},
            },
            "segments": [
                {"name": "office", "match": {"cidrs": ["10.1.0.0/16"]}, "release": "gray"}
            ],
        }
    }
    routing = {"trust_overrides": ["10.1.0.0/16"], "trusted_proxies": ["192.0.2.1/32"]}
    gw = await gateway(gateway_config(services, engine=engine, routing=routing))
    forged = {"X-Forwarded-For": "10.1.2.3", "X-Release-Stage": "gray", "X-Traffic-Tag": "x"}
    async with client.get(f"http://127.0.0.1:{gw.port}/", headers=forged) as r:
        assert r.status == 200
        body = await r.json()
    assert body["release"] == "stable"  # neither the segment nor the stage header believed it
    got = {k.lower(): v for k, v in body["headers"].items()}
    assert "x-traffic-tag" not in got
    assert got["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"  # passed on, with the real peer
    # The same request, explained: the client address is the peer.
    async with client.get(
        f"http://127.0.0.1:{gw.admin_port}/admin/services/svc/explain",
        params=[("header", "X-Forwarded-For: 10.1.2.3"), ("client_ip", "127.0.0.1")],
    ) as r:
        ex = await r.json()
    assert (ex["release"], ex["trusted"], ex.get("client", "127.0.0.1")) == (
        "stable",
        False,
        "127.0.0.1",
    )


async def test_trusted_proxy_hop_steers_segments_and_tags(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    engine: str,
) -> None:
    """Behind a trusted proxy the right-most untrusted X-Forwarded-For hop is the client."""
    st, gr = await upstreams("stable"), await upstreams("gray")
    services = {
        "svc": {
            "releases": {
                "stable": {"weight": 100, "upstreams": [st.url]},
                "gray": {"weight": 0, "upstreams": [gr.url]},
            },
            "segments": [
                {"name": "office", "match": {"cidrs": ["10.1.0.0/16"]}, "release": "gray"}
            ],
        }
    }
    routing = {
        "trust_overrides": ["10.9.0.0/16"],
        "trusted_proxies": ["127.0.0.1/32", "10.0.0.0/24"],
        "tag_header": "X-Colour",
        "tags": {"blue": "gray", "nowhere": "stable"},
    }
    gw = await gateway(gateway_config(services, engine=engine, routing=routing))
    url = f"http://127.0.0.1:{gw.port}/"
    cases = [
        ({"X-Forwarded-For": "1.2.3.4, 10.1.2.3, 10.0.0.5"}, "gray", None),  # office segment
        ({"X-Forwarded-For": "10.1.2.3, 1.2.3.4"}, "stable", None),  # 1.2.3.4 is the client
        ({"X-Forwarded-For": "10.9.0.1", "X-Colour": "blue"}, "gray", "blue"),  # trusted tag
        ({"X-Forwarded-For": "1.2.3.4", "X-Colour": "blue"}, "stable", None),  # untrusted tag
        ({"X-Forwarded-For": "10.9.0.1", "X-Colour": "unknown"}, "stable", "unknown"),
    ]
    for headers, want, tag_seen in cases:
        async with client.get(url, headers=headers) as r:
            assert r.status == 200
            body = await r.json()
        got = {k.lower(): v for k, v in body["headers"].items()}
        assert (body["release"], got.get("x-colour")) == (want, tag_seen), headers


async def test_explain_agrees_with_the_data_path_for_10000_mixed_requests(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    """Segments, tags, lanes, stage headers, untrusted hops and hashing, request by request."""
    ups = {r: await upstreams(r) for r in ("stable", "gray", "blue")}
    services = {
        "svc": {
            "releases": {
                "stable": {"weight": 70, "upstreams": [ups["stable"].url]},
                "gray": {"weight": 20, "upstreams": [ups["gray"].url], "lanes": ["canary"]},
                "blue": {"weight": 10, "upstreams": [ups["blue"].url]},
            },
            "segments": [
                {"name": "staff", "match": {"header": {"X-Employee": "true"}}, "release": "blue"},
                {
                    "name": "north",
                    "match": {"cidrs": ["10.1.0.0/16"]},
                    "weights": {"stable": 50, "gray": 50},
                },
            ],
        }
    }
    routing = {
        "lanes": True,
        "trusted_proxies": ["127.0.0.1/32"],
        "trust_overrides": ["10.0.0.0/8"],
        "lanes_trust": ["10.0.0.0/8"],
        # t-none names a release only the other service has: ignored for svc.
        "tags": {"t-gray": "gray", "t-blue": "blue", "t-none": "purple"},
    }
    services["other"] = {
        "match": {"hosts": ["o.local"]},
        "releases": {
            "stable": {"weight": 1, "upstreams": [ups["stable"].url]},
            "purple": {"weight": 0, "upstreams": [ups["stable"].url]},
        },
    }
    gw = await gateway(gateway_config(services, routing=routing))
    rng = random.Random(13)
    cases: list[list[tuple[str, str]]] = []
    for i in range(10_000):
        h: list[tuple[str, str]] = [("X-User-ID", f"user-{rng.randrange(1_000_000)}")]
        hop = rng.choice(["10.1.2.3", "10.2.0.1", "203.0.113.5", None])
        if hop is not None:
            h.append(("X-Forwarded-For", hop))
        roll = rng.random()
        if roll < 0.1:
            h.append(("X-Employee", "true"))
        elif roll < 0.25:
            h.append(("X-Traffic-Tag", rng.choice(["t-gray", "t-blue", "t-none", "junk"])))
        elif roll < 0.4:
            lane = rng.choice(["canary", "gray", "blue", "stable", "nowhere"])
            h.append(("baggage", f"k=v,release.stage={lane};p=1"))
        elif roll < 0.45:
            h.append(("X-Release-Stage", rng.choice(["gray", "blue", "nope"])))
        if i % 7 == 0:  # the sticky key from the cookie instead of the header
            h[0] = ("Cookie", f"uid={h[0][1]}")
        cases.append(h)

    async def data_path(h: list[tuple[str, str]]) -> tuple[str, str | None]:
        async with client.get(f"http://127.0.0.1:{gw.port}/", headers=h) as r:
            assert r.status == 200
            body = await r.json()
            return str(body["release"]), r.headers.get("X-Release-Fallback")

    async def explained(h: list[tuple[str, str]]) -> tuple[str, str | None]:
        params = [("header", f"{n}: {v}") for n, v in h]
        async with client.get(
            f"http://127.0.0.1:{gw.admin_port}/admin/services/svc/explain", params=params
        ) as r:
            assert r.status == 200, await r.text()
            ex = await r.json()
            return str(ex["release"]), ex["chosen"] if ex["reason"] == "fallback" else None

    served = await gather_limited([data_path(h) for h in cases], 32)
    told = await gather_limited([explained(h) for h in cases], 32)
    wrong = [(h, s, t) for h, s, t in zip(cases, served, told, strict=True) if s != t]
    assert not wrong, wrong[:5]
    # Every way of choosing was exercised.
    assert {r for r, _ in served} == {"stable", "gray", "blue"}
    assert any(f == "nowhere" for _, f in served)  # a lane this service lacks: the fallback


async def test_tripped_release_takes_no_segment_tag_or_lane_until_retry(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    engine: str,
) -> None:
    """A rolled-back release is reached only by the trusted stage header and cookie."""
    st, gr = await upstreams("stable"), await upstreams("gray")
    services = {
        "svc": {
            "releases": {
                "stable": {"weight": 100, "upstreams": [st.url]},
                "gray": {"weight": 0, "upstreams": [gr.url]},
            },
            "segments": [
                {"name": "staff", "match": {"header": {"X-Employee": "true"}}, "release": "gray"}
            ],
        }
    }
    routing = {"lanes": True, "tags": {"canary": "gray"}}
    gw = await gateway(gateway_config(services, engine=engine, routing=routing))
    base = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    steering = {
        "segment": {"X-Employee": "true"},
        "tag": {"X-Traffic-Tag": "canary"},
        "lane": {"baggage": "release.stage=gray"},
    }

    async def served(headers: dict[str, str]) -> tuple[str, str | None]:
        async with client.get(f"http://127.0.0.1:{gw.port}/", headers=headers) as r:
            assert r.status == 200
            return str((await r.json())["release"]), r.headers.get("X-Release-Fallback")

    async def post(path: str, body: Any = None) -> None:
        async with client.post(f"{base}/{path}", json=body) as r:
            assert r.status == 200, await r.text()

    for how, h in steering.items():
        assert await served(h) == ("gray", None), how
    await post("rollout", {"release": "gray", "steps": [{"weight": 5, "pause": "1h"}]})
    await post("abort")  # -> RolledBack
    for how, h in steering.items():
        assert await served(h) == ("stable", "gray"), how
    assert await served({"X-Release-Stage": "gray"}) == ("gray", None)
    assert await served({"Cookie": "release_stage=gray"}) == ("gray", None)
    await post("rollout/retry")
    for how, h in steering.items():
        assert await served(h) == ("gray", None), how


async def test_explain_names_the_lane_tag_and_client(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gw = await _chain(upstreams, gateway, "fast")
    base = f"http://127.0.0.1:{gw.admin_port}/admin/services"

    async def explain(svc: str, *headers: str) -> dict[str, Any]:
        params = [("header", h) for h in headers]
        async with client.get(f"{base}/{svc}/explain", params=params) as r:
            assert r.status == 200
            return dict(await r.json())

    ex = await explain("b", "baggage: release.stage=gray")
    assert (ex["release"], ex["reason"], ex["lane"]) == ("v2", "lane", "gray")
    ex = await explain("c", "baggage: release.stage=gray")
    assert (ex["release"], ex["reason"], ex["chosen"], ex["lane"]) == (
        "stable",
        "fallback",
        "gray",
        "gray",
    )
    ex = await explain("a", "X-Traffic-Tag: canary")
    assert (ex["release"], ex["reason"], ex["trusted"]) == ("gray", "tag", True)
    ex = await explain("a", "X-Traffic-Tag: canary", f"X-Forwarded-For: {HOSTILE}")
    assert (ex["release"], ex["reason"], ex["trusted"], ex["client"]) == (
        "stable",
        "random",  # no sticky key given
        False,
        HOSTILE,
    )
    assert "lane" not in ex
