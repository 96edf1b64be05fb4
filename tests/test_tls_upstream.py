"""The upstream side of the engine's TLS layer (gateway/engine/tls_conn.py `open_client`).

Why these cases: `https://` upstreams no longer go through the event loop's
TLS transport, so what it did for the pool is checked here over real sockets:
a pooled connection carries many requests, an upstream that ends a kept-alive
connection between requests (with close_notify, RFC 8446 §6.1, or with a bare
FIN) costs the next request nothing but a new connection, a response larger
than a TLS record (16 KiB, RFC 8446 §5.1) arrives whole, a refused certificate
is a 502 naming it, and a handshake that never finishes is bounded by the
connect timeout. The gateway is the in-process fast engine; the upstreams are
aiohttp over TLS, or a scripted TLS server on a thread where how a connection
ends must be exact.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway import config as C
from gateway.app import Gateway
from gateway.engine.tls_conn import open_client
from gateway.tls import client_context
from tests.conftest import gateway_config
from tests.tls_helpers import PKI, make_pki, serve_tls

DEADLINE = 30.0  # generous: the box is shared


async def start(gws: list[Gateway], url: str, pki: PKI, **svc: Any) -> int:
    """A fast-engine gateway whose one service forwards to `url`, trusting `pki`'s CA."""
    service = {
        "releases": {"stable": {"weight": 100, "upstreams": [url]}},
        "upstream_tls": {"ca": str(pki.ca_pem)},
        **svc,
    }
    gw = Gateway(C.build({**gateway_config({"svc": service}), "engine": "fast"}, env={}))
    await gw.start()
    gws.append(gw)
    assert gw.port is not None
    return gw.port


class ScriptedUpstream:
    """An HTTPS upstream on threads: answers one request per connection, then ends it as told.

    `ending` is "close_notify" (TLS's closure alert, then waits for the gateway's)
    or "fin" (TCP's FIN with no alert, then waits for the gateway to close).
    `ended` is set when the gateway has let go of a connection.
    """

    BODY = b'{"release": "stable"}'

    def __init__(self, ctx: ssl.SSLContext, ending: str) -> None:
        self.ctx = ctx
        self.ending = ending
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.conns = 0
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone would not)
        self.sock.close()
        self.thread.join(DEADLINE)

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return  # closed by the test
            self.conns += 1
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(DEADLINE)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as c:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = c.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                c.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(self.BODY), self.BODY)
                )
                if self.ending == "close_notify":
                    c.unwrap()  # sends ours, returns with the gateway's
                else:
                    c.shutdown(socket.SHUT_WR)  # a bare FIN: no close_notify
                    while c.recv(4096):  # plain TCP now; b"" when the gateway closes
                        pass
        except OSError:
            pass
        self.ended.set()


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, DEADLINE), "the gateway never let go"


async def get(port: int, path: str = "/x") -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{port}{path}") as r,
    ):
        return r.status, await r.read()


