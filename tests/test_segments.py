"""User segments (issue 13 item 1): matching rules, precedence, splits and config errors — pure."""

from __future__ import annotations

import datetime as dt
import gc
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from gateway import config as C
from gateway.errors import ConfigError
from gateway.preview import explain
from gateway.routing import (
    REASON_FALLBACK,
    REASON_HASH,
    REASON_HEADER,
    REASON_SEGMENT,
    Decision,
    WeightTable,
    choose_release,
)
from gateway.segments import SegmentSet, TimeWindow, parse_cookies, parse_query, salted_hash
from gateway.state import build_snapshot

ROOT = Path(__file__).resolve().parent.parent
RELEASES = {
    "stable": {"weight": 95, "upstreams": ["http://127.0.0.1:9001"]},
    "gray": {"weight": 5, "upstreams": ["http://127.0.0.1:9002"]},
}


def _cfg(segments: list[dict[str, Any]], env: dict[str, str] | None = None) -> C.Config:
    return C.build(
        {"services": {"svc": {"releases": RELEASES, "segments": segments}}}, env=env or {}
    )


def _segs(segments: list[dict[str, Any]], env: dict[str, str] | None = None) -> SegmentSet:
    s = _cfg(segments, env).services["svc"].segments
    assert s is not None
    return s


def _hit(
    segs: SegmentSet,
    headers: Sequence[tuple[str, str]] = (),
    *,
    target: str = "/",
    method: str = "GET",
    client: str = "127.0.0.1",
    user: str | None = None,
    now: float = 0.0,
) -> str | None:
    """The name of the segment a request matches (None: none)."""
    path = target.partition("?")[0]
    got = segs.evaluate(
        [(n.encode(), v.encode()) for n, v in headers],
        path,
        target.encode(),
        method.encode(),
        client,
        user,
        lambda: now,
    )
    return None if got is None else got[0].name


def _one(match: dict[str, Any]) -> SegmentSet:
    return _segs([{"name": "s", "match": match, "release": "gray"}])


# --------------------------------------------------------------------------- value tests

HEADER_CASES = [
    # (test, request headers, matches)
    ("exact", "yes", [("X-Beta", "yes")], True),
    ("exact-case-sensitive-value", "yes", [("X-Beta", "YES")], False),
    ("name-case-insensitive", "yes", [("x-bEtA", "yes")], True),
    ("exact-missing", "yes", [], False),
    ("repeated-any-value", "yes", [("X-Beta", "no"), ("X-Beta", "yes")], True),
    ("prefix", {"prefix": "cn-"}, [("X-Beta", "cn-north-1")], True),
    ("prefix-miss", {"prefix": "cn-"}, [("X-Beta", "us-east")], False),
    ("regex-full-match", {"regex": "v[0-9]+"}, [("X-Beta", "v12")], True),
    ("regex-partial-is-no-match", {"regex": "v[0-9]+"}, [("X-Beta", "v12x")], False),
    ("in", {"in": ["a", "b"]}, [("X-Beta", "b")], True),
    ("in-miss", {"in": ["a", "b"]}, [("X-Beta", "c")], False),
    ("present", {"present": True}, [("X-Beta", "")], True),
    ("present-missing", {"present": True}, [], False),
    ("absent", {"absent": True}, [], True),
    ("absent-present", {"absent": True}, [("X-Beta", "x")], False),
    ("not-exact", {"not": "yes"}, [("X-Beta", "no")], True),
    ("not-exact-missing-holds", {"not": "yes"}, [], True),
    ("not-exact-hit", {"not": "yes"}, [("X-Beta", "yes")], False),
    ("not-prefix", {"not": {"prefix": "cn-"}}, [("X-Beta", "us")], True),
    ("not-absent-is-present", {"not": {"absent": True}}, [("X-Beta", "1")], True),
]


@pytest.mark.parametrize(
    ("test", "headers", "want"),
    [c[1:] for c in HEADER_CASES],
    ids=[c[0] for c in HEADER_CASES],
)
def test_header_tests(test: object, headers: list[tuple[str, str]], want: bool) -> None:
    segs = _one({"header": {"X-Beta": test}})
    assert (_hit(segs, headers) == "s") is want


