"""Bytes, constants and the per-request record shared by the fast engine's two sides.

Why a module of its own: the client side (`fast_client.py`) and the upstream side
(`fast_upstream.py`) both build HTTP/1.1 heads and share one exchange record;
keeping the wire constants here precomputes them once at import, never per
request.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from gateway.engine.api import Forward, Headers, RequestHead, Respond
from gateway.headers import add_field_lines

if TYPE_CHECKING:
    from mypy_extensions import i64  # a plain int at run time; an unboxed int64 when compiled

    from gateway.engine.fast_client import ClientConn
    from gateway.engine.fast_upstream import Upstream

# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ].
STATUS_LINES: Final[dict[int, bytes]] = {
    int(s): b"HTTP/1.1 %d %s\r\n" % (int(s), s.phrase.encode("latin-1")) for s in HTTPStatus
}

CRLF: Final = b"\r\n"
CHUNK_END: Final = b"0\r\n\r\n"
TE_CHUNKED: Final = b"Transfer-Encoding: chunked\r\n"
CONN_CLOSE: Final = b"Connection: close\r\n"
CONN_KEEP: Final = b"Connection: keep-alive\r\n"
CONN_UPGRADE: Final = b"Connection: Upgrade\r\nUpgrade: "
HTTP11_TAIL: Final = b" HTTP/1.1\r\n"
SP: Final = b" "

# Why reading from a client is paused (a bit set; reading resumes when empty).
P_PIPE: Final = 1  # a pipelined request waits for the one in progress
P_WAIT: Final = 2  # the upstream connection is not there yet; the body is buffered
P_UPW: Final = 4  # the upstream's write buffer is above its high-water mark
P_UPG: Final = 8  # an upgrade waits for the upstream's answer
P_DEAD: Final = 16  # input was refused; nothing more is parsed

# Body framing of a client request.
BODY_NONE: Final = 0
BODY_CL: Final = 1
BODY_CHUNKED: Final = 2

# RFC 9110 §9.2.2: only these may be retried automatically (RFC 9112 §9.3.1).
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Bytes of a request kept for a replay: a small request (any GET, a small PUT) is
# kept whole; a larger one streams through and is not retried once sent (README "Failover").
REPLAY_CAP: Final = 65536

# The response side of an exchange (`Exchange.state`), in order; the request side
# is `Exchange.req_done` (pipelining: either may end first).
X_WAITING: Final = 0  # nothing written to the client yet
X_HEAD_SENT: Final = 1  # the response head (or a whole local answer) is written
X_ANSWERED: Final = 2  # the whole response is written
X_FINISHED: Final = 3  # reported to `Forward.on_done`; nothing more happens to it
EXCHANGE_STATES: Final = ("waiting", "head_sent", "answered", "finished")

# Fields handled specially: the relay drops hop-by-hop ones (RFC 9110 §7.6.1)
# and notes Content-Length for framing (fast_upstream.RESPONSE_FIELDS).
H_CONTENT_LENGTH: Final = b"content-length"
H_CONNECTION: Final = b"connection"
H_UPGRADE: Final = b"upgrade"
H_TRANSFER_ENCODING: Final = b"transfer-encoding"
# Request fields the client side inspects (lengths first: a cheap pre-filter, as
# literals so that the compiled build compares machine ints, no set lookup).
H_HOST: Final = b"host"
LEN_HOST: Final = 4
LEN_UPGRADE: Final = 7
LEN_CONTENT_LENGTH: Final = 14
LEN_TRANSFER_ENCODING: Final = 17


def response_fields(fwd: Forward) -> bytes:
    """Policy's fields for the client response (X-Release-Stage, X-Request-ID, ...) as field
    lines: rendered once by policy (engine.api.Forward), else here from its list."""
    rendered = fwd.response_fields
    if rendered is None:
        parts: list[bytes] = []
        add_field_lines(parts, fwd.response_headers)
        rendered = b"".join(parts)
    return rendered


def status_line(code: int) -> bytes:
    """The status line for `code`; an unknown code gets an empty reason (RFC 9112 §4)."""
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


def request_framing(
    version: str,
    method: bytes,
    hosts: int,
    cl: bytes | None,
    te: bytes | None,
    upgrade: bytes | None,
) -> tuple[bool, int, int, bytes | None]:
    """(http11, body kind, content length, upgrade) of a request head, or `Reject`.

    Why: RFC 9112 §6.1-6.3 and §11.2: a head whose framing two parties could
    read differently (TE with CL, TE in HTTP/1.0, a final coding other than
    chunked) is refused, never forwarded; §3.2: exactly one Host in HTTP/1.1.
    llhttp already refuses duplicate Content-Length, bad chunk sizes, control
    characters and obs-fold; this adds what it lets through.
    """
    if version == "1.1":
        http11 = True
    elif version == "1.0":
        http11 = False
    else:
        raise Reject(505, "HTTP version not supported")
    if hosts > 1 or (http11 and not hosts):
        raise Reject(400, "missing or duplicate Host")
    if method == b"CONNECT":
        raise Reject(501, "CONNECT is not supported")
    body_kind = BODY_NONE
    length = 0
    if te is not None:
        if not http11:
            raise Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
        if cl is not None:
            raise Reject(400, "both Content-Length and Transfer-Encoding")
        codings = [c.strip() for c in te.lower().split(b",")]
        if codings[-1] != b"chunked":
            raise Reject(400, "final transfer coding is not chunked")
        if len(codings) != 1:
            raise Reject(501, "transfer coding not implemented")
        body_kind = BODY_CHUNKED
    elif cl is not None:
        if not cl.isdigit():
            raise Reject(400, "invalid Content-Length")
        body_kind = BODY_CL
        length = int(cl)
    if upgrade is not None:
        if body_kind == BODY_CHUNKED or length:
            raise Reject(400, "upgrade request with a body")
        body_kind = BODY_NONE
    return http11, body_kind, length, upgrade


def head_at_start(
    data: bytes, method: bytes, target: bytes, fields: Headers
) -> tuple[str, bytes | None]:
    """(HTTP version, field lines) of a request head llhttp parsed from the start of `data`.

    Why: reading the version from the request line spares httptools'
    `get_http_version()` (a str formatted per call), and the field lines as
    received let policy forward the client's fields as one block. Only for a
    head that began at the start of this read (the caller knows that), and
    only in the plain form every client sends: `method SP target SP
    HTTP/1.x CRLF` (RFC 9112 §3), then one `name: value CRLF` line per field
    llhttp reported (RFC 9112 §5), then CRLF. Every byte between the parsed
    parts is checked, so the block holds exactly the parsed fields; anything
    else (leading CRLFs, extra spaces, OWS other than one SP, another version)
    gives ("", None) or (version, None): then the parser is asked, and policy
    renders the fields from the list. Byte indexing and lengths only: a
    bytes method call costs more in the compiled build than the whole check.
    """
    # Offsets as i64: machine arithmetic when compiled (no tagged-int calls per `+`).
    m: i64 = len(method)
    p: i64 = m + 1 + len(target)  # where SP HTTP/1.x CRLF must be
    n: i64 = len(data)
    if (
        n < p + 11
        or not data.startswith(method)
        or data[m] != 32
        or data[m + 1] == 32
        or data[p] != 32
        or data[p + 1] != 72  # H
        or data[p + 2] != 84  # T
        or data[p + 3] != 84  # T
        or data[p + 4] != 80  # P
        or data[p + 5] != 47  # /
        or data[p + 6] != 49  # 1
        or data[p + 7] != 46  # .
        or data[p + 9] != 13
        or data[p + 10] != 10
    ):
        return "", None
    minor = data[p + 8]
    if minor == 49:
        version = "1.1"
    elif minor == 48:
        version = "1.0"
    else:
        return "", None
    # llhttp keeps no CR in a value and strips the OWS before it, so each check
    # below fails at the first line that is not exactly `name: value CRLF`.
    start: i64 = p + 11
    pos: i64 = start
    for name, value in fields:
        pos += len(name)
        if pos + 1 >= n or data[pos] != 58 or data[pos + 1] != 32:  # ": "
            return version, None
        pos += 2 + len(value)
        if pos + 1 >= n or data[pos] != 13 or data[pos + 1] != 10:
            return version, None
        pos += 2
    if pos + 1 >= n or data[pos] != 13 or data[pos + 1] != 10:
        return version, None
    return version, data[start:pos]


# The usual methods as constants (RFC 9110 §9.3): a head that starts a read with one
# of these takes the constant (its hash cached: IDEMPOTENT is a set lookup), not a
# fresh bytes object from httptools' get_method() (a Python method call).
USUAL_METHODS: Final = (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")
_USUAL_STARTS: Final = tuple((m + SP, m) for m in USUAL_METHODS)


def method_at_start(data: bytes) -> bytes | None:
    """The method of the request line llhttp parsed from the start of `data`, if a usual one.

    Only for a head that began at the start of this read (the caller knows
    that): llhttp accepted `method SP` there (RFC 9112 §3), so the bytes up
    to the first space are the method.
    """
    if data.startswith(b"GET "):  # (the usual one, before the loop)
        return USUAL_METHODS[0]
    for start, method in _USUAL_STARTS:
        if data.startswith(start):
            return method
    return None


def error_json(status: int, message: str) -> Respond:
    """The engine's own error answer: a small JSON body, like policy's (README "On every hop")."""
    body = json.dumps({"error": message}).encode()
    return Respond(status, body, [(b"Content-Type", b"application/json")])


def local_response(r: Respond, *, keep: bool, http11: bool, is_head: bool) -> bytes:
    """Head and body of a local answer in one buffer: one write, no extra syscall.

    Why: a Content-Length on every answer that may have content keeps the
    connection reusable (RFC 9112 §6.3); HEAD gets the length, not the body.
    """
    status = r.status
    parts = [status_line(status)]
    add_field_lines(parts, r.headers)
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
    """One request/response pair on a client connection.

    Why one record shared by both sides: the client side fills the request
    half, the upstream side the response half, and `on_done` must run exactly
    once however the pair ends (engine.api).
    """

    __slots__ = (
        "client",
        "head",
        "http11",
        "is_head",
        "keep",
        "body_kind",
        "content_length",
        "upgrade",
        "req_done",
        "state",
        "buf",
        "discard",
        "fwd",
        "local",
        "up",
        "status",
        "close_after",
        "replay_head",
        "replay",
        "replay_size",
        "retried",
        "deadline",
    )

    def __init__(
        self,
        client: ClientConn,
        head: RequestHead | None,
        http11: bool = True,
        is_head: bool = False,
        keep: bool = True,
        body_kind: int = BODY_NONE,
        content_length: int = 0,
        upgrade: bytes | None = None,
    ) -> None:
        self.client = client
        self.head = head
        self.http11 = http11
        self.is_head = is_head
        self.keep = keep
        self.body_kind = body_kind
        self.content_length = content_length  # of the request body (BODY_CL)
        self.upgrade = upgrade
        self.req_done = False  # the whole request is read
        self.state = X_WAITING
        self.buf: list[bytes] | None = None  # request bytes waiting for an upstream
        self.discard = False  # request body is read and dropped
        self.fwd: Forward | None = None
        self.local: Respond | None = None  # engine-made answer (400, 414, 431, ...)
        self.up: Upstream | None = None
        self.status = 0
        self.close_after = False
        # What was sent upstream, kept while it may be sent again (an idempotent
        # request of at most REPLAY_CAP bytes): the first write, then later body parts.
        self.replay_head: bytes | None = None
        self.replay: list[bytes] | None = None
        self.replay_size = 0
        self.retried = False  # a stale pooled connection was replaced once already
        self.deadline = 0.0  # loop time by which the whole exchange ends (timeouts.total); 0 = none

    def __repr__(self) -> str:
        h = self.head
        what = f"{h.method.decode('latin-1')} {h.target.decode('latin-1')}" if h else "local"
        req = "read" if self.req_done else "reading"
        return f"Exchange({what}, {EXCHANGE_STATES[self.state]}, request {req}, {self.status})"

    def replay_parts(self) -> list[bytes] | None:
        """Everything sent upstream so far, when it may all be sent again; else None."""
        first = self.replay_head
        if first is None:
            return None
        more = self.replay
        return [first] if more is None else [first, *more]


def request_head(ex: Exchange, fwd: Forward) -> bytes:
    """Request line, policy's end-to-end headers and our framing (RFC 9112 §6)."""
    h = ex.head
    assert h is not None
    target = fwd.target
    fields = fwd.fields
    if fields is not None and ex.body_kind == BODY_NONE and ex.upgrade is None:
        # The common case as one formatting of bytes: compiled, one allocation and a
        # copy of each part (no tuple, no join over buffers, no list grown part by part).
        t = target if target is not None else h.target
        return b"%b %b HTTP/1.1\r\n%b\r\n" % (h.method, t, fields)
    parts = [h.method, SP, target if target is not None else h.target, HTTP11_TAIL]
    if fields is not None:
        parts.append(fields)  # policy's fields, rendered once (engine.api.Forward)
    else:
        add_field_lines(parts, fwd.headers)
    kind = ex.body_kind
    if kind == BODY_CL:
        parts.append(b"Content-Length: %d\r\n\r\n" % ex.content_length)
    elif kind == BODY_CHUNKED:
        parts += (TE_CHUNKED, CRLF)
    elif ex.upgrade is not None:
        parts += (CONN_UPGRADE, ex.upgrade, CRLF, CRLF)
    else:
        parts.append(CRLF)
    return b"".join(parts)