async def test_one_pooled_tls_connection_carries_many_requests(
    pki: PKI, started: list[Gateway]
) -> None:
    peers: list[object] = []

    async def echo(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.json_response({"n": len(peers)})

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    runner, up = await serve_tls(app, pki.server_ctx())
    try:
        port = await start(started, f"https://127.0.0.1:{up}", pki)
        async with aiohttp.ClientSession() as s:
            for i in range(1, 101):
                async with s.get(f"http://127.0.0.1:{port}/x") as r:
                    assert r.status == 200
                    assert (await r.json())["n"] == i
        assert len(peers) == 100 and len(set(peers)) == 1
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("ending", ["close_notify", "fin"], ids=["close-notify", "bare-fin"])
async def test_an_upstream_ending_a_kept_connection_costs_the_next_request_only_a_new_one(
    pki: PKI, started: list[Gateway], ending: str
) -> None:
    up = ScriptedUpstream(pki.server_ctx(), ending)
    try:
        port = await start(started, f"https://127.0.0.1:{up.port}", pki)
        for n in (1, 2, 3):
            status, body = await get(port)
            assert status == 200 and json.loads(body) == {"release": "stable"}
            await wait_for(up.ended)  # the pooled connection is gone before the next request
            up.ended.clear()
            assert up.conns == n
    finally:
        up.close()


async def test_a_response_of_many_tls_records_arrives_whole(
    pki: PKI, started: list[Gateway]
) -> None:
    blob = os.urandom(3 * 1024 * 1024 + 17)  # ~190 records of 16 KiB, the last one short

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=blob, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/{tail:.*}", big)
    runner, up = await serve_tls(app, pki.server_ctx())
    try:
        port = await start(started, f"https://127.0.0.1:{up}", pki)
        for _ in range(2):  # the second over the pooled connection
            status, body = await get(port)
            assert status == 200
            assert len(body) == len(blob)
            assert hashlib.sha256(body).digest() == hashlib.sha256(blob).digest()
    finally:
        await runner.cleanup()


async def test_a_refused_certificate_raises_its_error_and_the_gateway_answers_502(
    pki: PKI, started: list[Gateway], tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other", "other")
    runner, up = await serve_tls(web.Application(), other.server_ctx())
    try:
        loop = asyncio.get_running_loop()
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
            await open_client(
                loop,
                asyncio.Protocol,
                "127.0.0.1",
                up,
                client_context(ca=str(pki.ca_pem)),
                "127.0.0.1",
                DEADLINE,
            )
        port = await start(started, f"https://127.0.0.1:{up}", pki)
        status, body = await get(port)
        assert status == 502
        err = json.loads(body)
        assert err["kind"] == "tls"
        assert err["error"].startswith("upstream TLS error: certificate verify failed")
    finally:
        await runner.cleanup()


async def test_a_handshake_that_never_finishes_is_bounded_by_the_connect_timeout(
    pki: PKI, started: list[Gateway]
) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    held: list[socket.socket] = []
    try:
        addr = silent.getsockname()
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await open_client(
                loop,
                asyncio.Protocol,
                "127.0.0.1",
                int(addr[1]),
                client_context(ca=str(pki.ca_pem)),
                "127.0.0.1",
                0.2,
            )
        held.append(silent.accept()[0])
        url = f"https://127.0.0.1:{addr[1]}"
        port = await start(started, url, pki, timeouts={"connect": "300ms"}, retries=0)
        status, body = await get(port)
        assert status == 504, body
        assert json.loads(body)["kind"] == "timeout"
        held.append(silent.accept()[0])
        # The abandoned handshakes were ended: the silent upstream reads their end.
        for c in held:
            assert await asyncio.to_thread(read_to_end, c)
    finally:
        for c in held:
            c.close()
        silent.close()


def read_to_end(c: socket.socket) -> bool:
    """True once the peer has closed or reset `c` (what it sent first, a ClientHello, dropped)."""
    c.settimeout(DEADLINE)
    try:
        while c.recv(4096):
            pass
    except ConnectionResetError:
        pass  # an abort: let go all the same
    except TimeoutError:
        return False
    return True


async def test_an_upstream_closing_during_the_handshake_is_a_connection_error(pki: PKI) -> None:
    """Not a certificate problem: an OSError that is no TLS error, so the pool retries it."""
    closer = socket.create_server(("127.0.0.1", 0))

    def close_one() -> None:
        c, _ = closer.accept()
        c.close()  # a FIN (or a reset) in answer to the ClientHello

    try:
        accepting = asyncio.create_task(asyncio.to_thread(close_one))
        with pytest.raises(ConnectionError):
            await open_client(
                asyncio.get_running_loop(),
                asyncio.Protocol,
                "127.0.0.1",
                int(closer.getsockname()[1]),
                client_context(ca=str(pki.ca_pem)),
                "127.0.0.1",
                DEADLINE,
            )
        await accepting
    finally:
        closer.close()
