"""Alert targets end to end: each chat service's body at a local receiver, retries,
and a receiver that hangs or is down holding up neither the guard nor the data path.

Body shapes, from each service's incoming-webhook documentation:
- Slack: https://api.slack.com/messaging/webhooks — `{"text": ...}`, optional
  Block Kit `blocks` (https://api.slack.com/reference/block-kit/blocks), where
  `text` becomes the notification fallback.
- DingTalk custom robot:
  https://open.dingtalk.com/document/orgapp/custom-robot-access —
  `{"msgtype": "markdown", "markdown": {"title": ..., "text": ...}}`.
- WeCom group robot: https://developer.work.weixin.qq.com/document/path/91770 —
  `{"msgtype": "markdown", "markdown": {"content": ...}}`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from gateway.alerts import AlertSender
from gateway.config import AlertTarget
from tests.conftest import free_port, gateway_config, start_app, two_releases


def _failing_app() -> web.Application:
    async def boom(request: web.Request) -> web.Response:
        return web.json_response({"release": "gray"}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", boom)
    return app


class Receiver:
    """Records every POST; `/hang` holds its request until `release` is set."""

    def __init__(self, fail_first: int = 0) -> None:
        self.got: dict[str, list[Any]] = {}
        self.arrived = asyncio.Event()
        self.hanging = asyncio.Event()
        self.release = asyncio.Event()
        self.fail_first = fail_first
        self.attempts = 0

    def app(self) -> web.Application:
        async def hook(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            if name == "hang":
                self.hanging.set()
                await self.release.wait()
            if name == "flaky":
                self.attempts += 1
                if self.attempts <= self.fail_first:
                    return web.Response(status=503)
            self.got.setdefault(name, []).append(await request.json())
            self.arrived.set()
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/{name}", hook)
        return app

    async def wait_for(self, *names: str) -> None:
        while not all(n in self.got for n in names):
            self.arrived.clear()
            await self.arrived.wait()


def _is_slack(b: Any) -> bool:
    return (
        isinstance(b["text"], str)
        and isinstance(b["blocks"], list)
        and all(isinstance(x, dict) and x["type"] in ("header", "section") for x in b["blocks"])
        and all(x["text"]["type"] in ("plain_text", "mrkdwn") for x in b["blocks"])
    )


def _is_dingtalk(b: Any) -> bool:
    md = b["markdown"]
    return (
        b["msgtype"] == "markdown"
        and set(md) == {"title", "text"}
        and all(isinstance(md[k], str) and md[k] for k in md)
    )


def _is_wecom(b: Any) -> bool:
    md = b["markdown"]
    return b["msgtype"] == "markdown" and set(md) == {"content"} and isinstance(md["content"], str)


async def test_chat_bodies_reach_their_receivers_and_a_dead_one_delays_nothing(
    upstreams: Any, gateway: Any
) -> None:
    stable = await upstreams("stable")
    gray = await start_app(_failing_app())
    rx = Receiver()
    hook = await upstreams(app=rx.app())
    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    svc = two_releases(stable.url, gray.url, 50, 50)
    svc["svc"]["guard"] = {
        "error_rate": 0.05,
        "min_requests": 10,
        "window": "30s",
        "for": "0s",
        "alerts": [
            {"url": f"{hook.url}/hang", "format": "json"},
            {"url": dead, "format": "slack"},
            {"url": f"{hook.url}/slack", "format": "slack"},
            {"url": f"{hook.url}/dingtalk", "format": "dingtalk"},
        ],
        "alert_webhook": f"{hook.url}/json",
    }
    cfg = gateway_config(svc, alerts=[{"url": f"{hook.url}/wecom", "format": "wecom"}])
    gw = await gateway(cfg, guard_interval=3600)  # this test calls the guard itself
    base = f"http://127.0.0.1:{gw.port}"
    try:
        async with aiohttp.ClientSession() as s:
            for i in range(60):
                async with s.get(f"{base}/", headers={"X-User-ID": f"u{i}"}) as r:
                    await r.read()
            # The guard acts and returns while a receiver still holds its alert.
            acted = await gw.guardian.check()
            assert [(v.release, v.rule.metric) for v in acted] == [("gray", "error_rate")]
            await asyncio.wait_for(rx.hanging.wait(), 30)
            assert not rx.release.is_set()
            # The data path answers while that delivery hangs and another one fails.
            for i in range(50):
                async with s.get(f"{base}/", headers={"X-User-ID": f"u{i}"}) as r:
                    assert r.status == 200 and r.headers["X-Release-Stage"] == "stable"
            assert "hang" not in rx.got
            await asyncio.wait_for(rx.wait_for("slack", "dingtalk", "wecom", "json"), 30)
    finally:
        rx.release.set()
        await gray.runner.cleanup()
    (slack,), (ding,), (wecom,), (raw,) = (
        rx.got[k] for k in ("slack", "dingtalk", "wecom", "json")
    )
    assert _is_slack(slack) and "error_rate" in slack["text"]
    assert _is_dingtalk(ding) and "svc/gray" in ding["markdown"]["title"]
    assert _is_wecom(wecom) and "error_rate" in wecom["markdown"]["content"]
    assert raw["alert"] == "GrayReleaseRolledBack" and raw["reason"] == "error_rate"
    assert raw["action"] == {"kind": "rollback", "weight": 0, "rollout_state": "CircuitBreak"}


async def test_alerts_are_retried_with_backoff_until_the_receiver_answers() -> None:
    rx = Receiver(fail_first=2)
    hook = await start_app(rx.app())
    sender = AlertSender(
        lambda: aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)),
        attempts=4,
        backoff=0.05,
    )
    sender.start()
    try:
        sender.send([AlertTarget(f"{hook.url}/flaky", "dingtalk")], {"alert": "X", "service": "s"})
        await asyncio.wait_for(rx.wait_for("flaky"), 30)
    finally:
        await sender.stop()
        await hook.runner.cleanup()
    assert rx.attempts == 3 and sender.delivered == 1 and sender.failed == 0
    assert _is_dingtalk(rx.got["flaky"][0])


async def test_a_receiver_that_never_answers_is_given_up_after_the_attempts() -> None:
    dead = AlertTarget(f"http://127.0.0.1:{free_port()}/x", "wecom")
    sender = AlertSender(
        lambda: aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)),
        attempts=2,
        backoff=0.01,
    )
    sender.start()
    try:
        sender.send([dead], {"alert": "X"})
        await asyncio.wait_for(sender._queue.join(), 30)
    finally:
        await sender.stop()
    assert (sender.delivered, sender.failed) == (0, 1)


async def test_a_promoted_release_is_alerted_once_and_left_alone(
    upstreams: Any, gateway: Any
) -> None:
    stable = await upstreams("stable")
    gray = await start_app(_failing_app())
    rx = Receiver()
    hook = await upstreams(app=rx.app())
    svc = two_releases(stable.url, gray.url, 100, 0)
    svc["svc"]["guard"] = {
        "error_rate": 0.05,
        "min_requests": 10,
        "window": "30s",
        "for": "0s",
        "alert_webhook": f"{hook.url}/json",
    }
    gw = await gateway(gateway_config(svc), guard_interval=3600)  # the test calls the guard
    admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
    plan = {"release": "gray", "steps": [{"weight": 100}]}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{admin}/rollout", json=plan) as r:
                assert r.status == 200
            async with s.post(f"{admin}/promote") as r:
                assert r.status == 200
            version = gw.holder.current.version
            for i in range(30):
                async with s.get(f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": f"{i}"}):
                    pass
            assert await gw.guardian.check() == []  # no action
            assert await gw.guardian.check() == []
            await asyncio.wait_for(gw.guardian.alerts._queue.join(), 30)  # all delivered
    finally:
        await gray.runner.cleanup()
    assert gw.holder.current.version == version  # nothing written
    assert gw.holder.current.services["svc"].releases["gray"].raw_weight == 100
    (alert,) = rx.got["json"]  # once, not once per evaluation
    assert alert["alert"] == "PromotedReleaseBreach" and alert["reason"] == "error_rate"
    assert alert["action"]["kind"] == "alert"
    assert gw.metrics.guard_trips.labels("svc", "gray", "error_rate")._value.get() == 0


async def _hanging_alert(rx: Receiver, url: str, total: float) -> AlertSender:
    """A sender (one attempt) whose alert is under way at `rx`'s `/hang` (served at `url`)."""
    sender = AlertSender(
        lambda: aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=total)), attempts=1
    )
    sender.start()
    sender.send([AlertTarget(f"{url}/hang", "json")], {"alert": "X", "service": "s"})
    await asyncio.wait_for(rx.hanging.wait(), 10)
    return sender


async def test_a_clean_stop_lets_an_alert_under_way_be_delivered() -> None:
    rx = Receiver()
    hook = await start_app(rx.app())
    try:
        sender = await _hanging_alert(rx, hook.url, total=5)
        asyncio.get_running_loop().call_later(0.3, rx.release.set)
        await sender.stop(grace=10)
    finally:
        await hook.runner.cleanup()
    assert (sender.delivered, sender.failed) == (1, 0)
    assert rx.got["hang"][0]["alert"] == "X"


async def test_a_stop_waits_no_longer_than_its_grace_for_a_hanging_receiver() -> None:
    rx = Receiver()
    hook = await start_app(rx.app())
    loop = asyncio.get_running_loop()
    try:
        sender = await _hanging_alert(rx, hook.url, total=60)
        began = loop.time()
        await sender.stop(grace=0.3)
        took = loop.time() - began
    finally:
        rx.release.set()
        await hook.runner.cleanup()
    assert 0.3 <= took < 10 and sender.delivered == 0
