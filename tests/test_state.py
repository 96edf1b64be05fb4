"""gateway/state.py: the routing table as one immutable snapshot, swapped whole."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gateway import config as config_mod
from gateway.config import Config, Endpoint
from gateway.state import (
    Snapshot,
    SnapshotHolder,
    build_snapshot,
    effective_weights,
    live_releases,
    static_endpoints,
)


def _config(**extra: Any) -> Config:
    raw: dict[str, Any] = {
        "services": {
            "user-api": {
                "releases": {
                    "stable": {"weight": 95, "upstreams": ["http://127.0.0.1:9001"]},
                    "gray": {
                        "weight": 5,
                        "upstreams": ["http://127.0.0.1:9011"],
                        "baggage": {"gray.tag": "v2"},
                    },
                }
            }
        },
        **extra,
    }
    return config_mod.build(raw, env={})


CFG = _config()


@pytest.mark.parametrize(
    ("overrides", "weights"),
    [
        ({}, {"stable": 95, "gray": 5}),
        ({"user-api": {"gray": 10}}, {"stable": 95, "gray": 10}),
        ({"user-api": {"blue": 10}}, {"stable": 95, "gray": 5}),
        ({"user-api": {"stable": 0, "gray": 0}}, {"stable": 1, "gray": 0}),
        ({"other": {"gray": 50}}, {"stable": 95, "gray": 5}),
    ],
    ids=["config", "override", "unknown-release-ignored", "all-zero-baseline-serves", "other-svc"],
)
def test_effective_weights(
    overrides: dict[str, dict[str, float]], weights: dict[str, float]
) -> None:
    assert effective_weights(CFG, overrides) == {"user-api": weights}


def test_a_snapshot_precomputes_what_a_request_needs() -> None:
    snap = build_snapshot(CFG, version=3, overrides={"user-api": {"gray": 15}})
    sv = snap.services["user-api"]
    assert snap.version == 3
    assert sv.table.shares == pytest.approx({"stable": 95 / 110, "gray": 15 / 110})
    gray = sv.releases["gray"]
    assert gray.raw_weight == 15 and gray.share == pytest.approx(15 / 110)
    assert gray.endpoints == (Endpoint("127.0.0.1", 9011),)
    # config baggage, and what goes upstream: release.stage first, then the config's members
    assert gray.baggage == (("gray.tag", "v2"),)
    assert gray.extra_baggage == (("release.stage", "gray"), ("gray.tag", "v2"))
    assert gray.baggage_h == (b"baggage", b"release.stage=gray,gray.tag=v2")
    assert gray.stage_h == (b"X-Release-Stage", b"gray")
    assert snap.stage_l == b"x-release-stage" and snap.user_l == b"x-user-id"
    assert sv.available == {"stable", "gray"}


def test_a_release_without_endpoints_is_not_available() -> None:
    snap = build_snapshot(CFG, endpoints={("user-api", "stable"): (Endpoint("127.0.0.1", 1),)})
    sv = snap.services["user-api"]
    assert sv.available == {"stable"}
    assert live_releases(sv, now=0.0) == {"stable"}


def test_guard_overrides_replace_only_the_named_thresholds() -> None:
    snap = build_snapshot(CFG, guard_overrides={"user-api": {"error_rate": 0.2, "nope": 1}})
    g = snap.services["user-api"].guard
    assert g.error_rate == 0.2 and g.latency_p95_ms == CFG.services["user-api"].guard.latency_p95_ms


def test_successive_snapshots_share_live_endpoint_state() -> None:
    first = build_snapshot(CFG, rng=random.Random(1))
    second = build_snapshot(CFG, previous=first, overrides={"user-api": {"gray": 50}})
    assert second.slots is first.slots
    a = first.services["user-api"].releases["gray"].pool.slots[0]
    b = second.services["user-api"].releases["gray"].pool.slots[0]
    assert a is b  # in-flight counts and ejections survive a weight change


def test_the_holder_swaps_whole_snapshots_and_tells_listeners() -> None:
    holder = SnapshotHolder(build_snapshot(CFG))
    seen: list[Snapshot] = []
    holder.subscribe(seen.append)
    new = build_snapshot(CFG, version=1, previous=holder.current)
    holder.swap(new)
    assert holder.current is new and seen == [new]


def test_static_endpoints_are_the_configs() -> None:
    assert static_endpoints(CFG) == {
        ("user-api", "stable"): (Endpoint("127.0.0.1", 9001),),
        ("user-api", "gray"): (Endpoint("127.0.0.1", 9011),),
    }


def test_routing_names_come_from_the_config() -> None:
    cfg = _config(routing={"stage_header": "X-Stage", "user_header": "X-Uid"})
    snap = build_snapshot(cfg)
    assert snap.stage_l == b"x-stage" and snap.user_l == b"x-uid"
    assert snap.services["user-api"].releases["gray"].stage_h == (b"X-Stage", b"gray")
