"""Client side of the fast engine: one protocol object per client connection.

Why here: requests are parsed by llhttp, validated against the framing rules
of RFC 9112 §6 and §11 (smuggling defences), queued in order for pipelining
and answered in order; this module owns that state machine and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Final, cast

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
)

from gateway.engine.api import ERR_CLIENT, ERR_PROTOCOL, RequestHead, Respond
from gateway.engine.fast_wire import (
    BODY_CHUNKED,
    CHUNK_END,
    CRLF,
    H_CONTENT_LENGTH,
    H_HOST,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    P_DEAD,
    P_PIPE,
    P_UPG,
    P_UPW,
    P_WAIT,
    REQ_SPECIAL_LENS,
    Exchange,
    Reject,
    error_json,
    local_response,
    request_framing,
)

if TYPE_CHECKING:
    from gateway.engine.fast import FastEngine
    from gateway.engine.fast_upstream import Upstream

log = logging.getLogger(__name__)

# What the client connection waits for (drives its single lazy timer and says
# which timeout applies: docs/configuration.md#timeouts).
S_WAIT: Final = 0  # the start of the next request (`idle` if nothing is in flight)
S_HEAD: Final = 1  # the rest of a request head (`header`)
S_BODY: Final = 2  # the rest of a request body (`body` and `body_min_rate`)
S_LINGER: Final = 3  # the peer's close after our final response
S_TUNNEL: Final = 4  # nothing: an upgraded connection just relays

LINGER_SECONDS: Final = 2.0
PARSER_IDLE_SECONDS: Final = 1.0

# What `ClientConn._headers` is between two heads: shared, never appended to
# (on_header appends only in S_HEAD, and `_begin` makes a fresh list first).
_NO_HEADERS: Final[list[tuple[bytes, bytes]]] = []


class ClientConn:
    """One client connection: parse requests in order, answer them in order.

    An asyncio protocol by duck typing (asyncio.Protocol's methods, no base
    class): a class without a Python base compiles to a native mypyc class
    with C-struct attributes in the compiled build.

    Why a queue and paused reads: responses to pipelined requests must leave
    in request order (RFC 9112 §9.3.2), so a later request waits, parsed but
    not started, while reading stops until the one in progress is answered.
    """

    __slots__ = (
        "engine",
        "loop",
        "handler",
        "pool",
        "parser",
        "transport",
        "client_ip",
        "closed",
        "close_soon",
        "pause",
        "wpaused",
        "_url",
        "_headers",
        "_hsize",
        "_count",
        "_max_head",
        "_max_target",
        "_cl",
        "_te",
        "_hosts",
        "_upg",
        "_done_in_feed",
        "_head_bytes",
        "_tstate",
        "_t0",
        "_bn",
        "_tick",
        "_tw",
        "_parsing",
        "_last_ex",
        "_active",
        "_queue",
        "_running",
        "_linger",
        "_eof",
        "_upgraded",
        "_tun",
        "_tun_eof_c",
        "_tun_eof_u",
        "_begun",
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
        # Made at the first byte and dropped after PARSER_IDLE_SECONDS idle: an idle
        # keep-alive connection holds no llhttp parser (~0.85 KiB with its bound methods).
        self.parser: HttpRequestParser | None = None
        self._begun = False  # llhttp may hold bytes of a next message (see data_received)
        self.client_ip = ""
        self.closed = False
        self.close_soon = engine.closing  # no keep-alive: shutdown, upgrade or client EOF
        self.pause = 0
        self.wpaused = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = _NO_HEADERS  # a fresh list per head (_begin)
        self._hsize = 0
        self._count = False  # count header bytes exactly (the head may exceed the limit)
        self._max_head = engine.max_header_bytes
        self._max_target = engine.max_target_bytes
        self._cl: bytes | None = None
        self._te: bytes | None = None
        self._hosts = 0
        self._upg: bytes | None = None
        self._done_in_feed = 0
        self._head_bytes = 0
        self._tstate = S_WAIT
        self._t0 = 0.0  # when the current timeout's period began
        self._bn = 0  # request body bytes read since _t0 (S_BODY)
        self._tick = 0  # the wheel tick armed (engine/fast_timers.py); 0: none
        self._tw = 0.0
        self._parsing: Exchange | None = None
        self._last_ex: Exchange | None = None
        self._active: Exchange | None = None
        # Requests parsed and not started, in order. A list, not a deque: it holds
        # one or two entries (pipelining is rare) and an empty list is ~10x smaller
        # than an empty deque on every idle keep-alive connection.
        self._queue: list[Exchange] = []
        self._running = False
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
            # Interned: a thousand connections from one address share one string.
            self.client_ip = sys.intern(str(peer[0]))
        self.engine._clients.add(self)
        self._t0 = self.loop.time()
        self._arm(self._t0 + self.engine._tick)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._tick:
            self.pool.wheel.remove(self, self._tick)
            self._tick = 0
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
        # Like nginx, a client EOF aborts whatever is in flight (reported as
        # client_abort): a half-closed client is indistinguishable from a gone one.
        self._eof = True
        self.close_soon = True
        return None

    def pause_writing(self) -> None:
        self.wpaused = True
        ex = self._active
        if ex is not None and ex.up is not None:
            ex.up.client_paused(True)

    def resume_writing(self) -> None:
        self.wpaused = False
        ex = self._active
        if ex is not None and ex.up is not None:
            ex.up.client_paused(False)

    def data_received(self, data: bytes) -> None:
        tun = self._tun
        if tun is not None:
            assert tun.transport is not None
            tun.transport.write(data)
            return
        if self.pause & P_DEAD or self._linger:
            return  # refused or closing: drain and drop
        st0 = self._tstate
        self._done_in_feed = 0
        # A head can only pass the limit in this chunk if the chunk is big enough;
        # only then are its fields counted one by one.
        hb = self._head_bytes if st0 == S_HEAD else 0
        if hb + len(data) > self._max_head:
            self._count = True
            self._hsize = hb
        elif self._count:
            self._count = False
        try:
            p = self.parser
            if p is None:
                p = self.parser = HttpRequestParser(self)
            p.feed_data(data)
            # Bytes after a complete message that start no request line yet (a method's
            # first letters) raise no callback: a chunk ending in LF left none behind.
            self._begun = data[-1] != 10
        except HttpParserUpgrade as e:
            ex = self._last_ex
            assert ex is not None
            self._upgraded = True
            self.close_soon = True
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
        finally:
            self._last_ex = None  # only the upgrade branch needs it; an idle connection holds none
        if self.closed or self._linger:
            return
        if self._tstate == S_WAIT and not self._done_in_feed and self._idle():
            # The first bytes of a request line that llhttp has not reported yet:
            # the header timeout runs from here, not the idle one.
            self._begin()
        if self._tstate == S_HEAD:
            # llhttp has no header size limit: count raw bytes of an unfinished head.
            if self._done_in_feed:
                self._head_bytes = self._hsize if self._count else len(data)
            elif st0 == S_HEAD:
                self._head_bytes += len(data)
            else:
                self._head_bytes = len(data)
            if self._head_bytes > self._max_head:
                self._fail_input(431, "request header fields too large")
                return
        if self._queue:
            if self._active is None:
                self._run_queue()
            if self._queue and not self.closed:
                self._pause_(P_PIPE)

    # -- httptools callbacks ------------------------------------------------

    def _begin(self) -> None:
        self._url = b""
        self._headers = []  # on_header appends only after this (state S_HEAD)
        self._hsize = 0
        self._cl = None
        self._te = None
        self._hosts = 0
        self._upg = None
        self._tstate = S_HEAD
        self._t0 = self.loop.time()
        if not self._tick:
            self._arm(self._t0 + self.engine._tick)

    def on_url(self, url: bytes) -> None:
        if self._tstate != S_HEAD:
            self._begin()  # the request-target is the first callback of a message
        elif self._url:
            url = self._url + url
        self._url = url
        if len(url) > self._max_target:
            raise Reject(414, "request-target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._count:
            self._hsize += len(name) + len(value) + 4
            if self._hsize > self._max_head:
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
        assert p is not None
        version = p.get_http_version()
        method = p.get_method()
        http11, body_kind, cl, upgrade = request_framing(
            version,
            method,
            self._hosts,
            self._cl,
            self._te,
            self._upg if p.should_upgrade() else None,
        )
        headers = self._headers
        self._headers = _NO_HEADERS  # an idle connection holds no head, nor an empty list
        ex = Exchange(
            self,
            RequestHead(method, self._url, headers, self.client_ip, version, self.engine.scheme),
            http11,
            method == b"HEAD",
            p.should_keep_alive(),
            body_kind,
            cl,
            upgrade,
        )
        self._parsing = ex
        self._last_ex = ex
        self._queue.append(ex)
        self.engine._in_flight += 1
        self._tstate = S_BODY
        if body_kind:  # the body's progress window starts now (no clock read without one)
            self._t0 = self.loop.time()
            self._bn = 0
            self._arm(self._t0 + self.engine.body_timeout)

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        if ex is None:
            return
        self._bn += len(body)
        if ex.discard:
            return
        if ex.body_kind == BODY_CHUNKED:
            body = b"".join((b"%x\r\n" % len(body), body, CRLF))
        self._to_upstream(ex, body)

    def _to_upstream(self, ex: Exchange, data: bytes) -> None:
        """Request body bytes: sent if the upstream connection is there, else buffered."""
        up = ex.up
        if up is not None:
            up.send(ex, data)
        elif ex.buf is None:
            ex.buf = [data]
        else:
            ex.buf.append(data)

    def on_message_complete(self) -> None:
        ex = self._parsing
        self._parsing = None
        self._tstate = S_WAIT
        self._done_in_feed += 1
        if ex is None:
            return
        p = self.parser
        assert p is not None
        ex.keep = p.should_keep_alive()  # here: llhttp resets it once feed_data returns
        ex.req_done = True
        if not ex.discard:
            if ex.body_kind == BODY_CHUNKED:
                self._to_upstream(ex, CHUNK_END)
            up = ex.up
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
                ex = self._queue.pop(0)
                self._active = ex
                self._start(ex)
        finally:
            self._running = False
        if self.pause & P_PIPE and not self._queue:
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
        if r.total_timeout:
            ex.deadline = self.loop.time() + r.total_timeout
        try:
            if ex.upgrade is None:
                up = self.pool.acquire(r.host, r.port, r.tls)
                if up is not None:
                    up.attach(ex, True)
                    return
            self.pool.connect(ex)
        except Exception:  # a malformed Forward must still get an answer
            log.exception("fast engine: forwarding failed")
            if ex.up is not None:
                ex.up.abandon()
            self.upstream_failed(ex, 502, ERR_PROTOCOL)
            return
        if not ex.req_done:
            self._pause_(P_WAIT)

    def _respond(self, ex: Exchange, r: Respond) -> None:
        keep = (
            ex.keep
            and (ex.req_done or ex.fwd is None)
            and not ex.close_after
            and not self.close_soon
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
        """The upstream exchange failed; answer via `error_body` or abort (README "Failover")."""
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
        keep = ex.keep and ex.req_done and not ex.close_after and not self.close_soon
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
        if self.pause & (P_WAIT | P_UPW):
            self._unpause_(P_WAIT | P_UPW)
        if self._queue:
            self._run_queue()
        elif self._active is None:
            if self.close_soon:
                self._close()
                return
            self._t0 = t0 = self.loop.time()
            # Soon enough to drop the parser if nothing follows (_arm keeps an earlier one).
            self._arm(
                t0 + PARSER_IDLE_SECONDS if self.parser is not None else t0 + self.engine._tick
            )

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

    def shutdown_now(self) -> None:
        """End of the drain: flush and close if nothing is in flight, else cut."""
        self._shut(abort=not self._idle())

    def wait_upstream(self, ex: Exchange) -> None:
        if not ex.req_done:
            self._pause_(P_WAIT)

    # -- flow control, closing, timers ----------------------------------------

    def _idle(self) -> bool:
        return self._active is None and not self._queue

    def _pause_(self, bit: int) -> None:
        if not self.pause and not self.closed:
            self.transport.pause_reading()
        self.pause |= bit

    def _unpause_(self, bit: int) -> None:
        p = self.pause
        if p & bit:
            p &= ~bit
            self.pause = p
            if not p and not self.closed:
                self.transport.resume_reading()
                self._t0 = self.loop.time()  # we stopped reading: the client was not late
                self._bn = 0

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
        if self.pause:
            self.pause = 0
            tr.resume_reading()
        self._tstate = S_LINGER
        self._t0 = self.loop.time()
        self._arm(self._t0 + min(LINGER_SECONDS, self.engine._tick))

    def _arm(self, when: float) -> None:
        t = self._tick
        wheel = self.pool.wheel
        if t:
            if self._tw <= when:
                return
            wheel.remove(self, t)
        self._tw = when
        self._tick = wheel.add(self, when)

    def on_tick(self, tick: int) -> None:
        if tick != self._tick:
            return  # re-armed elsewhere meanwhile
        self._tick = 0
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
        elif self.pause:
            deadline = now + eng._tick  # we stopped reading: the client is not late
        elif st == S_WAIT:
            if not self._idle():
                return  # waiting on the upstream; re-armed when the exchange ends
            deadline = self._t0 + eng.keepalive_timeout
            if now >= deadline:
                self._shut(abort=False)
                return
            if self.parser is not None and not self._begun:
                drop = self._t0 + PARSER_IDLE_SECONDS
                if now >= drop:
                    self.parser = None  # between two messages: the next byte makes a new one
                elif drop < deadline:
                    deadline = drop
        elif st == S_BODY:
            deadline = self._t0 + eng.body_timeout
            if now >= deadline:
                if self._bn < eng.body_min_bytes:
                    self._fail_input(408, "request body timeout")
                    return
                self._t0 = now  # enough progress: the next window starts
                self._bn = 0
                deadline = now + eng.body_timeout
        else:
            deadline = self._t0 + eng.header_timeout
            if now >= deadline:
                self._fail_input(408, "request header timeout")
                return
        self._arm(min(deadline, now + eng._tick))
