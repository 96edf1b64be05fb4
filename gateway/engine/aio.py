"""The reference forwarding engine on aiohttp's server and pooled ClientSession.

Why keep it beside the fast engine: it is the simplest correct forwarder
(aiohttp does the HTTP/1.1 framing on both sides), so it serves as a
differential reference in tests and as `engine: aiohttp` for operators who
prefer the well-trodden stack over raw speed (it ran at ~0.15× nginx's throughput).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Timeouts
from gateway.engine.api import (
    ERR_CLIENT,
    ERR_CONNECT,
    ERR_LIMIT,
    ERR_PROTOCOL,
    ERR_RESET,
    ERR_TIMEOUT,
    ERR_TLS,
    Forward,
    Handler,
    Limits,
    RequestHead,
    Respond,
    UpstreamErrorKind,
    body_min_bytes,
)
from gateway.engine.fast_wire import IDEMPOTENT, REPLAY_CAP
from gateway.errors import upstream_status
from gateway.headers import strip_response_hop_by_hop
from gateway.tls import describe

_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class BodyStalled(Exception):
    """The client's request body fell below `timeouts.body_min_rate` (answered 408)."""


async def progressing_body(
    content: aiohttp.StreamReader, window: float, min_rate: float
) -> AsyncIterator[bytes]:
    """The request body, raising BodyStalled when a `window` brings too few bytes.

    Why: the same rule as the fast engine (docs/configuration.md#timeouts): a
    body trickled a byte at a time is as stalled as a silent one.
    """
    loop = asyncio.get_running_loop()
    need = body_min_bytes(min_rate, window)
    start = loop.time()
    n = 0
    while True:
        try:
            async with asyncio.timeout_at(start + window):
                chunk = await content.readany()
        except TimeoutError:
            chunk = None
        now = loop.time()
        if chunk is not None:
            if not chunk:
                return
            n += len(chunk)
            yield chunk
        if now >= start + window:
            if n < need:
                raise BodyStalled
            start, n = now, 0


class _Gate:
    """Requests in flight to one (service, endpoint), and those waiting for a turn."""

    __slots__ = ("busy", "waiters")

    def __init__(self) -> None:
        self.busy = 0
        self.waiters: deque[asyncio.Future[None]] = deque()


def _dial(fwd: Forward, target: str) -> tuple[URL, ssl.SSLContext | bool, str | None]:
    """The URL, `ssl` and `server_hostname` arguments for an aiohttp request to `fwd`'s endpoint.

    README "TLS": an https:// endpoint gets its client context (True: the default
    verification) and SNI/checked name `server_name`, else the host.
    """
    tls = fwd.tls
    if tls is None:
        return URL(f"http://{fwd.host}:{fwd.port}{target}", encoded=True), True, None
    url = URL(f"https://{fwd.host}:{fwd.port}{target}", encoded=True)
    return url, tls.context or True, tls.server_name