COOKIE_QUERY_CASES = [
    ("cookie-exact", {"cookie": {"beta": "1"}}, [("Cookie", "a=b; beta=1")], "/", True),
    ("cookie-quoted", {"cookie": {"beta": "1"}}, [("Cookie", 'beta="1"')], "/", True),
    ("cookie-two-lines", {"cookie": {"beta": "1"}}, [("Cookie", "a=b"), ("Cookie", "beta=1")], "/",
     True),
    ("cookie-repeated-any", {"cookie": {"beta": "1"}}, [("Cookie", "beta=0; beta=1")], "/", True),
    ("cookie-missing", {"cookie": {"beta": "1"}}, [], "/", False),
    ("cookie-empty-present", {"cookie": {"beta": {"present": True}}}, [("Cookie", "beta=")], "/",
     True),
    ("query-exact", {"query": {"ab": "on"}}, [], "/x?ab=on", True),
    ("query-percent-decoded", {"query": {"q": "a b/é"}}, [], "/x?q=a%20b%2F%C3%A9", True),
    ("query-plus-is-space", {"query": {"q": "a b"}}, [], "/x?q=a+b", True),
    ("query-repeated-any", {"query": {"ab": "on"}}, [], "/x?ab=off&ab=on", True),
    ("query-empty-present", {"query": {"ab": {"present": True}}}, [], "/x?ab", True),
    ("query-absent", {"query": {"ab": {"absent": True}}}, [], "/x", True),
    ("query-miss", {"query": {"ab": "on"}}, [], "/x?abc=on", False),
    ("path-exact", {"path": {"exact": "/search"}}, [], "/search?q=1", True),
    ("path-exact-miss", {"path": {"exact": "/search"}}, [], "/search/x", False),
    ("path-prefix", {"path": {"prefix": "/api/"}}, [], "/api/v1", True),
    ("path-regex", {"path": {"regex": "/u/[0-9]+"}}, [], "/u/42", True),
    ("path-regex-full", {"path": {"regex": "/u/[0-9]+"}}, [], "/u/42/x", False),
    ("header-and-query-both-hold", {"header": {"X-A": "1"}, "query": {"b": "2"}}, [("X-A", "1")],
     "/?b=2", True),
    ("header-and-query-one-fails", {"header": {"X-A": "1"}, "query": {"b": "2"}}, [("X-A", "1")],
     "/?b=3", False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("match", "headers", "target", "want"),
    [c[1:] for c in COOKIE_QUERY_CASES],
    ids=[c[0] for c in COOKIE_QUERY_CASES],
)
def test_cookie_query_path(
    match: dict[str, Any], headers: list[tuple[str, str]], target: str, want: bool
) -> None:
    assert (_hit(_one(match), headers, target=target) == "s") is want


@pytest.mark.parametrize(
    ("method", "want"),
    [("GET", True), ("HEAD", True), ("POST", False)],
    ids=["get", "head", "post"],
)
def test_method(method: str, want: bool) -> None:
    assert (_hit(_one({"method": ["get", "HEAD"]}), method=method) == "s") is want


@pytest.mark.parametrize(
    ("client", "want"),
    [
        ("10.1.2.3", True),
        ("10.1.255.255", True),
        ("10.0.255.255", False),
        ("10.2.0.1", False),
        ("2001:db9::", False),
        ("2001:db8::1", True),
        ("::ffff:10.1.0.9", True),  # an IPv4 client on a dual-stack socket
        ("not-an-ip", False),
    ],
    ids=[
        "in-v4",
        "in-v4-last",
        "out-v4-below",
        "out-v4",
        "out-v6",
        "in-v6",
        "v4-mapped",
        "garbage",
    ],
)
def test_cidrs(client: str, want: bool) -> None:
    segs = _one({"cidrs": ["10.1.0.0/16", "2001:db8::/32"]})
    assert (_hit(segs, client=client) == "s") is want


def test_parsers() -> None:
    assert parse_cookies(["a=1; b=2", 'a="3"; junk']) == {"a": ["1", "3"], "b": ["2"]}
    assert parse_query("a=1&a=2&b=&c=x+y&d=%41") == {
        "a": ["1", "2"],
        "b": [""],
        "c": ["x y"],
        "d": ["A"],
    }


def test_redos_pattern_is_linear() -> None:
    """`(a+)+$` backtracks exponentially in Python's `re`; RE2 answers at once."""
    segs = _one({"header": {"X-Evil": {"regex": "(a+)+$"}}})
    value = "a" * 100_000 + "!"
    t0 = time.perf_counter()
    for _ in range(10):
        assert _hit(segs, [("X-Evil", value)]) is None
    took = time.perf_counter() - t0
    print(f"10 RE2 matches of (a+)+$ against 100 KB: {took * 1000:.1f} ms")
    assert took < 1.0  # generous (a few ms here); Python's re would not finish in minutes
    assert _hit(segs, [("X-Evil", "a" * 100_000)]) == "s"


# --------------------------------------------------------------------------- users


def test_users_inline_file_and_hashed(tmp_path: Path) -> None:
    assert _hit(_one({"users": ["alice", "bob"]}), user="bob") == "s"
    assert _hit(_one({"users": ["alice", "bob"]}), user="carol") is None
    assert _hit(_one({"users": ["alice", "bob"]}), user=None) is None
    f = tmp_path / "beta.txt"
    f.write_text("alice\r\n\n  bob  \ncarol\n")
    segs = _one({"users": {"file": str(f)}})
    assert [_hit(segs, user=u) for u in ("alice", "bob", "carol", "dave")] == ["s"] * 3 + [None]
    salt = "pepper"
    h = tmp_path / "hashed.txt"
    h.write_text("\n".join(salted_hash(salt, u) for u in ("alice", "bob")).upper() + "\n")
    hs = _segs(
        [{"name": "s", "match": {"users": {"file": str(h), "hashed": True}}, "release": "gray"}],
        env={"GATEWAY_USER_SALT": salt},
    )
    assert [_hit(hs, user=u) for u in ("alice", "bob", "carol")] == ["s", "s", None]


def test_users_file_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "beta.txt").write_text("u1\nu2\n")
    seg = {"name": "beta", "match": {"users": {"file": "lists/beta.txt"}}, "release": "gray"}
    doc = {"services": {"svc": {"releases": RELEASES, "segments": [seg]}}}

    cfg_file = tmp_path / "gw.yaml"
    cfg_file.write_text(yaml.safe_dump(doc))
    segs = C.load(str(cfg_file), env={}).services["svc"].segments
    assert segs is not None and _hit(segs, user="u2") == "beta"


