"""Issue 13 acceptance 1 and 2 through the gateway process (`python -m gateway`), both engines.

One process per engine (`--workers 2`) with every kind of segment in its config: a
header segment, a 1,000,000-id user file (load time printed), a CIDR segment, a time
window that holds now and one that does not, and a 50/50 segment whose share over
100,000 users is 50 ± 0.5 pp, sticky 100 %, and monotone when raised to 60 live
(`PUT …/segments`). Users outside every segment keep exactly the release the
service's split gives them with no segments at all (checked by removing them live).

The 50/50 segment has a test of its own (`--workers 2`, the segment alone, so the
data path does the 200,000 requests it needs and nothing else): two passes over the
100,000 users (at 50, then at 60) check all three properties: the share in each;
monotone between them (no gray user leaves gray, only stable users move); sticky
within the pass at 60, which asks 10,000 of the users a second time on other
connections (so, with two workers, often another process), and across both passes,
where every answer must be the segment's own sticky split of that user (README
"Segments": the service's rendezvous hashing salted `<service>/<segment>`),
whichever worker gave it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.routing import WeightTable
from tests.conftest import run_gateway_process
from tests.loadclient import ThreadedUpstreams, stages_for_keys

HALF_USERS = [f"h{i:06d}" for i in range(100_000)]  # in the `half` segment (prefix "h")
TWICE = 10_000  # asked again in the pass at 60, on other connections
OUTSIDERS = [f"o{i:05d}" for i in range(2_000)]  # in no segment


def _hhmm(t: dt.datetime) -> str:
    return t.strftime("%H:%M")


def _segments(user_file: Path) -> list[dict[str, Any]]:
    now = dt.datetime.now(dt.UTC)
    hour = dt.timedelta(hours=1)
    return [
        {"name": "staff", "match": {"header": {"X-Employee": "true"}}, "release": "gray"},
        {"name": "beta", "match": {"users": {"file": str(user_file)}}, "release": "gray"},
        {
            "name": "office",  # the test client is 127.0.0.1; gated by a query parameter
            "match": {"cidrs": ["10.0.0.0/8", "127.0.0.0/8"], "query": {"office": "1"}},
            "release": "gray",
        },
        {
            "name": "never",
            "match": {
                "time": {"from": _hhmm(now + 2 * hour), "to": _hhmm(now + 3 * hour)},
                "header": {"X-Seg": "never"},
            },
            "release": "gray",
        },
        {
            "name": "now",
            "match": {
                "time": {"from": _hhmm(now - hour), "to": _hhmm(now + hour), "tz": "UTC"},
                "header": {"X-Seg": "now"},
            },
            "release": "gray",
        },
        _half(50),
    ]


def _half(gray_share: float) -> dict[str, Any]:
    return {
        "name": "half",
        "match": {"header": {"X-User-ID": {"prefix": "h"}}},
        "weights": {"stable": 100 - gray_share, "gray": gray_share},
    }


def _get(port: int, path: str = "/", headers: dict[str, str] | None = None) -> str:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        body = r.read().decode()
        assert r.status == 200, body
        assert r.getheader("X-Release-Stage") == body  # the release that answered
        return body
    finally:
        c.close()


def _admin(base: str, method: str, path: str, body: object = None) -> tuple[int, Any]:
    c = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
    try:
        data = json.dumps(body).encode() if body is not None else None
        c.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def _assign(port: int, users: list[str]) -> list[str]:
    """The release that answered each user, in order (16 pipelined connections)."""
    got = asyncio.run(stages_for_keys(port, users, conns=16))
    assert len(got) == len(users)
    bad = [(u, r) for u, r in zip(users, got, strict=True) if r[0] != 200 or r[1] != r[2]]
    assert not bad, bad[:5]  # 200, and X-Release-Stage names the release that answered
    return [stage for _, stage, _ in got]


def _gray_pp(assigned: list[str]) -> float:
    return assigned.count("gray") / len(assigned) * 100


def _converge(port: int, headers: dict[str, str], want: str) -> None:
    """Until 32 fresh connections in a row get `want` (both workers applied a change)."""
    deadline, run = time.monotonic() + 30.0, 0
    while run < 32:
        assert time.monotonic() < deadline, f"{headers} still not on {want} after 30 s"
        run = run + 1 if _get(port, headers=headers) == want else 0


def _doc(engine: str, up: ThreadedUpstreams, segments: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "engine": engine,
        "state": {"store": "file", "path": "var/gateway-state.json"},
        "drain_timeout": "2s",
        "services": {
            "svc": {
                "releases": {
                    "stable": {"weight": 80, "upstreams": [up.url("stable")]},
                    "gray": {"weight": 20, "upstreams": [up.url("gray")]},
                },
                "segments": segments,
            }
        },
    }


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fast", "aiohttp"])
def test_every_kind_of_segment_through_the_gateway_process(tmp_path: Path, engine: str) -> None:
    users = tmp_path / "beta-users.txt"
    users.write_text("".join(f"beta-{i}\n" for i in range(1_000_000)))
    with ThreadedUpstreams(["stable", "gray"]) as up:
        t0 = time.perf_counter()
        # a million ids to load on a shared box: more than the default 20 s to come up
        with run_gateway_process(tmp_path, _doc(engine, up, _segments(users)), ready_s=60.0) as gw:
            print(
                f"\n{engine}: gateway with a 1,000,000-id user list up in "
                f"{time.perf_counter() - t0:.2f} s"
            )
            # header, user file (header and cookie key), CIDR, time windows
            assert _get(gw.port, headers={"X-Employee": "true", "X-User-ID": "o1"}) == "gray"
            for i in (0, 4_711, 999_999):
                assert _get(gw.port, headers={"X-User-ID": f"beta-{i}"}) == "gray"
            assert _get(gw.port, headers={"Cookie": "uid=beta-12345"}) == "gray"
            assert _get(gw.port, "/x?office=1", {"X-User-ID": "o1"}) == "gray"
            assert _get(gw.port, headers={"X-Seg": "now", "X-User-ID": "o1"}) == "gray"
            outsiders = _assign(gw.port, OUTSIDERS)
            assert "stable" in outsiders and "gray" in outsiders
            stable = [u for u, r in zip(OUTSIDERS, outsiders, strict=True) if r == "stable"]
            for u in stable[:5]:
                assert _get(gw.port, headers={"X-Seg": "never", "X-User-ID": u}) == "stable"
                assert _get(gw.port, "/x?office=2", {"X-User-ID": u}) == "stable"
                assert _get(gw.port, headers={"X-Employee": "TRUE", "X-User-ID": u}) == "stable"

            # users outside every segment: the same release as with no segments at all
            status, body = _admin(gw.admin, "PUT", "/admin/services/svc/segments", [])
            assert (status, body["segments"]) == (200, [])
            u = stable[0]  # the staff header steers nothing any more
            assert _get(gw.port, headers={"X-Employee": "true", "X-User-ID": u}) == "stable"
            assert _assign(gw.port, OUTSIDERS) == outsiders


@pytest.mark.slow
# 210,000 requests through two workers: measured 47-54 s on the fast engine and
# 93-200 s on the reference engine while other suites kept the 2 cores at a load
# average of 10-13; the suite's 120 s is too short for the reference engine then.
@pytest.mark.timeout(360)
@pytest.mark.parametrize("engine", ["fast", "aiohttp"])
def test_a_50_50_segment_over_100000_users_is_exact_sticky_and_monotone(
    tmp_path: Path, engine: str
) -> None:
    started = time.perf_counter()
    split = {w: WeightTable.build("svc/half", {"stable": 100 - w, "gray": w}) for w in (50, 60)}
    with ThreadedUpstreams(["stable", "gray"]) as up:
        with run_gateway_process(tmp_path, _doc(engine, up, [_half(50)]), workers=2) as gw:
            first = _assign(gw.port, HALF_USERS)
            assert abs(_gray_pp(first) - 50.0) <= 0.5, _gray_pp(first)
            assert first == [split[50].pick_hash(u) for u in HALF_USERS]  # sticky on any worker
            status, body = _admin(gw.admin, "PUT", "/admin/services/svc/segments", [_half(60)])
            assert status == 200, body
            mover = next(
                u for u, r in zip(HALF_USERS, first, strict=True)
                if r == "stable" and split[60].pick_hash(u) == "gray"
            )  # fmt: skip
            _converge(gw.port, {"X-User-ID": mover}, "gray")
            both = _assign(gw.port, HALF_USERS + HALF_USERS[:TWICE])
            after, again = both[: len(HALF_USERS)], both[len(HALF_USERS) :]
            assert abs(_gray_pp(after) - 60.0) <= 0.5, _gray_pp(after)
            assert again == after[:TWICE]  # sticky: 100 % of the users asked twice
            assert after == [split[60].pick_hash(u) for u in HALF_USERS]
            moved = [(a, b) for a, b in zip(first, after, strict=True) if a != b]
            assert moved and set(moved) == {("stable", "gray")}  # no gray user left gray
    print(
        f"\n{engine}: {2 * len(HALF_USERS) + TWICE:,} requests, gray {_gray_pp(first):.2f} % "
        f"then {_gray_pp(after):.2f} %, {len(moved):,} moved; "
        f"wall time {time.perf_counter() - started:.1f} s"
    )
