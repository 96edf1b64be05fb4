"""HTTPS end to end on both engines: the listener, mTLS, TLS upstreams, rotation (README "TLS")."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway import config as C
from gateway.app import Gateway
from gateway.demo import demo_upstream
from gateway.tls import DirectSSLObject, client_context, server_context
from tests.conftest import gateway_config
from tests.engine_helpers import RawClient
from tests.tls_helpers import PKI, cert_serial, make_pki, serial_of, serve_tls


@pytest.fixture
async def tls_upstreams() -> AsyncIterator[Any]:
    """Factory: `await tls_upstreams(ctx, release)` -> port of an HTTPS echo upstream."""
    runners: list[web.AppRunner] = []

    async def make(ctx: ssl.SSLContext, release: str = "stable", app: Any = None) -> int:
        runner, port = await serve_tls(app if app is not None else demo_upstream(release), ctx)
        runners.append(runner)
        return port

    yield make
    for r in runners:
        await r.cleanup()


def one_release(url: str, **svc: Any) -> dict[str, Any]:
    return {"svc": {"releases": {"stable": {"weight": 100, "upstreams": [url]}}, **svc}}


async def start(started: list[Gateway], doc: dict[str, Any], engine: str) -> Gateway:
    gw = Gateway(C.build({**doc, "engine": engine}, env={}))
    await gw.start()
    started.append(gw)
    return gw


def listener(pki: PKI, client_ca: bool = False) -> dict[str, str]:
    t = {"cert": str(pki.server.cert), "key": str(pki.server.key)}
    if client_ca:
        t["client_ca"] = str(pki.ca_pem)
    return t


async def get_json(
    port: int, ctx: ssl.SSLContext | None, path: str = "/x"
) -> tuple[int, dict[str, Any]]:
    scheme = "https" if ctx is not None else "http"
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{scheme}://127.0.0.1:{port}{path}", ssl=ctx if ctx is not None else True) as r,
    ):
        return r.status, json.loads(await r.read())


async def test_https_listener_to_a_plain_upstream_says_https(
    engine: str, pki: PKI, upstreams: Any, started: list[Gateway]
) -> None:
    up = await upstreams("stable")
    gw = await start(started, gateway_config(one_release(up.url), tls=listener(pki)), engine)
    assert gw.port is not None
    status, body = await get_json(gw.port, pki.client_ctx())
    assert status == 200 and body["release"] == "stable"
    assert body["headers"]["X-Forwarded-Proto"] == "https"
    # ALPN offers http/1.1 only, and TLS 1.2 is the floor (README "TLS").
    r, w = await asyncio.open_connection("127.0.0.1", gw.port, ssl=pki_alpn(pki))
    assert w.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    w.close()
    assert gw.config.tls is not None and gw.config.tls.context is not None
    assert gw.config.tls.context.minimum_version == ssl.TLSVersion.TLSv1_2


def pki_alpn(pki: PKI) -> ssl.SSLContext:
    ctx = pki.client_ctx()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


async def test_plain_http_to_the_https_port_gets_no_answer_and_the_gateway_serves_on(
    engine: str, pki: PKI, upstreams: Any, started: list[Gateway]
) -> None:
    up = await upstreams("stable")
    gw = await start(started, gateway_config(one_release(up.url), tls=listener(pki)), engine)
    assert gw.port is not None
    r, w = await asyncio.open_connection("127.0.0.1", gw.port)
    w.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await asyncio.wait_for(r.read(), 30)
    assert not data.startswith(b"HTTP/1.1 200")
    w.close()
    status, _ = await get_json(gw.port, pki.client_ctx())
    assert status == 200


async def test_https_listener_to_a_tls_upstream(
    engine: str, pki: PKI, tls_upstreams: Any, started: list[Gateway]
) -> None:
    port = await tls_upstreams(pki.server_ctx(), "gray")
    svc = one_release(f"https://127.0.0.1:{port}", upstream_tls={"ca": str(pki.ca_pem)})
    gw = await start(started, gateway_config(svc, tls=listener(pki)), engine)
    assert gw.port is not None
    status, body = await get_json(gw.port, pki.client_ctx())
    assert status == 200 and body["release"] == "gray"


async def test_mtls_listener_refuses_a_client_without_a_certificate_and_takes_a_signed_one(
    engine: str, pki: PKI, upstreams: Any, started: list[Gateway], tmp_path: Path
) -> None:
    up = await upstreams("stable")
    doc = gateway_config(one_release(up.url), tls=listener(pki, client_ca=True))
    gw = await start(started, doc, engine)
    assert gw.port is not None
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await get_json(gw.port, pki.client_ctx())
    stranger = make_pki(tmp_path / "stranger", "stranger")  # a client cert from another CA
    ctx = pki.client_ctx()
    ctx.load_cert_chain(stranger.client.cert, stranger.client.key)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await get_json(gw.port, ctx)
    status, body = await get_json(gw.port, pki.client_ctx(with_cert=True))
    assert status == 200 and body["release"] == "stable"


async def test_upstream_mtls_presents_the_configured_client_certificate(
    engine: str, pki: PKI, tls_upstreams: Any, started: list[Gateway]
) -> None:
    seen: list[int] = []

    async def who(request: web.Request) -> web.Response:
        obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        seen.append(serial_of(obj))
        return web.json_response({"release": "stable"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", who)
    port = await tls_upstreams(pki.server_ctx(require_client=True), app=app)
    ut = {"ca": str(pki.ca_pem), "cert": str(pki.client.cert), "key": str(pki.client.key)}
    gw = await start(
        started, gateway_config(one_release(f"https://127.0.0.1:{port}", upstream_tls=ut)), engine
    )
    assert gw.port is not None
    status, body = await get_json(gw.port, None)
    assert status == 200 and body["release"] == "stable"
    assert seen == [cert_serial(pki.client.cert)]


async def test_wrong_ca_is_a_502_naming_the_certificate_error_counted_as_tls(
    engine: str, pki: PKI, tls_upstreams: Any, started: list[Gateway], tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other", "other")
    port = await tls_upstreams(pki.server_ctx())
    svc = one_release(f"https://127.0.0.1:{port}", upstream_tls={"ca": str(other.ca_pem)})
    gw = await start(started, gateway_config(svc), engine)
    assert gw.port is not None
    status, body = await get_json(gw.port, None)
    assert status == 502
    assert body["kind"] == "tls"
    assert body["error"].startswith("upstream TLS error: certificate verify failed")
    assert "unable to get local issuer certificate" in body["error"]
    gw.handler.flush()
    errs = gw.metrics.registry.get_sample_value(
        "gateway_upstream_errors_total", {"service": "svc", "release": "stable", "kind": "tls"}
    )
    assert errs == 1.0


@pytest.mark.parametrize(
    ("server_name", "ok"),
    [("upstream.test", True), (None, False)],
    ids=["server-name-set", "checked-against-the-ip"],
)
async def test_server_name_is_sni_and_the_name_checked(
    engine: str,
    pki: PKI,
    tls_upstreams: Any,
    started: list[Gateway],
    server_name: str | None,
    ok: bool,
) -> None:
    named = pki.issue("named", "upstream.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(named.cert, named.key)
    sni: list[str | None] = []
    ctx.sni_callback = lambda _obj, name, _ctx: sni.append(name)  # type: ignore[assignment,func-returns-value,return-value]
    port = await tls_upstreams(ctx)
    ut: dict[str, Any] = {"ca": str(pki.ca_pem), "server_name": server_name}
    gw = await start(
        started, gateway_config(one_release(f"https://127.0.0.1:{port}", upstream_tls=ut)), engine
    )
    assert gw.port is not None
    status, body = await get_json(gw.port, None)
    if ok:
        assert status == 200 and sni == ["upstream.test"]
    else:
        assert status == 502 and body["kind"] == "tls"
        assert "IP address mismatch" in body["error"]


async def test_release_upstream_tls_overrides_the_services_field_by_field(
    engine: str, pki: PKI, tls_upstreams: Any, started: list[Gateway], tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other", "other")
    stable = await tls_upstreams(pki.server_ctx(), "stable")
    gray = await tls_upstreams(pki.server_ctx(), "gray")
    svc = {
        "svc": {
            "upstream_tls": {"ca": str(other.ca_pem)},
            "releases": {
                "stable": {"weight": 0, "upstreams": [f"https://127.0.0.1:{stable}"]},
                "gray": {
                    "weight": 100,
                    "upstreams": [f"https://127.0.0.1:{gray}"],
                    "upstream_tls": {"ca": str(pki.ca_pem)},
                },
            },
        }
    }
    gw = await start(started, gateway_config(svc), engine)
    assert gw.port is not None
    status, body = await get_json(gw.port, None)
    assert status == 200 and body["release"] == "gray"
    cfg = gw.config.services["svc"]
    assert cfg.releases["stable"].upstream_tls is not None
    assert cfg.releases["stable"].upstream_tls.ca == str(other.ca_pem)


async def test_pooled_tls_connections_are_reused(
    engine: str, pki: PKI, tls_upstreams: Any, started: list[Gateway]
) -> None:
    peers: list[object] = []

    async def echo(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.json_response({"release": "stable"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    port = await tls_upstreams(pki.server_ctx(), app=app)
    svc = one_release(f"https://127.0.0.1:{port}", upstream_tls={"ca": str(pki.ca_pem)})
    gw = await start(started, gateway_config(svc), engine)
    assert gw.port is not None
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.get(f"http://127.0.0.1:{gw.port}/x") as r:
                assert r.status == 200
    assert len(peers) == 5 and len(set(peers)) == 1


async def test_reload_serves_a_new_certificate_to_new_connections_while_open_ones_go_on(
    engine: str, pki: PKI, upstreams: Any, started: list[Gateway], tmp_path: Path
) -> None:
    up = await upstreams("stable")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live-key.pem"
    live_cert.write_bytes(pki.server.cert.read_bytes())
    live_key.write_bytes(pki.server.key.read_bytes())
    doc = gateway_config(
        one_release(up.url), tls={"cert": str(live_cert), "key": str(live_key)}, engine=engine
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    gw = Gateway(C.load(str(path), env={}))
    await gw.start()
    started.append(gw)
    assert gw.port is not None and gw.admin_port is not None
    ctx = pki.client_ctx()
    kept = await tls_client(gw.port, ctx)
    assert (await kept.response()).status == 200
    assert served_serial(kept) == cert_serial(pki.server.cert)
    rotated = pki.issue("rotated")
    live_cert.write_bytes(rotated.cert.read_bytes())
    live_key.write_bytes(rotated.key.read_bytes())
    status, body = await post_reload(gw.admin_port)
    assert status == 200, body
    await kept.send(GET)  # the open connection carries on, with the certificate it had
    assert (await kept.response()).status == 200
    assert served_serial(kept) == cert_serial(pki.server.cert)
    fresh = await tls_client(gw.port, ctx)  # a new connection sees the new certificate
    assert (await fresh.response()).status == 200
    assert served_serial(fresh) == cert_serial(rotated.cert)
    await fresh.close()
    # A key that does not match refuses the reload, naming the file; the last good one serves.
    live_key.write_bytes(pki.client.key.read_bytes())
    status, body = await post_reload(gw.admin_port)
    assert status == 400
    assert body["field"] == "tls.key" and str(live_key) in body["errors"][0]["error"]
    fresh = await tls_client(gw.port, ctx)
    assert (await fresh.response()).status == 200
    assert served_serial(fresh) == cert_serial(rotated.cert)
    await fresh.close()
    await kept.close()


GET = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"


async def tls_client(port: int, ctx: ssl.SSLContext) -> RawClient:
    """A keep-alive HTTPS connection that has sent one GET."""
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    c = RawClient(r, w)
    await c.send(GET)
    return c


def served_serial(c: RawClient) -> int:
    return serial_of(c.writer.get_extra_info("ssl_object"))


async def post_reload(admin_port: int) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{admin_port}/admin/reload") as r,
    ):
        return r.status, await r.json()


async def test_active_health_check_of_an_https_endpoint_speaks_tls(
    pki: PKI, tls_upstreams: Any, started: list[Gateway]
) -> None:
    probed = asyncio.Event()

    async def health(request: web.Request) -> web.Response:
        if request.headers.get("User-Agent") == "gray-gateway-health":
            probed.set()
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", health)
    port = await tls_upstreams(pki.server_ctx(), app=app)
    svc = {
        "svc": {
            "upstream_tls": {"ca": str(pki.ca_pem)},
            "releases": {
                "stable": {
                    "weight": 100,
                    "upstreams": [f"https://127.0.0.1:{port}"],
                    "health_check": {"interval": "200ms", "timeout": "200ms"},
                }
            },
        }
    }
    await start(started, gateway_config(svc), "fast")
    await asyncio.wait_for(probed.wait(), 30)


async def test_websocket_over_the_https_listener_to_a_tls_upstream(
    engine: str, pki: PKI, tls_upstreams: Any, started: list[Gateway]
) -> None:
    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sock.send_str(f"tls:{msg.data}")
        return sock

    app = web.Application()
    app.router.add_get("/ws", ws)
    port = await tls_upstreams(pki.server_ctx(), app=app)
    svc = one_release(f"https://127.0.0.1:{port}", upstream_tls={"ca": str(pki.ca_pem)})
    gw = await start(started, gateway_config(svc, tls=listener(pki)), engine)
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(f"wss://127.0.0.1:{gw.port}/ws", ssl=pki.client_ctx()) as sock,
    ):
        await sock.send_str("hello")
        assert await sock.receive_str() == "tls:hello"


async def test_tls_failures_count_toward_passive_health(
    pki: PKI, tls_upstreams: Any, started: list[Gateway], tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other", "other")
    port = await tls_upstreams(pki.server_ctx())
    svc = one_release(f"https://127.0.0.1:{port}", upstream_tls={"ca": str(other.ca_pem)})
    gw = await start(started, gateway_config(svc, retries=0), "fast")
    assert gw.port is not None
    slot = gw.holder.current.services["svc"].releases["stable"].pool.slots[0]
    for n in (1, 2):
        status, body = await get_json(gw.port, None)
        assert status == 502 and body["kind"] == "tls"
        assert slot.fails == n and slot.down_until == 0.0
    status, _ = await get_json(gw.port, None)
    assert status == 502
    assert slot.down_until > 0  # the third in a row takes it out, as connect errors do


async def test_a_reload_reads_upstream_tls_files_again_and_drops_old_pooled_connections(
    pki: PKI, tls_upstreams: Any, started: list[Gateway], tmp_path: Path
) -> None:
    peers: list[object] = []

    async def echo(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.json_response({"release": "stable"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    port = await tls_upstreams(pki.server_ctx(), app=app)
    ca = tmp_path / "upstream-ca.pem"
    ca.write_bytes(pki.ca_pem.read_bytes())
    doc = gateway_config(one_release(f"https://127.0.0.1:{port}", upstream_tls={"ca": str(ca)}))
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    gw = Gateway(C.load(str(path), env={}))
    await gw.start()
    started.append(gw)
    assert gw.port is not None and gw.admin_port is not None
    for _ in range(2):
        assert (await get_json(gw.port, None))[0] == 200
    assert len(set(peers)) == 1
    status, body = await post_reload(gw.admin_port)
    assert status == 200, body
    assert (await get_json(gw.port, None))[0] == 200
    assert len(set(peers)) == 2  # a new connection, made with the reloaded context
    ca.write_text("gone\n")  # a CA file that is no more: the reload is refused, naming it
    status, body = await post_reload(gw.admin_port)
    assert status == 400 and body["field"] == "services.svc.upstream_tls.ca"
    assert (await get_json(gw.port, None))[0] == 200


async def test_a_gray_release_whose_certificate_fails_is_rolled_back_by_the_guard(
    pki: PKI, upstreams: Any, tls_upstreams: Any, started: list[Gateway], tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other", "other")  # gray's certificate is from a CA not trusted
    stable = await upstreams("stable")
    gray = await tls_upstreams(other.server_ctx(), "gray")
    svc = {
        "svc": {
            "upstream_tls": {"ca": str(pki.ca_pem)},
            "guard": {"error_rate": 0.05, "min_requests": 20, "window": "30s", "for": "0s"},
            "releases": {
                "stable": {"weight": 50, "upstreams": [stable.url]},
                "gray": {"weight": 50, "upstreams": [f"https://127.0.0.1:{gray}"]},
            },
        }
    }
    gw = Gateway(C.build(gateway_config(svc, retries=0), env={}), guard_interval=0.05)
    await gw.start()
    started.append(gw)
    kinds: set[str] = set()
    async with aiohttp.ClientSession() as s:
        for i in range(120):
            async with s.get(f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": f"u{i}"}) as r:
                if r.status == 502:
                    kinds.add((await r.json())["kind"])
        assert kinds == {"tls"}
        end = asyncio.get_running_loop().time() + 30
        while gw.holder.current.services["svc"].releases["gray"].raw_weight != 0:
            assert asyncio.get_running_loop().time() < end, "the guard never rolled gray back"
            await asyncio.sleep(0.05)
        async with s.get(f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": "u1"}) as r:
            assert r.status == 200 and r.headers["X-Release-Stage"] == "stable"


def _shake(client: ssl.SSLObject, server: ssl.SSLObject, wire: list[ssl.MemoryBIO]) -> None:
    """Complete a handshake between two SSLObjects over memory BIOs (c_in, c_out, s_in, s_out)."""
    c_in, c_out, s_in, s_out = wire
    for _ in range(10):
        done = 0
        for obj in (client, server):
            try:
                obj.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            return
    raise AssertionError("the handshake did not complete")


def test_tls_objects_hand_the_transport_the_c_methods_and_carry_data_both_ways(pki: PKI) -> None:
    """gateway.tls.DirectSSLObject: read/write/pending are OpenSSL's C methods, and they work
    as the event loop's TLS transport calls them (read(n), read(n, buffer), write, pending)."""
    wire = [ssl.MemoryBIO() for _ in range(4)]
    c_in, c_out, s_in, s_out = wire
    srv_ctx = server_context(str(pki.server.cert), str(pki.server.key), None)
    cli_ctx = client_context(ca=str(pki.ca_pem))
    server = srv_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = cli_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    for obj in (server, client):
        assert isinstance(obj, DirectSSLObject)
        raw = vars(obj)["_sslobj"]
        assert (obj.read, obj.write, obj.pending) == (raw.read, raw.write, raw.pending)
        assert type(obj.read).__name__ == "builtin_function_or_method"
    _shake(client, server, wire)
    assert server.version() == client.version() and server.selected_alpn_protocol() == "http/1.1"

    assert client.write(b"GET / HTTP/1.1\r\n\r\n") == 18
    s_in.write(c_out.read())
    assert server.read(4) == b"GET "
    assert server.pending() == 14
    buf = bytearray(64)
    assert server.read(64, buf) == 14 and bytes(buf[:14]) == b"/ HTTP/1.1\r\n\r\n"
    assert server.pending() == 0
    with pytest.raises(ssl.SSLWantReadError):
        server.read(64)

    body = b"x" * 20_000  # more than one TLS record
    assert server.write(body) == len(body)
    c_in.write(s_out.read())
    got = b""
    while len(got) < len(body):
        got += client.read(65_536)
    assert got == body
