"""The Consul KV state store against the Consul double (Consul docs: api-docs/kv.mdx)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.config import ConsulConfig
from gateway.errors import Conflict, StateError
from gateway.store import ServiceState, StateDoc, encode
from gateway.store.consul import ConsulStore
from tests.conftest import gateway_config, two_releases
from tests.consul_double import ConsulDouble

DOC = StateDoc(0, {"svc": ServiceState(weights={"stable": 90.0, "gray": 10.0})})


@pytest.fixture
async def consul() -> AsyncIterator[ConsulDouble]:
    async with ConsulDouble(jitter=False) as d:
        yield d


def _store(consul: ConsulDouble, **kw: Any) -> ConsulStore:
    return ConsulStore(ConsulConfig(address=consul.address, kv_prefix="gw/test"), **kw)


async def _next(it: AsyncIterator[StateDoc]) -> StateDoc:
    return await asyncio.wait_for(it.__anext__(), 10)


async def test_write_is_cas_and_reaches_another_replica(consul: ConsulDouble) -> None:
    a, b = _store(consul), _store(consul)
    await a.open()
    await b.open()
    try:
        assert a.load().version == 0 and b.load().version == 0  # 404: config defaults
        watch = b.watch()
        pending = asyncio.ensure_future(_next(watch))
        v1 = await a.write(DOC, 0)
        assert v1.version == 1
        got = await pending
        assert got.version == 1 and got.weights() == {"svc": {"stable": 90.0, "gray": 10.0}}
        # b's cache is at 1 now; a stale writer loses the race with a Conflict, no change.
        with pytest.raises(Conflict):
            await a.write(DOC, 0)
        v2 = await b.write(DOC, 1)
        assert v2.version == 2
        with pytest.raises(Conflict):  # a's CAS index is stale: Consul answers false
            a._doc = v1  # simulate a replica that has not heard of v2 yet
            await a.write(DOC, 1)
        assert a.load().version == 2  # ...and it caught up while failing
        await watch.aclose()
    finally:
        await a.close()
        await b.close()


async def test_corrupt_document_refuses_to_start(consul: ConsulDouble) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{consul.address}/v1/kv/gw/test/state", data=b'{"version": 1') as r:
            assert r.status == 200
    store = _store(consul)
    with pytest.raises(StateError) as e:
        await store.open()
    assert "corrupt state document" in e.value.message
    await store.close()


async def test_dead_consul_keeps_the_last_good_state(
    consul: ConsulDouble, caplog: pytest.LogCaptureFixture
) -> None:
    a = _store(consul, backoff=0.05)
    await a.open()
    try:
        v1 = await a.write(DOC, 0)
        await consul.kill()
        watch = a.watch()
        pending = asyncio.ensure_future(_next(watch))
        caplog.set_level(logging.WARNING, "gateway.store")
        deadline = time.monotonic() + 20  # wait for two failed polls, then judge them
        while caplog.text.count("Consul KV watch failed") < 2:
            assert time.monotonic() < deadline, "the outage was never noticed"
            await asyncio.sleep(0.01)
        assert not pending.done() and a.load() == v1
        await consul.revive()
        # Another writer (e.g. a replica) stores v2 directly: the watcher picks it up.
        v2 = StateDoc(2, DOC.services)
        async with aiohttp.ClientSession() as s:
            async with s.put(f"{consul.address}/v1/kv/gw/test/state", data=encode(v2)) as r:
                assert r.status == 200
        assert (await pending).version == 2
        await watch.aclose()
    finally:
        await a.close()


async def test_two_gateway_replicas_converge(
    consul: ConsulDouble, upstreams: Any, gateway: Any
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    doc = gateway_config(
        two_releases(st.url, gr.url, 95, 5),
        state={"store": "consul"},
        consul={"address": consul.address, "kv_prefix": "gw/replicas"},
    )
    g1, g2 = await gateway(doc), await gateway(doc)
    async with aiohttp.ClientSession() as s:
        async with s.put(
            f"http://127.0.0.1:{g1.admin_port}/admin/services/svc/weights", json={"gray": 50}
        ) as r:
            assert r.status == 200
    for _ in range(200):
        if g2.holder.current.services["svc"].releases["gray"].raw_weight == 50:
            break
        await asyncio.sleep(0.02)
    assert g2.holder.current.version == g1.holder.current.version == 1
    assert g2.holder.current.services["svc"].releases["gray"].raw_weight == 50
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{consul.address}/v1/kv/gw/replicas/state?raw") as r:
            assert b'"version": 1' in await r.read()
