"""A lean HTTP/1.1 forwarding engine on asyncio Protocols and httptools (llhttp).

Why: the aiohttp server + ClientSession forwarder spends ~89 µs of CPU per
request, nginx ~13; uvloop Protocols with llhttp and pooled keep-alive
upstreams get within reach of nginx (PERF_NOTES). Policy stays behind the
`Handler` interface of `engine.api`; this module only moves bytes and frames.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import cast

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
)

from gateway.engine.api import ERR_CLIENT, Handler, RequestHead, Respond
from gateway.engine.fast_upstream import Pool, Upstream
from gateway.engine.fast_wire import (
    BODY_CHUNKED,
    BODY_CL,
    BODY_NONE,
    CHUNK_END,
    CRLF,
    H_CONTENT_LENGTH,
    H_HOST,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    REQ_SPECIAL_LENS,
    Exchange,
    Reject,
    error_json,
    local_response,
)

__all__ = ["FastEngine"]

log = logging.getLogger(__name__)

# Why reading from a client is paused (a bit set; reading resumes when empty).
P_PIPE = 1  # a pipelined request waits for the one in progress
P_WAIT = 2  # the upstream connection is not there yet; the body is buffered
P_UPW = 4  # the upstream's write buffer is above its high-water mark
P_UPG = 8  # an upgrade waits for the upstream's answer
P_DEAD = 16  # input was refused; nothing more is parsed

# What the client connection waits for (drives its single lazy timer).
S_WAIT = 0  # the start of the next request (idle if nothing is in flight)
S_HEAD = 1  # the rest of a request head
S_BODY = 2  # the rest of a request body
S_LINGER = 3  # the peer's close after our final response
S_TUNNEL = 4  # nothing: an upgraded connection just relays

LINGER_SECONDS = 2.0


class ClientConn(asyncio.Protocol):
    """One client connection: parse requests in order, answer them in order."""

    __slots__ = (
        "engine",
        "loop",
        "handler",
        "pool",
        "parser",
        "transport",
        "client_ip",
        "closed",
        "_url",
        "_headers",
        "_hsize",
        "_cl",
        "_te",
        "_hosts",
        "_upg",
        "_done_in_feed",
        "_head_bytes",
        "_tstate",
        "_t0",
        "_timer",
        "_tw",
        "_parsing",
        "_last_ex",
        "_active",
        "_queue",
        "_running",
        "_pause",
        "_wpaused",
        "_linger",
        "_eof",
        "_upgraded",
        "_tun",
        "_tun_eof_c",
        "_tun_eof_u",
    )

    transport: asyncio.Transport

    def __init__(self, engine: FastEngine) -> None:
        self.engine = engine
        loop = engine._loop
        pool = engine._pool
        assert loop is not None and pool is not None
        self.loop = loop
        self.pool = pool
        self.handler = engine.handler
        self.parser = HttpRequestParser(self)
        self.client_ip = ""
        self.closed = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._hsize = 0
        self._cl: bytes | None = None
        self._te: bytes | None = None
        self._hosts = 0
        self._upg: bytes | None = None
        self._done_in_feed = 0
        self._head_bytes = 0
        self._tstate = S_WAIT
        self._t0 = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._tw = 0.0
        self._parsing: Exchange | None = None
        self._last_ex: Exchange | None = None
        self._active: Exchange | None = None
        self._queue: deque[Exchange] = deque()
        self._running = False
        self._pause = 0
        self._wpaused = False
        self._linger = False
        self._eof = False
        self._upgraded = False
        self._tun: Upstream | None = None
        self._tun_eof_c = False
        self._tun_eof_u = False

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_ip = str(peer[0])
        self.engine._clients.add(self)
        self._t0 = self.loop.time()
        self._arm(self._t0 + self.engine._tick)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        eng = self.engine
        eng._clients.discard(self)
        tun = self._tun
        self._tun = None
        pending = list(self._queue)
        self._queue.clear()
        active = self._active
        if active is not None:
            pending.insert(0, active)
        for ex in pending:
            if ex.finished:
                continue
            up = ex.up
            ex.up = None
            if tun is not None and up is tun:
                tun.close()
                self._finish(ex, None)
                continue
            if up is not None:
                up.abandon()
            self._finish(ex, ERR_CLIENT)
        if tun is not None:
            tun.close()
        if not eng._clients and eng._gone is not None:
            eng._gone.set()

    def eof_received(self) -> bool | None:
        tun = self._tun
        if tun is not None:
            self._tun_eof_c = True
            if tun.transport is not None and tun.transport.can_write_eof():
                tun.transport.write_eof()
            return None if self._tun_eof_u else True
        if self._linger:
            return None
        self._eof = True
        if self._tstate != S_WAIT and not (self._tstate == S_HEAD and self._idle()):
            self._fail_input(400, "incomplete request")
            return True
        if self._active is not None or self._queue:
            return True  # answer what was asked, then close
        return None

    def pause_writing(self) -> None:
        self._wpaused = True
        ex = self._active
        if ex is not None and ex.up is not None:
            ex.up.client_paused(True)

    def resume_writing(self) -> None:
        self._wpaused = False
        ex = self._active
        if ex is not None and ex.up is not None:
            ex.up.client_paused(False)

    def data_received(self, data: bytes) -> None:
        tun = self._tun
        if tun is not None:
            assert tun.transport is not None
            tun.transport.write(data)
            return
        if self._pause & P_DEAD or self._linger:
            return  # refused or closing: drain and drop
        st0 = self._tstate
        self._done_in_feed = 0
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as e:
            ex = self._last_ex
            assert ex is not None
            self._upgraded = True
            rest = data[e.args[0] :]
            if rest:
                ex.buf = [rest]
            self._pause_(P_UPG)
        except HttpParserCallbackError as e:
            r = e.__context__
            if isinstance(r, Reject):
                self._fail_input(r.status, r.message)
            else:
                log.error("fast engine: request callback failed", exc_info=r)
                self._fail_input(400, "bad request")
            return
        except HttpParserError as e:
            self._fail_input(400, f"bad request: {e}")
            return
        if self.closed or self._linger:
            return
        if self._tstate == S_HEAD:
            # llhttp has no header size limit: count raw bytes of an unfinished head.
            if self._done_in_feed:
                self._head_bytes = self._hsize
            elif st0 == S_HEAD:
                self._head_bytes += len(data)
            else:
                self._head_bytes = len(data)
            if self._head_bytes > self.engine.max_header_bytes:
                self._fail_input(431, "request header fields too large")
                return
        if self._queue:
            if self._active is None:
                self._run_queue()
            if self._queue and not self.closed:
                self._pause_(P_PIPE)

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._hsize = 0
        self._cl = None
        self._te = None
        self._hosts = 0
        self._upg = None
        self._tstate = S_HEAD
        self._t0 = self.loop.time()
        if self._timer is None:
            self._arm(self._t0 + self.engine._tick)

    def on_url(self, url: bytes) -> None:
        if self._url:
            url = self._url + url
        self._url = url
        if len(url) > self.engine.max_target_bytes:
            raise Reject(414, "request-target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._hsize += len(name) + len(value) + 4
        if self._hsize > self.engine.max_header_bytes:
            raise Reject(431, "request header fields too large")
        if self._tstate != S_HEAD:
            return  # trailer fields are not forwarded (RFC 9112 §7.1.2)
        self._headers.append((name, value))
        if len(name) in REQ_SPECIAL_LENS:
            lname = name.lower()
            if lname == H_HOST:
                self._hosts += 1
            elif lname == H_CONTENT_LENGTH:
                if self._cl is not None:
                    raise Reject(400, "duplicate Content-Length")
                self._cl = value
            elif lname == H_TRANSFER_ENCODING:
                self._te = value if self._te is None else self._te + b"," + value
            elif lname == H_UPGRADE:
                self._upg = value

    def on_headers_complete(self) -> None:
        p = self.parser
        version = p.get_http_version()
        if version == "1.1":
            http11 = True
        elif version == "1.0":
            http11 = False
        else:
            raise Reject(505, "HTTP version not supported")
        # RFC 9112 §3.2: exactly one Host in HTTP/1.1, at most one otherwise.
        if self._hosts > 1 or (http11 and not self._hosts):
            raise Reject(400, "missing or duplicate Host")
        method = p.get_method()
        if method == b"CONNECT":
            raise Reject(501, "CONNECT is not supported")
        ex = Exchange(self, None)
        te = self._te
        if te is not None:
            # RFC 9112 §6.1-6.3: TE+CL, TE in HTTP/1.0 and a final coding other
            # than chunked make the framing ambiguous: refuse, never forward.
            if not http11:
                raise Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
            if self._cl is not None:
                raise Reject(400, "both Content-Length and Transfer-Encoding")
            codings = [c.strip() for c in te.lower().split(b",")]
            if codings[-1] != b"chunked":
                raise Reject(400, "final transfer coding is not chunked")
            if len(codings) != 1:
                raise Reject(501, "transfer coding not implemented")
            ex.body_kind = BODY_CHUNKED
        elif self._cl is not None:
            ex.body_kind = BODY_CL
            ex.cl = int(self._cl)
        if p.should_upgrade():
            if ex.body_kind == BODY_CHUNKED or ex.cl:
                raise Reject(400, "upgrade request with a body")
            ex.upgrade = self._upg
            ex.body_kind = BODY_NONE
        ex.head = RequestHead(method, self._url, self._headers, self.client_ip, version)
        ex.http11 = http11
        ex.is_head = method == b"HEAD"
        ex.keep = p.should_keep_alive()
        self._parsing = ex
        self._last_ex = ex
        self._queue.append(ex)
        self.engine._in_flight += 1
        self._tstate = S_BODY

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        if ex is None or ex.discard:
            return
        self._t0 = self.loop.time()
        if ex.body_kind == BODY_CHUNKED:
            body = b"".join((b"%x\r\n" % len(body), body, CRLF))
        up = ex.up
        if up is not None:
            up.send(ex, body)
        elif ex.buf is None:
            ex.buf = [body]
        else:
            ex.buf.append(body)

    def on_message_complete(self) -> None:
        ex = self._parsing
        self._parsing = None
        self._tstate = S_WAIT
        self._done_in_feed += 1
        if ex is None:
            return
        ex.keep = self.parser.should_keep_alive()  # here, not after feed_data (PERF_NOTES)
        ex.req_done = True
        if not ex.discard:
            up = ex.up
            if ex.body_kind == BODY_CHUNKED:
                if up is not None:
                    up.send(ex, CHUNK_END)
                elif ex.buf is None:
                    ex.buf = [CHUNK_END]
                else:
                    ex.buf.append(CHUNK_END)
            if up is not None:
                up.request_done()
        if ex.resp_done:
            self._finish(ex)

    # -- exchanges ----------------------------------------------------------

    def _run_queue(self) -> None:
        if self._running:
            return
        self._running = True
        try:
            while self._active is None and self._queue and not self.closed and not self._linger:
                ex = self._queue.popleft()
                self._active = ex
                self._start(ex)
        finally:
            self._running = False
        if not self._queue:
            self._unpause_(P_PIPE)

    def _start(self, ex: Exchange) -> None:
        if ex.local is not None:
            self._respond(ex, ex.local)
            return
        assert ex.head is not None
        try:
            r = self.handler.handle(ex.head)
        except Exception:
            log.exception("fast engine: handler.handle failed")
            r = error_json(500, "internal error")
        if isinstance(r, Respond):
            ex.discard = True
            ex.buf = None
            self._respond(ex, r)
            return
        ex.fwd = r
        if ex.upgrade is None:
            up = self.pool.acquire(r.host, r.port)
            if up is not None:
                up.attach(ex, True)
                return
        self.pool.connect(ex)
        if not ex.req_done:
            self._pause_(P_WAIT)

    def _respond(self, ex: Exchange, r: Respond) -> None:
        keep = (
            ex.keep
            and (ex.req_done or ex.fwd is None)
            and not ex.close_after
            and not self.must_close()
        )
        self.transport_write(local_response(r, keep=keep, http11=ex.http11, is_head=ex.is_head))
        ex.status = r.status
        ex.head_sent = True
        self.response_complete(ex, keep)

    def response_complete(self, ex: Exchange, keep: bool) -> None:
        """The response to `ex` is fully written (called by the upstream side too)."""
        ex.resp_done = True
        if not keep:
            ex.close_after = True
        if ex.req_done or ex.close_after:
            self._finish(ex)
        else:
            ex.discard = True  # read the rest of the request body and drop it
            ex.buf = None
            self._unpause_(P_WAIT | P_UPW)

    def upstream_failed(self, ex: Exchange, status: int, kind: str) -> None:
        """The upstream exchange failed; answer via `error_body` or abort (SPEC §7)."""
        if ex.finished or self.closed:
            return
        ex.up = None
        fwd = ex.fwd
        assert fwd is not None
        if ex.head_sent:
            ex.close_after = True
            self._shut(abort=True)
            self._finish(ex, kind)
            return
        try:
            r = self.handler.error_body(status, kind, fwd)
        except Exception:
            log.exception("fast engine: handler.error_body failed")
            r = error_json(status, kind)
        if not ex.req_done:
            ex.close_after = True
        self._unpause_(P_WAIT | P_UPW)
        keep = ex.keep and ex.req_done and not ex.close_after and not self.must_close()
        self.transport_write(local_response(r, keep=keep, http11=ex.http11, is_head=ex.is_head))
        ex.status = r.status
        ex.head_sent = True
        ex.resp_done = True
        if not keep:
            ex.close_after = True
        self._finish(ex, kind)

    def _finish(self, ex: Exchange, kind: str | None = None) -> None:
        if ex.finished:
            return
        ex.finished = True
        ex.discard = True
        ex.buf = None
        eng = self.engine
        eng._in_flight -= 1
        fwd = ex.fwd
        if fwd is not None:
            try:
                fwd.on_done(ex.status, kind)
            except Exception:
                log.exception("fast engine: on_done failed")
        if ex is self._active:
            self._active = None
        if eng._in_flight == 0 and eng._drained is not None:
            eng._drained.set()
        if self.closed:
            return
        if ex.close_after:
            self._close()
            return
        self._unpause_(P_WAIT | P_UPW)
        if self._queue:
            self._run_queue()
        elif self._active is None:
            if self.must_close():
                self._close()
                return
            self._t0 = self.loop.time()
            if self._timer is None:
                self._arm(self._t0 + self.engine._tick)

    def _fail_input(self, status: int, message: str) -> None:
        """Refuse the request being read (RFC 9112 §11.2: never forward it) and close."""
        if self.closed or self._linger:
            return
        self._pause_(P_DEAD)
        ex = self._parsing
        self._parsing = None
        if ex is not None and not ex.req_done:
            if ex is self._active:
                self._abort_input(ex, status, message)
                return
            if ex in self._queue:
                self._queue.remove(ex)
                ex.finished = True
                self.engine._in_flight -= 1
        err = Exchange(self, None)
        err.local = error_json(status, message)
        err.close_after = True
        err.req_done = True
        err.keep = False
        self._queue.append(err)
        self.engine._in_flight += 1
        self._run_queue()

    def _abort_input(self, ex: Exchange, status: int, message: str) -> None:
        up = ex.up
        ex.up = None
        if up is not None:
            up.abandon()
        ex.close_after = True
        if not ex.head_sent:
            r = error_json(status, message)
            self.transport_write(local_response(r, keep=False, http11=ex.http11, is_head=False))
            ex.status = status
            ex.head_sent = True
            self._finish(ex, ERR_CLIENT)
        elif ex.resp_done:
            self._finish(ex)
        else:
            self._shut(abort=True)
            self._finish(ex, ERR_CLIENT)

    # -- helpers used by the upstream side ----------------------------------

    def transport_write(self, data: bytes) -> None:
        if not self.closed and not self._linger:
            self.transport.write(data)

    def must_close(self) -> bool:
        return self.engine.closing or self._upgraded or self._eof

    def write_paused(self) -> bool:
        return self._wpaused

    def pause_for_upstream(self) -> None:
        self._pause_(P_UPW)

    def resume_for_upstream(self) -> None:
        self._unpause_(P_UPW)

    def start_tunnel(self, ex: Exchange, rest: bytes) -> None:
        """Relay raw bytes both ways after a 101 (RFC 9110 §7.8)."""
        self._tun = ex.up
        self._tstate = S_TUNNEL
        if rest:
            self.transport_write(rest)
        self._unpause_(P_UPG | P_WAIT)

    def tunnel_eof_from_upstream(self) -> None:
        self._tun_eof_u = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self._tun_eof_c:
            self._shut(abort=False)

    def tunnel_closed(self, ex: Exchange) -> None:
        self._tun = None
        ex.up = None
        self._shut(abort=False)
        self._finish(ex, None)

    def upstream_ready(self) -> None:
        self._unpause_(P_WAIT)

    def close_if_idle(self) -> None:
        if self._idle() and self._tstate == S_WAIT:
            self._shut(abort=False)

    def abort(self) -> None:
        self._shut(abort=True)

    # -- flow control, closing, timers ----------------------------------------

    def _idle(self) -> bool:
        return self._active is None and not self._queue

    def _pause_(self, bit: int) -> None:
        if not self._pause and not self.closed:
            self.transport.pause_reading()
        self._pause |= bit

    def _unpause_(self, bit: int) -> None:
        p = self._pause
        if p & bit:
            p &= ~bit
            self._pause = p
            if not p and not self.closed:
                self.transport.resume_reading()
                self._t0 = self.loop.time()

    def _shut(self, abort: bool) -> None:
        if self.closed:
            return
        self._linger = True
        if abort:
            self.transport.abort()
        else:
            self.transport.close()

    def _close(self) -> None:
        """Close after the last response, lingering to drain (RFC 9112 §9.6)."""
        if self.closed or self._linger:
            return
        self._linger = True
        tr = self.transport
        if self._eof or not tr.can_write_eof():
            tr.close()
            return
        tr.write_eof()
        if self._pause:
            self._pause = 0
            tr.resume_reading()
        self._tstate = S_LINGER
        self._t0 = self.loop.time()
        self._arm(self._t0 + min(LINGER_SECONDS, self.engine._tick))

    def _arm(self, when: float) -> None:
        t = self._timer
        if t is not None:
            if self._tw <= when:
                return
            t.cancel()
        self._tw = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        eng = self.engine
        now = self.loop.time()
        st = self._tstate
        if st == S_LINGER:
            deadline = self._t0 + LINGER_SECONDS
            if now >= deadline:
                self._shut(abort=False)
                return
        elif st == S_TUNNEL:
            return
        elif self._pause:
            deadline = now + eng._tick  # we stopped reading: the client is not late
        elif st == S_WAIT:
            if not self._idle():
                return  # waiting on the upstream; re-armed when the exchange ends
            deadline = self._t0 + eng.keepalive_timeout
            if now >= deadline:
                self._shut(abort=False)
                return
        else:
            deadline = self._t0 + eng.header_timeout
            if now >= deadline:
                self._fail_input(408, "request timeout")
                return
        self._arm(min(deadline, now + eng._tick))


class FastEngine:
    """HTTP/1.1 reverse-proxy engine: llhttp parsing, pooled keep-alive upstreams.

    Why: RFC 9112 framing done once in C (llhttp) and relayed from protocol
    callbacks, with smuggling defences (RFC 9112 §6.3, §11.2) and hop-by-hop
    handling (RFC 9110 §7.6.1) in the engine, policy behind `engine.api`.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_header_bytes: int = 65536,
        max_target_bytes: int = 8192,
        keepalive_timeout: float = 75.0,
        header_timeout: float = 30.0,
        upstream_pool_per_host: int = 256,
        upstream_idle_timeout: float = 60.0,
    ) -> None:
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.max_target_bytes = max_target_bytes
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        self.upstream_pool_per_host = upstream_pool_per_host
        self.upstream_idle_timeout = upstream_idle_timeout
        self.closing = False
        self._tick = min(keepalive_timeout, header_timeout)
        self._in_flight = 0
        self._clients: set[ClientConn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: Pool | None = None
        self._server: asyncio.AbstractServer | None = None
        self._drained: asyncio.Event | None = None
        self._gone: asyncio.Event | None = None

    @property
    def in_flight(self) -> int:
        """Requests read and not yet fully answered (what a graceful stop waits for)."""
        return self._in_flight

    async def serve(self, sock: socket.socket) -> None:
        """Start serving on a bound, listening socket; return once accepting."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._pool = Pool(loop, self.upstream_pool_per_host, self.upstream_idle_timeout)
        sock.setblocking(False)
        self._server = await loop.create_server(lambda: ClientConn(self), sock=sock, backlog=4096)

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting, drain in-flight exchanges, then abort the rest.

        Why: RFC 9112 §9.6 graceful close: idle keep-alive connections are
        closed, in-flight responses carry `Connection: close`, and nothing
        is cut before `drain_timeout` unless it is idle.
        """
        self.closing = True
        if self._server is not None:
            self._server.close()
        for c in list(self._clients):
            c.close_if_idle()
        if self._in_flight > 0:
            self._drained = asyncio.Event()
            try:
                async with asyncio.timeout(drain_timeout):
                    await self._drained.wait()
            except TimeoutError:
                pass
        if self._clients:
            self._gone = asyncio.Event()
            for c in list(self._clients):
                c.abort()
            try:
                async with asyncio.timeout(1.0):
                    await self._gone.wait()
            except TimeoutError:
                pass
        if self._pool is not None:
            await self._pool.close()
        if self._server is not None:
            await self._server.wait_closed()
