"""The strict grammar of the common upstream response, checked without llhttp.

Why: most upstream responses are one plain HTTP/1.1 head with a Content-Length
and the whole body in one read. For those the fast engine walks the bytes once
itself (fast_upstream.Upstream) instead of feeding llhttp, whose callbacks into
Python cost more than the walk (benchmarks/README.md "The response fast path").
The grammar here is a strict subset of what llhttp accepts, with the same
meaning (RFC 9112 §2-6): anything else is declined and goes to llhttp from its
first byte, so this module can only ever say "not sure", never disagree.

Per byte, an index into `bytes` and a few compares: offsets are i64 (machine
arithmetic when compiled), and no bytes object is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from mypy_extensions import i64  # a plain int at run time; an unboxed int64 when compiled

# tchar (RFC 9110 §5.6.2), by byte: the bytes a field name is made of.
TCHAR: Final = bytes(
    1 if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "!#$%&'*+-.^_`|~") else 0
    for b in range(256)
)
# A body length the fast path reads: at most this many digits (a read is far shorter).
MAX_LENGTH_DIGITS: Final = 9


def field_line_end(buf: bytes, start: i64) -> i64:
    """Where the CRLF ending the field line at `start` begins, or -1 if the line is not plain.

    Plain: `token ":" *( VCHAR / SP / HTAB ) CRLF` (RFC 9110 §5.1, §5.5; RFC
    9112 §5). Refused here, all sent to llhttp: whitespace before the colon,
    obs-fold (a line starting with SP or HTAB), obs-text and other control
    bytes (NUL, DEL, a bare CR or LF), and a line that the read cuts off.
    Why no bound test per byte: a line the read cuts off ends at an index
    past its end, whose IndexError is the -1 (one compare fewer a byte, ~15 %
    of the walk when compiled).
    """
    i: i64 = start
    try:
        b: i64 = buf[i]
        while 97 <= (b | 32) <= 122 or b == 45 or TCHAR[b]:  # letters and `-` first
            i += 1
            b = buf[i]
        if i == start or b != 58:  # b":" ends a name of one or more tchar
            return -1
        i += 1
        b = buf[i]
        while 32 <= b < 127 or b == 9:
            i += 1
            b = buf[i]
        if b == 13 and buf[i + 1] == 10:
            return i
    except IndexError:
        pass
    return -1


def status_line_end(buf: bytes) -> i64:
    """Where the CRLF ending a plain status line at the start of `buf` begins, or -1.

    Plain: `HTTP/1.1 DDD SP reason CRLF` with a reason of VCHAR and SP only
    (RFC 9112 §4). The code's digits are checked; its value is the caller's.
    """
    n: i64 = len(buf)
    if (
        n < 15
        or buf[0] != 72  # H
        or buf[1] != 84  # T
        or buf[2] != 84  # T
        or buf[3] != 80  # P
        or buf[4] != 47  # /
        or buf[5] != 49  # 1
        or buf[6] != 46  # .
        or buf[7] != 49  # 1
        or buf[8] != 32
        or buf[12] != 32
    ):
        return -1
    i: i64 = 9
    while i < 12:
        d: i64 = buf[i]
        if d < 48 or d > 57:
            return -1
        i += 1
    i = 13
    while i < n:
        b: i64 = buf[i]
        if b < 32 or b >= 127:
            if b == 13 and i + 1 < n and buf[i + 1] == 10:
                return i
            return -1
        i += 1
    return -1


def status_digits(buf: bytes) -> int:
    """The status code of the plain status line at the start of `buf` (`status_line_end`
    checked its three digits)."""
    d0: i64 = buf[9] - 48
    d1: i64 = buf[10] - 48
    d2: i64 = buf[11] - 48
    return d0 * 100 + d1 * 10 + d2


def plain_final(status: int) -> bool:
    """A final status whose response has a body framed by its Content-Length.

    Why: 1xx are interim (RFC 9110 §15.2), 204 and 304 have no body whatever
    their fields say (RFC 9112 §6.3); those and codes past 599 go to llhttp.
    """
    return 200 <= status <= 599 and status != 204 and status != 304


def length_value(buf: bytes, start: i64, end: i64) -> i64:
    """The Content-Length `buf[start:end]` (OWS before it skipped) when it is only digits, else -1.

    Why so strict: a list, a sign, trailing OWS or a long number all go to
    llhttp, which refuses or reads them (RFC 9110 §8.6); digits only mean the
    same to both.
    """
    if end - start > MAX_LENGTH_DIGITS or start >= end:
        return -1
    value: i64 = 0
    while start < end:
        d: i64 = buf[start] - 48
        if d < 0 or d > 9:
            return -1
        value = value * 10 + d
        start += 1
    return value


def skip_ows(buf: bytes, start: i64, end: i64) -> i64:
    """Past the OWS (SP and HTAB) before a field value (RFC 9110 §5.5)."""
    while start < end and (buf[start] == 32 or buf[start] == 9):
        start += 1
    return start
