"""`privacy.user_id` through the gateway process: no raw user id leaves it; the gray tag does."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.app import Gateway
from gateway.telemetry import Telemetry, TelemetryConfig
from tests.conftest import Upstream, gateway_config, run_gateway_process
from tests.test_trace_e2e import eventually

UpstreamFactory = Callable[..., Awaitable[Upstream]]
GatewayFactory = Callable[..., Awaitable[Gateway]]

SALT = "pepper-13"
RAW = "alice-7c1f2e"  # distinctive enough to grep for


def salted(key: str) -> str:
    return hashlib.sha256((SALT + key).encode()).hexdigest()


def _wait_for(path: Path, needle: str, deadline_s: float = 30.0) -> str:
    """The file's text once it holds `needle` (spans are exported on shutdown)."""
    end = time.monotonic() + deadline_s
    text = ""
    while time.monotonic() < end:
        text = path.read_text(errors="replace")
        if needle in text:
            return text
        time.sleep(0.05)
    return text


async def test_hash_reaches_upstream_log_and_span_never_the_raw_id(
    upstreams: UpstreamFactory, tmp_path: Path
) -> None:
    st = await upstreams("stable")
    stable = {"weight": 1, "upstreams": [st.url], "tag": {"env": "pre", "group": "v2"}}
    doc = gateway_config(
        {"svc": {"releases": {"stable": stable}}},
        access_log=True,
        privacy={"user_id": "hash"},
    )
    env = {
        "GATEWAY_USER_SALT": SALT,
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_SERVICE_NAME": "privacy-test",
    }
    bodies: list[dict[str, Any]] = []
    with run_gateway_process(tmp_path, doc, env=env) as gp:
        async with aiohttp.ClientSession() as s:
            for headers in ({"X-User-ID": RAW}, {"Cookie": f"uid={RAW}; theme=dark"}):
                async with s.get(f"{gp.url}/p", headers=headers) as r:
                    assert r.status == 200
                    bodies.append(await r.json())
            async with s.get(f"{gp.admin}/admin/services/svc/explain", params={"user": RAW}) as r:
                explained = await r.text()
    log = _wait_for(gp.log, '"user.id"')
    want = salted(RAW)
    # The upstream got the hash in the user header, and in the uid cookie.
    assert bodies[0]["headers"]["X-User-ID"] == want
    assert bodies[1]["headers"]["Cookie"] == f"uid={want}; theme=dark"
    # The access log and the sampled span carry the hash.
    assert f'"user":"{want}"' in log
    assert f'"user.id": "{want}"' in log
    assert want in explained
    # The release's gray tag rides along: baggage (encoded) and span attribute (plain).
    assert "gray.tag=env=pre%3Bgroup=v2" in bodies[0]["headers"]["baggage"]
    assert '"gray.tag": "env=pre;group=v2"' in log
    # …and the raw id appears nowhere.
    for where, text in (("upstream", repr(bodies)), ("log+spans", log), ("explain", explained)):
        assert RAW not in text, where


@pytest.mark.parametrize("mode", ["drop", "keep"], ids=["drop", "keep"])
async def test_drop_sends_no_user_id_keep_sends_it(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    client: aiohttp.ClientSession,
    engine: str,
    mode: str,
) -> None:
    st = await upstreams("stable")
    doc = gateway_config(
        {"svc": {"releases": {"stable": {"weight": 1, "upstreams": [st.url]}}}},
        engine=engine,
        privacy={"user_id": mode},
    )
    gw = await gateway(doc)
    async with client.get(
        f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": RAW, "Cookie": f"uid={RAW}"}
    ) as r:
        body = await r.json()
    async with client.get(
        f"http://127.0.0.1:{gw.admin_port}/admin/services/svc/explain", params={"user": RAW}
    ) as r:
        ex = await r.json()
    got = {k.lower(): v for k, v in body["headers"].items()}
    if mode == "drop":
        assert "x-user-id" not in got and "cookie" not in got
        assert ex["key"] is None
    else:
        assert got["x-user-id"] == RAW and got["cookie"] == f"uid={RAW}"
        assert ex["key"] == RAW


async def test_span_names_the_client_behind_a_trusted_proxy_and_the_gray_tag(
    upstreams: UpstreamFactory, gateway: GatewayFactory, client: aiohttp.ClientSession, engine: str
) -> None:
    mem = InMemorySpanExporter()
    tel = Telemetry(TelemetryConfig(), processors=[SimpleSpanProcessor(mem)])
    st = await upstreams("stable")
    stable = {"weight": 1, "upstreams": [st.url], "tag": {"env": "pre"}}
    doc = gateway_config(
        {"svc": {"releases": {"stable": stable}}},
        engine=engine,
        routing={"trusted_proxies": ["127.0.0.1/32"]},
    )
    gw = await gateway(doc, telemetry=tel)
    url = f"http://127.0.0.1:{gw.port}/"
    async with client.get(url, headers={"X-Forwarded-For": "198.51.100.20"}) as r:
        assert r.status == 200
    await eventually(lambda: len(mem.get_finished_spans()) == 2, within=30.0)
    (server,) = [s for s in mem.get_finished_spans() if s.kind is SpanKind.SERVER]
    attrs = dict(server.attributes or {})
    assert attrs["client.address"] == "198.51.100.20"
    assert attrs["network.peer.address"] == "127.0.0.1"
    assert attrs["gray.tag"] == "env=pre"
    assert "user.id" not in attrs  # privacy.user_id: keep writes no user id to spans
