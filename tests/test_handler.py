"""ProxyHandler.handle on plain values: what one request's decision carries, request after request.

The handler keeps a little between requests to spare per-request work (the scan's
record, the last client address as bytes, a bulk draw of random ids): nothing of
one request may show in the next. End to end through the engines: tests/test_proxy_e2e.py.
"""

from __future__ import annotations

import random
import re

import pytest

from gateway import config as C
from gateway.engine.api import Forward, RequestHead
from gateway.handler import ProxyHandler
from gateway.headers import Headers, parse_field_lines
from gateway.state import SnapshotHolder, build_snapshot
from tests.conftest import two_releases

TP = b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"


def _handler(rng: random.Random | None = None) -> ProxyHandler:
    doc = C.build(
        {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0", "token_env": None},
            "state": {"store": "memory"},
            "services": two_releases("http://10.0.0.1:80", "http://10.0.0.2:80"),
        },
        env={},
    )
    return ProxyHandler(SnapshotHolder(build_snapshot(doc, rng=random.Random(1))), rng=rng)


def _sent(h: ProxyHandler, fields: Headers, client_ip: str = "127.0.0.1") -> dict[bytes, bytes]:
    f = h.handle(RequestHead(b"GET", b"/", [(b"Host", b"x"), *fields], client_ip))
    assert isinstance(f, Forward)
    f.on_done(200, None)
    return {n.lower(): v for n, v in parse_field_lines(f.fields or b"")}


def test_x_forwarded_for_is_each_requests_own_client() -> None:
    h = _handler()
    # Interned (as the engine passes them), a copy equal to one, an IPv6 address.
    ips = ["10.0.0.7", "10.0.0.8", "10.0.0.8", "".join(["10.0.0.", "7"]), "::1", "10.0.0.7"]
    assert [_sent(h, [], ip)[b"x-forwarded-for"] for ip in ips] == [i.encode() for i in ips]


def test_nothing_of_a_request_shows_in_the_next() -> None:
    h = _handler()
    first = _sent(
        h,
        [
            (b"X-User-ID", b"u1"),
            (b"X-Request-ID", b"rid-1"),
            (b"traceparent", TP),
            (b"tracestate", b"k=v"),
            (b"baggage", b"a=b"),
            (b"X-Forwarded-For", b"1.1.1.1"),
            (b"Via", b"1.0 lb"),
        ],
    )
    assert first[b"x-request-id"] == b"rid-1" and first[b"traceparent"].startswith(TP[:36])
    assert first[b"tracestate"] == b"k=v" and first[b"baggage"].startswith(b"a=b")
    second = _sent(h, [])
    assert second[b"x-forwarded-for"] == b"127.0.0.1"
    assert second[b"via"] == b"1.1 gray-gateway"
    assert b"tracestate" not in second and b"x-user-id" not in second
    assert not second[b"baggage"].startswith(b"a=b")  # only the release's own members
    tid = second[b"traceparent"][3:35]
    assert tid != TP[3:35] and second[b"x-request-id"] == tid  # a new trace, its id as the rid


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded-rng", "openssl"])
def test_trace_ids_follow_a_given_rng_and_are_random_without(seeded: bool) -> None:
    def trace_ids(h: ProxyHandler) -> list[bytes]:
        return [_sent(h, [])[b"traceparent"] for _ in range(5)]

    a = trace_ids(_handler(random.Random(4) if seeded else None))
    b = trace_ids(_handler(random.Random(4) if seeded else None))
    assert all(re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-02", t) for t in a + b)
    assert (a == b) is seeded and len(set(a)) == 5
