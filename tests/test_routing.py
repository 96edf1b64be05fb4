"""Pure routing policy: service match, overrides, and the sticky/exact/monotone split."""

from __future__ import annotations

import ipaddress
import math
import random
import sys

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import routing
from gateway.routing import (
    Decision,
    ServiceMatcher,
    TrustPolicy,
    WeightTable,
    choose_release,
    cookie_value,
    normalize_host,
)

KEYS = [f"user-{i}" for i in range(100_000)]


def assign(table: WeightTable, keys: list[str] = KEYS) -> list[str | None]:
    return [table.pick_hash(k) for k in keys]


@pytest.mark.parametrize(
    "weights",
    [
        {"stable": 95, "gray": 5},
        {"stable": 90, "gray": 10},
        {"stable": 1, "gray": 1},
        {"stable": 80, "batch-1": 15, "batch-2": 5},
        {"stable": 19, "gray": 1},  # normalized: need not sum to 100
        {"a": 25, "b": 25, "c": 25, "d": 25},
    ],
    ids=["95-5", "90-10", "1-1", "three", "19-1", "four"],
)
def test_exact_shares_over_100k_keys(weights: dict[str, float]) -> None:
    table = WeightTable.build("svc", weights)
    got = assign(table)
    total = sum(weights.values())
    for rel, w in weights.items():
        share = got.count(rel) / len(got) * 100
        assert abs(share - w / total * 100) <= 0.5, (rel, share)


def test_sticky_same_key_same_release_across_rebuilds() -> None:
    a = WeightTable.build("svc", {"stable": 95, "gray": 5})
    b = WeightTable.build("svc", {"stable": 95, "gray": 5})
    assert assign(a, KEYS[:20_000]) == assign(b, KEYS[:20_000])


def test_salt_changes_assignment() -> None:
    a = assign(WeightTable.build("svc-a", {"stable": 50, "gray": 50}), KEYS[:2000])
    b = assign(WeightTable.build("svc-b", {"stable": 50, "gray": 50}), KEYS[:2000])
    assert a != b


@pytest.mark.parametrize(
    ("before", "after", "changed"),
    [
        ({"stable": 95, "gray": 5}, {"stable": 95, "gray": 10}, "gray"),
        ({"stable": 95, "gray": 5}, {"stable": 95, "gray": 50}, "gray"),
        ({"stable": 95, "gray": 10}, {"stable": 95, "gray": 5}, "gray"),
        ({"stable": 80, "b1": 15, "b2": 5}, {"stable": 80, "b1": 15, "b2": 20}, "b2"),
        ({"stable": 80, "b1": 15, "b2": 5}, {"stable": 40, "b1": 15, "b2": 5}, "stable"),
        ({"stable": 100, "gray": 0}, {"stable": 100, "gray": 1}, "gray"),
    ],
    ids=["gray-5-10", "gray-5-50", "gray-10-5", "three-raise-b2", "three-lower-stable", "from-0"],
)
def test_monotone_keys_move_only_into_or_out_of_the_changed_release(
    before: dict[str, float], after: dict[str, float], changed: str
) -> None:
    old = assign(WeightTable.build("svc", before), KEYS[:50_000])
    new = assign(WeightTable.build("svc", after), KEYS[:50_000])
    raised = after[changed] > before[changed]
    moved = 0
    for o, n in zip(old, new, strict=True):
        if o != n:
            moved += 1
            assert (n == changed) if raised else (o == changed), (o, n)
    assert moved > 0


def test_raising_gray_keeps_every_gray_user() -> None:
    old = assign(WeightTable.build("svc", {"stable": 95, "gray": 5}))
    new = assign(WeightTable.build("svc", {"stable": 95, "gray": 10}))
    former = [i for i, r in enumerate(old) if r == "gray"]
    assert former and all(new[i] == "gray" for i in former)


