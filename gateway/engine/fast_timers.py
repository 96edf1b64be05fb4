"""One timer for every connection's timeouts: a wheel of coarse ticks on a single loop timer.

Why: with a loop timer per connection, each idle keep-alive connection holds
a timer handle, a libuv timer and a bound method, and every (re)arm is a heap
operation in the event loop. Here a connection that arms a deadline joins the
bucket of the first tick after it (an ordered set: O(1) to join and to leave),
and the loop holds one timer, for the earliest non-empty tick. Deadlines fire
at most `RESOLUTION` late, far below any timeout the gateway takes
(docs/configuration.md#timeouts). The idea is the hashed timing wheel of
Varghese and Lauck (SOSP 1987), as in the Linux kernel's timer wheel.
"""

from __future__ import annotations

import asyncio
import logging
from heapq import heappop, heappush
from typing import Final, Protocol

log = logging.getLogger(__name__)

RESOLUTION: Final = 0.05  # seconds per tick


class Timed(Protocol):
    """A connection the wheel calls back when a deadline it armed may have passed."""

    def on_tick(self, tick: int) -> None:
        """Called for the bucket of `tick`; ignored unless it is still the one it armed."""
        ...


class Wheel:
    """Buckets of connections per tick (tick = floor(deadline / RESOLUTION) + 1).

    A connection is in at most one bucket (it remembers which, see `add`);
    `on_tick` runs after the deadline it armed, and the connection
    decides there whether it is really due (its deadlines move lazily).
    """

    __slots__ = ("loop", "buckets", "ticks", "handle", "at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, dict[Timed, None]] = {}
        self.ticks: list[int] = []  # a heap of the ticks that have a bucket
        self.handle: asyncio.TimerHandle | None = None
        self.at = 0  # the tick the loop timer is set for

    def add(self, obj: Timed, when: float) -> int:
        """Call `obj.on_tick(tick)` once, after loop time `when`; returns that tick."""
        t = int(when / RESOLUTION) + 1  # strictly after `when`: a due connection is really due
        b = self.buckets.get(t)
        if b is None:
            b = self.buckets[t] = {}
            heappush(self.ticks, t)
            if self.handle is None or t < self.at:
                if self.handle is not None:
                    self.handle.cancel()
                self.at = t
                self.handle = self.loop.call_at(t * RESOLUTION, self._fire)
        b[obj] = None
        return t

    def remove(self, obj: Timed, tick: int) -> None:
        b = self.buckets.get(tick)
        if b is not None:
            b.pop(obj, None)  # an emptied bucket stays until its tick: harmless

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets.values())

    def _fire(self) -> None:
        self.handle = None
        now = self.loop.time()
        ticks = self.ticks
        buckets = self.buckets
        due: list[tuple[int, dict[Timed, None]]] = []
        while ticks and ticks[0] * RESOLUTION <= now:
            t = heappop(ticks)
            b = buckets.pop(t, None)
            if b:
                due.append((t, b))
        if ticks:
            self.at = ticks[0]
            self.handle = self.loop.call_at(self.at * RESOLUTION, self._fire)
        for t, b in due:
            for obj in b:
                # It may arm again (another bucket); one that moved while this bucket
                # waited here (a detached bucket cannot be left) ignores the call.
                try:
                    obj.on_tick(t)
                except Exception:  # one connection's bug must not stop the others' timers
                    log.exception("fast engine: a connection's timer failed")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.buckets.clear()
        self.ticks.clear()


class Armed:
    """A connection with one lazily moved deadline on a `Wheel`: the base of both sides.

    Why lazily: a deadline later than the one armed is not moved at all (the
    connection re-checks which timeout applies in its `on_tick`, and re-arms);
    only an earlier one moves it to an earlier bucket. Client and upstream
    connections (engine/fast_client.py, engine/fast_upstream.py) arm the same way.
    """

    __slots__ = ("wheel", "armed_tick", "armed_for")

    def __init__(self, wheel: Wheel) -> None:
        self.wheel = wheel
        self.armed_tick = 0  # the wheel tick armed; 0: none
        self.armed_for = 0.0  # the loop time that tick was armed for

    def arm(self, when: float) -> None:
        """Have `on_tick` called after `when`, unless an earlier call is armed already."""
        t = self.armed_tick
        if t:
            if self.armed_for <= when:
                return
            self.wheel.remove(self, t)
        self.armed_for = when
        self.armed_tick = self.wheel.add(self, when)

    def disarm(self) -> None:
        """No more calls (closed, or a tunnel: no timeout applies)."""
        t = self.armed_tick
        if t:
            self.wheel.remove(self, t)
            self.armed_tick = 0

    def on_tick(self, tick: int) -> None:
        """The armed tick has come (see `Timed.on_tick`); subclasses decide what is due."""
        raise NotImplementedError
