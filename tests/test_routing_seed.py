"""The named hash seed and a few assignments are pinned (docs/routing.md, "The salt and the seed").

Why: a build that changed the seed, the salt separator or the score would move
sticky users between releases on whichever replicas ran it; these rows fail first.
"""

from __future__ import annotations

import pytest

from gateway.routing import RELEASE_SEED_HASH_SEED, WeightTable, release_seed


def test_the_seed_is_the_documented_constant() -> None:
    assert RELEASE_SEED_HASH_SEED == 0x9E3779B9


@pytest.mark.parametrize(
    ("salt", "release", "seed"),
    [("user-api", "stable", 3459617614), ("user-api", "gray", 3352346878)],
    ids=["stable", "gray"],
)
def test_release_seeds_are_pinned(salt: str, release: str, seed: int) -> None:
    assert release_seed(salt, release) == seed


@pytest.mark.parametrize(
    ("key", "release"),
    [("u1", "gray"), ("u3", "gray"), ("u67", "gray"), ("alice", "stable"), ("u2", "stable")],
    ids=["u1", "u3", "u67", "alice", "u2"],
)
def test_sticky_assignments_are_pinned(key: str, release: str) -> None:
    table = WeightTable.build("user-api", {"stable": 95, "gray": 5})
    assert table.pick_hash(key) == release


def test_another_salt_is_another_assignment() -> None:
    """The salt separates services: the same users split differently."""
    a = WeightTable.build("user-api", {"stable": 50, "gray": 50})
    b = WeightTable.build("catalog", {"stable": 50, "gray": 50})
    keys = [f"u{i}" for i in range(200)]
    assert [a.pick_hash(k) for k in keys] != [b.pick_hash(k) for k in keys]