@settings(max_examples=40, deadline=None)
@given(
    w=st.lists(st.integers(min_value=1, max_value=1000), min_size=2, max_size=5),
    idx=st.integers(min_value=0, max_value=4),
    new_w=st.integers(min_value=0, max_value=2000),
)
def test_monotone_property(w: list[int], idx: int, new_w: int) -> None:
    names = [f"r{i}" for i in range(len(w))]
    idx %= len(w)
    before = dict(zip(names, map(float, w), strict=True))
    after = dict(before)
    after[names[idx]] = float(new_w)
    if not any(after.values()):
        return
    keys = KEYS[:2000]
    old = assign(WeightTable.build("p", before), keys)
    new = assign(WeightTable.build("p", after), keys)
    for o, n in zip(old, new, strict=True):
        if o != n:
            assert names[idx] in (o, n)


def test_zero_weight_release_gets_no_keys_and_random_skips_it() -> None:
    t = WeightTable.build("svc", {"stable": 1, "gray": 0})
    assert set(assign(t, KEYS[:1000])) == {"stable"}
    rng = random.Random(1)
    assert {t.pick_random(rng) for _ in range(1000)} == {"stable"}


def test_random_pick_follows_weights() -> None:
    t = WeightTable.build("svc", {"stable": 90, "gray": 10})
    rng = random.Random(7)
    picks = [t.pick_random(rng) for _ in range(100_000)]
    assert abs(picks.count("gray") / 1000 - 10) < 0.6


# --------------------------------------------------------------------------- choose_release

TABLE = WeightTable.build("svc", {"stable": 95, "gray": 5, "canary": 0})
BOTH = frozenset({"stable", "gray", "canary"})


def _args(**kw: object) -> dict[str, object]:
    """choose_release's arguments for a trusted client with nothing to go by, and `kw`."""
    args: dict[str, object] = {
        "baseline": "stable",
        "available": BOTH,
        "stage_header": None,
        "stage_cookie": None,
        "user_key": None,
        "trusted": True,
        "rng": random.Random(3),
    }
    args.update(kw)
    return args


def _choose(**kw: object) -> tuple[str, str] | None:
    d = choose_release(TABLE, **_args(**kw))  # type: ignore[arg-type]
    return None if d is None else (d.release, d.reason)


@pytest.mark.parametrize(
    ("kw", "want"),
    [
        ({"stage_header": "gray"}, ("gray", "header")),
        ({"stage_header": "canary"}, ("canary", "header")),  # weight 0 still forceable
        ({"stage_cookie": "gray"}, ("gray", "cookie")),
        ({"stage_header": "gray", "stage_cookie": "stable"}, ("gray", "header")),
        ({"stage_header": "nope", "stage_cookie": "gray"}, ("gray", "cookie")),
        ({"stage_header": "gray", "trusted": False, "user_key": "k"}, None),
        ({"stage_header": "nope", "user_key": "k"}, None),
        ({"stage_header": "gray", "available": frozenset({"stable"})}, ("stable", "fallback")),
        ({"stage_header": "gray", "available": frozenset()}, "none"),
    ],
    ids=[
        "header",
        "header-zero-weight",
        "cookie",
        "header-beats-cookie",
        "unknown-header-ignored",
        "untrusted-ignored",
        "unknown-value-hash",
        "fallback",
        "nothing-available",
    ],
)
def test_choose_release_order(kw: dict[str, object], want: object) -> None:
    got = _choose(**kw)
    if want is None:  # falls through to the sticky hash of "k"
        assert got == (TABLE.pick_hash("k"), "hash")
    elif want == "none":
        assert got is None
    else:
        assert got == want


_CHOICES = {
    "header": {"stage_header": "gray"},
    "hash": {"user_key": "k"},
    "fallback": {"stage_header": "gray", "available": frozenset({"stable"})},
    "minted": {"mint_uid": True},
    "lane-rejected": {"lane_unserved": "blue", "lane_reject": True},
}


