"""The upstream response fast path (engine/fast_reply.py, fast_upstream.Upstream._whole_reply).

The fast path walks a whole response read without llhttp; it may only decline
or agree with llhttp. Checked two ways, on tables and on hypothesis-mutated
responses: against httptools' own parse (status, fields, body, keep-alive; and
nothing llhttp refuses is taken), and against the llhttp path of the relay
itself (the same bytes for the client, the same state after the response).
The bytes through a real gateway are checked in tests/test_engine_fast_relay.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.engine.api import Forward
from gateway.engine.fast_client import ClientConn, ClientContext
from gateway.engine.fast_pool import Pool
from gateway.engine.fast_reply import (
    field_line_end,
    length_value,
    plain_final,
    skip_ows,
    status_digits,
    status_line_end,
)
from gateway.engine.fast_upstream import U_BUSY, U_DONE, Upstream
from gateway.engine.fast_wire import Exchange
from gateway.headers import HOP_BY_HOP

OURS = b"X-Release-Stage: stable\r\n"
# The benchmark upstream's response (benchmarks/upstream.py: nginx's fields), 1 KiB body.
BENCH = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 20:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Mon, 30 Nov 2026 20:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6564e0a1-400"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 1024
)


# -- the grammar's pieces ----------------------------------------------------

FIELD_LINES: list[tuple[bytes, int]] = [
    (b"Server: nginx\r\n", 13),
    (b"X-A:\r\n", 4),
    (b"x-a:1\r\n", 5),
    (b"X-T:\ta b\t\r\n", 9),
    (b"!#$%&'*+-.^_`|~09azAZ: v\r\n", 24),
    (b'X-A: ~!"(),/:;<=>?@[\\]{}\r\n', 24),
    (b"X-A : 1\r\n", -1),
    (b" X-A: 1\r\n", -1),
    (b"\tX-A: 1\r\n", -1),
    (b": 1\r\n", -1),
    (b"X(A): 1\r\n", -1),
    (b"X-A: 1\n", -1),
    (b"X-A: 1\rX-B: 2\r\n", -1),
    (b"X-A: 1\nX-B: 2\r\n", -1),
    (b"X-A: a\x00b\r\n", -1),
    (b"X-A: a\x7fb\r\n", -1),
    (b"X-A: caf\xc3\xa9\r\n", -1),
    (b"X-A\x80: 1\r\n", -1),
    (b"X-A: 1\r", -1),
    (b"X-A: 1", -1),
    (b"X-A", -1),
]
FIELD_LINE_IDS = [
    "plain",
    "empty-value",
    "no-ows",
    "tabs-in-value",
    "every-tchar",
    "every-delimiter-in-value",
    "space-before-colon",
    "obs-fold-sp",
    "obs-fold-htab",
    "empty-name",
    "delimiter-in-name",
    "lf-only",
    "bare-cr",
    "bare-lf",
    "nul",
    "del",
    "obs-text",
    "obs-text-in-name",
    "cut-after-cr",
    "cut-in-value",
    "cut-in-name",
]


@pytest.mark.parametrize(("line", "want"), FIELD_LINES, ids=FIELD_LINE_IDS)
def test_a_field_line_is_taken_only_in_its_plain_form(line: bytes, want: int) -> None:
    assert field_line_end(line, 0) == want
    # the same line after a status line: offsets are absolute
    assert field_line_end(b"HTTP/1.1 200 OK\r\n" + line, 17) == (want + 17 if want >= 0 else -1)


STATUS_LINES: list[tuple[bytes, int]] = [
    (b"HTTP/1.1 200 OK\r\n", 15),
    (b"HTTP/1.1 200 \r\n", 13),
    (b"HTTP/1.1 404 Not Found\r\n", 22),
    (b"HTTP/1.1 200 A ~!@ reason\r\n", 25),
    (b"HTTP/1.1 200\r\n", -1),
    (b"HTTP/1.0 200 OK\r\n", -1),
    (b"HTTP/2.0 200 OK\r\n", -1),
    (b"http/1.1 200 OK\r\n", -1),
    (b"HTTP/1.1  200 OK\r\n", -1),
    (b"HTTP/1.1 2x0 OK\r\n", -1),
    (b"HTTP/1.1 2000 OK\r\n", -1),
    (b"HTTP/1.1 200 O\tK\r\n", -1),
    (b"HTTP/1.1 200 \xc3\xa9\r\n", -1),
    (b"HTTP/1.1 200 OK\n", -1),
    (b"HTTP/1.1 200 OK\rX", -1),
    (b"HTTP/1.1 200 OK", -1),
    (b"\r\nHTTP/1.1 200 OK\r\n", -1),
]
STATUS_LINE_IDS = [
    "plain",
    "empty-reason",
    "long-reason",
    "punctuation",
    "no-reason-no-space",
    "http10",
    "http20",
    "lower-case",
    "two-spaces",
    "non-digit",
    "four-digits",
    "htab-in-reason",
    "obs-text",
    "lf-only",
    "bare-cr",
    "cut",
    "leading-crlf",
]


@pytest.mark.parametrize(("line", "want"), STATUS_LINES, ids=STATUS_LINE_IDS)
def test_a_status_line_is_taken_only_in_its_plain_form(line: bytes, want: int) -> None:
    assert status_line_end(line) == want
    if want >= 0:
        assert status_digits(line) == int(line[9:12])


@pytest.mark.parametrize(
    ("status", "want"),
    [(200, True), (201, True), (404, True), (599, True), (100, False), (101, False)]
    + [(199, False), (204, False), (304, False), (600, False), (-1, False)],
    ids=["200", "201", "404", "599", "100", "101", "199", "204", "304", "600", "none"],
)
def test_only_final_statuses_with_a_body_are_plain(status: int, want: bool) -> None:
    assert plain_final(status) is want


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (b"0", 0),
        (b"1024", 1024),
        (b"007", 7),
        (b"999999999", 999999999),
        (b"1234567890", -1),
        (b"", -1),
        (b"+5", -1),
        (b"-5", -1),
        (b"5 ", -1),
        (b"1, 1", -1),
        (b"0x10", -1),
        (b"1.0", -1),
    ],
    ids=["zero", "plain", "leading-zeros", "nine-digits", "ten-digits", "empty", "plus"]
    + ["minus", "trailing-ows", "list", "hex", "decimal"],
)
def test_a_length_is_digits_only(value: bytes, want: int) -> None:
    line = b"Content-Length: " + value + b"\r\n"
    start = skip_ows(line, 15, len(line) - 2)
    assert length_value(line, start, len(line) - 2) == want


# -- the differential check --------------------------------------------------


class Parsed:
    """What httptools reports for a response read."""

    def __init__(self) -> None:
        self.status = 0
        self.fields: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.messages = 0
        self.keep: list[bool] = []
        self.parser = HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.messages += 1
        self.keep.append(self.parser.should_keep_alive())


def llhttp_parse(data: bytes) -> Parsed | None:
    """httptools' parse of `data`, or None when it refuses it."""
    p = Parsed()
    try:
        p.parser.feed_data(data)
    except (HttpParserError, HttpParserUpgrade):
        return None
    return p


