"""One periodic control-plane loop: the guard, the analysis runner and the rollout driver.

Why one: each of them must survive a failed pass (log it, try again next tick) and stop
only when cancelled; three hand-written copies of that loop had started to drift.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable


async def every(
    interval: Callable[[], float], step: Callable[[], Awaitable[object]], what: str
) -> None:
    """Run `step` after each `interval()` seconds until cancelled; a failure is logged."""
    log = logging.getLogger("gateway.periodic")
    while True:
        await asyncio.sleep(interval())
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:  # the loop must outlive one bad pass
            log.exception("%s failed; trying again next tick", what)
