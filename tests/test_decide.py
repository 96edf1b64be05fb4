"""The pure pieces of reading a request: client address, lanes in baggage, precedence (tables)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from gateway import propagation as P
from gateway.decide import tripped_releases
from gateway.routing import (
    REASON_FALLBACK,
    REASON_HEADER,
    REASON_LANE,
    REASON_REJECT,
    REASON_SEGMENT,
    REASON_TAG,
    SegmentRoute,
    TrustPolicy,
    WeightTable,
    choose_release,
)
from gateway.statedoc import ServiceState
from gateway.trust import client_address

PROXIES = TrustPolicy([ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/24")])


@pytest.mark.parametrize(
    ("peer", "xff", "want"),
    [
        ("127.0.0.1", None, "127.0.0.1"),
        ("192.0.2.7", b"10.1.1.1", "192.0.2.7"),  # untrusted peer: its XFF is ignored
        ("127.0.0.1", b"198.51.100.4", "198.51.100.4"),
        ("127.0.0.1", b"1.1.1.1, 198.51.100.4, 10.0.0.9", "198.51.100.4"),
        ("127.0.0.1", b"1.1.1.1,198.51.100.4", "198.51.100.4"),  # forged left hops ignored
        ("127.0.0.1", b"10.0.0.3, 10.0.0.9", "10.0.0.3"),  # every hop trusted: the left-most
        ("127.0.0.1", b"", "127.0.0.1"),
        ("127.0.0.1", b"not-an-ip", "not-an-ip"),  # trusted by nothing
        ("::ffff:127.0.0.1", b"203.0.113.1", "203.0.113.1"),  # IPv4-mapped peer
    ],
    ids=[
        "no-xff",
        "untrusted-peer",
        "one-hop",
        "right-most-untrusted",
        "no-spaces",
        "all-trusted",
        "empty",
        "garbage-hop",
        "v4-mapped",
    ],
)
def test_client_address(peer: str, xff: bytes | None, want: str) -> None:
    assert client_address(peer, xff, PROXIES) == want


@pytest.mark.parametrize(
    ("lines", "want"),
    [
        ((), None),
        (("k=v",), None),
        (("release.stage=gray",), "gray"),
        (("release.stage = gray ;p=1;q",), "gray"),
        (("a=1,release.stage=gray,release.stage=blue",), "gray"),
        (("a=1", "release.stage=blue", "release.stage=gray"), "blue"),
        (("release.stage=bad value,release.stage=gray",), "gray"),  # malformed member skipped
        (("release.stage=gr%61y",), "gray"),
        (("release.stage=",), None),
        (("xrelease.stage=gray",), None),
    ],
    ids=[
        "none",
        "other",
        "plain",
        "properties",
        "first-wins",
        "across-lines",
        "malformed",
        "percent",
        "empty",
        "other-key",
    ],
)
def test_lane_of(lines: tuple[str, ...], want: str | None) -> None:
    assert P.lane_of(lines) == want


def test_gray_tag_encoding() -> None:
    v = P.gray_tag([("env", "pre"), ("group", "v2"), ("feature", "pay-new")])
    assert v == "env=pre;group=v2;feature=pay-new"
    out = P.build_baggage(["a=1"], [("release.stage", "gray"), (P.GRAY_TAG_KEY, v)])
    assert out == "a=1,release.stage=gray,gray.tag=env=pre%3Bgroup=v2%3Bfeature=pay-new"


def test_one_release_stage_goes_out_and_steering_members_survive_the_limits() -> None:
    filler = [f"k{i}=" + "x" * 60 for i in range(200)]
    incoming = [",".join([*filler[:100], "gray.tag=env=pre", *filler[100:]]), "release.stage=x"]
    out = P.build_baggage(incoming, [("release.stage", "gray")])
    assert out is not None
    members = out.split(",")
    assert len(members) <= P.BAGGAGE_MAX_MEMBERS and len(out) <= P.BAGGAGE_MAX_BYTES
    assert [m for m in members if m.startswith("release.stage=")] == ["release.stage=gray"]
    assert "gray.tag=env=pre" in members  # kept though members after k99 were dropped
    assert "k199=" + "x" * 60 not in members


def test_untrusted_steering_members_are_dropped() -> None:
    out = P.build_baggage(
        ["a=1,gray.tag=x,release.stage=gray"],
        [("release.stage", "stable")],
        (P.LANE_KEY, P.GRAY_TAG_KEY),
    )
    assert out == "a=1,release.stage=stable"


TABLE = WeightTable.build("svc", {"stable": 100, "gray": 0, "blue": 0})
ALL = frozenset({"stable", "gray", "blue"})
SEG = SegmentRoute("staff", "blue", None, True)


@pytest.mark.parametrize(
    ("kw", "want"),
    [
        ({"stage_header": "gray", "tag": "blue"}, ("gray", REASON_HEADER, "gray")),
        ({"tag": "blue", "lane": "gray"}, ("blue", REASON_TAG, "blue")),
        ({"lane": "gray", "segment": SEG}, ("gray", REASON_LANE, "gray")),
        ({"lane_unserved": "pink", "segment": SEG}, ("stable", REASON_FALLBACK, "pink")),
        ({"lane_unserved": "pink", "lane_reject": True}, ("", REASON_REJECT, "pink")),
        ({"tag": "gray", "lane_unserved": "pink"}, ("gray", REASON_TAG, "gray")),
        ({"segment": SEG}, ("blue", REASON_SEGMENT, "blue")),
        ({"segment": SEG, "tripped": frozenset({"blue"})}, ("stable", REASON_FALLBACK, "blue")),
        ({"tag": "blue", "tripped": frozenset({"blue"})}, ("stable", REASON_FALLBACK, "blue")),
        ({"lane": "blue", "tripped": frozenset({"blue"})}, ("stable", REASON_FALLBACK, "blue")),
        (
            {"stage_header": "blue", "tripped": frozenset({"blue"})},
            ("blue", REASON_HEADER, "blue"),
        ),
    ],
    ids=[
        "header-beats-tag",
        "tag-beats-lane",
        "lane-beats-segment",
        "unserved-lane-falls-back",
        "unserved-lane-rejects",
        "tag-beats-unserved-lane",
        "segment",
        "tripped-segment",
        "tripped-tag",
        "tripped-lane",
        "tripped-header-still-reaches",
    ],
)
def test_precedence(kw: dict[str, object], want: tuple[str, str, str]) -> None:
    args: dict[str, object] = {
        "baseline": "stable",
        "available": ALL,
        "stage_header": None,
        "stage_cookie": None,
        "user_key": "u1",
        "trusted": True,
        "rng": random.Random(1),
    }
    args.update(kw)
    d = choose_release(TABLE, **args)  # type: ignore[arg-type]
    assert d is not None
    assert (d.release, d.reason, d.chosen) == want


def test_tripped_releases_from_the_stored_rollouts() -> None:
    def st(state: str, release: object = "gray") -> ServiceState:
        return ServiceState(extra={"rollout": {"release": release, "state": state}})

    got = tripped_releases(
        {
            "a": st("CircuitBreak"),
            "b": st("RolledBack", "v2"),
            "c": st("Progressing"),
            "d": ServiceState(),
            "e": st("RolledBack", 5),
        }
    )
    assert got == {"a": frozenset({"gray"}), "b": frozenset({"v2"})}