class Relay:
    """Real upstream connections and exchanges, no sockets: the fast path and the llhttp
    path of `Upstream` each fed the same first read of a response."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = Pool(loop, 8, 30.0)
        self.ctx = ClientContext(
            loop,
            self.pool,
            None,  # type: ignore[arg-type]  # no request is read: no handler is asked
            scheme="http",
            max_header_bytes=65536,
            max_target_bytes=8192,
            keepalive_timeout=30.0,
            header_timeout=30.0,
            body_timeout=30.0,
            body_min_bytes=0.0,
        )

    def busy(self, *, http11: bool = True) -> tuple[Upstream, Exchange]:
        """A fresh upstream connection with an exchange attached (as `attach` leaves it)."""
        up = Upstream(self.pool, ("127.0.0.1", 9))
        ex = Exchange(ClientConn(self.ctx), None, http11=http11)
        ex.fwd = Forward("127.0.0.1", 9, [], None, "svc", "stable", 1.0, 1.0, _no_done)
        ex.fwd.response_fields = OURS
        ex.req_done = True
        ex.up = up
        up.ex = ex
        up.state = U_BUSY
        return up, ex

    def fast(self, data: bytes, http11: bool = True) -> tuple[Upstream, Exchange, bytes] | None:
        """The fast path's connection, exchange and bytes for the client; None: declined."""
        up, ex = self.busy(http11=http11)
        relayed = up._whole_reply(ex, data)
        if relayed is None:
            assert up.out == [] and not up.has_length and up.state == U_BUSY
            assert ex.state == 0 and ex.status == 0 and up.head_pos == 0
            return None
        assert up.out == []  # (written at once, not through the llhttp path's list)
        return up, ex, relayed

    def llhttp(self, data: bytes, http11: bool = True) -> tuple[Upstream, Exchange] | None:
        """The llhttp path's callbacks for the read (`Upstream._feed` without its failure
        handling, which needs a client transport)."""
        up, ex = self.busy(http11=http11)
        up.head_buf = data
        try:
            up.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade):
            return None
        return up, ex


