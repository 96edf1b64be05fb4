"""Upstream side of the fast engine: pooled HTTP/1.1 connections and the response relay.

Why callbacks and no coroutines: on the hot path a pooled connection is taken,
written and read entirely from protocol callbacks, so a request costs no task,
no future and no await (the gap to nginx is framework work: benchmarks/README.md "Profile").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from gateway.engine.api import ERR_PROTOCOL, ERR_RESET, ERR_TIMEOUT, UpstreamErrorKind
from gateway.engine.fast_reply import (
    field_line_end,
    length_value,
    plain_final,
    skip_ows,
    status_digits,
    status_line_end,
)
from gateway.engine.fast_timers import Armed
from gateway.engine.fast_wire import (
    CHUNK_END,
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
    TE_CHUNKED,
    X_HEAD_SENT,
    X_WAITING,
    Exchange,
    Reject,
    request_head,
    response_fields,
    status_line,
)
from gateway.headers import HOP_BY_HOP, connection_tokens

if TYPE_CHECKING:
    from mypy_extensions import i64  # a plain int at run time; an unboxed int64 when compiled

    from gateway.engine.fast_pool import Pool
    from gateway.tls_config import UpstreamTLS

log = logging.getLogger(__name__)

# How the response body is relayed to the client.
M_NONE: Final = 0  # no body (HEAD, 1xx, 204, 304)
M_RAW: Final = 1  # as received: Content-Length, or close-delimited to HTTP/1.0
M_CHUNK: Final = 2  # re-framed as chunked for an HTTP/1.1 client (RFC 9112 §7.1)
M_EOF: Final = 3  # upstream body ends at close; relayed raw to an HTTP/1.0 client

# The response's Transfer-Encoding (`Upstream.te_kind`).
TE_NONE: Final = 0  # none
TE_IS_CHUNKED: Final = 1  # ends in chunked: the body ends by itself
TE_OTHER: Final = 2  # another final coding: the body ends at close (RFC 9112 §6.3)

# An upstream connection's lifecycle (`Upstream.state`), in order.
U_CONNECTING: Final = 0  # created by create_connection; no transport yet
U_IDLE: Final = 1  # open, no exchange: in the pool (or about to be)
U_BUSY: Final = 2  # an exchange is attached: request sent, response being relayed
U_DONE: Final = 3  # the whole response is read; `_complete` releases or closes it
U_TUNNEL: Final = 4  # after a 101: bytes relayed both ways (RFC 9110 §7.8), no timeout
U_CLOSED: Final = 5  # closed or aborted by us, or connection_lost
UPSTREAM_STATES: Final = ("connecting", "idle", "busy", "done", "tunnel", "closed")

Key = tuple[str, int]

# The longest response head read (status line and fields); a longer one is a 502,
# as nginx answers "upstream sent too big header" (its proxy_buffer_size).
MAX_RESPONSE_HEAD: Final = 65536


def _by_first_byte(names: list[bytes]) -> tuple[tuple[bytes, ...], ...]:
    """Per lower-cased first byte: the lower-cased names that begin with it."""
    table: list[list[bytes]] = [[] for _ in range(256)]
    for name in names:
        table[name[0]].append(name)
    return tuple(tuple(t) for t in table)


# The response fields the relay looks at: Content-Length (kept, noted for framing)
# and the hop-by-hop ones (RFC 9110 §7.6.1, not relayed). A field line is a token,
# a colon and the value (llhttp refused anything else, RFC 9112 §5.1), so a name is
# found from the line's first byte and a colon right after it: no pass per name.
NOTED: Final = _by_first_byte(sorted(HOP_BY_HOP | {H_CONTENT_LENGTH}))
NOTED_FIRST: Final = bytes(1 if NOTED[b | 32] else 0 for b in range(256))  # a cheap pre-test
HTTP11_SP: Final = b"HTTP/1.1 "
KEEP_ALIVE: Final = b"keep-alive"
CLOSE: Final = b"close"
H_PROXY_CONNECTION: Final = b"proxy-connection"  # llhttp reads it as Connection
EMPTY: Final = b""
TE_CHUNKED_CLOSE: Final = TE_CHUNKED + CONN_CLOSE


def line_end(buf: bytes, start: i64) -> i64:
    """Where the CRLF ending the line at `start` begins; `Reject` if `buf` ends first.

    Why every second byte: llhttp accepted the head, so a CR or LF in it is
    part of a CRLF ending a line (RFC 9112 §2.2: no bare CR or LF; it refuses
    obs-fold too), and of two adjacent bytes one is looked at. The line has at
    least one byte before its CRLF (the caller tests for the empty line).
    """
    n: i64 = len(buf)
    i: i64 = start + 1
    while i < n:
        b: i64 = buf[i]  # (an i64: machine compares, no tagged int)
        if b <= 13:  # one test for most bytes: CR, LF, or HTAB in a value
            if b == 10:
                if buf[i - 1] == 13:
                    return i - 1
                break
            if b == 13:
                if i + 1 < n and buf[i + 1] == 10:
                    return i
                break
        i += 2
    raise Reject(502, "response head not found")  # (or a bare CR or LF: llhttp refuses those)


def name_at(buf: bytes, start: i64, name: bytes) -> bool:
    """The bytes at `start` are `name` (lower-case letters and `-`), in any case (RFC 9110 §5.1).

    OR-ing 32 lower-cases a letter and maps onto a lower-case letter or `-`
    only that letter's two cases, or CR for `-` (no field line holds a CR:
    llhttp refused it), so it compares names, and values such as `close`,
    exactly.
    """
    k: i64 = 0
    size: i64 = len(name)
    while k < size:
        b: i64 = buf[start + k]
        c: i64 = name[k]
        if b | 32 != c:
            return False
        k += 1
    return True


def status_at(buf: bytes, start: i64, end: i64) -> int:
    """The status code of the line `buf[start:end]` if it is `HTTP/1.1 NNN SP ...`, else -1.

    Why: the upstream's own status line is relayed when it is HTTP/1.1 with a
    reason (possibly empty) after the code (RFC 9112 §4); else ours is written.
    """
    if end - start <= 12 or buf[start + 12] != 32:
        return -1
    k: i64 = 0
    while k < 9:
        b: i64 = buf[start + k]
        c: i64 = HTTP11_SP[k]
        if b != c:
            return -1
        k += 1
    d0: i64 = buf[start + 9] - 48
    d1: i64 = buf[start + 10] - 48
    d2: i64 = buf[start + 11] - 48
    if 0 <= d0 <= 9 and 0 <= d1 <= 9 and 0 <= d2 <= 9:
        return d0 * 100 + d1 * 10 + d2
    return -1


class Upstream(Armed):
    """One keep-alive connection to an upstream endpoint (a protocol by duck typing, as ClientConn).

    Why it relays the response itself: the head llhttp validated is relayed from
    the bytes read, its field lines as sent less the hop-by-hop ones (RFC 9110
    §7.6.1; no Python call per field), and the body re-framed for the client
    (RFC 9112 §6-7) from llhttp's callbacks; the connection goes back to the
    pool only after a complete keep-alive response (RFC 9112 §9.3).

    State: `state` is the lifecycle (U_CONNECTING ... U_CLOSED); the fields
    below it describe the response being read while U_BUSY.
    """

    __slots__ = (
        "pool",
        "clock",
        "key",
        "idle_set",
        "idle_prev",
        "idle_next",
        "pooled",
        "transport",
        "buffered",
        "parser",
        "state",
        "ex",
        "reused",
        "answered",
        "head_buf",
        "head_pos",
        "head_acc",
        "has_length",
        "te_kind",
        "eof_body",
        "upgrade",
        "conn_tokens",
        "mode",
        "interim",
        "keep",
        "body_len",
        "conn_close",
        "cut_from",
        "cut_to",
        "extra",
        "head_only",
        "rpaused",
        "wpaused",
        "last_active",
        "idle_since",
        "read_timeout",
        "out",
        "tls",
    )

    def __init__(self, pool: Pool, key: Key, tls: UpstreamTLS | None = None) -> None:
        super().__init__(pool.wheel)
        self.pool = pool
        # The loop's clock, bound once: calling a kept bound method skips the method
        # lookup that `loop.time()` makes on every read.
        self.clock: Callable[[], float] = pool.loop.time
        self.key = key
        self.idle_set = pool.idle_set(key)  # where `Pool.release` puts it (no lookup by key)
        # Its neighbours in `idle_set` while in it (`pooled`): fast_pool.IdleList.
        self.idle_prev: Upstream | None = None
        self.idle_next: Upstream | None = None
        self.tls = tls  # what it was opened with: reused only for the same (README "TLS")
        self.transport: asyncio.Transport | None = None
        # `transport.get_write_buffer_size`, bound at connection_made (as `clock`).
        self.buffered: Callable[[], int] = _nothing_buffered
        self.parser = HttpResponseParser(self)
        self.state = U_CONNECTING
        self.ex: Exchange | None = None
        self.reused = False  # the exchange got it from the pool (it may have gone stale)
        self.answered = False  # a byte of the response came back (no replay after that)
        # The response head is relayed from the bytes read (llhttp validates it):
        # `head_buf[head_pos:]` is where the next head starts during a read, and
        # `head_acc` keeps a head split over reads until it is complete.
        self.head_buf = EMPTY
        self.head_pos = 0
        self.head_acc: bytearray | None = None
        self.has_length = False  # the response has a Content-Length
        self.te_kind = TE_NONE
        self.eof_body = False  # the response body ends at close
        self.upgrade: bytes | None = None  # the response's Upgrade value
        self.conn_tokens: set[bytes] | None = None  # fields its Connection header names
        self.mode = M_NONE
        self.interim = False  # reading a 1xx head (RFC 9110 §15.2)
        self.keep = False  # the response allows reuse (llhttp's keep-alive verdict)
        self.body_len: i64 = -1  # the fast path's Content-Length (`_whole_reply`); -1: none yet
        self.conn_close = False  # the fast path saw `Connection: close`
        # The fast path's hop-by-hop lines, one run `[cut_from:cut_to]` of the read (0: none).
        self.cut_from: i64 = 0
        self.cut_to: i64 = 0
        self.extra = False  # bytes after the response, or a second one: never reuse
        self.head_only = False  # a response to HEAD: its parser cannot be reused
        self.pooled = False  # in `idle_set`
        self.rpaused = False  # reading paused: the client's write buffer is full
        self.wpaused = False  # our write buffer is above its high-water mark
        self.last_active = 0.0  # loop time of the last progress (the read timeout runs from it)
        self.idle_since = 0.0
        self.read_timeout = pool.idle_timeout  # the exchange's timeouts.read while busy
        self.out: list[bytes] = []  # bytes for the client, written once per read

    def __repr__(self) -> str:
        host, port = self.key
        return (
            f"Upstream({host}:{port}, {UPSTREAM_STATES[self.state]}, mode={self.mode}, "
            f"exchange={self.ex!r})"
        )

    @property
    def closed(self) -> bool:
        """Closed or aborted by us, or lost: never used again."""
        return self.state == U_CLOSED

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.buffered = self.transport.get_write_buffer_size
        self.state = U_IDLE
        self.pool.conns.add(self)
        self.pool.opened(self.key)

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = U_CLOSED
        self.disarm()
        pool = self.pool
        pool.conns.discard(self)
        if not pool.conns and pool.all_closed is not None:
            pool.all_closed.set()
        ex = self.ex
        if ex is None:
            pool.discard(self)
            pool.closed(self.key)
            return
        self._lost(ex, exc, was == U_TUNNEL)
        pool.closed(self.key)  # after the exchange's own retry, which may want this endpoint

    def _lost(self, ex: Exchange, exc: Exception | None, tunnel: bool) -> None:
        if tunnel:
            self.ex = None
            ex.client.tunnel_closed(ex)
            return
        if exc is None and self.eof_body and ex.state >= X_HEAD_SENT and not self.interim:
            # Close-delimited body (RFC 9112 §6.3 rule 8): EOF is its end.
            self.keep = False
            if self.mode == M_CHUNK:
                ex.client.transport_write(CHUNK_END)
            self._complete(self.clock())
            return
        self._failed(ERR_RESET)

    def eof_received(self) -> bool | None:
        if self.state == U_TUNNEL and self.ex is not None:
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
        if self.state == U_TUNNEL:
            ex.client.transport_write(data)
            return
        # The first read of a response, when it is one plain response whole, is walked
        # and relayed without llhttp (`_whole_reply`); anything else goes to llhttp.
        reply = None if self.answered else self._whole_reply(ex, data)
        if reply is not None:
            ex.client.transport_write(reply)
        else:
            self.answered = True
            if not self._feed(ex, data):
                return
            out = self.out
            if out:
                # One write per read: head and body of a small response leave together.
                ex.client.transport_write(b"".join(out))
                out.clear()
        # Progress: the read timeout runs from here; a reused connection's idle time too
        # (one clock read per read, microseconds apart from a second one on a millisecond clock).
        now = self.last_active = self.clock()
        if self.state == U_DONE and self.ex is ex:
            self._complete(now)

    def _feed(self, ex: Exchange, data: bytes) -> bool:
        """Feed a read to llhttp; False when the exchange failed or became a tunnel."""
        in_head = ex.state == X_WAITING  # the (final) head is not relayed yet
        if in_head:
            acc = self.head_acc
            if acc is None:
                self.head_buf = data  # the usual case: the whole head in this read
            else:
                acc += data
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as e:
            self.head_buf = EMPTY
            if self.mode == M_NONE and ex.status == 101 and self.ex is ex:
                self._flush(ex)
                self._start_tunnel(ex, data[e.args[0] :])
            else:
                self._failed(ERR_PROTOCOL)
            return False
        except HttpParserError:
            self.head_buf = EMPTY
            if self.ex is ex:
                self._flush(ex)
                self._failed(ERR_PROTOCOL)
            return False
        return not in_head or self._head_rest(ex)

    def _whole_reply(self, ex: Exchange, data: bytes) -> bytes | None:
        """The bytes for the client when `data` is exactly one plain response; else None.

        Why: llhttp's callbacks into Python cost more per response than walking
        its head here (benchmarks/README.md "The response fast path"). Only the
        first read of a response comes here (llhttp then holds no byte of it,
        and is left at the start of a message), and only a response this
        strict walk accepts in full is taken: an `HTTP/1.1` final status that
        has a body (`fast_reply.plain_final`), plain field lines
        (`fast_reply.field_line_end`), exactly one Content-Length of digits, no
        Transfer-Encoding, Upgrade or Proxy-Connection, a Connection of only
        `keep-alive` or `close`, hop-by-hop lines (if any) in one run, and
        exactly that many body bytes after the head, nothing more (RFC 9112
        §6.3, §9.3). On any doubt it declines with nothing changed, and llhttp
        reads the same bytes from the first. The relayed head and the finish
        are the llhttp path's own code (`_relay_fields`, `_final_head`,
        `_finished`), so both relay the same; only the bytes are put together
        here, by one formatting of a few slices of the read (compiled: one
        allocation and a copy of each; no list to fill, join and empty).
        """
        if ex.is_head or ex.upgrade is not None or ex.state != X_WAITING:
            return None
        eol = status_line_end(data)
        if eol < 0:
            return None
        status = status_digits(data)
        if not plain_final(status):
            return None
        self.body_len = -1
        self.conn_close = False
        self.cut_from = self.cut_to = 0
        end = self._relay_fields(None, data, 0, eol + 2)  # (the empty line's offset)
        if end < 0 or end > MAX_RESPONSE_HEAD or len(data) - end - 2 != self.body_len:
            self.has_length = False
            return None
        fwd = ex.fwd
        assert fwd is not None
        self.answered = True
        ours = self._final_head(ex, status)
        self._finished(not self.conn_close)  # llhttp's verdict for HTTP/1.1 with a length
        cut_from = self.cut_from
        cut_to = self.cut_to
        if not cut_to:
            cut_from = cut_to = end  # nothing cut: the lines kept are one slice
        # The lines kept, policy's fields, ours, then the head's last CRLF and the body
        # (as llhttp's path relays them).
        return b"%b%b%b%b%b" % (
            data[:cut_from],
            data[cut_to:end],
            response_fields(fwd),
            ours,
            data[end:],
        )

    # -- httptools callbacks ----------------------------------------------

    def _head_rest(self, ex: Exchange) -> bool:
        """After a read that began in a head: keep what is left of an unfinished head.

        False when the head is over the limit (the exchange has failed).
        """
        buf = self.head_buf
        self.head_buf = EMPTY
        pos = self.head_pos
        self.head_pos = 0
        acc = self.head_acc
        if ex.state != X_WAITING or self.ex is not ex:
            self.head_acc = None
            return True
        if acc is None:
            if pos >= len(buf):
                return True  # every head in it is complete (a 1xx that ended the read)
            acc = self.head_acc = bytearray(buf[pos:] if pos else buf)
        if len(acc) > MAX_RESPONSE_HEAD:
            self.head_acc = None
            self._failed(ERR_PROTOCOL)
            return False
        return True

    def _head_parts(self, parts: list[bytes]) -> int:
        """Append the relayed head so far to `parts`, from the raw bytes of the one llhttp
        just parsed; returns its status code.

        Why raw: each end-to-end field line is kept as sent, so a head of any
        size is a few slices of the read (RFC 9110 §7.6.1: the hop-by-hop ones
        are cut out), and the status line is ours only when the upstream's is
        not HTTP/1.1 (RFC 9110 §6.2: a proxy sends its own version). The parts
        end with the CRLF of the last field line; the caller adds fields. The
        status of an `HTTP/1.1 NNN ` line is read from its three digits (llhttp
        checked them), sparing httptools' `get_status_code()` (a Python call).
        """
        first_part = len(parts)
        acc = self.head_acc
        if acc is not None:
            self.head_acc = None
            self.head_buf = bytes(acc)  # a head split over reads, joined once
        buf = self.head_buf
        # Offsets as i64: machine arithmetic when compiled (no tagged-int calls per `+`).
        pos: i64 = self.head_pos
        n: i64 = len(buf)
        while pos < n and (buf[pos] == 13 or buf[pos] == 10):
            pos += 1  # empty lines before a message are skipped (RFC 9112 §2.2), as llhttp does
        eol = line_end(buf, pos)
        status = status_at(buf, pos, eol)
        last: i64 = pos  # where the run of lines relayed as sent starts
        if status < 0:
            status = self.parser.get_status_code()
            parts.append(status_line(status))
            last = eol + 2
        off = self._relay_fields(parts, buf, last, eol + 2)
        if off - pos > MAX_RESPONSE_HEAD:
            del parts[first_part:]  # none of it is relayed (a 1xx before it is)
            raise Reject(502, "response head too large")
        self.head_pos = off + 2  # a final head may follow a 1xx in the same read
        if self.conn_tokens is not None:
            parts[first_part:] = [
                strip_named_fields(b"".join(parts[first_part:]), self.conn_tokens)
            ]
            self.conn_tokens = None
        return status

    def _relay_fields(self, parts: list[bytes] | None, buf: bytes, last: i64, off: i64) -> i64:
        """Append the field lines from `off` to the head's end, less the hop-by-hop ones, to
        `parts` (from `last`: the lines before them are relayed as sent too); returns where
        the empty line ending the head starts.

        With `parts` (llhttp accepted the head): the lines are walked by offsets
        in the read (`line_end`), no bytes object per line, only the slices
        relayed; a line is looked at only when its first byte can begin a noted
        name and a colon follows that name. `parts` None (the fast path,
        `_whole_reply`: no parser has seen the head): strict, each line is
        checked byte by byte (`fast_reply.field_line_end`) and each noted field
        by `_plain_field`, and the hop-by-hop lines, which must be one run of
        adjacent lines, are noted in `cut_from` and `cut_to` instead of
        slicing around them; -1 when the head is not the plain form.
        """
        strict = parts is None
        n: i64 = len(buf)
        while off < n:
            c: i64 = buf[off]
            if c == 13:
                break  # a line that starts with CR is the head's end
            if strict:
                eol = field_line_end(buf, off)
                if eol < 0:
                    return -1
            else:
                eol = line_end(buf, off)
            if NOTED_FIRST[c]:
                for name in NOTED[c | 32]:
                    colon: i64 = off + len(name)  # (a tuple of names only: no pair to unpack)
                    if colon < eol and buf[colon] == 58 and name_at(buf, off, name):  # b":"
                        if strict and not self._plain_field(name, buf, colon + 1, eol):
                            return -1
                        if name == H_CONTENT_LENGTH:
                            self.has_length = True  # kept: the relay frames the body as received
                        elif parts is not None:
                            if off > last:
                                parts.append(buf[last:off])
                            last = eol + 2
                            self._hop_by_hop(name, buf, colon + 1, eol)
                        else:  # the fast path (`_plain_field` let through none to note)
                            if off > last:  # lines kept before this one
                                if self.cut_to:
                                    return -1  # a second run of hop-by-hop lines
                                self.cut_from = off
                            last = self.cut_to = eol + 2
                        break
            off = eol + 2
        if off + 1 >= n or (strict and buf[off + 1] != 10):
            if strict:
                return -1
            raise Reject(502, "response head not found")  # llhttp accepted only CRLF lines
        if off > last and parts is not None:
            parts.append(buf[last:off])
        return off

    def _plain_field(self, name: bytes, buf: bytes, start: i64, end: i64) -> bool:
        """A noted field the fast path takes (`_whole_reply`), its value `buf[start:end]`.

        Content-Length once and digits only (noted in `body_len`); Connection
        only `keep-alive` or `close` in any case (noted in `conn_close`: llhttp's
        keep-alive verdict); no framing or upgrade field, nor Proxy-Connection
        (llhttp reads it as Connection). Any other hop-by-hop field is only cut.
        """
        start = skip_ows(buf, start, end)
        if name == H_CONTENT_LENGTH:
            if self.body_len >= 0:
                return False  # a second one: llhttp refuses or compares them
            self.body_len = length_value(buf, start, end)
            return self.body_len >= 0
        if name == H_CONNECTION:
            size = end - start
            if size == 5 and name_at(buf, start, CLOSE):
                self.conn_close = True
                return True
            return size == 10 and name_at(buf, start, KEEP_ALIVE)
        return name != H_TRANSFER_ENCODING and name != H_UPGRADE and name != H_PROXY_CONNECTION

    def _hop_by_hop(self, name: bytes, buf: bytes, start: i64, end: i64) -> None:
        """A hop-by-hop response field (RFC 9110 §7.6.1) whose value is `buf[start:end]`:
        noted, not relayed."""
        while start < end and (buf[start] == 32 or buf[start] == 9):
            start += 1  # OWS before the value (RFC 9110 §5.5)
        if name == H_CONNECTION:
            size = end - start
            if (size == 10 and name_at(buf, start, KEEP_ALIVE)) or (
                size == 5 and name_at(buf, start, CLOSE)
            ):
                return  # options that name no field, in any case (compared in place: no slice)
            toks = connection_tokens(buf[start:end])
            if toks:
                self.conn_tokens = toks if self.conn_tokens is None else self.conn_tokens | toks
        elif name == H_UPGRADE:
            self.upgrade = buf[start:end]
        elif name == H_TRANSFER_ENCODING:
            chunked = buf[start:end].lower().rstrip().endswith(b"chunked")
            self.te_kind = TE_IS_CHUNKED if chunked else TE_OTHER

    def on_headers_complete(self) -> None:
        ex = self.ex
        assert ex is not None
        if self.state == U_DONE:
            self.extra = True  # a second response to one request: never reuse
            return
        # The head goes straight into `out`, after what this read relayed before it (a 1xx).
        parts = self.out
        first_part = len(parts)
        status = self._head_parts(parts)
        fwd = ex.fwd
        assert fwd is not None
        if status < 200:
            if status == 101:
                if ex.upgrade is None or self.upgrade is None:
                    raise Reject(502, "101 without an upgrade")
                ex.status = 101
                ex.state = X_HEAD_SENT
                parts += (CONN_UPGRADE, self.upgrade, CRLF, response_fields(fwd), CRLF)
                return
            # Interim response (RFC 9110 §15.2): relay to HTTP/1.1 clients only.
            self.interim = True
            self.has_length = False
            self.te_kind = TE_NONE
            self.upgrade = None
            if ex.http11:
                parts.append(CRLF)
            else:
                del parts[first_part:]
            return
        ours = self._final_head(ex, status)
        parts += (response_fields(fwd), ours, CRLF)

    def _final_head(self, ex: Exchange, status: int) -> bytes:
        """For a final head of `status`: our framing fields, which follow policy's after the
        relayed ones (b"": none); the caller ends the head (its CRLF).

        Shared by llhttp's `on_headers_complete` and the fast path
        (`_whole_reply`): how the body is relayed (RFC 9112 §6-7) and whether
        the client's connection stays open.
        """
        client = ex.client
        ours = EMPTY
        close = ex.close_after or not ex.keep or not ex.req_done or client.close_soon
        if ex.is_head or status == 204 or status == 304:
            self.mode = M_NONE
            self.eof_body = False
            if ex.is_head:
                # httptools cannot be told the response is to HEAD: end it here.
                self.state = U_DONE
                self.head_only = True
                self.keep = self.parser.should_keep_alive()
        elif self.has_length and self.te_kind == TE_NONE:
            self.mode = M_RAW
        else:
            # Chunked ends by itself; anything else is close-delimited (RFC 9112 §6.3).
            self.eof_body = self.te_kind != TE_IS_CHUNKED
            if ex.http11:
                self.mode = M_CHUNK
                ours = TE_CHUNKED
            else:
                self.mode = M_EOF
                close = True
        if close:
            ours = TE_CHUNKED_CLOSE if self.mode == M_CHUNK else CONN_CLOSE
            ex.close_after = True
        elif not ex.http11:
            ours = CONN_KEEP
        ex.status = status
        ex.state = X_HEAD_SENT  # the head leaves with the body bytes of this read: one write
        return ours

    def on_body(self, body: bytes) -> None:
        if self.state == U_DONE:
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
        if self.state == U_DONE:
            if not self.head_only:
                self.extra = True
            return
        self._finished(self.parser.should_keep_alive())  # here: llhttp resets it after feed_data

    def _finished(self, keep: bool) -> None:
        """The whole response is read; `keep`: it allows reuse (RFC 9112 §9.3)."""
        self.state = U_DONE
        self.keep = keep
        if self.mode == M_CHUNK:
            self.out.append(CHUNK_END)

    # -- exchange lifecycle -------------------------------------------------

    def attach(self, ex: Exchange, reused: bool, replay: list[bytes] | None = None) -> None:
        """Send `ex`'s request on this connection and relay its response."""
        fwd = ex.fwd
        assert fwd is not None and self.transport is not None
        self.ex = ex
        ex.up = self
        self.state = U_BUSY
        self.reused = reused
        self.answered = False
        self.conn_tokens = None
        self.has_length = False
        self.te_kind = TE_NONE
        self.eof_body = False
        self.upgrade = None
        self.mode = M_NONE
        self.interim = False
        self.keep = False
        self.extra = False
        self.read_timeout = fwd.read_timeout
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
            now = self.clock()
            self.last_active = now
            self.arm(now + self.read_timeout)
        if ex.deadline:
            self.arm(ex.deadline)

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
        now = self.clock()
        self.last_active = now
        self.arm(now + self.read_timeout)

    def client_paused(self, paused: bool) -> None:
        """Follow the client's write buffer: stop reading while it is full."""
        if self.state == U_CLOSED or self.transport is None:
            return
        if paused:
            if not self.rpaused:
                self.rpaused = True
                self.transport.pause_reading()
        elif self.rpaused:
            self.rpaused = False
            self.last_active = self.clock()
            self.transport.resume_reading()

    def abandon(self) -> None:
        """Drop the connection without relaying anything more (client gone, bad input)."""
        self.ex = None
        if self.state != U_CLOSED and self.transport is not None:
            self.state = U_CLOSED
            self.transport.abort()
        self.pool.discard(self)

    def close(self) -> None:
        self.ex = None
        if self.state != U_CLOSED and self.transport is not None:
            self.state = U_CLOSED
            self.transport.close()
        self.pool.discard(self)

    def _flush(self, ex: Exchange) -> None:
        out = self.out
        if out:
            ex.client.transport_write(b"".join(out))
            out.clear()

    def _complete(self, now: float) -> None:
        """The response is relayed: back to the pool (idle from `now`, loop time) or closed."""
        ex = self.ex
        assert ex is not None and self.transport is not None
        self.ex = None
        ex.up = None
        if self.head_only:
            self.parser = HttpResponseParser(self)
            self.head_only = False
        if self.rpaused:
            self.rpaused = False
            if self.state != U_CLOSED:
                self.transport.resume_reading()
        reusable = (
            self.keep
            and not self.extra
            and ex.req_done
            and ex.upgrade is None
            and self.state != U_CLOSED
            and self.buffered() == 0
        )
        if reusable:
            self.state = U_IDLE
            self.pool.release(self, now)
        else:
            self.close()
        if self.wpaused:
            ex.client.resume_for_upstream()
        ex.client.response_complete(ex, self.mode != M_EOF, now)

    def _failed(self, kind: UpstreamErrorKind, final: bool = False) -> None:
        ex = self.ex
        if ex is None:
            return
        # Sent again only when no response byte came back and all that was sent
        # is kept (an idempotent request, RFC 9110 §9.2.2); `final`: the deadline.
        replay = None
        if not self.answered and ex.state < X_HEAD_SENT and not final:
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
        ex.client.upstream_failed(ex, kind)

    def _start_tunnel(self, ex: Exchange, rest: bytes) -> None:
        assert self.transport is not None
        self.state = U_TUNNEL
        self.disarm()
        buf = ex.buf
        ex.buf = None
        if buf:
            self.transport.write(b"".join(buf))
        ex.client.start_tunnel(ex, rest)

    # -- timers -------------------------------------------------------------

    def on_tick(self, tick: int) -> None:
        if tick != self.armed_tick:
            return  # re-armed elsewhere meanwhile
        self.armed_tick = 0
        if self.state >= U_TUNNEL:
            return  # a tunnel has no timeout; a closed connection none either
        now = self.clock()
        ex = self.ex
        if ex is not None and ex.deadline and now >= ex.deadline:
            # timeouts.total: the whole exchange is over, whatever is in progress.
            self._failed(ERR_TIMEOUT, True)
            return
        if ex is None:
            deadline = self.idle_since + self.pool.idle_timeout
            if now >= deadline:
                self.close()
                return
        elif ex.req_done and not self.rpaused:
            deadline = self.last_active + self.read_timeout
            if now >= deadline:
                self._failed(ERR_TIMEOUT)
                return
        else:
            deadline = now + self.read_timeout  # waiting on the client, not on us
        if ex is not None and ex.deadline and ex.deadline < deadline:
            deadline = ex.deadline
        self.arm(min(deadline, now + self.read_timeout))


def _nothing_buffered() -> int:
    """`Upstream.buffered` before the connection is made."""
    return 0


def strip_named_fields(head: bytes, names: set[bytes]) -> bytes:
    """The head (status line and field lines, each ending in CRLF) without the fields `names`.

    Why: a field the upstream's Connection header names is hop-by-hop (RFC 9110
    §7.6.1); Content-Length stays, the relay frames the body by it. Rare: a
    line at a time.
    """
    lines = head.split(CRLF)
    kept = [lines[0]]
    for line in lines[1:-1]:
        name = line.partition(b":")[0].lower()
        if name not in names or name == H_CONTENT_LENGTH:
            kept.append(line)
    kept.append(EMPTY)
    return CRLF.join(kept)
