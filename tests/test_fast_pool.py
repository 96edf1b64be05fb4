"""The fast engine's keep-alive pool: idle order, per-host cap, and discarding on close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.engine.fast_pool import Pool
from gateway.engine.fast_upstream import Upstream

KEY = ("127.0.0.1", 9)
OTHER = ("127.0.0.1", 10)


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    p = Pool(asyncio.get_running_loop(), per_host=64, idle_timeout=30.0)
    yield p
    p.wheel.close()  # the idle timers of connections that never had a socket
    await p.close()


def _idle(pool: Pool, n: int, key: tuple[str, int] = KEY) -> list[Upstream]:
    """`n` connections released to the pool idle, oldest first (no sockets: never attached)."""
    ups = [Upstream(pool, key) for _ in range(n)]
    for up in ups:
        pool.release(up)
    return ups


def _drain(pool: Pool, key: tuple[str, int] = KEY) -> list[Upstream]:
    out = []
    while (up := pool.acquire(*key)) is not None:
        out.append(up)
    return out


async def test_acquire_takes_the_most_recently_released_first(pool: Pool) -> None:
    ups = _idle(pool, 3)
    assert _drain(pool) == ups[::-1]
    assert pool.acquire(*OTHER) is None


@pytest.mark.parametrize("which", [0, 2, 4], ids=["oldest", "middle", "newest"])
async def test_a_closed_idle_connection_leaves_the_pool(pool: Pool, which: int) -> None:
    ups = _idle(pool, 5)
    ups[which].close()  # Upstream.close discards itself from the pool
    left = [up for i, up in enumerate(ups) if i != which]
    assert _drain(pool) == left[::-1]


async def test_discard_of_what_is_not_idle_changes_nothing(pool: Pool) -> None:
    ups = _idle(pool, 2)
    busy = Upstream(pool, KEY)  # never released: in use
    pool.discard(busy)
    pool.discard(Upstream(pool, OTHER))  # a key with no idle list at all
    pool.discard(ups[0])
    pool.discard(ups[0])  # twice
    assert _drain(pool) == [ups[1]]


async def test_a_connection_released_twice_is_pooled_once(pool: Pool) -> None:
    ups = _idle(pool, 3)
    pool.release(ups[0])  # again: moved to the front, not linked a second time
    assert _drain(pool) == [ups[0], ups[2], ups[1]]


async def test_discard_keys_are_separate(pool: Pool) -> None:
    a, b = _idle(pool, 1, KEY)[0], _idle(pool, 1, OTHER)[0]
    b.close()
    assert _drain(pool, OTHER) == [] and _drain(pool, KEY) == [a]


async def test_ports_of_one_host_and_other_hosts_have_their_own_idle_lists(pool: Pool) -> None:
    """A host's idle lists are chained by port (`Pool.idle_by_host`): each port finds its
    own, a port or host never seen finds none, and closing the pool closes them all."""
    keys = [KEY, OTHER, ("127.0.0.1", 11), ("127.0.0.2", 9)]
    ups = {key: _idle(pool, 2, key) for key in keys}
    assert pool.acquire("127.0.0.1", 12) is None and pool.acquire("127.0.0.3", 9) is None
    for key in keys:
        assert pool.acquire(*key) is ups[key][1]
    assert all(ups[key][0].pooled for key in keys)
    await pool.close()  # each idle one closed, which takes it out of its list
    assert not any(ups[key][0].pooled for key in keys)


async def test_release_beyond_the_per_host_cap_closes(pool: Pool) -> None:
    pool.per_host = 2
    ups = _idle(pool, 3)  # the third is closed instead of pooled
    assert _drain(pool) == [ups[1], ups[0]]


async def test_thousands_of_idle_connections_close_in_any_order(pool: Pool) -> None:
    """1,000 idle connections (issue: c1000), closed out of order; the rest stay in order."""
    pool.per_host = 5000
    ups = _idle(pool, 2000)
    for up in ups[::2]:
        up.close()
    assert _drain(pool) == ups[1::2][::-1]