@pytest.mark.parametrize("before", list(_CHOICES), ids=list(_CHOICES))
@pytest.mark.parametrize("now", list(_CHOICES), ids=list(_CHOICES))
def test_choose_release_into_a_used_decision_is_a_new_ones(before: str, now: str) -> None:
    """The handler passes one Decision for every request: it ends up as a new one would be."""

    def choose(kw: dict[str, object], into: Decision | None = None) -> Decision | None:
        return choose_release(TABLE, **_args(into=into, **kw))  # type: ignore[arg-type]

    used = choose(_CHOICES[before])
    assert used is not None
    used.client, used.trusted, used.lane = "10.0.0.1", True, "blue"  # as decide sets them
    used.strip_tag = used.strip_baggage = True
    again, fresh = choose(_CHOICES[now], into=used), choose(_CHOICES[now])
    assert again is used and fresh is not None
    # Every field: a compiled class lists them in __mypyc_attrs__ (it has no __slots__).
    fields: tuple[str, ...] = getattr(Decision, "__mypyc_attrs__", None) or Decision.__slots__
    assert [getattr(again, f) for f in fields] == [getattr(fresh, f) for f in fields]


def test_choose_release_into_a_used_decision_lets_the_one_before_go() -> None:
    """Compiled, too (tests/test_compiled_build.py runs this file): nothing of it is kept."""
    key = "".join(["us", "er-7"])  # an object of its own, counted
    refs = sys.getrefcount(key)
    d = choose_release(TABLE, **_args(user_key=key))  # type: ignore[arg-type]
    held = sys.getrefcount(key)  # counted apart: pytest's assert holds what it shows
    assert d is not None and held == refs + 1
    again = choose_release(TABLE, **_args(user_key="k", into=d))  # type: ignore[arg-type]
    after = sys.getrefcount(key)
    assert again is d and after == refs


def test_no_key_random_and_sticky_cookie_minting() -> None:
    d = choose_release(
        TABLE,
        baseline="stable",
        available=BOTH,
        stage_header=None,
        stage_cookie=None,
        user_key=None,
        trusted=True,
        rng=random.Random(5),
        mint_uid=True,
    )
    assert d is not None and d.reason == "random" and d.set_cookie
    assert d.release == TABLE.pick_hash(d.set_cookie)  # the next request lands the same


@pytest.mark.parametrize(
    ("trust", "ip", "want"),
    [
        (True, "203.0.113.9", True),
        (False, "127.0.0.1", False),
        ([ipaddress.ip_network("10.0.0.0/8")], "10.1.2.3", True),
        ([ipaddress.ip_network("10.0.0.0/8")], "11.1.2.3", False),
        ([ipaddress.ip_network("10.0.0.0/8")], "::ffff:10.1.2.3", True),
        ([ipaddress.ip_network("::1/128")], "::1", True),
        ([ipaddress.ip_network("10.0.0.0/8")], "garbage", False),
    ],
    ids=["all", "none", "in-cidr", "outside", "v4-mapped", "v6", "bad-ip"],
)
def test_trust_policy(trust: object, ip: str, want: bool) -> None:
    assert TrustPolicy(trust).trusted(ip) is want  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "name", "want"),
    [
        ("uid=abc", "uid", "abc"),
        ("a=1; uid=abc; b=2", "uid", "abc"),
        ("xuid=1; uid=2", "uid", "2"),
        ('uid="quoted"', "uid", "quoted"),
        ("a=1", "uid", None),
        ("", "uid", None),
        ("uid", "uid", None),
    ],
    ids=["single", "middle", "suffix-name", "quoted", "absent", "empty", "no-value"],
)
def test_cookie_value(header: str, name: str, want: str | None) -> None:
    assert cookie_value(header, name) == want


# --------------------------------------------------------------------------- service match

MATCHER = ServiceMatcher(
    [
        ("exact", ["api.example.com"], "/"),
        ("exact-v2", ["api.example.com"], "/v2"),
        ("wild", ["*.example.com"], "/"),
        ("any", [], "/"),
        ("any-cat", [], "/catalog"),
    ]
)


