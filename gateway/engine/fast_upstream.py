"""Upstream side of the fast engine: pooled HTTP/1.1 connections and the response relay.

Why callbacks and no coroutines: on the hot path a pooled connection is taken,
written and read entirely from protocol callbacks, so a request costs no task,
no future and no await (the gap to nginx is framework work: benchmarks/README.md "Profile").
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from gateway.engine.api import ERR_PROTOCOL, ERR_RESET, ERR_TIMEOUT
from gateway.engine.fast_wire import (
    CHUNK_END,
    COLON,
    CONN_CLOSE,
    CONN_KEEP,
    CONN_UPGRADE,
    CRLF,
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    IDEMPOTENT,
    P_WAIT,
    REPLAY_CAP,
    RESP_SPECIAL,
    RESP_SPECIAL_LENS,
    STATUS_LINES,
    TE_CHUNKED,
    Exchange,
    Reject,
    connection_tokens,
    request_head,
    status_line,
    strip_connection_tokens,
)

if TYPE_CHECKING:
    from gateway.engine.fast_pool import Pool
    from gateway.tls_config import UpstreamTLS

log = logging.getLogger(__name__)

# How the response body is relayed to the client.
M_NONE: Final = 0  # no body (HEAD, 1xx, 204, 304)
M_RAW: Final = 1  # as received: Content-Length, or close-delimited to HTTP/1.0
M_CHUNK: Final = 2  # re-framed as chunked for an HTTP/1.1 client (RFC 9112 §7.1)
M_EOF: Final = 3  # upstream body ends at close; relayed raw to an HTTP/1.0 client

TE_NONE: Final = 0
TE_IS_CHUNKED: Final = 1
TE_OTHER: Final = 2

Key = tuple[str, int]


class Upstream:
    """One keep-alive connection to an upstream endpoint (a protocol by duck typing, as ClientConn).

    Why it relays the response itself: the head is rebuilt once without
    hop-by-hop fields (RFC 9110 §7.6.1) and the body re-framed for the client
    (RFC 9112 §6-7) straight from llhttp callbacks; the connection goes back to
    the pool only after a complete keep-alive response (RFC 9112 §9.3).
    """

    __slots__ = (
        "pool",
        "loop",
        "key",
        "transport",
        "parser",
        "ex",
        "reused",
        "got",
        "rh",
        "cl",
        "te",
        "eof_body",
        "upg",
        "ctok",
        "mode",
        "interim",
        "done",
        "keep",
        "extra",
        "head_only",
        "rpaused",
        "wpaused",
        "closed",
        "last",
        "idle_since",
        "rt",
        "tick",
        "tw",
        "tunnel",
        "out",
        "tls",
    )

    def __init__(self, pool: Pool, key: Key, tls: UpstreamTLS | None = None) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.key = key
        self.tls = tls  # what it was opened with: reused only for the same (README "TLS")
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.reused = False
        self.got = False
        self.rh: list[bytes] = []  # the head so far, flat: name, ": ", value, CRLF, ...
        self.cl = False
        self.te = TE_NONE
        self.eof_body = False
        self.upg: bytes | None = None
        self.ctok: set[bytes] | None = None
        self.mode = M_NONE
        self.interim = False
        self.done = False
        self.keep = False
        self.extra = False
        self.head_only = False
        self.rpaused = False
        self.wpaused = False
        self.closed = False
        self.last = 0.0
        self.idle_since = 0.0
        self.rt = pool.idle_timeout
        self.tick = 0  # the wheel tick armed (engine/fast_timers.py); 0: none
        self.tw = 0.0
        self.tunnel = False
        self.out: list[bytes] = []  # bytes for the client, written once per read

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.pool.conns.add(self)
        self.pool.opened(self.key)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tick:
            self.pool.wheel.remove(self, self.tick)
            self.tick = 0
        pool = self.pool
        pool.conns.discard(self)
        if not pool.conns and pool.all_closed is not None:
            pool.all_closed.set()
        ex = self.ex
        if ex is None:
            pool.discard(self)
            pool.closed(self.key)
            return
        self._lost(ex, exc)
        pool.closed(self.key)  # after the exchange's own retry, which may want this endpoint

    def _lost(self, ex: Exchange, exc: Exception | None) -> None:
        if self.tunnel:
            self.ex = None
            ex.client.tunnel_closed(ex)
            return
        if exc is None and self.eof_body and ex.head_sent and not self.interim:
            # Close-delimited body (RFC 9112 §6.3 rule 8): EOF is its end.
            self.done = True
            self.keep = False
            if self.mode == M_CHUNK:
                ex.client.transport_write(CHUNK_END)
            self._complete()
            return
        self._failed(502, ERR_RESET)

    def eof_received(self) -> bool | None:
        if self.tunnel and self.ex is not None:
            self.ex.client.tunnel_eof_from_upstream()
            return True
        return None

    def pause_writing(self) -> None:
        self.wpaused = True
        ex = self.ex
        if ex is not None:
            ex.client.pause_for_upstream()

    def resume_writing(self) -> None:
        self.wpaused = False
        ex = self.ex
        if ex is not None:
            ex.client.resume_for_upstream()

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:
            # Bytes on an idle connection: nothing may be pending, so it is unusable.
            self.abandon()
            return
        if self.tunnel:
            ex.client.transport_write(data)
            return
        self.got = True
        self.last = self.loop.time()
        out = self.out
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as e:
            if self.mode == M_NONE and ex.status == 101 and self.ex is ex:
                self._flush(ex)
                self._start_tunnel(ex, data[e.args[0] :])
            else:
                self._failed(502, ERR_PROTOCOL)
            return
        except HttpParserError:
            if self.ex is ex:
                self._flush(ex)
                self._failed(502, ERR_PROTOCOL)
            return
        if out:
            # One write per read: head and body of a small response leave together.
            ex.client.transport_write(b"".join(out))
            out.clear()
        if self.done and self.ex is ex:
            self._complete()

    # -- httptools callbacks ----------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) not in RESP_SPECIAL_LENS:
            rh = self.rh  # four appends: cheaper than extending by a new tuple (compiled)
            rh.append(name)
            rh.append(COLON)
            rh.append(value)
            rh.append(CRLF)
            return
        lname = name.lower()
        if lname in RESP_SPECIAL:
            if lname == H_CONTENT_LENGTH:
                self.cl = True
                self.rh += (name, COLON, value, CRLF)
            elif lname == H_CONNECTION:
                if len(value) == 10 or len(value) == 5:  # "keep-alive" / "close": names nothing
                    lvalue = value.lower()
                    if lvalue == b"keep-alive" or lvalue == b"close":
                        return
                toks = connection_tokens(value)
                if toks:
                    self.ctok = toks if self.ctok is None else self.ctok | toks
            elif lname == H_UPGRADE:
                self.upg = value
            elif lname == H_TRANSFER_ENCODING:
                self.te = TE_IS_CHUNKED if value.lower().rstrip().endswith(b"chunked") else TE_OTHER
            return
        self.rh += (name, COLON, value, CRLF)

    def on_headers_complete(self) -> None:
        ex = self.ex
        assert ex is not None
        if self.done:
            self.extra = True  # a second response to one request: never reuse
            return
        status = self.parser.get_status_code()
        rh = self.rh
        self.rh = []
        if self.ctok is not None:
            rh = strip_connection_tokens(rh, self.ctok)
            self.ctok = None
        line = STATUS_LINES.get(status)
        rh.insert(0, line if line is not None else status_line(status))
        client = ex.client
        if status < 200:
            if status == 101:
                if ex.upgrade is None or self.upg is None:
                    raise Reject(502, "101 without an upgrade")
                ex.status = 101
                ex.head_sent = True
                parts = rh
                parts += (CONN_UPGRADE, self.upg, CRLF)
                assert ex.fwd is not None
                for n, v in ex.fwd.response_headers:
                    parts += (n, COLON, v, CRLF)
                parts.append(CRLF)
                self.out.append(b"".join(parts))
                return
            # Interim response (RFC 9110 §15.2): relay to HTTP/1.1 clients only.
            self.interim = True
            self.cl = False
            self.te = TE_NONE
            self.upg = None
            if ex.http11:
                rh.append(CRLF)
                self.out.append(b"".join(rh))
            return
        fwd = ex.fwd
        assert fwd is not None
        parts = rh
        for n, v in fwd.response_headers:
            parts.append(n)
            parts.append(COLON)
            parts.append(v)
            parts.append(CRLF)
        close = ex.close_after or not ex.keep or not ex.req_done or client.close_soon
        if ex.is_head or status == 204 or status == 304:
            self.mode = M_NONE
            self.eof_body = False
            if ex.is_head:
                # httptools cannot be told the response is to HEAD: end it here.
                self.done = True
                self.head_only = True
                self.keep = self.parser.should_keep_alive()
        elif self.cl and self.te == TE_NONE:
            self.mode = M_RAW
        else:
            # Chunked ends by itself; anything else is close-delimited (RFC 9112 §6.3).
            self.eof_body = self.te != TE_IS_CHUNKED
            if ex.http11:
                self.mode = M_CHUNK
                parts.append(TE_CHUNKED)
            else:
                self.mode = M_EOF
                close = True
        if close:
            parts.append(CONN_CLOSE)
            ex.close_after = True
        elif not ex.http11:
            parts.append(CONN_KEEP)
        parts.append(CRLF)
        ex.status = status
        ex.head_sent = True
        self.out.append(b"".join(parts))

    def on_body(self, body: bytes) -> None:
        if self.done:
            self.extra = True
            return
        mode = self.mode
        if mode == M_RAW or mode == M_EOF:
            self.out.append(body)
        elif mode == M_CHUNK:
            self.out += (b"%x\r\n" % len(body), body, CRLF)
        else:
            self.extra = True

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.done:
            if not self.head_only:
                self.extra = True
            return
        self.done = True
        self.keep = self.parser.should_keep_alive()  # here: llhttp resets it once feed_data returns
        if self.mode == M_CHUNK:
            self.out.append(CHUNK_END)

    # -- exchange lifecycle -------------------------------------------------

    def attach(self, ex: Exchange, reused: bool, replay: list[bytes] | None = None) -> None:
        """Send `ex`'s request on this connection and relay its response."""
        fwd = ex.fwd
        assert fwd is not None and self.transport is not None
        self.ex = ex
        ex.up = self
        self.reused = reused
        self.got = False
        if self.rh:
            self.rh = []  # trailer fields of the previous response
        self.ctok = None
        self.cl = False
        self.te = TE_NONE
        self.eof_body = False
        self.upg = None
        self.mode = M_NONE
        self.interim = False
        self.done = False
        self.keep = False
        self.extra = False
        self.rt = fwd.read_timeout
        data = b"".join(replay) if replay is not None else request_head(ex, fwd)
        buf = ex.buf
        if buf is not None and ex.upgrade is None:
            data += b"".join(buf)
            ex.buf = None
        self.transport.write(data)
        # Kept for a replay (a stale pooled connection, or failover to another
        # endpoint) only when sending it twice is harmless: RFC 9110 §9.2.2.
        ex.replay = None
        if (
            (reused or fwd.retry is not None)
            and len(data) <= REPLAY_CAP
            and ex.upgrade is None
            and ex.head is not None
            and ex.head.method in IDEMPOTENT
        ):
            ex.replay_head = data
            ex.replay_size = len(data)
        else:
            ex.replay_head = None
        client = ex.client
        if client.pause & P_WAIT:
            client.upstream_ready()
        if client.wpaused:
            self.transport.pause_reading()
            self.rpaused = True
        if self.wpaused:
            client.pause_for_upstream()
        if ex.req_done:
            now = self.loop.time()
            self.last = now
            if not self.tick or self.tw > now + self.rt:
                self._arm(now + self.rt)
        if ex.deadline:
            self._arm(ex.deadline)

    def send(self, ex: Exchange, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if ex.replay_head is not None:
            ex.replay_size += len(data)
            if ex.replay_size > REPLAY_CAP:
                ex.replay_head = None
                ex.replay = None
            elif ex.replay is None:
                ex.replay = [data]
            else:
                ex.replay.append(data)

    def request_done(self) -> None:
        now = self.loop.time()
        self.last = now
        self._arm(now + self.rt)

    def client_paused(self, paused: bool) -> None:
        """Follow the client's write buffer: stop reading while it is full."""
        if self.closed or self.transport is None:
            return
        if paused:
            if not self.rpaused:
                self.rpaused = True
                self.transport.pause_reading()
        elif self.rpaused:
            self.rpaused = False
            self.last = self.loop.time()
            self.transport.resume_reading()

    def abandon(self) -> None:
        """Drop the connection without relaying anything more (client gone, bad input)."""
        self.ex = None
        self.tunnel = False
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()
        self.pool.discard(self)

    def close(self) -> None:
        self.ex = None
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()
        self.pool.discard(self)

    def _flush(self, ex: Exchange) -> None:
        out = self.out
        if out:
            ex.client.transport_write(b"".join(out))
            out.clear()

    def _complete(self) -> None:
        ex = self.ex
        assert ex is not None and self.transport is not None
        self.ex = None
        ex.up = None
        if self.head_only:
            self.parser = HttpResponseParser(self)
            self.head_only = False
        if self.rpaused:
            self.rpaused = False
            if not self.closed:
                self.transport.resume_reading()
        reusable = (
            self.keep
            and not self.extra
            and ex.req_done
            and ex.upgrade is None
            and not self.closed
            and self.transport.get_write_buffer_size() == 0
        )
        if reusable:
            self.pool.release(self)
        else:
            self.close()
        if self.wpaused:
            ex.client.resume_for_upstream()
        ex.client.response_complete(ex, self.mode != M_EOF)

    def _failed(self, status: int, kind: str, final: bool = False) -> None:
        ex = self.ex
        if ex is None:
            return
        # Sent again only when no response byte came back and all that was sent
        # is kept (an idempotent request, RFC 9110 §9.2.2); `final`: the deadline.
        replay = None
        if not self.got and not ex.head_sent and not final:
            replay = ex.replay_parts()
        stale = replay is not None and kind == ERR_RESET and self.reused and not ex.retried
        if self.wpaused:
            ex.client.resume_for_upstream()
        self.abandon()
        ex.up = None
        ex.replay_head = None
        ex.replay = None
        if replay is not None:
            fwd = ex.fwd
            assert fwd is not None
            if stale:
                # A keep-alive connection the upstream closed while idle (RFC 9112
                # §9.3.1): the same endpoint on a fresh connection.
                ex.retried = True
                self.pool.connect(ex, replay)
                ex.client.wait_upstream(ex)
                return
            if fwd.retry is not None and fwd.retry.again(fwd, kind):
                ex.client.wait_upstream(ex)  # before: resend may attach at once and resume
                self.pool.resend(ex, replay)
                return
        ex.client.upstream_failed(ex, status, kind)

    def _start_tunnel(self, ex: Exchange, rest: bytes) -> None:
        assert self.transport is not None
        self.tunnel = True
        if self.tick:
            self.pool.wheel.remove(self, self.tick)
            self.tick = 0
        buf = ex.buf
        ex.buf = None
        if buf:
            self.transport.write(b"".join(buf))
        ex.client.start_tunnel(ex, rest)

    # -- timers -------------------------------------------------------------

    def _arm(self, when: float) -> None:
        t = self.tick
        wheel = self.pool.wheel
        if t:
            if self.tw <= when:
                return
            wheel.remove(self, t)
        self.tw = when
        self.tick = wheel.add(self, when)

    def on_tick(self, tick: int) -> None:
        if tick != self.tick:
            return  # re-armed elsewhere meanwhile
        self.tick = 0
        if self.closed or self.tunnel:
            return
        now = self.loop.time()
        ex = self.ex
        if ex is not None and ex.deadline and now >= ex.deadline:
            # timeouts.total: the whole exchange is over, whatever is in progress.
            self._failed(ex.status if ex.head_sent else 504, ERR_TIMEOUT, True)
            return
        if ex is None:
            deadline = self.idle_since + self.pool.idle_timeout
            if now >= deadline:
                self.close()
                return
        elif ex.req_done and not self.rpaused:
            deadline = self.last + self.rt
            if now >= deadline:
                if ex.head_sent:
                    self._failed(ex.status, ERR_TIMEOUT)
                else:
                    self._failed(504, ERR_TIMEOUT)
                return
        else:
            deadline = now + self.rt  # waiting on the client, not on us
        if ex is not None and ex.deadline and ex.deadline < deadline:
            deadline = ex.deadline
        self._arm(min(deadline, now + self.rt))