def _no_done(status: int, kind: str | None) -> None:
    pass


@pytest.fixture(scope="module")
def relay() -> Iterator[Relay]:
    loop = asyncio.new_event_loop()
    try:
        yield Relay(loop)
    finally:
        loop.close()


def check_agrees(relay: Relay, data: bytes, http11: bool = True) -> bool:
    """Whether the fast path took `data`; when it did, that it agrees with llhttp in full
    (for a client of `http11`)."""
    taken = relay.fast(data, http11)
    if taken is None:
        return False
    up, ex, relayed = taken
    parsed = llhttp_parse(data)
    assert parsed is not None, "the fast path took a response llhttp refuses"
    assert parsed.messages == 1 and not parsed.parser.should_upgrade()
    assert ex.status == parsed.status
    assert up.keep == parsed.keep[0]
    head, _, body = relayed.partition(b"\r\n\r\n")
    assert body == parsed.body
    # The relayed fields: llhttp's less the hop-by-hop ones, then ours, in order.
    lines = head.split(b"\r\n")[1:]
    got = [tuple(x.strip(b" \t") for x in line.split(b":", 1)) for line in lines]
    want = [(n, v.strip(b" \t")) for n, v in parsed.fields if n.lower() not in HOP_BY_HOP]
    want.append(tuple(OURS.rstrip(b"\r\n").split(b": ")))  # type: ignore[arg-type]
    if not http11:
        want.append((b"Connection", b"keep-alive"))
    assert got == want
    # And the llhttp path of the relay gives the same bytes and the same state.
    other = relay.llhttp(data, http11)
    assert other is not None
    up2, ex2 = other
    assert b"".join(up2.out) == relayed
    assert (up.state, up.keep, up.mode, up.has_length, up.extra) == (
        up2.state,
        up2.keep,
        up2.mode,
        up2.has_length,
        up2.extra,
    )
    assert (ex.state, ex.status, ex.close_after) == (ex2.state, ex2.status, ex2.close_after)
    assert up.state == U_DONE
    return True


