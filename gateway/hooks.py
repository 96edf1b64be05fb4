"""Rollout hooks: HTTP calls the rollout driver makes at its gates (README "Rollouts").

Why background tasks: a hook may take its whole `timeout` (10 s) and its
`retries`; the driver asks `gate(...)` every tick, which starts a call when
none is running and answers from the last result, so neither the driver nor
the data path ever waits on a hook. The body follows Flagger's webhook payload
(`name`, `namespace`, `phase`, `checksum`, `type`, `metadata`; Flagger docs,
"Webhooks") with our own fields beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.rollout_config import Webhook

log = logging.getLogger("gateway.hooks")

# A `step` hook answering non-2xx this many times in a row within one step rolls back.
STEP_FAILURE_LIMIT = 2
_BACKOFF = 0.5  # seconds before the first retry; doubles each time


@dataclass(slots=True)
class _Call:
    """The last call of one hook for one gate key (a rollout step, or its Pending start)."""

    task: asyncio.Task[tuple[bool, str]] | None = None
    ok: bool = False
    detail: str = "not called yet"
    failures: int = 0  # non-2xx answers in a row


def payload(
    hook: Webhook,
    service: str,
    rollout: Mapping[str, Any],
    baseline: str,
    now: float,
    event: str | None = None,
) -> dict[str, Any]:
    """The JSON body of every hook call: Flagger's keys, then ours."""
    body: dict[str, Any] = {
        "name": service,
        "namespace": "gateway",
        "phase": rollout.get("state"),
        "checksum": f"{rollout.get('release')}:{rollout.get('step')}",
        "type": hook.type,
        "metadata": {"hook": hook.name},
        "service": service,
        "release": rollout.get("release"),
        "baseline": baseline,
        "state": rollout.get("state"),
        "step": rollout.get("step"),
        "steps": len(rollout.get("steps") or ()),
        "weight": rollout.get("weight"),
        "reason": rollout.get("reason"),
        "time": now,
    }
    if event is not None:
        body["metadata"]["eventMessage"] = event
    return body


class HookRunner:
    """Calls hooks in background tasks and remembers each gate's last answer."""

    def __init__(self, session_factory: Callable[[], aiohttp.ClientSession] | None = None) -> None:
        self._factory = session_factory or (
            lambda: aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        )
        self._session: aiohttp.ClientSession | None = None
        self._calls: dict[tuple[str, object], _Call] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._notices: set[asyncio.Task[Any]] = set()  # the `notify` calls among them

    async def stop(self, grace: float = 0.0) -> None:
        """Cancel every call; notifications in flight first get up to `grace` seconds to end
        (a clean stop loses none that can be delivered in time)."""
        if grace > 0 and self._notices:
            _, late = await asyncio.wait(list(self._notices), timeout=grace)
            if late:
                log.warning("stopping with %d hook notification(s) unfinished", len(late))
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def drain(self) -> None:
        """Wait for every call in flight (a clean stop, or a test that counts calls)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def call(self, hook: Webhook, body: Mapping[str, Any]) -> tuple[bool, str]:
        """POST the body; (2xx?, what happened). Retries connection errors, timeouts and 5xx."""
        if self._session is None or self._session.closed:
            self._session = self._factory()
        detail = ""
        for attempt in range(hook.retries + 1):
            if attempt:
                await asyncio.sleep(_BACKOFF * 2 ** (attempt - 1))
            try:
                async with self._session.post(
                    hook.url, json=body, timeout=aiohttp.ClientTimeout(total=hook.timeout)
                ) as r:
                    await r.read()
                    if 200 <= r.status < 300:
                        return True, f"HTTP {r.status}"
                    detail = f"HTTP {r.status}"
                    if r.status < 500:
                        return False, detail  # the hook's answer: retrying changes nothing
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return False, detail

    def gate(
        self,
        hooks: tuple[Webhook, ...],
        key: object,
        body: Callable[[Webhook], Any],
        limit: int | None = None,
    ) -> str | None:
        """None once every hook answered 2xx for `key`; else why it holds (calls one if idle).

        A hook that said yes for this key is not called again; one that said no
        is called again on the next tick, until it said no `limit` times in a row.
        """
        waiting: str | None = None
        for h in hooks:
            c = self._calls.get((h.name, key))
            if c is None:
                c = self._calls[(h.name, key)] = _Call()
            if c.task is not None and c.task.done():
                ok, detail = (False, "cancelled") if c.task.cancelled() else c.task.result()
                c.task, c.ok, c.detail = None, ok, detail
                c.failures = 0 if ok else c.failures + 1
                log.info("hook %s (%s): %s", h.name, h.type, detail)
            if c.ok:
                continue
            if c.task is None and (limit is None or c.failures < limit):
                c.task = self._spawn(self.call(h, body(h)))
            if waiting is None:
                waiting = f"waiting:{h.name}"
                if c.failures:
                    waiting += f" ({c.detail})"
        return waiting

    def failures(self, hooks: tuple[Webhook, ...], key: object) -> tuple[str, int] | None:
        """The hook with the most non-2xx answers in a row for `key`, and that count."""
        worst: tuple[str, int] | None = None
        for h in hooks:
            c = self._calls.get((h.name, key))
            if c is not None and c.failures and (worst is None or c.failures > worst[1]):
                worst = (h.name, c.failures)
        return worst

    def forget(self, keep: Callable[[object], bool]) -> None:
        """Drop the answers of gates that are over (their rollout step ended)."""
        for k in [k for k in self._calls if not keep(k[1])]:
            c = self._calls.pop(k)
            if c.task is not None:
                c.task.cancel()

    def notify(
        self, hooks: tuple[Webhook, ...], body: Callable[[Webhook], Any]
    ) -> list[asyncio.Task[Any]]:
        """Fire-and-forget hooks (post_rollout, rollback, event): logged, never awaited.

        Returns the calls, so the driver can record the change once they all finished.
        """
        calls = [self._spawn(self._notify(h, body(h))) for h in hooks]
        for t in calls:
            self._notices.add(t)
            t.add_done_callback(self._notices.discard)
        return calls

    async def _notify(self, hook: Webhook, body: Any) -> None:
        ok, detail = await self.call(hook, body)
        (log.info if ok else log.warning)("hook %s (%s): %s", hook.name, hook.type, detail)
