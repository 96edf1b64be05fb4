"""Endpoint choice inside a release."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway.balancer import Pool, SlotGroup, SlotRegistry
from gateway.config import Endpoint, OutlierConfig

EPS = (Endpoint("10.0.0.1", 80, 1), Endpoint("10.0.0.2", 80, 3))


def test_round_robin_honours_weights_smoothly() -> None:
    pool = Pool(EPS, "round_robin", random.Random(1))
    seq = [pool.pick().endpoint.host for _ in range(8)]  # type: ignore[union-attr]
    assert Counter(seq) == {"10.0.0.1": 2, "10.0.0.2": 6}
    assert seq[:4].count("10.0.0.1") == 1  # interleaved, not bursty


def test_p2c_prefers_least_outstanding() -> None:
    pool = Pool((Endpoint("a", 1), Endpoint("b", 1)), "p2c", random.Random(2))
    pool.slots[0].outstanding = 10
    picks = Counter(pool.pick().endpoint.host for _ in range(200))  # type: ignore[union-attr]
    assert picks["b"] == 200


def test_p2c_weights_spread_load() -> None:
    pool = Pool(EPS, "p2c", random.Random(3))
    picks = Counter(pool.pick().endpoint.host for _ in range(4000))  # type: ignore[union-attr]
    assert picks["10.0.0.1"] > 500 and picks["10.0.0.2"] > 500  # both used when idle


@pytest.mark.parametrize("key", ["alice", "bob", "carol"], ids=["a", "b", "c"])
def test_hash_is_sticky_per_key(key: str) -> None:
    p1 = Pool(EPS, "hash", random.Random(1))
    p2 = Pool(EPS, "hash", random.Random(99))
    assert {p1.pick(key).endpoint for _ in range(20)} == {p2.pick(key).endpoint}  # type: ignore[union-attr]


def test_hash_honours_weights() -> None:
    pool = Pool(EPS, "hash", random.Random(1))
    picks = Counter(pool.pick(f"k{i}").endpoint.host for i in range(20000))  # type: ignore[union-attr]
    assert abs(picks["10.0.0.2"] / 20000 - 0.75) < 0.02


def test_empty_pool_picks_nothing() -> None:
    assert Pool((), "p2c", random.Random()).pick() is None


def test_pools_of_one_group_share_in_flight_counts() -> None:
    group = SlotGroup()
    old = Pool(EPS, "p2c", random.Random(), group)
    started = old.slots[1]
    started.outstanding += 1  # a request picked from the old snapshot's pool
    new = Pool(EPS + (Endpoint("10.0.0.3", 80),), "p2c", random.Random(), group)
    assert [s.outstanding for s in new.slots] == [0, 1, 0]
    started.outstanding -= 1  # it finishes after the swap
    assert [s.outstanding for s in new.slots] == [0, 0, 0]


def test_a_new_weight_for_the_same_address_keeps_the_count() -> None:
    group = SlotGroup()
    old = Pool(EPS, "p2c", random.Random(), group)
    old.slots[0].outstanding = 2
    new = Pool((Endpoint("10.0.0.1", 80, 5), EPS[1]), "p2c", random.Random(), group)
    assert (new.slots[0].weight, new.slots[0].outstanding) == (5, 2)


@pytest.mark.parametrize(
    ("busy", "keep", "left"),
    [
        (0, frozenset({"10.0.0.1:80"}), {"10.0.0.1:80"}),
        (1, frozenset({"10.0.0.1:80"}), {"10.0.0.1:80", "10.0.0.2:80"}),
        (0, frozenset(), set()),
    ],
    ids=["gone-and-idle-is-forgotten", "gone-but-busy-is-kept", "all-gone"],
)
def test_registry_prunes_endpoints_gone_for_good(
    busy: int, keep: frozenset[str], left: set[str]
) -> None:
    reg = SlotRegistry()
    pool = Pool(EPS, "p2c", random.Random(), reg.group("svc", "gray"))
    pool.slots[1].outstanding = busy
    reg.prune({("svc", "gray"): keep} if keep else {})
    assert set(reg.groups.get(("svc", "gray"), SlotGroup()).by_address) == left


def test_passive_health_ejects_after_consecutive_failures_and_returns() -> None:
    from gateway.balancer import FAIL_TIMEOUT, MAX_FAILS

    pool = Pool((Endpoint("a", 1), Endpoint("b", 1)), "p2c", random.Random(4))
    a, b = pool.slots
    for _ in range(MAX_FAILS - 1):
        pool.eject(a, now=100.0)
    a.succeeded()  # a success in between resets the count
    for _ in range(MAX_FAILS - 1):
        pool.eject(a, now=100.0)
    assert {pool.pick(None, 100.0).endpoint.host for _ in range(50)} == {"a", "b"}  # type: ignore[union-attr]
    pool.eject(a, now=100.0)  # the MAX_FAILS-th in a row
    assert {pool.pick(None, 101.0).endpoint.host for _ in range(50)} == {"b"}  # type: ignore[union-attr]
    pool.eject(b, now=101.0)
    pool.eject(b, now=101.0)
    pool.eject(b, now=101.0)
    assert pool.pick(None, 102.0) is None  # everything sits out: the caller falls back
    back = 100.0 + FAIL_TIMEOUT
    assert pool.pick(None, back).endpoint.host == "a"  # type: ignore[union-attr]


def test_ejection_survives_a_snapshot_swap() -> None:
    group = SlotGroup()
    old = Pool(EPS, "round_robin", random.Random(), group)
    for _ in range(3):
        old.eject(old.slots[0], now=50.0)
    new = Pool(EPS, "round_robin", random.Random(), group)
    assert {new.pick(None, 51.0).endpoint.host for _ in range(8)} == {"10.0.0.2"}  # type: ignore[union-attr]


def test_ejection_reported_through_an_old_pool_reaches_the_new_one() -> None:
    group = SlotGroup()
    old = Pool(EPS, "p2c", random.Random(5), group)
    new = Pool(EPS, "p2c", random.Random(5), group)
    for _ in range(3):  # requests picked before the swap fail after it
        old.eject(old.slots[0], now=50.0)
    assert {new.pick(None, 51.0).endpoint.host for _ in range(20)} == {"10.0.0.2"}  # type: ignore[union-attr]


def _pool(n: int, **outlier: float) -> Pool:
    eps = tuple(Endpoint(f"10.0.0.{i}", 80) for i in range(1, n + 1))
    return Pool(eps, "p2c", random.Random(6), outlier=OutlierConfig(**outlier))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "failing", "outlier", "ejected"),
    [
        (2, 1, {}, 1),
        (4, 4, {}, 2),
        (3, 3, {}, 1),
        (1, 1, {}, 0),
        (2, 2, {"max_ejection_percent": 100}, 2),
        (4, 1, {"consecutive_5xx": 0}, 0),
        (10, 3, {"max_ejection_percent": 10}, 1),
    ],
    ids=[
        "one-of-two",
        "half-of-four-at-most",
        "one-of-three-rounds-down",
        "a-lone-endpoint-never",
        "cap-lifted",
        "off",
        "ten-percent",
    ],
)
def test_outlier_ejection_on_consecutive_5xx_is_capped(
    n: int, failing: int, outlier: dict[str, float], ejected: int
) -> None:
    pool = _pool(n, **outlier)
    for s in pool.slots[:failing]:
        for _ in range(5):
            pool.server_error(s, now=10.0)
    assert sum(1 for s in pool.slots if s.down_until > 10.0) == ejected


def test_a_success_between_5xx_resets_the_streak() -> None:
    pool = _pool(2)
    a = pool.slots[0]
    for _ in range(4):
        assert not pool.server_error(a, now=1.0)
    a.succeeded()
    for _ in range(4):
        assert not pool.server_error(a, now=1.0)
    assert pool.server_error(a, now=1.0)  # the 5th in a row
    assert {pool.pick(None, 2.0).endpoint.host for _ in range(20)} == {"10.0.0.2"}  # type: ignore[union-attr]
    assert pool.pick(None, 1.0 + OutlierConfig().ejection_time).endpoint is not None  # type: ignore[union-attr]


def test_an_active_check_takes_an_endpoint_out_until_it_passes() -> None:
    group = SlotGroup()
    pool = Pool(EPS, "p2c", random.Random(7), group)
    a = pool.slots[0]
    group.set_checked(a, False)
    pool.eject(a, now=5.0)  # passive ejections never shorten it
    pool.eject(a, now=5.0)
    pool.eject(a, now=5.0)
    assert {pool.pick(None, 1e9).endpoint.host for _ in range(20)} == {"10.0.0.2"}  # type: ignore[union-attr]
    group.set_checked(a, True)
    assert group.down_until <= 5.0 + 10.0  # back at once
    assert {pool.pick(None, 100.0).endpoint.host for _ in range(40)} == {"10.0.0.1", "10.0.0.2"}  # type: ignore[union-attr]
