"""Header policy on every hop (README "On every hop") — pure, over lists of (name, value) bytes.

Why one pass: the request head is scanned once to pull out what routing and
tracing need and to drop hop-by-hop fields (RFC 9110 §7.6.1), so the
per-request path allocates little.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, NamedTuple, TypeVar

Headers = list[tuple[bytes, bytes]]


class Field(NamedTuple):
    """A header field (name, value) built once (per process or snapshot), sent many times.

    Why not a plain tuple: compiled, a `tuple[bytes, bytes]` constant or attribute is
    held unboxed and made into a new tuple each time it goes into a header list; a
    NamedTuple is kept as the one object, and reads as a tuple wherever Headers are read.
    """

    name: bytes
    value: bytes


# RFC 9110 §7.6.1 plus the de-facto ones; Upgrade is re-added by the engine when upgrading.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Framing is the engine's business; these never pass through as given.
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})
# Fields the gateway rewrites itself.
_REWRITTEN: Final = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"via",
        b"x-request-id",
        b"traceparent",
        b"tracestate",
        b"baggage",
    }
)
VIA_TOKEN: Final = b"1.1 gray-gateway"
# Pieces of the fields the gateway adds (upstream_fields), names and separators
# run together: fewer, larger parts per request.
_XFF: Final = b"X-Forwarded-For: "
_XFH: Final = b"\r\nX-Forwarded-Host: "
_XFP_HTTP_LINE: Final = b"\r\nX-Forwarded-Proto: http"
_XFP_HTTP_XFH: Final = _XFP_HTTP_LINE + _XFH
_XFP_HTTPS_LINE: Final = b"\r\nX-Forwarded-Proto: https"
_XFP_HTTPS_XFH: Final = _XFP_HTTPS_LINE + _XFH
# An HTTP/1.0 request may come without Host; HTTP/1.1 to the upstream must carry one,
# empty when the target has no authority (RFC 9112 §3.2).
_NO_HOST: Final = b"\r\nHost: "
_VIA_NAME: Final = b"\r\nVia: "
_VIA_APPENDED: Final = b", " + VIA_TOKEN + b"\r\n"
_VIA_LINE: Final = _VIA_NAME + VIA_TOKEN + b"\r\n"
_XRID: Final = b"X-Request-ID: "
# Connection options that name no field (RFC 9110 §7.6.1): not among connection_tokens.
_NOT_FIELD_NAMES: Final = frozenset({b"", b"close", b"keep-alive"})
# A client's X-Request-ID is kept only when it is 1-200 visible ASCII bytes
# (RFC 5234 VCHAR, %x21-7E): longer or other bytes would be echoed into logs,
# upstream heads and responses unchecked.
REQUEST_ID_MAX: Final = 200
_REQUEST_ID_RE: Final = re.compile(rb"[\x21-\x7e]{1,%d}" % REQUEST_ID_MAX)
# `name.translate(ASCII_LOWER)` is `name.lower()` (bytes.lower maps only A-Z too); compiled,
# translate with a bytes table is a C loop, where lower() is a Python method call per field.
ASCII_LOWER: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


class Scanned:
    """What one pass over the request head found.

    A plain slotted class, not a dataclass: a dataclass __init__ stays interpreted
    in the compiled build. `refill` makes it what a new one is: the handler fills one
    per request (scan's `into`).
    """

    __slots__ = (
        "kept",
        "host_b",
        "cookie",
        "stage",
        "tag",
        "user",
        "request_id",
        "request_id_replaced",
        "forwarded_for",
        "via",
        "traceparent",
        "tracestate",
        "baggage",
    )
    # What goes upstream of the client's fields. While every field goes on as
    # received, this is the request's own list, shared: whoever changes what
    # goes upstream makes a new list (so `kept is headers` says "unchanged").
    kept: Headers
    host_b: bytes | None  # as received: X-Forwarded-Host, the service match
    cookie: str | None
    stage: str | None
    tag: str | None  # the colouring tag header (routing.tag_header), kept
    user: str | None
    request_id: str | None
    request_id_replaced: bool  # the client's was refused (valid_request_id)
    forwarded_for: bytes | None
    via: bytes | None
    # The values of each field, None when absent (most requests carry none of these):
    # compiled, `is None` is a pointer compare, where the truth of a Sequence is a call.
    traceparent: list[str] | None
    tracestate: list[str] | None
    baggage: list[str] | None

    def __init__(self, kept: Headers) -> None:
        self.refill(kept)

    def refill(self, kept: Headers) -> None:
        """Every field as a new Scanned has it.

        Why a method and not `__init__` again: compiled, `__init__` stores into fields it
        takes to be empty, so running it twice would never free the first values.
        """
        self.kept = kept
        self.host_b = None
        self.cookie = None
        self.stage = None
        self.tag = None
        self.user = None
        self.request_id = None
        self.request_id_replaced = False
        self.forwarded_for = None
        self.via = None
        self.traceparent = None
        self.tracestate = None
        self.baggage = None


_T = TypeVar("_T")


def _add(values: list[_T] | None, value: _T) -> list[_T]:
    """Append to a list made only when a first value turns up."""
    if values is None:
        return [value]
    values.append(value)
    return values


def _latin(v: bytes) -> str:
    return v.decode("latin-1")


def scan(
    headers: Headers,
    stage_l: bytes,
    user_l: bytes,
    tag_l: bytes = b"",
    into: Scanned | None = None,
) -> Scanned:
    """Split a request head into end-to-end headers and the values policy needs.

    `stage_l` / `user_l` / `tag_l` are the lower-cased configured override, sticky
    and colouring-tag header names. When every field goes on as it came,
    `kept` is `headers` itself, not a copy. `into`: a Scanned to fill afresh instead
    of making one (the handler's own, read only while it handles one request: no
    allocation and free of a 13-field object per request).
    """
    if into is None:
        s = Scanned(headers)
    else:
        s = into
        s.refill(headers)
    # A new list only from the first field that is dropped or renamed on.
    kept: Headers | None = None
    i = 0
    conn: set[bytes] | None = None
    cookies: list[str] | None = None
    xff: list[bytes] | None = None
    via: list[bytes] | None = None
    tp: list[str] | None = None
    ts: list[str] | None = None
    bg: list[str] | None = None
    for name, value in headers:
        # Every request has Host, as spelt here: known lower-cased without a call.
        spelt_host = name == b"Host"
        n = b"host" if spelt_host else name.translate(ASCII_LOWER)
        if n == b"host":
            s.host_b = value
            if not spelt_host:
                kept = headers[:i] if kept is None else kept
                kept.append((b"Host", value))
            elif kept is not None:
                kept.append((name, value))
        elif n == b"cookie":
            cookies = _add(cookies, _latin(value))
            if kept is not None:
                kept.append((name, value))
        elif n == stage_l:
            s.stage = _latin(value).strip()
            kept = headers[:i] if kept is None else kept
        elif n == user_l:
            s.user = _latin(value).strip() or None
            if kept is not None:
                kept.append((name, value))
        elif n == tag_l:
            s.tag = _latin(value).strip() or None
            if kept is not None:
                kept.append((name, value))
        elif n in _REWRITTEN:
            kept = headers[:i] if kept is None else kept
            if n == b"traceparent":
                tp = _add(tp, _latin(value))
            elif n == b"tracestate":
                ts = _add(ts, _latin(value))
            elif n == b"baggage":
                bg = _add(bg, _latin(value))
            elif n == b"x-request-id":
                v = value.strip()
                if valid_request_id(v):
                    s.request_id = _latin(v)
                    s.request_id_replaced = False
                elif v:
                    s.request_id = None
                    s.request_id_replaced = True
            elif n == b"x-forwarded-for":
                xff = _add(xff, value)
            elif n == b"via":
                via = _add(via, value)
            # x-forwarded-proto/-host are replaced by ours
        elif n in HOP_BY_HOP or n in _FRAMING:
            kept = headers[:i] if kept is None else kept
            if n == b"connection":  # the engine handles upgrades (Connection: upgrade)
                toks = connection_tokens(value)
                conn = toks if conn is None else conn | toks
        elif kept is not None:
            kept.append((name, value))
        i += 1
    if kept is not None:
        s.kept = kept
    s.traceparent = tp
    s.tracestate = ts
    s.baggage = bg
    if conn:
        conn.discard(b"upgrade")
        if conn:
            s.kept = [(k, v) for k, v in s.kept if k.lower() not in conn]
    if cookies is not None:
        s.cookie = "; ".join(cookies)
    if xff is not None:
        s.forwarded_for = b", ".join(xff)
    if via is not None:
        s.via = b", ".join(via)
    return s


def valid_request_id(value: bytes) -> bool:
    """1 to REQUEST_ID_MAX visible ASCII bytes (no spaces, no controls, no 8-bit)."""
    return _REQUEST_ID_RE.fullmatch(value) is not None


def set_authority(s: Scanned, authority: bytes) -> None:
    """Host becomes the absolute-form target's authority (RFC 9112 §3.2.2).

    A proxy MUST ignore the received Host and generate one from the target.
    """
    s.host_b = authority
    kept = [(k, v) for k, v in s.kept if k != b"Host"]
    kept.insert(0, (b"Host", authority))
    s.kept = kept


def field_line(f: Field) -> bytes:
    """`name: value` CRLF (RFC 9112 §5), for fields rendered once per snapshot."""
    return f.name + b": " + f.value + b"\r\n"


class ReleaseLines:
    """A release's fixed field lines, rendered once per snapshot (gateway/state.py).

    Why the pieces straddle fields: the fields go upstream in their usual order
    (the stage field between Via and X-Request-ID, the release's baggage last),
    and each piece runs from one per-request value to the next, so a request
    joins a few large parts instead of four small ones per field.
    """

    __slots__ = ("stage_rid", "via_stage_rid", "baggage_end")

    def __init__(self, stage: Field, baggage: Field) -> None:
        # The stage line and X-Request-ID's name: to the client, and upstream after a
        # client's Via (made per request).
        self.stage_rid = field_line(stage) + _XRID
        # Our Via (the client sent none), the stage line, X-Request-ID's name.
        self.via_stage_rid = _VIA_LINE + self.stage_rid
        # Ends the traceparent line; the release's baggage (the client sent none).
        self.baggage_end = b"\r\n" + field_line(baggage)


def add_field_lines(parts: list[bytes], fields: Sequence[tuple[bytes, bytes]]) -> None:
    """Append `name: value CRLF` per field to parts of a head (joined once, written once)."""
    for n, v in fields:
        parts.append(n)  # four appends: cheaper than extending by a new tuple (compiled)
        parts.append(b": ")
        parts.append(v)
        parts.append(b"\r\n")


def parse_field_lines(block: bytes) -> Headers:
    """The (name, value) list of CRLF-terminated field lines: the inverse of rendering them.

    Why: the data path renders upstream fields once as bytes; whoever wants them
    as a list (the aiohttp engine, tests) parses them back. Leading OWS is not
    part of a value (RFC 9112 §5.1); llhttp keeps trailing OWS, and so does this.
    """
    out: Headers = []
    for line in block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            out.append((name, value.lstrip(b" \t")))
    return out


def _forwarded_proto(proto: str, host: bool) -> bytes:
    """X-Forwarded-Proto's line from its CRLF on, and X-Forwarded-Host's name if `host`.

    Without `host` (HTTP/1.0 needs none) an empty Host line instead (_NO_HOST).
    """
    if proto == "http":
        return _XFP_HTTP_XFH if host else _XFP_HTTP_LINE + _NO_HOST
    if proto == "https":
        return _XFP_HTTPS_XFH if host else _XFP_HTTPS_LINE + _NO_HOST
    return b"\r\nX-Forwarded-Proto: " + proto.encode() + (_XFH if host else _NO_HOST)


def forwarded_lines(
    client_ip: bytes, proto: str, forwarded_for: bytes = b"", host: bool = True
) -> bytes:
    """X-Forwarded-For (`client_ip` after the client's own `forwarded_for`), X-Forwarded-Proto,
    and X-Forwarded-Host's name when the request has a Host (`_forwarded_proto`).

    With the defaults, what `upstream_fields` sends for every request from
    `client_ip` with a Host and no X-Forwarded-For of its own: a caller that
    keeps it while the client repeats passes it as `peer_lines`.
    """
    return b"%b%b%b%b" % (
        _XFF,
        forwarded_for + b", " if forwarded_for else b"",
        client_ip,
        _forwarded_proto(proto, host),
    )


def upstream_fields(
    s: Scanned,
    client_fields: bytes | None,
    *,
    client_ip: bytes,
    proto: str,
    lines: ReleaseLines,
    request_id: bytes,
    trace: tuple[bytes, bytes, bytes],
    trace_tail: bytes,
    peer_lines: bytes | None = None,
) -> bytes:
    """The end-to-end field lines sent to the upstream (README "On every hop"), CRLF-terminated.

    The client's kept fields first: `client_fields` when they are the client's
    own lines unchanged (the engine's raw block), else rendered from `s.kept`.
    Then X-Forwarded-For/-Proto/-Host, Via, the release's stage field,
    X-Request-ID and `traceparent` from `trace` (trace-id, span-id, flags: W3C Trace
    Context 2 §3.2.2, version 00, propagation.outgoing_trace); `trace_tail` follows
    the traceparent value (the CRLF ending its line, then tracestate and baggage
    lines, if any). `client_ip`: the peer's address, latin-1 encoded; `peer_lines`:
    `forwarded_lines(client_ip, proto)`, if the caller keeps it.
    """
    if client_fields is None:
        parts: list[bytes] = []
        add_field_lines(parts, s.kept)
        client_fields = b"".join(parts)
    host = s.host_b
    xff = s.forwarded_for
    if peer_lines is not None and host is not None and not xff:
        fwd = peer_lines  # the usual request: no part of these lines made again
    else:
        fwd = forwarded_lines(client_ip, proto, xff or b"", host is not None)
    if s.via:
        via = _VIA_NAME + s.via + _VIA_APPENDED + lines.stage_rid
    else:
        via = lines.via_stage_rid
    trace_id, span_id, flags = trace
    # One formatting: compiled, one allocation and a copy per part (no list, no join).
    return b"%b%b%b%b%b\r\ntraceparent: 00-%b-%b-%b%b" % (
        client_fields,
        fwd,
        host if host is not None else b"",
        via,
        request_id,
        trace_id,
        span_id,
        flags,
        trace_tail,
    )


def has_control_chars(value: bytes) -> bool:
    """RFC 9110 §5.5: field values must not carry CTLs other than HTAB."""
    return any((c < 0x20 and c != 0x09) or c == 0x7F for c in value)


def connection_tokens(value: bytes) -> set[bytes]:
    """The field names a Connection header lists (RFC 9110 §7.6.1), lower-cased.

    `close` and `keep-alive` are connection options, not fields: left out.
    """
    return {t.strip().lower() for t in value.split(b",")} - _NOT_FIELD_NAMES


def strip_response_hop_by_hop(headers: Sequence[tuple[bytes, bytes]], upgrading: bool) -> Headers:
    """Response direction of RFC 9110 §7.6.1 (Proxy-Authenticate included)."""
    named: set[bytes] = set()
    for n, v in headers:
        if n.lower() == b"connection":
            named |= connection_tokens(v)
    out: Headers = []
    for n, v in headers:
        ln = n.lower()
        if ln in HOP_BY_HOP or ln in named or ln == b"content-length":
            if upgrading and ln in (b"connection", b"upgrade"):
                out.append((n, v))
            continue
        out.append((n, v))
    return out