def response(status: bytes, fields: list[bytes], body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    cl = [b"Content-Length: %d\r\n" % n] if n >= 0 else []
    return status + b"".join(fields + cl) + b"\r\n" + body


OK = b"HTTP/1.1 200 OK\r\n"
# (response read, taken by the fast path)
RESPONSES: list[tuple[bytes, bool]] = [
    (BENCH, True),
    (response(OK, [], b""), True),
    (response(b"HTTP/1.1 404 Not Found\r\n", [b"X-A: 1\r\n"], b"nope"), True),
    (response(OK, [b"Connection: close\r\n"], b"ok"), True),
    (response(OK, [b"CONNECTION:Keep-Alive\r\n"], b"ok"), True),
    (response(OK, [b"Keep-Alive: timeout=5\r\n", b"TE: x\r\n", b"Trailer: y\r\n"], b"ok"), True),
    (response(OK, [b"Connection: close\r\n", b"X-A: 1\r\n"], b"ok"), True),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok", True),
    (response(OK, [b"Keep-Alive: timeout=5\r\n", b"X-A: 1\r\n", b"TE: x\r\n"], b"ok"), False),
    (response(OK, [b"X-A:   spaced \t\r\n"], b"ok"), True),
    (b"HTTP/1.1 200 OK\r\nContent-Length:\t 2\r\n\r\nok", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 007\r\n\r\n1234567", True),
    (response(OK, [b"Connection: x-hop\r\n", b"X-Hop: 1\r\n"], b"ok"), False),
    (response(OK, [b"Connection: close, keep-alive\r\n"], b"ok"), False),
    (response(OK, [b"Connection: close \r\n"], b"ok"), False),
    (response(OK, [b"Proxy-Connection: close\r\n"], b"ok"), False),
    (response(OK, [b"Upgrade: h2c\r\n"], b"ok"), False),
    (response(OK, [b"Transfer-Encoding: chunked\r\n"], b"2\r\nok\r\n0\r\n\r\n", -1), False),
    (response(OK, [b"Transfer-Encoding: chunked\r\n"], b"2\r\nok\r\n0\r\n\r\n"), False),
    (response(OK, [b"Content-Length: 2\r\n"], b"ok"), False),
    (response(OK, [b"Content-Length: 3\r\n"], b"ok"), False),
    (response(OK, [], b"ok", 3), False),
    (response(OK, [], b"ok", 1), False),
    (response(OK, [], b"ok", -1), False),
    (response(OK, [], b"ok") + response(OK, [], b"ok"), False),
    (b"HTTP/1.1 100 Continue\r\n\r\n" + response(OK, [], b"ok"), False),
    (response(b"HTTP/1.1 204 No Content\r\n", [], b""), False),
    (response(b"HTTP/1.1 304 Not Modified\r\n", [], b""), False),
    (response(b"HTTP/1.1 204 No Content\r\n", [], b"ok"), False),
    (response(b"HTTP/1.0 200 OK\r\n", [], b"ok"), False),
    (response(b"HTTP/1.1 200\r\n", [], b"ok"), False),
    (b"\r\n" + response(OK, [], b"ok"), False),
    (response(OK, [b"X-A: 1\r\n", b" folded\r\n"], b"ok"), False),
    (response(OK, [b"X-A: a\x00b\r\n"], b"ok"), False),
    (response(OK, [b"X-A: 1\n"], b"ok"), False),
    (response(OK, [b"X-A : 1\r\n"], b"ok"), False),
    (response(OK, [b"X-A: caf\xc3\xa9\r\n"], b"ok"), False),
    (BENCH[:100], False),
    (BENCH[:-1], False),
]
RESPONSE_IDS = [
    "benchmark",
    "empty-body",
    "404",
    "connection-close",
    "keep-alive-odd-case",
    "other-hop-by-hop",
    "hop-by-hop-first",
    "hop-by-hop-last",
    "two-runs-of-hop-by-hop",
    "ows-around-value",
    "htab-before-length",
    "leading-zeros",
    "connection-names-a-field",
    "connection-list",
    "connection-trailing-ows",
    "proxy-connection",
    "upgrade",
    "chunked",
    "cl-and-te",
    "two-lengths",
    "two-different-lengths",
    "short-body",
    "long-body",
    "no-length",
    "two-responses",
    "interim-first",
    "204",
    "304",
    "204-with-a-body",
    "http10",
    "no-reason",
    "leading-crlf",
    "obs-fold",
    "nul",
    "bare-lf",
    "space-before-colon",
    "obs-text",
    "cut-head",
    "cut-body",
]


@pytest.mark.parametrize(("data", "taken"), RESPONSES, ids=RESPONSE_IDS)
def test_the_fast_path_takes_plain_responses_and_agrees_with_llhttp(
    relay: Relay, data: bytes, taken: bool
) -> None:
    assert check_agrees(relay, data) is taken


def test_an_http10_client_and_a_head_request_are_left_to_llhttp(relay: Relay) -> None:
    up, ex = relay.busy()
    ex.is_head = True
    assert not up._whole_reply(ex, BENCH)
    up, ex = relay.busy(http11=False)
    relayed = up._whole_reply(ex, BENCH)  # an HTTP/1.0 client: the same head, keep-alive added
    assert relayed is not None
    assert relayed.endswith(OURS + b"Connection: keep-alive\r\n\r\n" + b"x" * 1024)


# Mutations of plain responses: each piece is mostly a plain one, sometimes one
# that llhttp reads differently, refuses or frames otherwise, so that a good part
# of the responses are taken and the rest probe the edges.
def mostly(plain: list[bytes], odd: list[bytes]) -> st.SearchStrategy[bytes]:
    """One of `plain`, or one of `odd` about one draw in five."""
    return st.sampled_from(plain * (4 * len(odd) // len(plain) + 1) + odd)


PLAIN_FIELDS = [
    b"Server: nginx\r\n",
    b'ETag: "e-1"\r\n',
    b"x-b:1\r\n",
    b"X-Empty:\r\n",
    b"X-Tab:\ta b\t\r\n",
    b"Connection: keep-alive\r\n",
    b"connection:Close\r\n",
    b"Keep-Alive: timeout=5\r\n",
]
NAMES = mostly(
    [b"X-A", b"Server", b"Connection", b"Keep-Alive"],
    [b"Content-Length", b"content-length", b"Transfer-Encoding", b"Proxy-Connection"]
    + [b"Upgrade", b"TE", b"X A", b"X(A)", b"", b"X-\xe9"],
)
VALUES = mostly(
    [b"1", b"a b", b"keep-alive", b"close", b""],
    [b"2", b"0", b"02", b"+2", b"2, 2", b"2 ", b"chunked", b"gzip, chunked", b"close, x"]
    + [b"upgrade", b"h2c", b"x-a", b"\t", b"a\x00b", b"a\x7fb", b"caf\xc3\xa9", b"a\rb"]
    + [b"a\nb", b"\x01", b"\x1f", b"\xff"],
)
SEPARATORS = mostly([b": ", b":"], [b":\t", b" : ", b" :", b":  "])
ENDS = mostly([b"\r\n"], [b"\n", b"\r", b" \r\n", b"\r\n ", b"\r\n\t"])
STATUSES = mostly(
    [b"HTTP/1.1 200 OK", b"HTTP/1.1 201 ", b"HTTP/1.1 404 Not Found"],
    [b"HTTP/1.1 100 Continue", b"HTTP/1.1 101 Switching", b"HTTP/1.1 204 No Content"]
    + [b"HTTP/1.1 304 Not Modified", b"HTTP/1.0 200 OK", b"HTTP/1.1 200", b"HTTP/1.1 099 X"]
    + [b"HTTP/1.1 999 X", b"HTTP/1.1 200 \x80", b"HTTP/1.1 200 O\tK", b"HTTP/1.1  200 OK"],
)
MUTATED_FIELD = st.tuples(NAMES, SEPARATORS, VALUES, ENDS).map(b"".join)


def one_in(draw: st.DrawFn, n: int) -> bool:
    return draw(st.integers(1, n)) == 1


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    status = draw(STATUSES) + draw(ENDS)
    fields = [
        draw(MUTATED_FIELD if one_in(draw, 4) else st.sampled_from(PLAIN_FIELDS))
        for _ in range(draw(st.integers(0, 4)))
    ]
    body = draw(st.binary(max_size=8))
    length = draw(st.integers(-1, 10)) if one_in(draw, 4) else None
    data = response(status, fields, body, length)
    if one_in(draw, 5):
        data = data + draw(st.sampled_from([b"\r\n", data, b"HTTP/1.1 200 OK\r\n"]))
    return data


@given(data=responses())
@example(data=BENCH)
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_responses_are_declined_or_read_as_llhttp_reads_them(
    relay: Relay, data: bytes
) -> None:
    check_agrees(relay, data)
    check_agrees(relay, data, http11=False)


@given(data=st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_after_a_plain_status_line_never_crash_and_never_disagree(
    relay: Relay, data: bytes
) -> None:
    check_agrees(relay, OK + data)
    check_agrees(relay, OK + b"Content-Length: 2\r\n" + data)
