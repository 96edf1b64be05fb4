"""The common request head read straight from a read's bytes, without llhttp's callbacks.

Why: llhttp reports a head through a Python callback for the target, one per
field (with two bytes objects and a tuple each), and more at the head's and
the message's end; that glue costs more than the parse (benchmarks/README.md
"The request head fast path"). A read that holds exactly one whole request
head of the plain form every client sends, and no body, is read here in one
pass instead. The grammar is a strict subset of what llhttp accepts, with the
same meaning (tests/test_fast_head.py checks it against llhttp): anything
else gives None and goes to llhttp unchanged, so this module never answers an
error of its own, and the framing rules stay in `fast_wire.request_framing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from gateway.engine.api import Headers, RequestHead
from gateway.engine.fast_upstream import KEEP_ALIVE, name_at
from gateway.engine.fast_wire import (
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_HOST,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    method_at_start,
)

if TYPE_CHECKING:
    from mypy_extensions import i64  # a plain int at run time; an unboxed int64 when compiled

_DIGITS_ALPHA: Final = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# RFC 9110 §5.6.2: token = 1*tchar.
TCHAR: Final = bytes(1 if b in b"!#$%&'*+-.^_`|~" + _DIGITS_ALPHA else 0 for b in range(256))
# RFC 9112 §3.2.1 origin-form after its first "/": RFC 3986 §3.3 pchar (unreserved,
# sub-delims, ":" and "@"; "%" of pct-encoded, its hex digits not checked, as llhttp
# does not), "/" and the query's "?" (no "#": origin-form has no fragment).
TARGET_CHAR: Final = bytes(
    1 if b in b"-._~%!$&'()*+,;=:@/?" + _DIGITS_ALPHA else 0 for b in range(256)
)
_HTTP_1_: Final = b" HTTP/1."

# Names llhttp treats specially (SPECIAL_HEADERS in its src/llhttp/constants.ts:
# Connection, Proxy-Connection, Content-Length, Transfer-Encoding, Upgrade), and two
# more the engine leaves to llhttp's path (Expect) or counts (Host). Any of them but
# Host and a lone `Connection: keep-alive` means the head is not read here.
H_EXPECT: Final = b"expect"
H_PROXY_CONNECTION: Final = b"proxy-connection"


def read_head(data: bytes, max_target: int, client_ip: str, scheme: str) -> RequestHead | None:
    """The request head that is the whole of `data`, if it is of the plain form; else None.

    The plain form (RFC 9112 §3 and §5): a usual method (`fast_wire.USUAL_METHODS`),
    SP, an origin-form target of at most `max_target` bytes, SP, `HTTP/1.1` or
    `HTTP/1.0`, CRLF; then field lines `token ": " value CRLF` whose value is
    visible ASCII with SP or HTAB only inside it; then CRLF, the last bytes of
    `data`. Exactly one Host; no Content-Length, Transfer-Encoding, Upgrade,
    Expect or Proxy-Connection; Connection only once and only `keep-alive` (any
    case). So the request has no body and llhttp would keep the connection
    alive after it (an HTTP/1.0 one only with that Connection field): after a
    head that closes it, llhttp refuses any further byte, which only llhttp's
    path reproduces.
    """
    method = method_at_start(data)
    if method is None or not data.endswith(b"\r\n\r\n"):
        return None
    # The last four bytes are CRLF CRLF: every scan below stops at a CR by then, so
    # no index passes the end (and `data` holds at least `method SP CRLF CRLF`).
    n: i64 = len(data)
    start: i64 = len(method) + 1
    pos: i64 = start
    if data[pos] != 47:  # "/"
        return None
    pos += 1
    while TARGET_CHAR[data[pos]]:
        pos += 1
    if pos - start > max_target or not _at(data, pos, _HTTP_1_):
        return None
    target = data[start:pos]
    minor: i64 = data[pos + 8]
    if (minor != 49 and minor != 48) or data[pos + 9] != 13 or data[pos + 10] != 10:
        return None
    http11 = minor == 49
    pos += 11
    fields_start = pos
    headers: Headers = []
    hosts = 0
    keep_alive = False  # a `Connection: keep-alive` field was read
    while True:
        name_start = pos
        while TCHAR[data[pos]]:
            pos += 1
        size: i64 = pos - name_start
        if not size:
            break  # not a name: the empty line that ends the head, or bad
        if data[pos] != 58 or data[pos + 1] != 32:  # ": "
            return None
        value_start: i64 = pos + 2
        pos = value_start
        b: i64 = data[pos]
        if b <= 32 or b >= 127:  # empty, OWS more than one SP, CTL or obs-text
            return None
        while True:  # VCHAR, SP or HTAB (RFC 9110 §5.5), up to the CR
            b = data[pos]
            if b < 32:
                if b != 9:
                    break
            elif b >= 127:
                return None
            pos += 1
        if b != 13 or data[pos + 1] != 10:
            return None
        last: i64 = data[pos - 1]
        if last == 32 or last == 9:
            return None  # OWS after the value: llhttp's trimming is not relied on
        if size == 4 or size == 6 or size == 7 or size == 10 or size == 14 or size >= 16:
            if size == 4 and name_at(data, name_start, H_HOST):
                hosts += 1
            elif size == 10 and name_at(data, name_start, H_CONNECTION):
                if keep_alive or pos - value_start != 10:
                    return None
                if not name_at(data, value_start, KEEP_ALIVE):
                    return None
                keep_alive = True
            elif (
                (size == 6 and name_at(data, name_start, H_EXPECT))
                or (size == 7 and name_at(data, name_start, H_UPGRADE))
                or (size == 14 and name_at(data, name_start, H_CONTENT_LENGTH))
                or (size == 16 and name_at(data, name_start, H_PROXY_CONNECTION))
                or (size == 17 and name_at(data, name_start, H_TRANSFER_ENCODING))
            ):
                return None
        headers.append((data[name_start : name_start + size], data[value_start:pos]))
        pos += 2
    if data[pos] != 13 or pos + 2 != n or hosts != 1 or not (http11 or keep_alive):
        return None  # not the end of `data` (more follows), Host, or llhttp would close
    return RequestHead(
        method,
        target,
        headers,
        client_ip,
        "1.1" if http11 else "1.0",
        scheme,
        data[fields_start:pos],
    )


def _at(data: bytes, pos: i64, lit: bytes) -> bool:
    """The bytes of `data` at `pos` are `lit` (and `data` is long enough)."""
    size: i64 = len(lit)
    if pos + size > len(data):
        return False
    k: i64 = 0
    while k < size:
        if data[pos + k] != lit[k]:
            return False
        k += 1
    return True