def test_a_million_user_ids_load_fast_and_match_in_constant_time(tmp_path: Path) -> None:
    f = tmp_path / "million.txt"
    f.write_text("".join(f"user-{i}\n" for i in range(1_000_000)))
    t0 = time.perf_counter()
    segs = _one({"users": {"file": str(f)}})
    took = time.perf_counter() - t0
    print(f"\n1,000,000 user ids loaded in {took:.2f} s")
    assert _hit(segs, user="user-999999") == "s"
    assert _hit(segs, user="user-1000000") is None
    # The cycle collector tracks no container of the million keys: a full collection
    # would walk every entry of one (tens of milliseconds under a request).
    big = [
        o
        for o in gc.get_objects()
        if isinstance(o, set | frozenset | dict | list | tuple) and len(o) >= 1_000_000
    ]
    assert big == [], [type(o).__name__ for o in big]


# --------------------------------------------------------------------------- time windows


def _at(tz: str, *args: int) -> float:
    return dt.datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()  # type: ignore[misc]


BERLIN = "Europe/Berlin"
# 2026-11-27 is a Friday.
TIME_CASES = [
    ("wrap-opens-friday", {"from": "22:00", "to": "06:00", "days": ["fri"]}, (2026, 11, 27, 23, 0),
     True),
    ("wrap-from-inclusive", {"from": "22:00", "to": "06:00", "days": ["fri"]},
     (2026, 11, 27, 22, 0), True),
    ("wrap-before-from", {"from": "22:00", "to": "06:00", "days": ["fri"]}, (2026, 11, 27, 21, 59),
     False),
    ("wrap-saturday-morning-still-friday-window", {"from": "22:00", "to": "06:00",
     "days": ["fri"]}, (2026, 11, 28, 5, 59), True),
    ("wrap-to-exclusive", {"from": "22:00", "to": "06:00", "days": ["fri"]}, (2026, 11, 28, 6, 0),
     False),
    ("wrap-saturday-night-not-listed", {"from": "22:00", "to": "06:00", "days": ["fri"]},
     (2026, 11, 28, 23, 0), False),
    ("wrap-friday-morning-is-thursday-window", {"from": "22:00", "to": "06:00", "days": ["fri"]},
     (2026, 11, 27, 5, 0), False),
    ("day-window", {"from": "09:00", "to": "17:00"}, (2026, 11, 29, 12, 0), True),
    ("day-window-after", {"from": "09:00", "to": "17:00"}, (2026, 11, 29, 17, 0), False),
    ("whole-day-midnight", {"from": "00:00", "to": "00:00", "days": ["mon"]},
     (2026, 11, 30, 23, 59), True),
    ("whole-day-next-day", {"from": "00:00", "to": "00:00", "days": ["mon"]},
     (2026, 12, 1, 0, 0), False),
    ("whole-day-from-six-spans-into-tuesday", {"from": "06:00", "to": "06:00", "days": ["mon"]},
     (2026, 12, 1, 5, 59), True),
    ("whole-day-from-six-not-before", {"from": "06:00", "to": "06:00", "days": ["mon"]},
     (2026, 11, 30, 5, 59), False),
    ("sunday-to-monday-wrap", {"from": "23:00", "to": "01:00", "days": ["sun"]},
     (2026, 11, 30, 0, 30), True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("window", "local", "want"), [c[1:] for c in TIME_CASES], ids=[c[0] for c in TIME_CASES]
)
def test_time_window(window: dict[str, Any], local: tuple[int, ...], want: bool) -> None:
    segs = _one({"time": {**window, "tz": BERLIN}})
    assert (_hit(segs, now=_at(BERLIN, *local)) == "s") is want


def test_time_window_follows_daylight_saving() -> None:
    """09:00-10:00 Berlin wall clock is 08:00 UTC in winter and 07:00 UTC in summer."""
    w = TimeWindow(9 * 60, 10 * 60, ZoneInfo(BERLIN), frozenset(range(7)))
    utc = "UTC"
    # 2026-03-29 02:00 CET -> 03:00 CEST
    assert not w.holds(_at(utc, 2026, 3, 28, 7, 30))  # 08:30 CET
    assert w.holds(_at(utc, 2026, 3, 28, 8, 30))  # 09:30 CET
    assert w.holds(_at(utc, 2026, 3, 29, 7, 30))  # 09:30 CEST
    assert not w.holds(_at(utc, 2026, 3, 29, 8, 30))  # 10:30 CEST
    # 2026-10-25 03:00 CEST -> 02:00 CET
    assert w.holds(_at(utc, 2026, 10, 24, 7, 30))
    assert not w.holds(_at(utc, 2026, 10, 25, 7, 30))  # 08:30 CET
    assert w.holds(_at(utc, 2026, 10, 25, 8, 30))  # 09:30 CET


def test_time_window_answer_follows_the_injected_clock() -> None:
    segs = _one({"time": {"from": "22:00", "to": "06:00", "tz": "UTC"}})
    night, day = _at("UTC", 2026, 11, 29, 23, 0), _at("UTC", 2026, 11, 29, 12, 0)
    assert [_hit(segs, now=t) for t in (night, day, night + 30, day + 59)] == ["s", None, "s", None]


# --------------------------------------------------------------------------- precedence


_TABLES: dict[tuple[str, tuple[tuple[str, float], ...]], WeightTable] = {}


def _decide(
    cfg: C.Config,
    headers: list[tuple[str, str]],
    *,
    trusted: bool = True,
    available: frozenset[str] = frozenset({"stable", "gray"}),
    rng: random.Random | None = None,
    mint: bool = False,
) -> Decision | None:
    sv = cfg.services["svc"]
    segs = sv.segments
    weights = tuple((r.name, r.weight) for r in sv.releases.values())
    table = _TABLES.get((sv.salt, weights))
    if table is None:  # the service's split, built once as the snapshot does
        table = _TABLES[(sv.salt, weights)] = WeightTable.build(sv.salt, dict(weights))
    d = dict((n.lower(), v) for n, v in headers)
    user = d.get("x-user-id")
    hit = None
    if segs is not None:
        hit = segs.evaluate(
            [(n.encode(), v.encode()) for n, v in headers], "/", b"/", b"GET", "1.2.3.4", user,
            lambda: 0.0,
        )  # fmt: skip
    return choose_release(
        table,
        baseline="stable",
        available=available,
        stage_header=d.get("x-release-stage"),
        stage_cookie=None,
        user_key=user,
        trusted=trusted,
        rng=rng or random.Random(1),
        mint_uid=mint,
        segment=hit[0] if hit else None,
        segment_key=hit[1] if hit else None,
    )


STAFF = {"name": "staff", "match": {"header": {"X-Employee": "true"}}, "release": "gray"}
HALF = {"name": "half", "match": {"header": {"X-Region": {"prefix": "cn"}}},
        "weights": {"stable": 50, "gray": 50}, "sticky_by": {"header": "X-Org"}}  # fmt: skip
STABLE_SEG = {"name": "pinned", "match": {"header": {"X-Pin": "1"}}, "release": "stable"}

PRECEDENCE = [
    ("trusted-stage-header-beats-segment",
     [("X-Employee", "true"), ("X-Release-Stage", "stable")], True,
     ("stable", REASON_HEADER, None)),
    ("untrusted-stage-header-ignored", [("X-Employee", "true"), ("X-Release-Stage", "stable")],
     False, ("gray", REASON_SEGMENT, "staff")),
    ("segment-beats-sticky-key", [("X-Employee", "true"), ("X-User-ID", "u1")], True,
     ("gray", REASON_SEGMENT, "staff")),
    ("first-match-wins", [("X-Pin", "1"), ("X-Employee", "true")], True,
     ("gray", REASON_SEGMENT, "staff")),
    ("second-segment", [("X-Pin", "1")], True, ("stable", REASON_SEGMENT, "pinned")),
    ("no-segment-hash", [("X-User-ID", "u1")], True, (None, REASON_HASH, None)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("headers", "trusted", "want"), [c[1:] for c in PRECEDENCE], ids=[c[0] for c in PRECEDENCE]
)
def test_precedence(
    headers: list[tuple[str, str]], trusted: bool, want: tuple[str | None, str, str | None]
) -> None:
    d = _decide(_cfg([STAFF, STABLE_SEG]), headers, trusted=trusted)
    assert d is not None
    release, reason, segment = want
    if release is not None:
        assert d.release == release
    assert (d.reason, d.segment) == (reason, segment)


def test_segment_release_without_endpoints_falls_back_to_the_baseline() -> None:
    d = _decide(_cfg([STAFF]), [("X-Employee", "true")], available=frozenset({"stable"}))
    assert d is not None
    assert (d.release, d.reason, d.chosen, d.segment) == (
        "stable",
        REASON_FALLBACK,
        "gray",
        "staff",
    )


def test_weighted_segment_without_key_is_random_and_mints_a_cookie_when_asked() -> None:
    cfg = _cfg([{"name": "h", "match": {"header": {"X-Region": {"prefix": "cn"}}},
                 "weights": {"stable": 50, "gray": 50}}])  # fmt: skip
    rng = random.Random(3)
    seen = {_decide(cfg, [("X-Region", "cn-1")], rng=rng).release for _ in range(50)}  # type: ignore[union-attr]
    assert seen == {"stable", "gray"}
    d = _decide(cfg, [("X-Region", "cn-1")], mint=True)
    assert d is not None and d.set_cookie is not None and d.segment == "h"
    again = _decide(cfg, [("X-Region", "cn-1"), ("X-User-ID", d.set_cookie)])
    assert again is not None and again.release == d.release  # the minted uid keys it next time


def test_sticky_by_keys_the_split_and_no_cookie_is_minted_for_it() -> None:
    cfg = _cfg([HALF])
    by_org = {
        org: _decide(cfg, [("X-Region", "cn-1"), ("X-Org", org), ("X-User-ID", f"u{i}")])
        for i, org in enumerate(["o1", "o2", "o3", "o4", "o5", "o6"])
    }
    for org, d in by_org.items():  # every user of an org lands where the org does
        for i in range(5):
            e = _decide(cfg, [("X-Region", "cn-9"), ("X-Org", org), ("X-User-ID", f"x{i}")])
            assert e is not None and d is not None and e.release == d.release
    d = _decide(cfg, [("X-Region", "cn-1")], mint=True)
    assert d is not None and d.set_cookie is None


def _segment_split(weights: dict[str, float], users: list[str]) -> dict[str, str]:
    cfg = _cfg([{"name": "half", "match": {"header": {"X-Beta": "1"}}, "weights": weights}])
    out = {}
    for u in users:
        d = _decide(cfg, [("X-Beta", "1"), ("X-User-ID", u)])
        assert d is not None and d.segment == "half"
        out[u] = d.release
    return out


def test_weighted_segment_is_exact_sticky_and_monotone() -> None:
    users = [f"user-{i}" for i in range(100_000)]
    first = _segment_split({"stable": 50, "gray": 50}, users)
    share = sum(r == "gray" for r in first.values()) / len(users) * 100
    print(f"\ngray share in a 50/50 segment over 100,000 users: {share:.2f} %")
    assert abs(share - 50.0) <= 0.5
    # sticky: a new config of the same weights agrees on every user
    assert _segment_split({"stable": 50, "gray": 50}, users) == first
    raised = _segment_split({"stable": 50, "gray": 60}, users)
    moved = [u for u in users if raised[u] != first[u]]
    assert moved and all(first[u] == "stable" and raised[u] == "gray" for u in moved)
    # independent of the service's own split (salted <service>/<segment>)
    service = WeightTable.build("svc", {"stable": 50, "gray": 50})
    agree = sum(service.pick_hash(u) == first[u] for u in users) / len(users)
    assert 0.45 < agree < 0.55


def test_users_outside_every_segment_keep_their_release() -> None:
    users = [f"user-{i}" for i in range(100_000)]
    plain = _cfg([])
    segmented = _cfg([
        {"name": "beta", "match": {"users": users[:5000]}, "release": "gray"},
        {"name": "staff", "match": {"header": {"X-Employee": "true"}}, "release": "gray"},
        HALF,
    ])  # fmt: skip
    for u in users[5000:]:
        a = _decide(plain, [("X-User-ID", u)])
        b = _decide(segmented, [("X-User-ID", u)])
        assert a is not None and b is not None
        assert (b.release, b.reason, b.segment) == (a.release, REASON_HASH, None)
    assert all(_decide(segmented, [("X-User-ID", u)]).segment == "beta" for u in users[:5000])  # type: ignore[union-attr]


def test_explain_names_the_segment() -> None:
    snap = build_snapshot(_cfg([STAFF, HALF]))
    ex = explain(snap, "svc", headers=[("X-Employee", "true")])
    assert ex.to_json() | {"trusted": True} == {
        "service": "svc",
        "release": "gray",
        "reason": "segment",
        "key": None,
        "chosen": "gray",
        "trusted": True,
        "segment": "staff",
    }
    assert explain(snap, "svc", headers=[("X-User-ID", "u")]).segment is None


# --------------------------------------------------------------------------- config errors

_OK = {"name": "s", "match": {"header": {"X-A": "1"}}, "release": "gray"}


def _with(**over: Any) -> dict[str, Any]:
    return {**_OK, **over}


BAD = [
    ("not-a-list", {"name": "x"}, "services.svc.segments"),
    ("unknown-field", [_with(colour="red")], "services.svc.segments[0].colour"),
    ("missing-name", [{"match": {"method": ["GET"]}, "release": "gray"}],
     "services.svc.segments[0].name"),
    ("bad-name", [_with(name="a b")], "services.svc.segments[0].name"),
    ("duplicate-name", [_OK, _OK], "services.svc.segments[1].name"),
    ("missing-match", [{"name": "s", "release": "gray"}], "services.svc.segments[0].match"),
    ("unknown-match-key", [_with(match={"colour": "red"})],
     "services.svc.segments[0].match.colour"),
    ("release-and-weights", [_with(weights={"gray": 1})], "services.svc.segments[0]"),
    ("neither-release-nor-weights", [{"name": "s", "match": {"method": ["GET"]}}],
     "services.svc.segments[0]"),
    ("unknown-release", [_with(release="blue")], "services.svc.segments[0].release"),
    ("weights-unknown-release",
     [{"name": "s", "match": {"method": ["GET"]}, "weights": {"blue": 1}}],
     "services.svc.segments[0].weights.blue"),
    ("negative-weight", [{"name": "s", "match": {"method": ["GET"]},
     "weights": {"stable": -1, "gray": 1}}], "services.svc.segments[0].weights.stable"),
    ("all-zero-weights", [{"name": "s", "match": {"method": ["GET"]},
     "weights": {"stable": 0, "gray": 0}}], "services.svc.segments[0].weights"),
    ("bool-weight", [{"name": "s", "match": {"method": ["GET"]},
     "weights": {"stable": True}}], "services.svc.segments[0].weights.stable"),
    ("sticky-by-without-weights", [_with(sticky_by={"header": "X-Org"})],
     "services.svc.segments[0].sticky_by"),
    ("sticky-by-bad", [{"name": "s", "match": {"method": ["GET"]}, "weights": {"gray": 1},
     "sticky_by": {"query": "x"}}], "services.svc.segments[0].sticky_by"),
    ("bad-regex", [_with(match={"header": {"X-A": {"regex": "(?=x)"}}})],
     "services.svc.segments[0].match.header.X-A.regex"),
    ("backreference-regex", [_with(match={"query": {"a": {"regex": "(a)\\1"}}})],
     "services.svc.segments[0].match.query.a.regex"),
    ("unknown-value-test", [_with(match={"header": {"X-A": {"glob": "*"}}})],
     "services.svc.segments[0].match.header.X-A"),
    ("yaml-bool-value", [_with(match={"header": {"X-A": {"prefix": True}}})],
     "services.svc.segments[0].match.header.X-A.prefix"),
    ("present-false", [_with(match={"header": {"X-A": {"present": False}}})],
     "services.svc.segments[0].match.header.X-A.present"),
    ("empty-in", [_with(match={"cookie": {"c": {"in": []}}})],
     "services.svc.segments[0].match.cookie.c.in"),
    ("bad-header-name", [_with(match={"header": {"X A": "1"}})],
     "services.svc.segments[0].match.header.X A"),
    ("bad-path", [_with(match={"path": {"glob": "/x"}})], "services.svc.segments[0].match.path"),
    ("bad-method", [_with(match={"method": "GET"})], "services.svc.segments[0].match.method"),
    ("cidr-typo", [_with(match={"cidrs": ["10.0.0.0/8", "10.1.0/33"]})],
     "services.svc.segments[0].match.cidrs[1]"),
    ("bad-time-zone", [_with(match={"time": {"from": "22:00", "to": "06:00", "tz": "Mars/Base"}})],
     "services.svc.segments[0].match.time.tz"),
    ("unquoted-time", [_with(match={"time": {"from": 1320, "to": "06:00"}})],
     "services.svc.segments[0].match.time.from"),
    ("bad-hour", [_with(match={"time": {"from": "24:00", "to": "06:00"}})],
     "services.svc.segments[0].match.time.from"),
    ("missing-to", [_with(match={"time": {"from": "22:00"}})],
     "services.svc.segments[0].match.time.to"),
    ("bad-day", [_with(match={"time": {"from": "22:00", "to": "06:00", "days": ["funday"]}})],
     "services.svc.segments[0].match.time.days"),
    ("missing-file", [_with(match={"users": {"file": "/nonexistent/beta.txt"}})],
     "services.svc.segments[0].match.users.file"),
    ("hashed-without-salt", [_with(match={"users": {"file": "/dev/null", "hashed": True}})],
     "services.svc.segments[0].match.users.hashed"),
    ("users-not-strings", [_with(match={"users": [1, 2]})], "services.svc.segments[0].match.users"),

]  # fmt: skip


@pytest.mark.parametrize(("segments", "field"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_segments_name_the_field(segments: object, field: str) -> None:
    doc = {"services": {"svc": {"releases": RELEASES, "segments": segments}}}
    with pytest.raises(ConfigError) as e:
        C.build(doc, env={})
    assert field in [p for p, _ in e.value.errors], e.value.lines()


@pytest.mark.parametrize(
    "line",
    ["z" * 64, "ab" * 31, salted_hash("s", "alice") + "0"],
    ids=["not-hex", "too-short", "too-long"],
)
def test_hashed_user_file_must_hold_sha256_hex(tmp_path: Path, line: str) -> None:
    f = tmp_path / "hashed.txt"
    f.write_text(salted_hash("s", "bob") + "\n" + line + "\n")
    seg = {"name": "s", "match": {"users": {"file": str(f), "hashed": True}}, "release": "gray"}
    with pytest.raises(ConfigError) as e:
        _cfg([seg], env={"GATEWAY_USER_SALT": "s"})
    assert [p for p, _ in e.value.errors] == ["services.svc.segments[0].match.users.file"]
    assert repr(line) in e.value.lines()[0]


def test_gateway_check_exits_2_naming_every_segment_field(tmp_path: Path) -> None:
    doc = {"services": {"svc": {"releases": RELEASES, "segments": [
        {"name": "a", "match": {"header": {"X-A": {"regex": "(?<=x)"}}, "cidrs": ["300.0.0.0/8"],
                                "users": {"file": "missing.txt"},
                                "time": {"from": "22:00", "to": "06:00", "tz": "Nowhere/City"}},
         "weights": {"stable": -5, "blue": 1}},
    ]}}}  # fmt: skip
    f = tmp_path / "gw.yaml"
    f.write_text(yaml.safe_dump(doc))
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(f)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    out = r.stdout + r.stderr
    for field in (
        "segments[0].match.header.X-A.regex",
        "segments[0].match.cidrs[0]",
        "segments[0].match.users.file",
        "segments[0].match.time.tz",
        "segments[0].weights.stable",
        "segments[0].weights.blue",
    ):
        assert field in out, out


def test_reload_compares_equal_unless_something_changed(tmp_path: Path) -> None:
    f = tmp_path / "u.txt"
    f.write_text("a\nb\n")
    segs = [{"name": "u", "match": {"users": {"file": str(f)}}, "release": "gray"}]
    assert _cfg(segs) == _cfg(segs)
    f.write_text("a\nb\nc\n")  # re-read on reload: a changed file is a changed config
    before = _cfg(segs)
    f.write_text("a\n")
    assert _cfg(segs) != before


def test_the_policy_benchmark_segments_case(tmp_path: Path) -> None:
    """benchmarks.policy --segments: 10 valid segments; its users hit only the 1M list, 1 in 10."""
    from benchmarks import policy

    users = [f"bench-{i}" for i in range(200)]
    segs = _segs(policy.segments_case(tmp_path / "beta.txt", users[::10]))
    assert len(segs.segments) == 10
    got = [_hit(segs, [("Host", "h")], target="/1k", user=u) for u in users]
    assert got == [("beta" if i % 10 == 0 else None) for i in range(200)]
    r = policy.measure_segments(rounds=1, heads_n=50)
    assert r["none_us"] > 0 and r["segments_us"] > 0


# --------------------------------------------------------------------------- the cheap scan

LONG = "X-" + "L" * 70  # longer than the length filter's table: every line is looked at

SCAN = [
    # (segments' matches in order, request headers, target, method, expected segment)
    ("length-filtered-miss", [{"header": {"X-Region": "n"}}], [("X-Regio1", "n")], "/", "GET",
     None),
    ("any-case-name", [{"header": {"X-Region": "n"}}], [("x-REGION", "n")], "/", "GET", "s0"),
    ("same-length-as-cookie", [{"header": {"X-Tier": "a"}}, {"cookie": {"b": "1"}}],
     [("Cookie", "b=1"), ("X-Tier", "z")], "/", "GET", "s1"),
    ("cookie-without-header-rules", [{"cookie": {"b": "1"}}], [("COOKIE", "a=2; b=1")], "/",
     "GET", "s0"),
    ("long-header-name", [{"header": {LONG: "v"}}], [("Host", "h"), (LONG.lower(), "v")], "/",
     "GET", "s0"),
    ("long-name-absent", [{"header": {LONG: {"absent": True}}}], [("Host", "h")], "/", "GET",
     "s0"),
    ("absent-gate-with-no-wanted-lines", [{"header": {"X-A": {"absent": True}}}], [], "/", "GET",
     "s0"),
    ("gated-by-header-skips-to-next", [{"header": {"X-A": "1"}}, {"method": ["POST"]}], [], "/",
     "POST", "s1"),
    ("query-gate", [{"query": {"q": "1"}}], [], "/p?q=1", "GET", "s0"),
    ("query-gate-no-query", [{"query": {"q": {"absent": True}}}], [], "/p", "GET", "s0"),
    ("method-list", [{"method": ["PUT", "GET"]}], [], "/", "GET", "s0"),
    ("method-case-sensitive", [{"method": ["GET"]}], [], "/", "get", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("matches", "headers", "target", "method", "expected"),
    [c[1:] for c in SCAN],
    ids=[c[0] for c in SCAN],
)
def test_the_precomputed_scan_reads_what_the_rules_need(
    matches: list[dict[str, Any]],
    headers: list[tuple[str, str]],
    target: str,
    method: str,
    expected: str | None,
) -> None:
    segs = _segs([{"name": f"s{i}", "match": m, "release": "gray"} for i, m in enumerate(matches)])
    assert _hit(segs, headers, target=target, method=method) == expected


def test_a_salted_user_hash_is_computed_once_for_every_hashed_list(tmp_path: Path) -> None:
    salt = "pepper"
    for name, keys in (("a.txt", ["alice"]), ("b.txt", ["bob"])):
        (tmp_path / name).write_text("".join(salted_hash(salt, k) + "\n" for k in keys))
    segs = _segs(
        [
            {
                "name": "a",
                "match": {"users": {"file": str(tmp_path / "a.txt"), "hashed": True}},
                "release": "gray",
            },
            {
                "name": "b",
                "match": {"users": {"file": str(tmp_path / "b.txt"), "hashed": True}},
                "release": "stable",
            },
        ],  # fmt: skip
        env={"GATEWAY_USER_SALT": salt},
    )
    assert _hit(segs, user="alice") == "a"
    assert _hit(segs, user="bob") == "b"
    assert _hit(segs, user="carol") is None
