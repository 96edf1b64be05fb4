"""Client side of the fast engine: one protocol object per client connection.

Why here: requests are parsed by llhttp (the common whole head in one read by
engine/fast_head.py, into the same exchange), validated against the framing
rules of RFC 9112 §6 and §11 (smuggling defences), queued in order for
pipelining and answered in order; this module owns that state machine and
nothing else.
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

from gateway.engine.api import (
    ERR_CLIENT,
    ERR_PROTOCOL,
    Handler,
    RequestHead,
    Respond,
    UpstreamErrorKind,
)
from gateway.engine.fast_head import read_head
from gateway.engine.fast_timers import Armed
from gateway.engine.fast_wire import (
    BODY_CHUNKED,
    CHUNK_END,
    CRLF,
    H_CONTENT_LENGTH,
    H_HOST,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    LEN_CONTENT_LENGTH,
    LEN_HOST,
    LEN_TRANSFER_ENCODING,
    LEN_UPGRADE,
    P_DEAD,
    P_PIPE,
    P_UPG,
    P_UPW,
    P_WAIT,
    X_ANSWERED,
    X_FINISHED,
    X_HEAD_SENT,
    Exchange,
    Reject,
    error_json,
    head_at_start,
    local_response,
    method_at_start,
    request_framing,
)
from gateway.errors import upstream_status
from gateway.headers import ASCII_LOWER

if TYPE_CHECKING:
    from gateway.engine.fast_park import ParkingLot
    from gateway.engine.fast_pool import Pool
    from gateway.engine.fast_upstream import Upstream

log = logging.getLogger(__name__)

# A client connection's lifecycle (`ClientConn.state`), in order.
C_OPEN: Final = 0  # reading requests and answering them
C_TUNNEL: Final = 1  # upgraded (RFC 9110 §7.8): bytes relayed both ways, no timeout
C_LINGER: Final = 2  # our FIN is sent after the last response; draining until the peer's
C_SHUT: Final = 3  # transport closed or aborted by us; connection_lost follows
C_CLOSED: Final = 4  # connection_lost: gone
CLIENT_STATES: Final = ("open", "tunnel", "linger", "shut", "closed")

# What an open connection's parser waits for (`ClientConn.waiting_for`): says
# which timeout applies (docs/configuration.md#timeouts) to its one lazy timer.
S_WAIT: Final = 0  # the start of the next request (`idle` if nothing is in flight)
S_HEAD: Final = 1  # the rest of a request head (`header`)
S_BODY: Final = 2  # the rest of a request body (`body` and `body_min_rate`)
WAITING_FOR: Final = ("request", "head", "body")

# How long a closing connection reads and drops what the client still sends after
# our FIN, so that its unread request bytes do not turn our close into a reset that
# destroys the response in flight (RFC 9112 §9.6); then it is closed whatever comes.
LINGER_SECONDS: Final = 2.0
# An idle keep-alive connection drops its llhttp parser after this long (a new one
# is made at the next byte): long enough that back-to-back requests keep theirs.
PARSER_IDLE_SECONDS: Final = 1.0

# What `ClientConn._headers` is between two heads: shared, never appended to
# (on_header appends only in S_HEAD, and `_begin` makes a fresh list first).
_NO_HEADERS: Final[list[tuple[bytes, bytes]]] = []
# What `ClientConn._queue` is between heads on an idle connection: shared, never
# appended to (a request is queued only by `_head_read`, which makes the queue at the
# first head; `_fail_input` makes its own). An idle connection holds none.
_NO_QUEUE: Final[list[Exchange]] = []


class ClientContext:
    """What client connections need from their engine, and what they report back to it.

    Why not the engine itself: a connection reads these few settings and keeps
    the engine's counts here (connections open, exchanges in flight); the
    engine (engine/fast.py) reads the same object to drain on shutdown.
    """

    __slots__ = (
        "loop",
        "pool",
        "handler",
        "scheme",
        "max_header_bytes",
        "max_target_bytes",
        "keepalive_timeout",
        "header_timeout",
        "body_timeout",
        "body_min_bytes",
        "recheck",
        "park_after",
        "lot",
        "idle_check",
        "closing",
        "clients",
        "in_flight",
        "drained",
        "gone",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: Pool,
        handler: Handler,
        *,
        scheme: str,
        max_header_bytes: int,
        max_target_bytes: int,
        keepalive_timeout: float,
        header_timeout: float,
        body_timeout: float,
        body_min_bytes: float,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.handler = handler
        self.scheme = scheme  # X-Forwarded-Proto
        self.max_header_bytes = max_header_bytes
        self.max_target_bytes = max_target_bytes
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        # A request body must bring `body_min_bytes` in every `body_timeout`
        # window, else 408: a trickle is as stalled as silence.
        self.body_timeout = body_timeout
        self.body_min_bytes = body_min_bytes
        # How late the lazy per-connection timer may notice a shorter timeout;
        # a body's window arms its own deadline (ClientConn.on_headers_complete).
        self.recheck = min(keepalive_timeout, header_timeout)
        # An idle connection is parked outside uvloop after this long (engine/fast_park.py);
        # 0, or no lot (HTTPS): never.
        self.park_after = 0.0
        self.lot: ParkingLot | None = None
        # When an idle connection's timer first looks at it after its last response.
        self.idle_check = PARSER_IDLE_SECONDS
        self.closing = False  # shutdown: no keep-alive from now on
        # Open connections; a dict used as a set: ~half a set's table per entry.
        self.clients: dict[ClientConn, None] = {}
        self.in_flight = 0  # exchanges read and not yet finished
        self.drained: asyncio.Event | None = None  # set when in_flight reaches 0 (shutdown)
        self.gone: asyncio.Event | None = None  # set when the last connection is lost

    def park_idle(self, lot: ParkingLot, after: float) -> None:
        """Park connections idle for `after` seconds in `lot` (engine/fast_park.py)."""
        self.lot = lot
        self.park_after = after
        self.idle_check = min(PARSER_IDLE_SECONDS, after)

    def finished_one(self) -> None:
        """An exchange ended: one fewer in flight (a draining shutdown waits for none)."""
        n = self.in_flight - 1
        self.in_flight = n
        if n == 0 and self.drained is not None:
            self.drained.set()


class ClientConn(Armed):
    """One client connection: parse requests in order, answer them in order.

    An asyncio protocol by duck typing (asyncio.Protocol's methods, no Python
    base class): a class whose bases are native compiles to a native mypyc
    class with C-struct attributes in the compiled build.

    Why a queue and paused reads: responses to pipelined requests must leave
    in request order (RFC 9112 §9.3.2), so a later request waits, parsed but
    not started, while reading stops until the one in progress is answered.

    State: `state` is the lifecycle (C_OPEN ... C_CLOSED); while open,
    `waiting_for` says which part of a request the parser waits for and so
    which timeout applies; `pause` is the set of reasons reading is paused.
    """

    __slots__ = (
        "ctx",
        "loop",
        "parser",
        "transport",
        "client_ip",
        "state",
        "waiting_for",
        "close_soon",
        "pause",
        "wpaused",
        "_url",
        "_headers",
        "_counted",
        "_counting",
        "_max_head",
        "_max_target",
        "_content_length",
        "_transfer_coding",
        "_hosts",
        "_upgrade",
        "_done_in_feed",
        "_head_bytes",
        "_period_start",
        "_body_bytes",
        "_parsing",
        "_last_ex",
        "_active",
        "_queue",
        "_running",
        "_peer_eof",
        "_tunnel",
        "_tunnel_eof_client",
        "_tunnel_eof_upstream",
        "_begun",
        "_chunk",
    )

    transport: asyncio.Transport

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx.pool.wheel)
        # Pointers and integers are assigned first and the one-byte flags last: a
        # compiled ClientConn lays its fields out in this order, so the flags share a
        # word instead of padding one each (benchmarks/README.md "Idle connections").
        self.ctx = ctx  # the pool and the handler are read from here (fewer fields)
        self.loop = ctx.loop
        # Made at the first byte and dropped after PARSER_IDLE_SECONDS idle: an idle
        # keep-alive connection holds no llhttp parser (~0.85 KiB with its bound methods).
        self.parser: HttpRequestParser | None = None
        # The bytes being fed while they began with no message in progress (else None).
        self._chunk: bytes | None = None
        self.client_ip = ""
        self.state = C_OPEN
        self.waiting_for = S_WAIT
        self.pause = 0  # P_* bits (engine/fast_wire.py): why reading is paused; 0: reading
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = _NO_HEADERS  # a fresh list per head (_begin)
        self._counted = 0  # header bytes counted field by field (when `_counting`)
        self._max_head = ctx.max_header_bytes
        self._max_target = ctx.max_target_bytes
        # The framing fields of the head being read, as sent (request_framing checks them).
        self._content_length: bytes | None = None
        self._transfer_coding: bytes | None = None  # all Transfer-Encoding values, joined
        self._hosts = 0  # how many Host fields
        self._upgrade: bytes | None = None
        self._done_in_feed = 0
        self._head_bytes = 0
        self._period_start = 0.0  # when the current timeout's period began
        self._body_bytes = 0  # request body bytes read since _period_start (S_BODY)
        self._parsing: Exchange | None = None
        self._last_ex: Exchange | None = None
        self._active: Exchange | None = None
        # Requests parsed and not started, in order: a list made at the first head and
        # dropped when the connection idles (pipelining is rare: one or two entries),
        # `_NO_QUEUE` between.
        self._queue: list[Exchange] = _NO_QUEUE
        self._tunnel: Upstream | None = None  # the upstream of an upgraded connection
        self.close_soon = ctx.closing  # no keep-alive: shutdown, upgrade or client EOF
        self.wpaused = False  # the transport's write buffer is above its high-water mark
        self._counting = False  # count header bytes exactly (the head may exceed the limit)
        self._begun = False  # llhttp may hold bytes of a next message (see data_received)
        self._running = False
        self._peer_eof = False  # the client half-closed
        self._tunnel_eof_client = False
        self._tunnel_eof_upstream = False

    def __repr__(self) -> str:
        return (
            f"ClientConn({self.client_ip or '?'}, {CLIENT_STATES[self.state]}, "
            f"waiting for {WAITING_FOR[self.waiting_for]}, pause={self.pause:#x}, "
            f"active={self._active!r}, queued={len(self._queue)})"
        )

    @property
    def closed(self) -> bool:
        """The connection is gone (connection_lost)."""
        return self.state == C_CLOSED

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            # Interned: a thousand connections from one address share one string.
            self.client_ip = sys.intern(str(peer[0]))
        self.ctx.clients[self] = None
        self._period_start = self.loop.time()
        self.arm(self._period_start + self.ctx.recheck)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = C_CLOSED
        self.disarm()
        # The parser holds bound methods of this connection: a cycle that, once the
        # connection had lived long enough to reach the oldest generation, only a full
        # collection would free. Dropped here, a closed connection is freed at once.
        self.parser = None
        ctx = self.ctx
        ctx.clients.pop(self, None)
        tun = self._tunnel
        self._tunnel = None
        pending = self._queue
        self._queue = _NO_QUEUE
        active = self._active
        if active is not None:
            pending = [active, *pending]  # (never into the shared _NO_QUEUE)
        for ex in pending:
            if ex.state == X_FINISHED:
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
        if not ctx.clients and ctx.gone is not None:
            ctx.gone.set()

    def eof_received(self) -> bool | None:
        tun = self._tunnel
        if tun is not None:
            self._tunnel_eof_client = True
            if tun.transport is not None and tun.transport.can_write_eof():
                tun.transport.write_eof()
            return None if self._tunnel_eof_upstream else True
        # Like nginx, a client EOF aborts whatever is in flight (reported as
        # client_abort): a half-closed client is indistinguishable from a gone one.
        self._peer_eof = True
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
        tun = self._tunnel
        if tun is not None:
            assert tun.transport is not None
            tun.transport.write(data)
            return
        if self.pause & P_DEAD or self.state >= C_LINGER:
            return  # refused or closing: drain and drop
        st0 = self.waiting_for
        self._done_in_feed = 0
        # A head can only pass the limit in this chunk if the chunk is big enough;
        # only then are its fields counted one by one.
        hb = self._head_bytes if st0 == S_HEAD else 0
        if hb + len(data) > self._max_head:
            self._counting = True
            self._counted = hb
        elif self._counting:
            self._counting = False
        try:
            # Between messages with nothing held by llhttp, a head starts in this read;
            # the common whole head is read without llhttp (engine/fast_head.py).
            between = st0 == S_WAIT and not self._begun
            if not between or not self._read_plain_head(data):
                p = self.parser
                if p is None:
                    p = self.parser = HttpRequestParser(self)  # (an idle connection holds none)
                self._chunk = data if between else None
                p.feed_data(data)
                # Bytes after a complete message that start no request line yet (a method's
                # first letters) raise no callback: a chunk ending in LF left none behind.
                self._begun = data[-1] != 10
        except HttpParserUpgrade as e:
            ex = self._last_ex
            assert ex is not None
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
            self._chunk = None
        if self.state >= C_LINGER:
            return
        if self.waiting_for == S_WAIT and not self._done_in_feed and self._idle():
            # The first bytes of a request line that llhttp has not reported yet:
            # the header timeout runs from here, not the idle one.
            self._begin()
        if self.waiting_for != S_WAIT and self._period_start < 0.0:
            self._period_start = self.loop.time()  # a head began in this read (_begin)
        if self.waiting_for == S_HEAD:
            # llhttp has no header size limit: count raw bytes of an unfinished head.
            if self._done_in_feed:
                self._head_bytes = self._counted if self._counting else len(data)
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
            if self._queue and self.state != C_CLOSED:
                self._pause_(P_PIPE)

    def _read_plain_head(self, data: bytes) -> bool:
        """Read `data` as one whole request head of the plain form, if it is one (fast_head).

        Only between messages with nothing held by llhttp (the caller knows that).
        The same exchange and the same state as llhttp's callbacks would give;
        False: nothing was changed, and llhttp reads `data` (a longer head gets
        its 431 and a longer target its 414 there).
        """
        if len(data) > self._max_head:
            return False
        q = self._queue
        last = q[-1] if q else self._active
        if last is not None and not last.keep:
            return False  # llhttp read a message it closes after: it refuses what follows
        head = read_head(data, self._max_target, self.client_ip, self.ctx.scheme)
        if head is None:
            return False
        try:
            # One Host, no body, no upgrade (read_head): the framing rules still decide.
            http11, body_kind, length, upgrade = request_framing(
                head.http_version, head.method, 1, None, None, None
            )
        except Reject:
            return False
        self._head_begun()
        ex = self._head_read(head, http11, body_kind, length, upgrade, True)
        self._message_read(ex, True)  # (read_head takes only heads llhttp keeps alive after)
        return True

    # -- httptools callbacks ------------------------------------------------

    def _begin(self) -> None:
        self._url = b""
        self._headers = []  # on_header appends only after this (waiting for S_HEAD)
        self._counted = 0
        self._content_length = None
        self._transfer_coding = None
        self._hosts = 0
        self._upgrade = None
        self._head_begun()

    def _head_begun(self) -> None:
        """A request head began in this read: the header timeout applies (both readers)."""
        self.waiting_for = S_HEAD
        # The header timeout's start: read from the loop's clock after the feed, and
        # only if the head is still unfinished then (data_received): later than here
        # by the rest of one feed (microseconds, on a millisecond clock).
        self._period_start = -1.0
        if not self.armed_tick:
            self.arm(self.loop.time() + self.ctx.recheck)

    def on_url(self, url: bytes) -> None:
        if self.waiting_for != S_HEAD:
            self._begin()  # the request-target is the first callback of a message
        elif self._url:
            url = self._url + url
        self._url = url
        if len(url) > self._max_target:
            raise Reject(414, "request-target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._counting:
            self._counted += len(name) + len(value) + 4  # ": " and CRLF
            if self._counted > self._max_head:
                raise Reject(431, "request header fields too large")
        if self.waiting_for != S_HEAD:
            return  # trailer fields are not forwarded (RFC 9112 §7.1.2)
        self._headers.append((name, value))
        n = len(name)
        if (
            n == LEN_HOST
            or n == LEN_UPGRADE
            or n == LEN_CONTENT_LENGTH
            or n == LEN_TRANSFER_ENCODING
        ):
            # The usual spelling of Host as it is; others lower-cased by a table (a C
            # call when compiled; bytes.lower() is a Python method call).
            lname = H_HOST if name == b"Host" else name.translate(ASCII_LOWER)
            if lname == H_HOST:
                self._hosts += 1
            elif lname == H_CONTENT_LENGTH:
                if self._content_length is not None:
                    raise Reject(400, "duplicate Content-Length")
                self._content_length = value
            elif lname == H_TRANSFER_ENCODING:
                te = self._transfer_coding
                self._transfer_coding = value if te is None else te + b"," + value
            elif lname == H_UPGRADE:
                self._upgrade = value

    def on_headers_complete(self) -> None:
        p = self.parser
        assert p is not None
        headers = self._headers
        chunk = self._chunk
        version = ""
        fields: bytes | None = None
        method: bytes | None = None
        if chunk is not None and not self._done_in_feed:
            # The first message of a read that began between messages: its head is
            # at the start of `chunk` (fast_wire.head_at_start).
            method = method_at_start(chunk)
            if method is None:
                method = p.get_method()
            version, fields = head_at_start(chunk, method, self._url, headers)
        if method is None:
            method = p.get_method()
        if not version:
            version = p.get_http_version()
        upgrade = self._upgrade
        if upgrade is not None and not p.should_upgrade():  # asked only with an Upgrade field
            upgrade = None
        http11, body_kind, length, upgrade = request_framing(
            version, method, self._hosts, self._content_length, self._transfer_coding, upgrade
        )
        self._headers = _NO_HEADERS  # an idle connection holds no head, nor an empty list
        # A request with neither body nor upgrade ends in this same feed, before anything
        # reads `keep`: on_message_complete asks llhttp then (one Python call, not two).
        keep = p.should_keep_alive() if body_kind or upgrade is not None else True
        head = RequestHead(
            method, self._url, headers, self.client_ip, version, self.ctx.scheme, fields
        )
        self._last_ex = self._head_read(head, http11, body_kind, length, upgrade, keep)

    def _head_read(
        self,
        head: RequestHead,
        http11: bool,
        body_kind: int,
        length: int,
        upgrade: bytes | None,
        keep: bool,
    ) -> Exchange:
        """A whole, framing-checked request head is read (by either reader): queue it."""
        ex = Exchange(self, head, http11, head.method == b"HEAD", keep, body_kind, length, upgrade)
        self._parsing = ex
        if self._queue is _NO_QUEUE:
            # Made with one slot, which it keeps when popped empty: CPython frees the
            # slots of a list that grew from [] once it is emptied, so an append and
            # a pop on `[]` would allocate and free them for every request.
            self._queue = [ex]
        else:
            self._queue.append(ex)
        self.ctx.in_flight += 1
        self.waiting_for = S_BODY
        if body_kind:  # the body's progress window starts now (no clock read without one)
            self._period_start = self.loop.time()
            self._body_bytes = 0
            self.arm(self._period_start + self.ctx.body_timeout)
        return ex

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        if ex is None:
            return
        self._body_bytes += len(body)
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
        keep = False
        if ex is not None:
            p = self.parser
            assert p is not None
            keep = p.should_keep_alive()  # here: llhttp resets it once feed_data returns
        self._message_read(ex, keep)

    def _message_read(self, ex: Exchange | None, keep: bool) -> None:
        """The whole request `ex` is read (by either reader); None: a message not queued."""
        self._parsing = None
        self.waiting_for = S_WAIT
        self._done_in_feed += 1
        if ex is None:
            return
        ex.keep = keep
        ex.req_done = True
        if not ex.discard:
            if ex.body_kind == BODY_CHUNKED:
                self._to_upstream(ex, CHUNK_END)
            up = ex.up
            if up is not None:
                up.request_done()
        if ex.state >= X_ANSWERED:
            self._finish(ex)

    # -- exchanges ----------------------------------------------------------

    def _run_queue(self) -> None:
        if self._running:
            return
        self._running = True
        try:
            while self._active is None and self._queue and self.state < C_LINGER:
                q = self._queue
                ex = q.pop() if len(q) == 1 else q.pop(0)  # (popping the last moves nothing)
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
            r = self.ctx.handler.handle(ex.head)
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
                up = self.ctx.pool.acquire(r.host, r.port, r.tls)
                if up is not None:
                    up.attach(ex, True)
                    return
            self.ctx.pool.connect(ex)
        except Exception:  # a malformed Forward must still get an answer
            log.exception("fast engine: forwarding failed")
            if ex.up is not None:
                ex.up.abandon()
            self.upstream_failed(ex, ERR_PROTOCOL)
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
        ex.state = X_HEAD_SENT
        self.response_complete(ex, keep)

    def response_complete(self, ex: Exchange, keep: bool, now: float = -1.0) -> None:
        """The response to `ex` is fully written (called by the upstream side too).

        `now`: the loop time if the caller read it in this callback (-1: not read).
        """
        if ex.state != X_FINISHED:  # the state only moves forward
            ex.state = X_ANSWERED
        if not keep:
            ex.close_after = True
        if ex.req_done or ex.close_after:
            self._finish(ex, None, now)
        else:
            ex.discard = True  # read the rest of the request body and drop it
            ex.buf = None
            self._unpause_(P_WAIT | P_UPW)

    def upstream_failed(self, ex: Exchange, kind: UpstreamErrorKind) -> None:
        """The upstream exchange failed; answer via `error_body` or abort (README "Failover").

        The status comes from the one table of gateway/errors.py.
        """
        if ex.state == X_FINISHED or self.state == C_CLOSED:
            return
        ex.up = None
        fwd = ex.fwd
        assert fwd is not None
        if ex.state >= X_HEAD_SENT:
            ex.close_after = True
            self._shut(abort=True)
            self._finish(ex, kind)
            return
        status = upstream_status(kind)
        try:
            r = self.ctx.handler.error_body(status, kind, fwd)
        except Exception:
            log.exception("fast engine: handler.error_body failed")
            r = error_json(status, kind)
        if not ex.req_done:
            ex.close_after = True
        self._unpause_(P_WAIT | P_UPW)
        keep = ex.keep and ex.req_done and not ex.close_after and not self.close_soon
        self.transport_write(local_response(r, keep=keep, http11=ex.http11, is_head=ex.is_head))
        ex.status = r.status
        ex.state = X_ANSWERED
        if not keep:
            ex.close_after = True
        self._finish(ex, kind)

    def _finish(
        self, ex: Exchange, kind: UpstreamErrorKind | None = None, now: float = -1.0
    ) -> None:
        if ex.state == X_FINISHED:
            return
        ex.state = X_FINISHED
        ex.discard = True
        ex.buf = None
        self.ctx.finished_one()
        fwd = ex.fwd
        if fwd is not None:
            try:
                fwd.done(ex.status, kind)
            except Exception:
                log.exception("fast engine: on_done failed")
        if ex is self._active:
            self._active = None
        if self.state == C_CLOSED:
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
            # (a caller's read in this callback serves: microseconds apart, a millisecond clock)
            self._period_start = t0 = now if now >= 0.0 else self.loop.time()
            # Soon enough to drop the parser and queue, or park, if nothing follows (arm
            # keeps an earlier one).
            self.arm(t0 + self.ctx.idle_check)

    def _fail_input(self, status: int, message: str) -> None:
        """Refuse the request being read (RFC 9112 §11.2: never forward it) and close."""
        if self.state >= C_LINGER:
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
                ex.state = X_FINISHED
                self.ctx.finished_one()
        err = Exchange(self, None)
        err.local = error_json(status, message)
        err.close_after = True
        err.req_done = True
        err.keep = False
        if self._queue is _NO_QUEUE:
            self._queue = []
        self._queue.append(err)
        self.ctx.in_flight += 1
        self._run_queue()

    def _abort_input(self, ex: Exchange, status: int, message: str) -> None:
        up = ex.up
        ex.up = None
        if up is not None:
            up.abandon()
        ex.close_after = True
        if ex.state < X_HEAD_SENT:
            r = error_json(status, message)
            self.transport_write(local_response(r, keep=False, http11=ex.http11, is_head=False))
            ex.status = status
            ex.state = X_HEAD_SENT
            self._finish(ex, ERR_CLIENT)
        elif ex.state >= X_ANSWERED:
            self._finish(ex)
        else:
            self._shut(abort=True)
            self._finish(ex, ERR_CLIENT)

    # -- helpers used by the upstream side ----------------------------------

    def transport_write(self, data: bytes) -> None:
        if self.state < C_LINGER:
            self.transport.write(data)

    def pause_for_upstream(self) -> None:
        self._pause_(P_UPW)

    def resume_for_upstream(self) -> None:
        self._unpause_(P_UPW)

    def start_tunnel(self, ex: Exchange, rest: bytes) -> None:
        """Relay raw bytes both ways after a 101 (RFC 9110 §7.8)."""
        self._tunnel = ex.up
        self.state = C_TUNNEL
        self.disarm()
        if rest:
            self.transport_write(rest)
        self._unpause_(P_UPG | P_WAIT)

    def tunnel_eof_from_upstream(self) -> None:
        self._tunnel_eof_upstream = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self._tunnel_eof_client:
            self._shut(abort=False)

    def tunnel_closed(self, ex: Exchange) -> None:
        self._tunnel = None
        ex.up = None
        self._shut(abort=False)
        self._finish(ex, None)

    def upstream_ready(self) -> None:
        self._unpause_(P_WAIT)

    def close_if_idle(self) -> None:
        if self.state == C_OPEN and self.waiting_for == S_WAIT and self._idle():
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
        if not self.pause and self.state != C_CLOSED:
            self.transport.pause_reading()
        self.pause |= bit

    def _unpause_(self, bit: int) -> None:
        p = self.pause
        if p & bit:
            p &= ~bit
            self.pause = p
            if not p and self.state != C_CLOSED:
                self.transport.resume_reading()
                self._period_start = self.loop.time()  # we stopped reading: the client was not late
                self._body_bytes = 0

    def _shut(self, abort: bool) -> None:
        """Close the transport (again, to escalate from a close to an abort)."""
        if self.state == C_CLOSED:
            return
        self.state = C_SHUT
        if abort:
            self.transport.abort()
        else:
            self.transport.close()

    def _close(self) -> None:
        """Close after the last response, lingering to drain (RFC 9112 §9.6)."""
        if self.state >= C_LINGER:
            return
        tr = self.transport
        if self._peer_eof or not tr.can_write_eof():
            self.state = C_SHUT
            tr.close()
            return
        self.state = C_LINGER
        tr.write_eof()
        if self.pause:
            self.pause = 0
            tr.resume_reading()
        self._period_start = self.loop.time()
        self.arm(self._period_start + min(LINGER_SECONDS, self.ctx.recheck))

    def _park(self, deadline: float) -> bool:
        """Idle (nothing in flight, buffered or paused): hand the socket to the lot."""
        lot = self.ctx.lot
        tr = self.transport
        if lot is None or tr.get_write_buffer_size():
            return False
        sock = tr.get_extra_info("socket")
        if sock is None or not lot.park(sock.fileno(), deadline):
            return False
        # The lot holds a duplicate descriptor; closing the transport closes uvloop's.
        self.ctx.clients.pop(self, None)
        self.parser = None
        self._queue = _NO_QUEUE
        self.state = C_SHUT
        tr.abort()
        return True

    def on_tick(self, tick: int) -> None:
        if tick != self.armed_tick:
            return  # re-armed elsewhere meanwhile
        self.armed_tick = 0
        state = self.state
        if state != C_OPEN and state != C_LINGER:
            return  # a tunnel has no timeout; a shut connection waits for connection_lost
        ctx = self.ctx
        now = self.loop.time()
        st = self.waiting_for
        if state == C_LINGER:
            deadline = self._period_start + LINGER_SECONDS
            if now >= deadline:
                self._shut(abort=False)
                return
        elif self.pause:
            deadline = now + ctx.recheck  # we stopped reading: the client is not late
        elif st == S_WAIT:
            if not self._idle():
                return  # waiting on the upstream; re-armed when the exchange ends
            deadline = self._period_start + ctx.keepalive_timeout
            if now >= deadline:
                self._shut(abort=False)
                return
            park = ctx.park_after
            if park and ctx.lot is not None and not self._begun and not self.close_soon:
                at = self._period_start + park
                if now >= at:
                    if self._park(deadline):
                        return
                elif at < deadline:
                    deadline = at
            if (self.parser is not None or self._queue is not _NO_QUEUE) and not self._begun:
                drop = self._period_start + PARSER_IDLE_SECONDS
                if now >= drop:
                    self.parser = None  # between two messages: the next byte makes a new one
                    self._queue = _NO_QUEUE  # empty (idle): made again at the next head
                elif drop < deadline:
                    deadline = drop
        elif st == S_BODY:
            deadline = self._period_start + ctx.body_timeout
            if now >= deadline:
                if self._body_bytes < ctx.body_min_bytes:
                    self._fail_input(408, "request body timeout")
                    return
                self._period_start = now  # enough progress: the next window starts
                self._body_bytes = 0
                deadline = now + ctx.body_timeout
        else:
            deadline = self._period_start + ctx.header_timeout
            if now >= deadline:
                self._fail_input(408, "request header timeout")
                return
        self.arm(min(deadline, now + ctx.recheck))
