"""Hop-by-hop removal and forwarding headers (RFC 9110 §7.6)."""

from __future__ import annotations

import sys

import pytest

from gateway.headers import (
    Field,
    Headers,
    ReleaseLines,
    Scanned,
    forwarded_lines,
    has_control_chars,
    parse_field_lines,
    scan,
    strip_response_hop_by_hop,
    upstream_fields,
)
from tests.engine_helpers import HOP


def upstream_headers(
    s: Scanned, *, client_ip: str, proto: str, stage: Field, request_id: bytes
) -> Headers:
    """What `upstream_fields` sends for `s.kept` (a stand-in traceparent), as (name, value)."""
    lines = ReleaseLines(stage, Field(b"baggage", b""))
    block = upstream_fields(
        s, None, client_ip=client_ip.encode(), proto=proto, lines=lines, request_id=request_id,
        trace=(b"t", b"s", b"01"), trace_tail=b"\r\n",
    )  # fmt: skip
    return parse_field_lines(block)


def _names(h: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [k.lower() for k, _ in h]


def test_hop_by_hop_and_connection_named_fields_removed() -> None:
    s = scan(
        [
            (b"Host", b"a.example"),
            (b"Connection", b"keep-alive, X-Secret"),
            (b"X-Secret", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"Proxy-Authorization", b"Basic x"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Upgrade", b"h2c"),
            (b"Content-Length", b"3"),
            (b"Accept", b"*/*"),
        ],
        b"x-release-stage",
        b"x-user-id",
    )
    out = upstream_headers(
        s,
        client_ip="10.0.0.9",
        proto="http",
        stage=Field(b"X-Release-Stage", b"gray"),
        request_id=b"rid",
    )
    names = _names(out)
    for hop in (*sorted(HOP), b"x-secret"):  # RFC 9110 §7.6.1 + the one Connection names
        assert hop not in names
    d = dict(out)
    assert d[b"Host"] == b"a.example" and d[b"Accept"] == b"*/*"
    assert d[b"X-Forwarded-For"] == b"10.0.0.9"
    assert d[b"X-Forwarded-Proto"] == b"http" and d[b"X-Forwarded-Host"] == b"a.example"
    assert d[b"Via"] == b"1.1 gray-gateway"
    assert d[b"X-Release-Stage"] == b"gray" and d[b"X-Request-ID"] == b"rid"


def test_existing_forwarded_for_and_via_are_appended_and_stage_replaced() -> None:
    s = scan(
        [
            (b"X-Forwarded-For", b"1.1.1.1"),
            (b"Via", b"1.0 edge"),
            (b"X-Release-Stage", b"gray"),
            (b"X-Request-ID", b"keep-me"),
            (b"X-User-ID", b"u1"),
        ],
        b"x-release-stage",
        b"x-user-id",
    )
    assert s.stage == "gray" and s.user == "u1" and s.request_id == "keep-me"
    out = dict(
        upstream_headers(
            s,
            client_ip="2.2.2.2",
            proto="http",
            stage=Field(b"X-Release-Stage", b"stable"),
            request_id=b"keep-me",
        )
    )
    assert out[b"X-Forwarded-For"] == b"1.1.1.1, 2.2.2.2"
    assert out[b"Via"] == b"1.0 edge, 1.1 gray-gateway"
    assert out[b"X-Release-Stage"] == b"stable"


def test_response_hop_by_hop_stripped() -> None:
    out = strip_response_hop_by_hop(
        [
            (b"Connection", b"close, X-Int"),
            (b"X-Int", b"1"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Type", b"text/plain"),
        ],
        upgrading=False,
    )
    assert out == [(b"Content-Type", b"text/plain")]


@pytest.mark.parametrize(
    ("value", "bad"),
    [
        (b"ok value", False),
        (b"tab\tok", False),
        (b"nul\x00", True),
        (b"cr\rlf", True),
        (b"del\x7f", True),
    ],
    ids=["plain", "htab", "nul", "cr", "del"],
)
def test_control_chars(value: bytes, bad: bool) -> None:
    assert has_control_chars(value) is bad


_LINES = ReleaseLines(Field(b"X-Release-Stage", b"gray"), Field(b"baggage", b"release.stage=gray"))
_TAIL = b"X-Release-Stage: gray\r\nX-Request-ID: rid\r\ntraceparent: 00-t-s-02\r\n"


@pytest.mark.parametrize(
    ("fields", "raw", "proto", "trace_tail", "block"),
    [
        (
            [(b"Host", b"a.example"), (b"Accept", b"*/*")],
            b"Host: a.example\r\nAccept: */*\r\n",
            "http",
            b"\r\n",
            b"Host: a.example\r\nAccept: */*\r\nX-Forwarded-For: 10.0.0.9\r\n"
            b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: a.example\r\n"
            b"Via: 1.1 gray-gateway\r\n" + _TAIL,
        ),
        (
            [(b"Host", b"a.example"), (b"Accept", b"*/*")],
            None,
            "https",
            b"\r\ntracestate: k=v\r\nbaggage: release.stage=gray\r\n",
            b"Host: a.example\r\nAccept: */*\r\nX-Forwarded-For: 10.0.0.9\r\n"
            b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: a.example\r\n"
            b"Via: 1.1 gray-gateway\r\n" + _TAIL[:-2] + b"\r\ntracestate: k=v\r\n"
            b"baggage: release.stage=gray\r\n",
        ),
        (
            [(b"Accept", b"*/*")],
            b"Accept: */*\r\n",
            "http",
            b"\r\n",
            b"Accept: */*\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\n"
            b"Host: \r\nVia: 1.1 gray-gateway\r\n" + _TAIL,  # RFC 9112 §3.2: empty Host
        ),
        (
            [(b"Accept", b"*/*")],
            None,
            "https",
            b"\r\n",
            b"Accept: */*\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: https\r\n"
            b"Host: \r\nVia: 1.1 gray-gateway\r\n" + _TAIL,  # RFC 9112 §3.2: empty Host
        ),
        (
            [(b"Host", b"a"), (b"X-Forwarded-For", b"1.1.1.1"), (b"Via", b"1.0 edge")],
            None,
            "http",
            b"\r\n",
            b"Host: a\r\nX-Forwarded-For: 1.1.1.1, 10.0.0.9\r\nX-Forwarded-Proto: http\r\n"
            b"X-Forwarded-Host: a\r\nVia: 1.0 edge, 1.1 gray-gateway\r\n" + _TAIL,
        ),
    ],
    ids=[
        "raw-block-http-host",
        "rendered-https-host-tracestate-baggage",
        "raw-block-http-no-host",
        "rendered-https-no-host",
        "forwarded-for-and-via-appended",
    ],
)
@pytest.mark.parametrize("kept", [False, True], ids=["lines-made", "peer-lines-kept"])
def test_upstream_fields_block(
    fields: Headers, raw: bytes | None, proto: str, trace_tail: bytes, block: bytes, kept: bool
) -> None:
    s = scan(fields, b"x-release-stage", b"x-user-id")
    # The X-Forwarded-* lines a caller keeps for the client (the handler does) change nothing.
    peer_lines = forwarded_lines(b"10.0.0.9", proto) if kept else None
    got = upstream_fields(
        s, raw, client_ip=b"10.0.0.9", proto=proto, lines=_LINES, request_id=b"rid",
        trace=(b"t", b"s", b"02"), trace_tail=trace_tail, peer_lines=peer_lines,
    )  # fmt: skip
    assert got == block


@pytest.mark.parametrize(
    ("fields", "kept"),
    [
        ([(b"Host", b"a"), (b"Accept", b"*/*")], None),
        ([(b"host", b"a"), (b"Accept", b"*/*")], [(b"Host", b"a"), (b"Accept", b"*/*")]),
        ([(b"Accept", b"*/*"), (b"HOST", b"a")], [(b"Accept", b"*/*"), (b"Host", b"a")]),
    ],
    ids=["as-spelt-kept-unchanged", "lower-case-renamed", "upper-case-after-another"],
)
def test_scan_takes_host_in_any_case_and_sends_it_as_host(
    fields: Headers, kept: Headers | None
) -> None:
    s = scan(fields, b"x-release-stage", b"x-user-id")
    assert s.host_b == b"a"
    if kept is None:
        assert s.kept is fields  # nothing renamed: the request's own list goes on
    else:
        assert s.kept == kept


_HEADS = {
    "every-field": [
        (b"Host", b"a"),
        (b"Cookie", b"u=1"),
        (b"X-Release-Stage", b" gray "),
        (b"X-User-ID", b"u7"),
        (b"X-Tag", b"t"),
        (b"X-Request-ID", b"r-1"),
        (b"X-Forwarded-For", b"1.1.1.1"),
        (b"Via", b"1.0 lb"),
        (b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),
        (b"tracestate", b"k=v"),
        (b"baggage", b"a=b"),
        (b"Connection", b"x-hop"),
        (b"X-Hop", b"1"),
    ],
    "refused-request-id": [(b"host", b"b"), (b"X-Request-ID", b"two words")],
    "plain": [(b"Host", b"c"), (b"Accept", b"*/*")],
    "none": [],
}


# Scanned's fields: a compiled class lists them in __mypyc_attrs__ (it has no __slots__).
_SCANNED: tuple[str, ...] = getattr(Scanned, "__mypyc_attrs__", None) or Scanned.__slots__


def _found(s: Scanned) -> dict[str, object]:
    return {name: getattr(s, name) for name in _SCANNED}


@pytest.mark.parametrize("before", list(_HEADS), ids=list(_HEADS))
@pytest.mark.parametrize("head", list(_HEADS), ids=list(_HEADS))
def test_scan_into_a_used_scanned_finds_what_a_new_one_does(before: str, head: str) -> None:
    """The handler fills one Scanned per request: nothing of the request before stays."""
    used = scan(_HEADS[before], b"x-release-stage", b"x-user-id", b"x-tag")
    again = scan(_HEADS[head], b"x-release-stage", b"x-user-id", b"x-tag", into=used)
    assert again is used
    assert _found(again) == _found(scan(_HEADS[head], b"x-release-stage", b"x-user-id", b"x-tag"))


def test_scan_into_a_used_scanned_lets_the_request_before_go() -> None:
    """Compiled, too (tests/test_compiled_build.py runs this file): nothing of it is kept."""
    before: Headers = [(b"Host", b"a"), (b"X-User-ID", b"u1")]
    refs = sys.getrefcount(before)
    s = scan(before, b"x-release-stage", b"x-user-id")
    held = sys.getrefcount(before)  # counted apart: pytest's assert holds what it shows
    assert held == refs + 1
    scan([(b"Host", b"b")], b"x-release-stage", b"x-user-id", into=s)
    after = sys.getrefcount(before)
    assert after == refs