@pytest.mark.parametrize(
    ("host", "path", "want"),
    [
        ("api.example.com", "/x", "exact"),
        ("API.example.com:8080", "/x", "exact"),
        ("api.example.com", "/v2/users", "exact-v2"),
        ("api.example.com", "/v2", "exact-v2"),
        ("api.example.com", "/v20", "exact"),
        ("shop.example.com", "/", "wild"),
        ("example.com", "/", "any"),
        ("other.org", "/catalog/1", "any-cat"),
        (None, "/", "any"),
    ],
    ids=[
        "exact",
        "case-port",
        "longest-prefix",
        "prefix-equal",
        "segment-boundary",
        "wildcard",
        "wildcard-needs-subdomain",
        "any-host-prefix",
        "no-host",
    ],
)
def test_service_match(host: str | None, path: str, want: str) -> None:
    assert MATCHER.match(host, path) == want
    # The data path's form: the Host field's bytes as received.
    assert MATCHER.match_field(None if host is None else host.encode(), path) == want


@pytest.mark.parametrize(
    ("host", "path", "want"),
    [
        (b"a.example", "/api/x", "prefixed"),
        (None, "/", "root"),
        (b"b.example", "/", "root"),
        (None, "*", None),  # OPTIONS *: not a path under "/"
        (None, "", None),
    ],
    ids=["any-host-prefix", "no-host", "host-not-named", "asterisk-form", "empty-path"],
)
def test_service_match_without_host_names(host: bytes | None, path: str, want: str | None) -> None:
    m = ServiceMatcher([("root", [], "/"), ("prefixed", [], "/api")])
    assert m.match_field(host, path) == want
    assert m.match(None if host is None else host.decode(), path) == want


def test_two_services_at_the_root_the_first_in_config_order_wins() -> None:
    m = ServiceMatcher([("first", [], "/"), ("second", [], "/"), ("api", [], "/api")])
    assert (m.match(None, "/x"), m.match(None, "/api/1"), m.match(None, "*")) == (
        "first",
        "api",
        None,
    )
    assert m.match(None, "") is None  # no path: not the root service's either


def test_no_service_matches() -> None:
    m = ServiceMatcher([("only", ["a.example"], "/api")])
    assert m.match("a.example", "/other") is None
    assert m.match("b.example", "/api") is None


@pytest.mark.parametrize(
    ("raw", "want"),
    [("Example.COM:443", "example.com"), ("[::1]:8080", "[::1]"), ("host.", "host"), ("", "")],
    ids=["port-case", "ipv6", "trailing-dot", "empty"],
)
def test_normalize_host(raw: str, want: str) -> None:
    assert normalize_host(raw) == want


def _reference_score(key: str, seed: int, inv_weight: float) -> float:
    """The score as first defined: the unsigned 64-bit hash as a Python integer."""
    u = mmh3.hash64(key, seed, signed=False)[0]
    return math.log((u + 0.5) / float(2**64)) * inv_weight


def test_scores_equal_the_big_integer_definition_so_no_user_moves() -> None:
    """Sticky across restarts: the score must not change between versions or builds.

    README "How routing decides".
    """
    rng = random.Random(11)
    for i in range(50_000):
        key, seed, inv = (
            f"user-{rng.getrandbits(48)}",
            rng.getrandbits(32),
            1 / rng.choice((1, 5, 33.3, 95)),
        )
        assert routing.hrw_score(key, seed, inv) == _reference_score(key, seed, inv), i
    # Non-ASCII (hashed as UTF-8), empty and long keys, every tail length of a 16-byte block.
    odd = ["", "é", "用户-42", "\x00\xff", "a" * 1000, *("k" * n for n in range(1, 17))]
    for key in odd:
        for seed in (0, 1, 2**31, 2**32 - 1):
            assert routing.hrw_score(key, seed, 0.5) == _reference_score(key, seed, 0.5), key
    edges = [0, 1, -1, 2**63 - 1, -(2**63), 2**52 + 1, 2**53 + 1, -(2**53) - 1, -(2**52) - 1]
    for h in edges + [rng.getrandbits(64) - 2**63 for _ in range(50_000)]:
        u = h + 2**64 if h < 0 else h
        assert routing._score(h, 0.5) == math.log((u + 0.5) / float(2**64)) * 0.5
    table = WeightTable.build("salt", {"stable": 95, "gray": 5})
    for key in [*KEYS[:5_000], *odd]:
        want = max(table._live, key=lambda e: _reference_score(key, e.seed, e.inv)).name
        assert table.pick_hash(key) == want
