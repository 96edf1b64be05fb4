"""Consul over TLS with the Consul CLI's variables: discovery and the KV store (README "TLS")."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import config as C
from gateway.app import Gateway
from gateway.demo import demo_upstream
from gateway.discovery import Pacing
from gateway.errors import StateError
from gateway.store.consul import ConsulStore
from tests.conftest import gateway_config, two_releases
from tests.consul_double import ConsulDouble
from tests.tls_helpers import PKI, make_pki, serve_tls


async def tls_consul(ctx: ssl.SSLContext) -> ConsulDouble:
    consul = ConsulDouble(jitter=False)
    consul.ssl_context = ctx
    await consul.start()
    return consul


async def wait_for(cond: Any, what: str, deadline_s: float = 20.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}")


async def test_discovery_over_tls_finds_an_https_instance_and_reaches_it(
    pki: PKI, upstreams: Any, started: list[Gateway]
) -> None:
    stable = await upstreams("stable")
    runner, gray_port = await serve_tls(demo_upstream("gray"), pki.server_ctx())
    consul = await tls_consul(pki.server_ctx())
    try:
        assert consul.address.startswith("https://")
        consul.register(
            {
                "ID": "gray-1",
                "Name": "user-api",
                "Tags": ["gray"],
                "Address": "127.0.0.1",
                "Port": gray_port,
                "Meta": {"scheme": "https"},  # README "TLS": this instance speaks TLS
                "Check": {"CheckID": "service:gray-1", "TTL": "600s", "Status": "passing"},
            }
        )
        doc = gateway_config(
            {
                "user-api": {
                    "upstream_tls": {"ca": str(pki.ca_pem)},
                    "releases": {
                        "stable": {"weight": 0, "upstreams": [stable.url]},
                        "gray": {
                            "weight": 100,
                            "consul": {"service": "user-api", "tags": ["gray"]},
                        },
                    },
                }
            },
            consul={"address": consul.address},
        )
        cfg = C.build(doc, env={"CONSUL_CACERT": str(pki.ca_pem)})
        gw = Gateway(cfg, consul_pacing=Pacing(rate=50, burst=50))
        await gw.start()
        started.append(gw)
        await wait_for(
            lambda: len(gw.holder.current.services["user-api"].releases["gray"].endpoints) == 1,
            "the gray instance discovered over TLS",
        )
        rel = gw.holder.current.services["user-api"].releases["gray"]
        assert rel.endpoints[0].tls
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{gw.port}/") as r,
        ):
            assert r.status == 200, await r.text()
            assert (await r.json())["release"] == "gray"
        assert any(q.path.startswith("/v1/health/service/user-api") for q in consul.requests)
    finally:
        await consul.close()
        await runner.cleanup()


@pytest.mark.parametrize("how", ["https-address", "consul-http-ssl"], ids=["https", "env-ssl"])
async def test_kv_store_over_mtls_takes_weight_changes(
    pki: PKI, upstreams: Any, started: list[Gateway], how: str
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    consul = await tls_consul(pki.server_ctx(require_client=True))
    try:
        env = {
            "CONSUL_CACERT": str(pki.ca_pem),
            "CONSUL_CLIENT_CERT": str(pki.client.cert),
            "CONSUL_CLIENT_KEY": str(pki.client.key),
        }
        address = consul.address
        if how == "consul-http-ssl":  # CONSUL_HTTP_SSL=true turns http:// into https://
            address = address.replace("https://", "http://")
            env["CONSUL_HTTP_SSL"] = "true"
        doc = gateway_config(
            two_releases(st.url, gr.url, 95, 5),
            state={"store": "consul"},
            consul={"address": address, "kv_prefix": "gw/tls"},
        )
        gw = Gateway(C.build(doc, env=env))
        await gw.start()
        started.append(gw)
        async with (
            aiohttp.ClientSession() as s,
            s.put(
                f"http://127.0.0.1:{gw.admin_port}/admin/services/svc/weights", json={"gray": 50}
            ) as r,
        ):
            assert r.status == 200, await r.text()
        assert "gw/tls/state" in consul.kv
        assert b'"gray": 50' in consul.kv["gw/tls/state"].value
    finally:
        await consul.close()


async def test_kv_store_refuses_a_consul_whose_certificate_it_cannot_verify(
    pki: PKI, tmp_path: Path
) -> None:
    consul = await tls_consul(pki.server_ctx())
    other = make_pki(tmp_path / "other", "other")
    try:
        cfg = C.build(
            gateway_config(
                {"svc": {"releases": {"stable": {"weight": 1, "upstreams": ["127.0.0.1:9"]}}}},
                consul={"address": consul.address},
            ),
            env={"CONSUL_CACERT": str(other.ca_pem)},
        )
        store = ConsulStore(cfg.consul)
        with pytest.raises(StateError, match="certificate verify failed"):
            await store.open()
        await store.close()
        # CONSUL_HTTP_SSL_VERIFY=false: no check at all, as the Consul CLI does.
        cfg = C.build(
            gateway_config(
                {"svc": {"releases": {"stable": {"weight": 1, "upstreams": ["127.0.0.1:9"]}}}},
                consul={"address": consul.address},
            ),
            env={"CONSUL_HTTP_SSL_VERIFY": "false"},
        )
        store = ConsulStore(cfg.consul)
        await store.open()
        await store.close()
    finally:
        await consul.close()