def _cimd(headers: list[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    return CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers)


class AiohttpEngine:
    """engine.api over aiohttp: same Handler, same observable behaviour."""

    def __init__(
        self,
        handler: Handler,
        *,
        timeouts: Timeouts | None = None,
        upstream_limits: Limits | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        # HTTPS listener (README "TLS"): the server keeps its first context; an SNI
        # callback hands each new handshake the current one, so set_tls needs no restart.
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        if tls is not None:
            tls.sni_callback = self._current_tls
        # aiohttp's server has no request-head timeout; the others apply here too.
        self.timeouts = timeouts or Timeouts()
        # upstream.max_connections: aiohttp's connector caps connections per host
        # (at the top-level value); a gate per (service, endpoint) adds the bounded
        # wait and the 503 (docs/configuration.md#upstream-connection-limits).
        self.upstream_limits = upstream_limits if upstream_limits is not None else Limits()
        self._gates: dict[tuple[str, str, int], _Gate] = {}
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.ServerRunner | None = None
        self._site: web.SockSite | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def serve(self, sock: socket.socket) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,
                limit_per_host=self.upstream_limits.default[0],
                keepalive_timeout=self.timeouts.upstream_idle,
            ),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO,
        )
        server = web.Server(
            self._handle, handler_cancellation=True, keepalive_timeout=self.timeouts.idle
        )
        self._runner = web.ServerRunner(server, handle_signals=False, access_log=None)
        await self._runner.setup()
        self._site = web.SockSite(self._runner, sock, ssl_context=self.tls)
        await self._site.start()

    def set_tls(self, ctx: ssl.SSLContext) -> None:
        """New certificate files (reload): used by handshakes from now on."""
        self.tls = ctx

    def _current_tls(self, conn: ssl.SSLObject, name: str | None, first: ssl.SSLContext) -> None:
        if self.tls is not None and self.tls is not first:
            conn.context = self.tls

    async def shutdown(self, drain_timeout: float) -> None:
        if self._site is not None:
            server = self._site._server
            if server is not None:
                server.close()  # stop accepting; in-flight requests go on
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        v = request.version
        head = RequestHead(
            method=request.method.encode(),
            target=request.raw_path.encode("latin-1"),
            headers=list(request.raw_headers),
            client_ip=request.remote or "",
            http_version=f"{v.major}.{v.minor}",
            scheme=self.scheme,
        )
        res = self.handler.handle(head)
        if isinstance(res, Respond):
            return self._respond(res)
        self._in_flight += 1
        self._idle.clear()
        try:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await self._websocket(request, res)
            return await self._gated(request, res)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _gated(self, request: web.BaseRequest, fwd: Forward) -> web.StreamResponse:
        """`_forward` within the endpoint's `upstream.max_connections`, else 503 after the wait."""
        key = (fwd.service, fwd.host, fwd.port)
        cap, wait = self.upstream_limits.get(fwd.service)
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate()
        if gate.busy >= cap or gate.waiters:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            gate.waiters.append(fut)
            try:
                async with asyncio.timeout(wait):
                    await fut
            except BaseException as e:
                if fut.done() and not fut.cancelled():
                    self._leave(key, gate)  # the turn came with the timeout: pass it on
                else:
                    fut.cancel()
                    with contextlib.suppress(ValueError):
                        gate.waiters.remove(fut)
                    if not gate.busy and not gate.waiters:
                        self._gates.pop(key, None)
                if isinstance(e, TimeoutError):
                    return self._fail(fwd, ERR_LIMIT)
                raise
        else:
            gate.busy += 1
        try:
            return await self._forward(request, fwd)
        finally:
            self._leave(key, gate)

    def _leave(self, key: tuple[str, str, int], gate: _Gate) -> None:
        while gate.waiters:
            fut = gate.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the turn passes on: `busy` stays
                return
        gate.busy -= 1
        if gate.busy <= 0:
            self._gates.pop(key, None)

    @staticmethod
    def _respond(res: Respond) -> web.Response:
        return web.Response(status=res.status, body=res.body, headers=_cimd(res.headers))

    async def _forward(self, request: web.BaseRequest, fwd: Forward) -> web.StreamResponse:
        assert self._session is not None
        session = self._session
        headers = _cimd(fwd.headers)
        if headers.get("Expect", "").lower() == "100-continue":
            # RFC 9110 §10.1.1: this engine answers the interim 100 itself, as
            # aiohttp's router does, then streams the body on.
            del headers["Expect"]
            if request.version >= (1, 1):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        has_body = request.body_exists
        method = request.method
        t = self.timeouts
        # A request that reached an upstream is sent again only when that is
        # harmless (RFC 9110 §9.2.2) and its body is kept whole; a streamed body
        # goes to another endpoint only when no byte of it was sent (README "Failover").
        replayable = method.encode() in IDEMPOTENT
        body: bytes | None = None
        if has_body and replayable:
            n = request.content_length
            if n is not None and n <= REPLAY_CAP:
                try:
                    chunks = progressing_body(request.content, t.body, t.body_min_rate)
                    body = b"".join([c async for c in chunks])
                except BodyStalled:
                    return self._stalled(fwd)
            else:
                replayable = False
        target = request.raw_path if fwd.target is None else fwd.target.decode("latin-1")
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=fwd.connect_timeout, sock_read=fwd.read_timeout
        )
        total = fwd.total_timeout
        when = asyncio.get_running_loop().time() + total if total else None
        status = 0
        reported = False
        try:
            async with asyncio.timeout_at(when):  # timeouts.total: every attempt included
                while True:
                    kind: UpstreamErrorKind
                    url, ssl_arg, sni = _dial(fwd, target)  # again: failover moves `fwd`
                    data: bytes | AsyncIterator[bytes] | None = body
                    if body is None and has_body:
                        data = progressing_body(request.content, t.body, t.body_min_rate)
                    try:
                        up = await session.request(
                            method,
                            url,
                            headers=headers,
                            data=data,
                            allow_redirects=False,
                            timeout=timeout,
                            ssl=ssl_arg,
                            server_hostname=sni,
                        )
                        break
                    except aiohttp.ClientSSLError as e:
                        fwd.detail = describe(e.__cause__ or e)
                        reported = True
                        return self._fail(fwd, ERR_TLS)
                    except aiohttp.ClientConnectorError:
                        kind, sent = ERR_CONNECT, False
                    except aiohttp.ConnectionTimeoutError:
                        kind, sent = ERR_TIMEOUT, False
                    except aiohttp.ServerTimeoutError:
                        kind, sent = ERR_TIMEOUT, True
                    except aiohttp.ClientResponseError:
                        kind, sent = ERR_PROTOCOL, True
                    except aiohttp.ClientError as e:
                        if isinstance(e.__cause__, BodyStalled):
                            reported = True
                            return self._stalled(fwd)  # aiohttp already cut the upstream
                        kind, sent = ERR_RESET, True
                    if (
                        kind == ERR_PROTOCOL
                        or (sent and not replayable)
                        or fwd.retry is None
                        or not fwd.retry.again(fwd, kind)
                    ):
                        reported = True
                        return self._fail(fwd, kind)
                try:
                    out_h = strip_response_hop_by_hop(up.raw_headers, False) + fwd.response_headers
                    resp = web.StreamResponse(
                        status=up.status, reason=up.reason, headers=_cimd(out_h)
                    )
                    if up.content_length is not None:
                        resp.content_length = up.content_length
                    status = up.status
                    await resp.prepare(request)
                    try:
                        async for chunk in up.content.iter_any():
                            await resp.write(chunk)
                    except (aiohttp.ClientError, TimeoutError):
                        reported = True
                        fwd.on_done(status, ERR_RESET)
                        raise ConnectionResetError from None
                    await resp.write_eof()
                    reported = True
                    fwd.on_done(status, None)
                    return resp
                finally:
                    up.release()
        except TimeoutError:  # only timeouts.total gets here: the others are caught above
            if reported:
                raise
            reported = True
            if status == 0:
                return self._fail(fwd, ERR_TIMEOUT)
            fwd.on_done(status, ERR_TIMEOUT)
            raise ConnectionResetError from None  # the head is out: cut the response
        except (ConnectionResetError, asyncio.CancelledError):
            if not reported:
                fwd.on_done(status, ERR_CLIENT)
            raise

    @staticmethod
    def _stalled(fwd: Forward) -> web.Response:
        """408 for a request body below `timeouts.body_min_rate` (docs/configuration.md)."""
        resp = web.json_response({"error": "request body timeout"}, status=408)
        resp.force_close()
        fwd.on_done(408, ERR_CLIENT)
        return resp

    def _fail(self, fwd: Forward, kind: UpstreamErrorKind) -> web.Response:
        body = self.handler.error_body(upstream_status(kind), kind, fwd)
        fwd.on_done(body.status, kind)
        return self._respond(body)

    async def _websocket(self, request: web.BaseRequest, fwd: Forward) -> web.StreamResponse:
        assert self._session is not None
        target = request.raw_path if fwd.target is None else fwd.target.decode("latin-1")
        url, ssl_arg, sni = _dial(fwd, target)
        skip = {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "host"}
        headers = {k.decode(): v.decode() for k, v in fwd.headers if k.lower().decode() not in skip}
        protocols = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        try:
            up = await self._session.ws_connect(
                url,
                headers=headers,
                protocols=protocols,
                timeout=aiohttp.ClientWSTimeout(ws_close=fwd.read_timeout),
                ssl=ssl_arg,
                server_hostname=sni,
            )
        except aiohttp.ClientSSLError as e:
            fwd.detail = describe(e.__cause__ or e)
            return self._fail(fwd, ERR_TLS)
        except aiohttp.ClientConnectorError:
            return self._fail(fwd, ERR_CONNECT)
        except aiohttp.ClientError:
            return self._fail(fwd, ERR_PROTOCOL)
        ws = web.WebSocketResponse(protocols=protocols)
        for k, v in fwd.response_headers:
            ws.headers[k.decode()] = v.decode()
        await ws.prepare(request)

        async def pump(
            src: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
            dst: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
        ) -> None:
            async for msg in src:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                else:
                    break
            await dst.close()

        try:
            await asyncio.gather(pump(ws, up), pump(up, ws))
        finally:
            await up.close()
            fwd.on_done(101, None)
        return ws
