"""The fast engine's timer wheel: one loop timer; each armed connection called once, late."""

from __future__ import annotations

import asyncio

from gateway.engine.fast_timers import RESOLUTION, Wheel

DEADLINE = 30.0


class Conn:
    """Arms like ClientConn/Upstream do: remembers its tick, ignores a stale one."""

    def __init__(self, wheel: Wheel, done: asyncio.Event, want: int) -> None:
        self.wheel = wheel
        self.tick = 0
        self.when = 0.0
        self.fired: list[float] = []
        self.done = done
        self.want = want

    def arm(self, when: float) -> None:
        if self.tick:
            self.wheel.remove(self, self.tick)
        self.when = when
        self.tick = self.wheel.add(self, when)

    def on_tick(self, tick: int) -> None:
        if tick != self.tick:
            return
        self.tick = 0
        self.fired.append(self.wheel.loop.time())
        if len(self.fired) >= self.want:
            self.done.set()


async def test_each_armed_connection_fires_once_after_its_deadline() -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    done = [asyncio.Event() for _ in range(200)]
    now = loop.time()
    conns = [Conn(wheel, d, 1) for d in done]
    for i, c in enumerate(conns):
        c.arm(now + 0.01 * (i % 20))  # 20 distinct deadlines, 10 connections each
    async with asyncio.timeout(DEADLINE):
        for d in done:
            await d.wait()
    for c in conns:
        assert len(c.fired) == 1 and c.fired[0] >= c.when, (c.fired, c.when)
    assert len(wheel) == 0 and wheel.handle is None


async def test_moving_earlier_and_removing() -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    ev = asyncio.Event()
    late = Conn(wheel, ev, 1)
    late.arm(loop.time() + 3600)
    gone = Conn(wheel, asyncio.Event(), 1)
    gone.arm(loop.time() + 0.05)
    wheel.remove(gone, gone.tick)
    late.arm(loop.time() + 0.1)  # moved earlier: the hour-long bucket no longer holds it
    async with asyncio.timeout(DEADLINE):
        await ev.wait()
    assert len(late.fired) == 1 and gone.fired == []
    assert len(wheel) == 0
    wheel.close()


async def test_a_stale_call_from_a_bucket_already_taken_is_ignored() -> None:
    """A connection re-armed while its due bucket waits in `_fire` is not called for it."""
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    ev = asyncio.Event()
    now = loop.time()
    b = Conn(wheel, ev, 1)

    class Mover(Conn):
        def on_tick(self, tick: int) -> None:
            super().on_tick(tick)
            b.arm(loop.time() + 0.2)  # b is due in the same firing, in a taken bucket

    a = Mover(wheel, asyncio.Event(), 1)
    a.arm(now + 0.01)  # first in the bucket: called before b
    b.arm(now + 0.01)
    async with asyncio.timeout(DEADLINE):
        await ev.wait()
    assert len(a.fired) == 1 and len(b.fired) == 1
    assert b.fired[0] >= b.when and b.when - now >= 0.2 - RESOLUTION


async def test_a_failing_connection_does_not_stop_the_others() -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)

    class Broken(Conn):
        def on_tick(self, tick: int) -> None:
            raise RuntimeError("bug")

    ev = asyncio.Event()
    now = loop.time()
    Broken(wheel, asyncio.Event(), 1).arm(now + 0.01)
    ok = Conn(wheel, ev, 1)
    ok.arm(now + 0.01)  # the same bucket, after the broken one
    async with asyncio.timeout(DEADLINE):
        await ev.wait()
    assert len(ok.fired) == 1
