"""Releases discovered from Consul, through the running gateway.

README "Consul discovery" and "How routing decides".
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from gateway.app import Gateway
from gateway.discovery import Pacing
from tests.conftest import gateway_config
from tests.consul_double import ConsulDouble


def _register(
    consul: ConsulDouble, sid: str, port: int, tags: list[str], status: str = "passing"
) -> None:
    consul.register(
        {
            "ID": sid,
            "Name": "user-api",
            "Tags": tags,
            "Address": "127.0.0.1",
            "Port": port,
            "Check": {"CheckID": f"service:{sid}", "TTL": "600s", "Status": status},
        }
    )


async def _wait(gw: Gateway, release: str, n: int, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if len(gw.holder.current.services["user-api"].releases[release].endpoints) == n:
            return

        await asyncio.sleep(0.02)
    raise AssertionError(f"{release} never had {n} endpoints")


async def _release_of(s: aiohttp.ClientSession, gw: Gateway, **headers: str) -> tuple[str, Any]:
    async with s.get(f"http://127.0.0.1:{gw.port}/", headers=headers) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["release"], r.headers.get("X-Release-Fallback")


async def test_gray_discovered_by_tags_follows_consul(upstreams: Any, gateway: Any) -> None:
    stable, gray = await upstreams("stable"), await upstreams("gray")
    async with ConsulDouble(jitter=False) as consul:
        _register(consul, "gray-1", gray.port, ["v2", "Gray"])
        _register(consul, "other", stable.port, ["v2"])  # lacks the gray tag: not selected
        doc = gateway_config(
            {
                "user-api": {
                    "releases": {
                        "stable": {"weight": 50, "upstreams": [stable.url]},
                        "gray": {
                            "weight": 50,
                            "consul": {"service": "user-api", "tags": ["v2", "gray"]},
                        },
                    }
                }
            },
            consul={"address": consul.address},
        )
        gw = await gateway(doc, consul_pacing=Pacing(rate=50, burst=50))
        await _wait(gw, "gray", 1)
        async with aiohttp.ClientSession() as s:
            assert await _release_of(s, gw, **{"X-Release-Stage": "gray"}) == ("gray", None)
            # The instance fails its check: gray empties, the baseline serves with a marker.
            consul.register(
                {
                    "ID": "gray-1",
                    "Name": "user-api",
                    "Tags": ["v2", "gray"],
                    "Address": "127.0.0.1",
                    "Port": gray.port,
                    "Check": {"CheckID": "service:gray-1", "TTL": "600s", "Status": "critical"},
                }
            )
            await _wait(gw, "gray", 0)
            assert await _release_of(s, gw, **{"X-Release-Stage": "gray"}) == ("stable", "gray")
            # Healthy again, then Consul dies: the last known good endpoints stay.
            _register(consul, "gray-1", gray.port, ["v2", "gray"])
            await _wait(gw, "gray", 1)
            await consul.kill()
            for _ in range(5):
                assert await _release_of(s, gw, **{"X-Release-Stage": "gray"}) == ("gray", None)
            assert len(gw.holder.current.services["user-api"].releases["gray"].endpoints) == 1
