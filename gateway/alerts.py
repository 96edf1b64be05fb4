"""Alert delivery: one alert, many targets, each in the body its service expects.

Why a background queue: a guard action must not wait on a chat service, and
the data path never touches this module; `send` only enqueues, a few
delivery tasks POST with retries and exponential backoff, and a full queue
drops the oldest alert (logged) rather than grow without bound.

Bodies (each service's incoming-webhook documentation):
- `json`: the gateway's own alert object, unchanged (README.md "Alerts").
- `slack`: `{"text", "blocks"}` — https://api.slack.com/messaging/webhooks
  (`text` is the notification fallback when `blocks` are present).
- `dingtalk`: `{"msgtype": "markdown", "markdown": {"title", "text"}}` —
  https://open.dingtalk.com/document/orgapp/custom-robot-access
- `wecom`: `{"msgtype": "markdown", "markdown": {"content"}}` —
  https://developer.work.weixin.qq.com/document/path/91770
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import aiohttp

from gateway.config import AlertTarget

# One webhook call's limit: a receiver slower than this is retried with backoff, in the
# background queue, so a slow receiver never holds up the guard (README "Alerts").
ALERT_TIMEOUT_S: Final = 5.0

log = logging.getLogger("gateway.alerts")


def title(alert: Mapping[str, Any]) -> str:
    return f"{alert.get('alert', 'GatewayAlert')}: {alert.get('service')}/{alert.get('release')}"


def summary_lines(alert: Mapping[str, Any]) -> list[str]:
    """The few facts an operator needs, one per line."""
    action = alert.get("action") or {}
    return [
        f"service: {alert.get('service')}",
        f"release: {alert.get('release')}",
        f"reason: {alert.get('reason')} = {alert.get('value')} "
        f"(threshold {alert.get('threshold')})",
        f"action: {action.get('kind')} (rollout {action.get('rollout_state')})",
        f"state version: {alert.get('state_version')}",
    ]


def render(fmt: str, alert: Mapping[str, Any]) -> dict[str, Any]:
    """The request body for one target format."""
    if fmt == "json":
        return dict(alert)
    head = title(alert)
    lines = summary_lines(alert)
    if fmt == "slack":
        text = f"{head}\n" + "\n".join(lines)
        return {
            "text": text,
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": head[:150]}},
                {
                    "type": "section",
                    "text": {"type": "mrkdwn", "text": "\n".join(f"*{ln}*" for ln in lines)},
                },
            ],
        }
    md = f"### {head}\n\n" + "\n".join(f"- {ln}" for ln in lines)
    if fmt == "dingtalk":
        return {"msgtype": "markdown", "markdown": {"title": head, "text": md}}
    if fmt == "wecom":
        return {"msgtype": "markdown", "markdown": {"content": md}}
    raise ValueError(f"unknown alert format {fmt!r}")


class AlertSender:
    """Delivers alerts in the background; `send` never blocks."""

    def __init__(
        self,
        session_factory: Callable[[], aiohttp.ClientSession],
        *,
        attempts: int = 4,
        backoff: float = 0.5,
        max_queue: int = 1000,
        concurrency: int = 4,
    ) -> None:
        self.session_factory = session_factory
        self.attempts = attempts
        self.backoff = backoff
        self.concurrency = concurrency
        self._queue: asyncio.Queue[tuple[AlertTarget, dict[str, Any]]] = asyncio.Queue(max_queue)
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self.delivered = 0
        self.failed = 0

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._worker(), name=f"gateway-alerts-{i}")
                for i in range(self.concurrency)
            ]

    async def stop(self, grace: float = 0.0) -> None:
        """Stop the workers; alerts queued or in flight first get up to `grace` seconds."""
        if grace > 0 and self._tasks:
            try:
                await asyncio.wait_for(self._queue.join(), grace)
            except TimeoutError:
                log.warning(
                    "stopping before every alert was sent: %d still queued, the ones under way"
                    " cut off",
                    self._queue.qsize(),
                )
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    def send(self, targets: Iterable[AlertTarget], alert: Mapping[str, Any]) -> None:
        for target in targets:
            body = render(target.format, alert)
            if self._queue.full():
                dropped, _ = self._queue.get_nowait()
                log.warning("alert queue full; dropped the oldest alert for %s", dropped.url)
            self._queue.put_nowait((target, body))

    async def _worker(self) -> None:
        while True:
            target, body = await self._queue.get()
            try:
                await self._deliver(target, body)
            finally:
                self._queue.task_done()

    async def _deliver(self, target: AlertTarget, body: dict[str, Any]) -> None:
        if self._session is None:
            self._session = self.session_factory()
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                async with self._session.post(target.url, json=body) as r:
                    if r.status < 300:
                        self.delivered += 1
                        return
                    problem = f"answered {r.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                problem = f"failed: {e or type(e).__name__}"
            if attempt < self.attempts:
                log.warning(
                    "alert %s (%s) %s; retry %d in %.1fs",
                    target.url,
                    target.format,
                    problem,
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)
                delay *= 2
            else:
                self.failed += 1
                log.error(
                    "alert %s (%s) %s; gave up after %d attempts",
                    target.url,
                    target.format,
                    problem,
                    attempt,
                )


def targets_for(
    top: Iterable[AlertTarget], guard_alerts: Iterable[AlertTarget], webhook: str | None
) -> tuple[AlertTarget, ...]:
    """Top-level targets, the service guard's own, and `alert_webhook` as a json target."""
    out: list[AlertTarget] = [*top, *guard_alerts]
    if webhook:
        out.append(AlertTarget(webhook, "json"))
    return tuple(dict.fromkeys(out))  # each target once, in order
