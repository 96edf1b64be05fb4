"""Pure admin policy with tables: explain, preview and change validation (no sockets)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gateway import changes
from gateway import config as C
from gateway.errors import BadRequest
from gateway.preview import explain, preview
from gateway.routing import WeightTable
from gateway.state import Snapshot, build_snapshot

UP = ["http://127.0.0.1:9"]


def _snapshot(
    trust: Any = ("10.0.0.0/8",), gray_consul: bool = False, sticky: bool = False
) -> Snapshot:
    gray: dict[str, Any] = {"weight": 50}
    if gray_consul:
        gray["consul"] = {"service": "svc", "tags": ["gray"]}  # no endpoints discovered
    else:
        gray["upstreams"] = UP
    cfg = C.build(
        {
            "routing": {
                "trust_overrides": list(trust) if isinstance(trust, tuple) else trust,
                "sticky_cookie": sticky,
            },
            "services": {
                "svc": {"releases": {"stable": {"weight": 50, "upstreams": UP}, "gray": gray}}
            },
        },
        env={},
    )
    return build_snapshot(cfg)


def _key_for(release: str) -> str:
    snap = _snapshot()
    table = snap.services["svc"].table
    return next(k for k in (f"k{i}" for i in range(1000)) if table.pick_hash(k) == release)


STABLE_KEY, GRAY_KEY = _key_for("stable"), _key_for("gray")

# fmt: off
EXPLAIN = [
    ("header-trusted", {}, [("X-Release-Stage", "gray")], "10.1.1.1", ("gray", "header", None)),
    ("header-untrusted", {}, [("X-Release-Stage", "gray"), ("X-User-ID", STABLE_KEY)],
     "127.0.0.1", ("stable", "hash", STABLE_KEY)),
    ("header-unknown-release", {}, [("X-Release-Stage", "blue"), ("X-User-ID", STABLE_KEY)],
     "10.1.1.1", ("stable", "hash", STABLE_KEY)),
    ("cookie-trusted", {}, [("Cookie", "a=1; release_stage=gray")], "10.0.0.1",
     ("gray", "cookie", None)),
    ("header-beats-cookie", {}, [("Cookie", "release_stage=stable"), ("x-release-stage", "gray")],
     "10.0.0.1", ("gray", "header", None)),
    ("uid-cookie", {}, [("Cookie", f"uid={GRAY_KEY}")], "127.0.0.1", ("gray", "hash", GRAY_KEY)),
    ("user-header-beats-uid-cookie", {}, [("X-User-ID", STABLE_KEY), ("Cookie", f"uid={GRAY_KEY}")],
     "127.0.0.1", ("stable", "hash", STABLE_KEY)),
    ("last-header-wins", {}, [("X-User-ID", GRAY_KEY), ("X-User-ID", STABLE_KEY)], "127.0.0.1",
     ("stable", "hash", STABLE_KEY)),
    ("trust-all", {"trust": True}, [("X-Release-Stage", "gray")], "192.0.2.1",
     ("gray", "header", None)),
    ("trust-none", {"trust": False}, [("X-Release-Stage", "gray"), ("X-User-ID", STABLE_KEY)],
     "10.0.0.1", ("stable", "hash", STABLE_KEY)),
    ("fallback", {"gray_consul": True}, [("X-User-ID", GRAY_KEY)], "127.0.0.1",
     ("stable", "fallback", GRAY_KEY)),
    ("forced-fallback", {"gray_consul": True}, [("X-Release-Stage", "gray")], "10.0.0.1",
     ("stable", "fallback", None)),
]
# fmt: on


@pytest.mark.parametrize(
    ("kw", "headers", "ip", "want"), [e[1:] for e in EXPLAIN], ids=[e[0] for e in EXPLAIN]
)
def test_explain_table(
    kw: dict[str, Any], headers: list[tuple[str, str]], ip: str, want: tuple[str, str, str | None]
) -> None:
    ex = explain(_snapshot(**kw), "svc", headers=headers, client_ip=ip)
    assert (ex.release, ex.reason, ex.key) == want


def test_explain_without_key_is_random_and_sticky_cookie_mints_a_key() -> None:
    ex = explain(_snapshot(), "svc", rng=random.Random(1))
    assert ex.reason == "random" and ex.key is None and ex.release in ("stable", "gray")
    ex = explain(_snapshot(sticky=True), "svc", rng=random.Random(1))
    assert ex.reason == "random" and ex.key is not None and len(ex.key) == 32


# fmt: off
PREVIEWS = [
    ("raise-gray", {"stable": 95, "gray": 5}, {"stable": 95, "gray": 10}, {"stable->gray"}),
    ("lower-gray", {"stable": 90, "gray": 10}, {"stable": 90, "gray": 5}, {"gray->stable"}),
    ("same", {"stable": 90, "gray": 10}, {"stable": 90, "gray": 10}, set()),
    ("zero-one-of-three", {"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 0, "c": 1}, {"b->a", "b->c"}),
    ("raise-one-of-three", {"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 2, "c": 1}, {"a->b", "c->b"}),
]
# fmt: on


@pytest.mark.parametrize(
    ("old", "new", "moves"), [p[1:] for p in PREVIEWS], ids=[p[0] for p in PREVIEWS]
)
def test_preview_moves_only_into_or_out_of_the_changed_release(
    old: dict[str, float], new: dict[str, float], moves: set[str]
) -> None:
    a, b = WeightTable.build("svc", old), WeightTable.build("svc", new)
    pv = preview(a, b, 20_000)
    assert set(pv.moves) == moves
    assert pv.moved_share == pytest.approx(sum(pv.moves.values()))
    moved = sum(1 for i in range(20_000) if a.pick_hash(f"user-{i}") != b.pick_hash(f"user-{i}"))
    assert pv.moved_share == moved / 20_000
    assert sum(pv.shares.values()) == pytest.approx(1) and sum(pv.before.values()) == pytest.approx(
        1
    )
    # monotone (README "How routing decides"): the moved share is exactly the net
    # share change of the changed release
    for rel in new:
        if new[rel] != old.get(rel):
            assert pv.moved_share == pytest.approx(abs(pv.shares[rel] - pv.before[rel]))


SVC = C.build(
    {
        "services": {
            "s": {
                "releases": {
                    "stable": {"weight": 9, "upstreams": UP},
                    "gray": {"weight": 1, "upstreams": UP},
                }
            }
        }
    },
    env={},
).services["s"]


@pytest.mark.parametrize(
    ("body", "want"),
    [
        ({"gray": 3}, {"stable": 9, "gray": 3}),
        ({"stable": 0, "gray": 2.5}, {"stable": 0, "gray": 2.5}),
    ],
    ids=["partial", "full"],
)
def test_weights_change_merges(body: dict[str, float], want: dict[str, float]) -> None:
    assert changes.weights_change(SVC, {"stable": 9, "gray": 1}, body) == want


@pytest.mark.parametrize(
    ("value", "want"),
    [(None, None), ("*", None), ('"7"', 7), ("7", 7), ('W/"12"', 12)],
    ids=["absent", "star", "quoted", "bare", "weak"],
)
def test_if_match(value: str | None, want: int | None) -> None:
    assert changes.parse_if_match(value) == want


@pytest.mark.parametrize("value", ["", "x", '"-1"', '"1.5"'], ids=["empty", "word", "neg", "frac"])
def test_if_match_garbage(value: str) -> None:
    with pytest.raises(BadRequest) as e:
        changes.parse_if_match(value)
    assert e.value.field == "If-Match"


def test_platform_change_sets_gray_baseline_and_zeroes_the_rest() -> None:
    svc = C.build(
        {
            "services": {
                "s": {
                    "releases": {
                        "stable": {"weight": 80, "upstreams": UP},
                        "gray": {"weight": 10, "upstreams": UP},
                        "batch-1": {"weight": 10, "upstreams": UP},
                    }
                }
            }
        },
        env={},
    ).services["s"]
    weights, guard = changes.platform_change(
        svc, {"service": "s", "gray_weight": 30, "metrics_threshold": {"min_requests": 10}}
    )
    assert weights == {"stable": 70, "gray": 30, "batch-1": 0}
    assert guard == {"min_requests": 10}


async def test_discovered_endpoints_merge_and_keep_the_stored_state() -> None:
    from gateway.config import Endpoint
    from gateway.control import ControlPlane
    from gateway.state import SnapshotHolder
    from gateway.store.memory import MemoryStore

    snap = _snapshot(gray_consul=True)
    cp = ControlPlane(snap.config, SnapshotHolder(snap), store=MemoryStore())
    await cp.start(admin=False)
    try:
        await cp.set_weights("svc", {"gray": 80}, None)
        holder = cp.holder
        assert holder.current.services["svc"].available == {"stable"}
        ep = Endpoint("127.0.0.2", 8080)
        cp.set_discovered({("svc", "gray"): (ep,), ("svc", "stable"): (ep,)})
        sv = holder.current.services["svc"]
        assert sv.available == {"stable", "gray"}
        assert sv.releases["gray"].endpoints == (ep,)
        assert len(sv.releases["stable"].endpoints) == 2  # static first, then discovered
        assert sv.table.raw == {"stable": 50, "gray": 80} and holder.current.version == 1
        await cp.set_weights("svc", {"gray": 70}, None)  # a later change keeps discovered ones
        assert holder.current.services["svc"].releases["gray"].endpoints == (ep,)
    finally:
        await cp.stop()
