"""Waiting in a test for something the gateway does later: poll a condition with a deadline.

Why not `sleep()`: a fixed sleep is either too short on a loaded CI box or wastes time on an
idle one; polling returns as soon as the condition holds and fails loudly at the deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

POLL_S = 0.02  # how often the condition is asked; small next to every deadline the tests use


async def until(cond: Callable[[], bool | Awaitable[bool]], within: float) -> float:
    """Poll `cond` (sync or async) until true; the loop time it became true.

    AssertionError once `within` seconds pass without it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        got = cond()
        if not isinstance(got, bool):
            got = await got
        if got:
            return loop.time()
        assert loop.time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(POLL_S)
