"""Bytes, constants and the per-request record shared by the fast engine's two sides.

Why a module of its own: the client side (`fast.py`) and the upstream side
(`fast_upstream.py`) both build HTTP/1.1 heads and share one exchange record;
keeping the wire constants here precomputes them once at import, never per
request (STYLE habit 4).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import TYPE_CHECKING

from gateway.engine.api import Forward, Headers, RequestHead, Respond

if TYPE_CHECKING:
    from gateway.engine.fast import ClientConn
    from gateway.engine.fast_upstream import Upstream

# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ].
STATUS_LINES: dict[int, bytes] = {
    int(s): b"HTTP/1.1 %d %s\r\n" % (int(s), s.phrase.encode("latin-1")) for s in HTTPStatus
}

CRLF = b"\r\n"
COLON = b": "
CHUNK_END = b"0\r\n\r\n"
TE_CHUNKED = b"Transfer-Encoding: chunked\r\n"
CONN_CLOSE = b"Connection: close\r\n"
CONN_KEEP = b"Connection: keep-alive\r\n"
CONN_UPGRADE = b"Connection: Upgrade\r\nUpgrade: "
HTTP11_TAIL = b" HTTP/1.1\r\n"
SP = b" "

# Body framing of a client request.
BODY_NONE = 0
BODY_CL = 1
BODY_CHUNKED = 2

# RFC 9110 §9.2.2: only these may be retried automatically (RFC 9112 §9.3.1).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
REPLAY_CAP = 65536

# Response fields handled specially by the relay: hop-by-hop ones (RFC 9110
# §7.6.1) are dropped, Content-Length is kept but noted for framing.
H_CONTENT_LENGTH = b"content-length"
H_CONNECTION = b"connection"
H_UPGRADE = b"upgrade"
H_TRANSFER_ENCODING = b"transfer-encoding"
RESP_SPECIAL = frozenset(
    {
        H_CONTENT_LENGTH,
        H_CONNECTION,
        H_UPGRADE,
        H_TRANSFER_ENCODING,
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
    }
)
# Request fields the client side inspects (lengths first: a cheap pre-filter).
H_HOST = b"host"
REQ_SPECIAL_LENS = frozenset({len(H_HOST), len(H_UPGRADE), len(H_CONTENT_LENGTH), 17})


def status_line(code: int) -> bytes:
    line = STATUS_LINES.get(code)
    if line is None:
        line = b"HTTP/1.1 %d \r\n" % code
    return line


class Reject(Exception):
    """A request the engine refuses on its own, before any policy runs."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_json(status: int, message: str) -> Respond:
    body = json.dumps({"error": message}).encode()
    return Respond(status, body, [(b"Content-Type", b"application/json")])


def local_response(r: Respond, *, keep: bool, http11: bool, is_head: bool) -> bytes:
    """The whole wire form of a locally generated response, head and body."""
    status = r.status
    parts = [status_line(status)]
    for n, v in r.headers:
        parts += (n, COLON, v, CRLF)
    body = r.body
    if status >= 200 and status != 204 and status != 304:
        parts.append(b"Content-Length: %d\r\n" % len(body))
    else:
        body = b""
    if not keep:
        parts.append(CONN_CLOSE)
    elif not http11:
        parts.append(CONN_KEEP)
    parts.append(CRLF)
    if not is_head:
        parts.append(body)
    return b"".join(parts)


class Exchange:
    """One request/response pair on a client connection."""

    __slots__ = (
        "client",
        "head",
        "http11",
        "is_head",
        "keep",
        "body_kind",
        "cl",
        "upgrade",
        "req_done",
        "resp_done",
        "buf",
        "discard",
        "fwd",
        "local",
        "up",
        "status",
        "head_sent",
        "close_after",
        "finished",
        "replay",
        "replay_size",
        "retried",
    )

    def __init__(self, client: ClientConn, head: RequestHead | None) -> None:
        self.client = client
        self.head = head
        self.http11 = True
        self.is_head = False
        self.keep = True
        self.body_kind = BODY_NONE
        self.cl = 0
        self.upgrade: bytes | None = None
        self.req_done = False
        self.resp_done = False
        self.buf: list[bytes] | None = None  # request bytes waiting for an upstream
        self.discard = False  # request body is read and dropped
        self.fwd: Forward | None = None
        self.local: Respond | None = None  # engine-made answer (400, 414, 431, ...)
        self.up: Upstream | None = None
        self.status = 0
        self.head_sent = False
        self.close_after = False
        self.finished = False
        self.replay: list[bytes] | None = None
        self.replay_size = 0
        self.retried = False


def request_head(ex: Exchange, fwd: Forward) -> bytes:
    """Request line, policy's end-to-end headers and our framing (RFC 9112 §6)."""
    h = ex.head
    assert h is not None
    target = fwd.target
    parts = [h.method, SP, target if target is not None else h.target, HTTP11_TAIL]
    for n, v in fwd.headers:
        parts += (n, COLON, v, CRLF)
    kind = ex.body_kind
    if kind == BODY_CL:
        parts.append(b"Content-Length: %d\r\n\r\n" % ex.cl)
    elif kind == BODY_CHUNKED:
        parts += (TE_CHUNKED, CRLF)
    elif ex.upgrade is not None:
        parts += (CONN_UPGRADE, ex.upgrade, CRLF, CRLF)
    else:
        parts.append(CRLF)
    return b"".join(parts)


def strip_connection_tokens(headers: Headers, tokens: set[bytes]) -> Headers:
    """Drop the fields a Connection header names (RFC 9110 §7.6.1)."""
    return [(n, v) for n, v in headers if n.lower() not in tokens or n.lower() == H_CONTENT_LENGTH]


def connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")} - {b"", b"close", b"keep-alive"}
