"""gateway/periodic.py: the control plane's loop survives a failed pass and stops on cancel."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway import periodic


async def test_a_failed_pass_is_logged_and_the_next_one_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    passes: list[int] = []
    third = asyncio.Event()

    async def step() -> None:
        passes.append(len(passes))
        if len(passes) == 1:
            raise ValueError("boom")
        if len(passes) == 3:
            third.set()

    caplog.set_level(logging.ERROR, logger="gateway.periodic")
    task = asyncio.create_task(periodic.every(lambda: 0.001, step, "test pass"))
    await asyncio.wait_for(third.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert passes[:3] == [0, 1, 2]
    assert any("test pass failed" in r.getMessage() for r in caplog.records)


async def test_the_interval_is_read_before_every_pass() -> None:
    seen: list[float] = []
    intervals = iter([0.001, 0.002, 0.003])
    done = asyncio.Event()

    def interval() -> float:
        value = next(intervals, 0.001)
        seen.append(value)
        return value

    async def step() -> None:
        if len(seen) >= 3:
            done.set()

    task = asyncio.create_task(periodic.every(interval, step, "interval"))
    await asyncio.wait_for(done.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen[:3] == [0.001, 0.002, 0.003]
