"""Header policy on every hop (README "On every hop") — pure, over lists of (name, value) bytes.

Why one pass: the request head is scanned once to pull out what routing and
tracing need and to drop hop-by-hop fields (RFC 9110 §7.6.1), so the
per-request path allocates little.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, TypeVar

Headers = list[tuple[bytes, bytes]]

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
_VIA: Final = (b"Via", VIA_TOKEN)
_XFP_HTTP: Final = (b"X-Forwarded-Proto", b"http")
# Connection options that name no field (RFC 9110 §7.6.1): not among connection_tokens.
_NOT_FIELD_NAMES: Final = frozenset({b"", b"close", b"keep-alive"})
# A client's X-Request-ID is kept only when it is 1-200 visible ASCII bytes
# (RFC 5234 VCHAR, %x21-7E): longer or other bytes would be echoed into logs,
# upstream heads and responses unchecked.
REQUEST_ID_MAX: Final = 200
_REQUEST_ID_RE: Final = re.compile(rb"[\x21-\x7e]{1,%d}" % REQUEST_ID_MAX)


class Scanned:
    """What one pass over the request head found.

    A plain slotted class, not a dataclass: built once per request, and a
    dataclass __init__ stays interpreted in the compiled build.
    """

    __slots__ = (
        "kept",
        "host",
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

    def __init__(self, kept: Headers) -> None:
        self.kept = kept
        self.host: str | None = None
        self.host_b: bytes | None = None  # as received, for X-Forwarded-Host
        self.cookie: str | None = None
        self.stage: str | None = None
        self.tag: str | None = None  # the colouring tag header (routing.tag_header), kept
        self.user: str | None = None
        self.request_id: str | None = None
        self.request_id_replaced = False  # the client's was refused (valid_request_id)
        self.forwarded_for: bytes | None = None
        self.via: bytes | None = None
        # Shared empty defaults: most requests carry none of these (no per-request lists).
        self.traceparent: Sequence[str] = ()
        self.tracestate: Sequence[str] = ()
        self.baggage: Sequence[str] = ()


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
    headers: Sequence[tuple[bytes, bytes]], stage_l: bytes, user_l: bytes, tag_l: bytes = b""
) -> Scanned:
    """Split a request head into end-to-end headers and the values policy needs.

    `stage_l` / `user_l` / `tag_l` are the lower-cased configured override, sticky
    and colouring-tag header names.
    """
    kept: Headers = []
    s = Scanned(kept)
    conn: set[bytes] | None = None
    cookies: list[str] | None = None
    xff: list[bytes] | None = None
    via: list[bytes] | None = None
    tp: list[str] | None = None
    ts: list[str] | None = None
    bg: list[str] | None = None
    for name, value in headers:
        n = name.lower()
        if n == b"host":
            s.host = _latin(value)
            s.host_b = value
            kept.append((b"Host", value))
        elif n == b"cookie":
            cookies = _add(cookies, _latin(value))
            kept.append((name, value))
        elif n == stage_l:
            s.stage = _latin(value).strip()
        elif n == user_l:
            s.user = _latin(value).strip() or None
            kept.append((name, value))
        elif n == tag_l:
            s.tag = _latin(value).strip() or None
            kept.append((name, value))
        elif n in _REWRITTEN:
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
            if n == b"connection":  # the engine handles upgrades (Connection: upgrade)
                toks = connection_tokens(value)
                conn = toks if conn is None else conn | toks
        else:
            kept.append((name, value))
    if tp is not None:
        s.traceparent = tp
    if ts is not None:
        s.tracestate = ts
    if bg is not None:
        s.baggage = bg
    if conn:
        conn.discard(b"upgrade")
        if conn:
            s.kept = [(k, v) for k, v in kept if k.lower() not in conn]
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
    s.host = _latin(authority)
    s.host_b = authority
    kept = [(k, v) for k, v in s.kept if k != b"Host"]
    kept.insert(0, (b"Host", authority))
    s.kept = kept


def upstream_headers(
    s: Scanned,
    *,
    client_ip: str,
    proto: str,
    stage: tuple[bytes, bytes],
    request_id: bytes,
    trace: Sequence[tuple[bytes, bytes]] = (),
) -> Headers:
    """The end-to-end header list sent to the upstream (README "On every hop").

    Extends and returns `s.kept` (a scan serves one request). `stage` is the
    (configured stage header, release) field, built once per snapshot.
    """
    out = s.kept
    ip = client_ip.encode("latin-1")
    out.append((b"X-Forwarded-For", s.forwarded_for + b", " + ip if s.forwarded_for else ip))
    out.append(_XFP_HTTP if proto == "http" else (b"X-Forwarded-Proto", proto.encode()))
    if s.host_b is not None:
        out.append((b"X-Forwarded-Host", s.host_b))
    out.append((b"Via", s.via + b", " + VIA_TOKEN) if s.via else _VIA)
    out.append(stage)
    out.append((b"X-Request-ID", request_id))
    out.extend(trace)
    return out


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
