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
from gateway.handler import WALK_MAX, Observer, ProxyHandler, path_end, plain_path_end
from gateway.headers import Headers, parse_field_lines
from gateway.state import SnapshotHolder, build_snapshot
from gateway.tally import Tally
from tests.conftest import two_releases

TP = b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"


def _handler(
    rng: random.Random | None = None, observers: list[Observer] | None = None
) -> ProxyHandler:
    doc = C.build(
        {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0", "token_env": None},
            "state": {"store": "memory"},
            "services": two_releases("http://10.0.0.1:80", "http://10.0.0.2:80"),
        },
        env={},
    )
    holder = SnapshotHolder(build_snapshot(doc, rng=random.Random(1)))
    return ProxyHandler(holder, rng=rng, observers=observers)


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


# The two forms of the path test: `plain_path_end` walks a short target's bytes, `path_end`
# tests a longer one's str. Each row is (target, the path's end, or -1: not plain).
_PATH_ENDS = {
    "root": (b"/", 1),
    "short": (b"/1k", 3),
    "query": (b"/a/b?x=1", 4),
    "empty-query": (b"/a?", 2),
    "query-only": (b"/?", 1),
    "slashes-in-query": (b"/a?b=//c/./d%41", 2),
    "dots-in-names": (b"/a.b/c.d.", 9),
    "dot-file": (b"/a/.well-known", -1),
    "dot-segment": (b"/a/./b", -1),
    "dot-dot": (b"/a/../b", -1),
    "trailing-dot-segment": (b"/a/.", -1),
    "double-slash": (b"/a//b", -1),
    "leading-double-slash": (b"//a", -1),
    "percent": (b"/%41", -1),
    "empty": (b"", -1),
    "asterisk": (b"*", -1),
    "absolute-form": (b"http://h/a", -1),
    "query-first": (b"?a", -1),
    "long": (b"/" + b"a" * 40, 41),
    "long-query": (b"/" + b"a" * 40 + b"?q=/./", 41),
    "long-double-slash": (b"/" + b"a" * 40 + b"//", -1),
    "long-dot-segment": (b"/" + b"a" * 40 + b"/./", -1),
    "latin-1": (b"/caf\xe9", 5),
}


@pytest.mark.parametrize(("target", "end"), list(_PATH_ENDS.values()), ids=list(_PATH_ENDS))
def test_both_path_tests_find_the_same_end(target: bytes, end: int) -> None:
    assert plain_path_end(target) == end
    assert path_end(target.decode("latin-1")) == end


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (b"/a?x=1", None),
        (b"/a/../b", b"/b"),
        (b"/" + b"a" * 40 + b"?q=//", None),
        (b"/" + b"a" * 40 + b"/./b", b"/" + b"a" * 40 + b"/b"),
    ],
    ids=["short-plain", "short-normalized", "long-plain", "long-normalized"],
)
def test_a_target_goes_on_as_received_unless_normalized(
    target: bytes, forwarded: bytes | None
) -> None:
    assert len(target) <= WALK_MAX or target.startswith(b"/" + b"a" * 40)
    f = _handler().handle(RequestHead(b"GET", target, [(b"Host", b"x")], "127.0.0.1"))
    assert isinstance(f, Forward) and f.target == forwarded


class _Seen:
    """An observer that keeps what each flush hands on: (service, release, requests, codes)."""

    def __init__(self) -> None:
        self.tallies: list[tuple[str, str, int, dict[int, int]]] = []

    def record_tally(self, t: Tally) -> None:
        self.tallies.append((t.service, t.release, t.n, t.codes))


@pytest.mark.parametrize("entry", ["done", "on_done"], ids=["engine-method", "callable"])
def test_a_requests_end_is_accounted_once_by_either_entry(entry: str) -> None:
    seen = _Seen()
    h = _handler(observers=[seen])
    fwds = [h.handle(RequestHead(b"GET", b"/", [(b"Host", b"x")], "127.0.0.1")) for _ in range(3)]
    for f in fwds:
        assert isinstance(f, Forward) and f.retry is None  # one endpoint a release: no failover
        assert f.response_fields is not None and b"X-Request-ID: " in f.response_fields
        if entry == "done":
            f.done(200, None)
        else:
            f.on_done(200, None)
    assert sum(n for _, _, n, _ in seen.tallies) == 3
    assert all(codes == {200: n} for _, _, n, codes in seen.tallies)


def test_forwarded_lines_follow_each_requests_client_and_scheme() -> None:
    h = _handler()
    seen = []
    for ip, scheme, xff in [
        ("10.0.0.7", "http", None),
        ("10.0.0.7", "https", None),
        ("10.0.0.7", "https", b"1.1.1.1"),
        ("10.0.0.8", "https", None),
        ("10.0.0.8", "http", None),
    ]:
        extra = [] if xff is None else [(b"X-Forwarded-For", xff)]
        head = RequestHead(b"GET", b"/", [(b"Host", b"x"), *extra], ip, scheme=scheme)
        f = h.handle(head)
        assert isinstance(f, Forward)
        f.done(200, None)
        sent = {n.lower(): v for n, v in parse_field_lines(f.fields or b"")}
        seen.append((sent[b"x-forwarded-for"], sent[b"x-forwarded-proto"]))
    assert seen == [
        (b"10.0.0.7", b"http"),
        (b"10.0.0.7", b"https"),
        (b"1.1.1.1, 10.0.0.7", b"https"),
        (b"10.0.0.8", b"https"),
        (b"10.0.0.8", b"http"),
    ]
