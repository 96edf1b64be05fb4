"""Path normalization before service matching (gateway/paths.py), pure and end to end."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.paths import (
    ERR_ABOVE_ROOT,
    ERR_AUTHORITY,
    ERR_PERCENT,
    ERR_TARGET,
    BadTarget,
    needs_normalizing,
    normalize_path,
    origin_target,
)
from tests.conftest import Upstream, gateway_config
from tests.engine_helpers import RawClient

GatewayFactory = Callable[..., Awaitable[Gateway]]
UpstreamFactory = Callable[..., Awaitable[Upstream]]

NORMALIZE = [
    (b"/", b"/"),
    (b"/a/b", b"/a/b"),
    (b"/a/../b/secret", b"/b/secret"),
    (b"/a/./b", b"/a/b"),
    (b"/a//b", b"/a/b"),
    (b"//a///b//", b"/a/b/"),
    (b"/a/b/..", b"/a/"),
    (b"/a/b/.", b"/a/b/"),
    (b"/a/..", b"/"),
    (b"/a/b/../../c", b"/c"),
    (b"/a/%2e%2e/b", b"/b"),
    (b"/a/%2E%2e/b", b"/b"),
    (b"/a/.%2E/b", b"/b"),
    (b"/a/%2e/b", b"/a/b"),
    (b"/%61/x", b"/a/x"),
    (b"/a%7Eb/%41", b"/a~b/A"),
    (b"/a/..%2fb", b"/a/..%2fb"),
    (b"/a%2Fb/c", b"/a%2Fb/c"),
    (b"/a/%2F../b", b"/a/%2F../b"),
    (b"/caf%C3%A9", b"/caf%C3%A9"),
    (b"/a/...", b"/a/..."),
    (b"/a/.b/..c", b"/a/.b/..c"),
    (b"/%20", b"/%20"),
]


@pytest.mark.parametrize(("raw", "want"), NORMALIZE, ids=[r.decode() for r, _ in NORMALIZE])
def test_normalize_path(raw: bytes, want: bytes) -> None:
    assert normalize_path(raw) == want
    assert normalize_path(want) == want  # idempotent


REFUSED = [
    (b"/..", ERR_ABOVE_ROOT),
    (b"/../a", ERR_ABOVE_ROOT),
    (b"/a/../../b", ERR_ABOVE_ROOT),
    (b"/%2e%2e/etc/passwd", ERR_ABOVE_ROOT),
    (b"/a%zz", ERR_PERCENT),
    (b"/a%2", ERR_PERCENT),
    (b"/a%", ERR_PERCENT),
]


@pytest.mark.parametrize(("raw", "err"), REFUSED, ids=[r.decode() for r, _ in REFUSED])
def test_normalize_path_refuses(raw: bytes, err: str) -> None:
    with pytest.raises(BadTarget) as e:
        normalize_path(raw)
    assert e.value.message == err


@pytest.mark.parametrize(
    ("path", "work"),
    [
        (b"/a/b.html", False),
        (b"/v1.2/x", False),
        (b"/a/./b", True),
        (b"/a//b", True),
        (b"/a%20b", True),
        (b"/.well-known/x", True),
    ],
    ids=["dot-in-name", "dot-version", "dot-segment", "double-slash", "percent", "dot-start"],
)
def test_fast_check(path: bytes, work: bool) -> None:
    assert needs_normalizing(path) is work


TARGETS = [
    (b"GET", b"/a/../b?x=/../y", None, b"/b?x=/../y", b"/b"),
    (b"GET", b"/a?q=%2e%2e", None, b"/a?q=%2e%2e", b"/a"),
    (b"GET", b"http://user-api.local/x", b"user-api.local", b"/x", b"/x"),
    (b"GET", b"HTTP://h.local:8080", b"h.local:8080", b"/", b"/"),
    (b"GET", b"http://h.local?q=1", b"h.local", b"/?q=1", b"/"),
    (b"GET", b"https://h.local/a/../b", b"h.local", b"/b", b"/b"),
    (b"OPTIONS", b"*", None, b"*", b"/"),
]


@pytest.mark.parametrize(
    ("method", "target", "authority", "origin", "path"),
    TARGETS,
    ids=[
        "query-untouched",
        "query-percent",
        "absolute",
        "absolute-no-path",
        "absolute-query",
        "absolute-dots",
        "asterisk",
    ],
)
def test_origin_target(
    method: bytes, target: bytes, authority: bytes | None, origin: bytes, path: bytes
) -> None:
    assert origin_target(method, target) == (authority, origin, path)


BAD_TARGETS = [
    (b"GET", b"*", ERR_TARGET),
    (b"GET", b"example.com:80", ERR_TARGET),
    (b"GET", b"ftp://h/x", ERR_TARGET),
    (b"GET", b"http:///x", ERR_AUTHORITY),
    (b"GET", b"http://evil@h.local/x", ERR_AUTHORITY),
    (b"GET", b"x/y", ERR_TARGET),
]


@pytest.mark.parametrize(
    ("method", "target", "err"),
    BAD_TARGETS,
    ids=[
        "asterisk-not-options",
        "authority-form",
        "ftp",
        "empty-authority",
        "userinfo",
        "relative",
    ],
)
def test_origin_target_refuses(method: bytes, target: bytes, err: str) -> None:
    with pytest.raises(BadTarget) as e:
        origin_target(method, target)
    assert e.value.message == err


# --------------------------------------------------------------------------- end to end


async def _a_and_b(upstreams: UpstreamFactory, gateway: GatewayFactory, engine: str) -> Gateway:
    a, b = await upstreams("svc-a"), await upstreams("svc-b")
    services: dict[str, Any] = {
        "a": {
            "match": {"path_prefix": "/a"},
            "releases": {"stable": {"weight": 1, "upstreams": [a.url]}},
        },
        "b": {
            "match": {"path_prefix": "/b"},
            "releases": {"stable": {"weight": 1, "upstreams": [b.url]}},
        },
    }
    return await gateway(gateway_config(services, engine=engine))


async def _get(port: int, target: bytes, host: bytes = b"x.local") -> tuple[int, dict[str, Any]]:
    c = await RawClient.connect(port)
    try:
        await c.send(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (target, host))
        r = await c.response(limit=30)
    finally:
        await c.close()
    return r.status, json.loads(r.body)


E2E = [
    (b"/a/../b/secret", "svc-b", "/b/secret"),
    (b"/a/%2e%2e/b/secret?x=/../y", "svc-b", "/b/secret?x=/../y"),
    (b"/b/../a//x", "svc-a", "/a/x"),
    (b"/%62/x", "svc-b", "/b/x"),
    (b"/a/..%2fb/secret", "svc-a", "/a/..%2fb/secret"),
]


@pytest.mark.parametrize(
    ("target", "release", "path"),
    E2E,
    ids=["dotdot-to-b", "encoded-dotdot", "dotdot-and-slashes", "encoded-letter", "encoded-slash"],
)
async def test_dot_segments_resolved_before_matching(
    upstreams: UpstreamFactory,
    gateway: GatewayFactory,
    engine: str,
    target: bytes,
    release: str,
    path: str,
) -> None:
    """Issue 10: with A on /a and B on /b, `/a/../b/secret` is B's `/b/secret`."""
    gw = await _a_and_b(upstreams, gateway, engine)
    assert gw.port is not None
    status, body = await _get(gw.port, target)
    assert status == 200, body
    assert body["release"] == release
    assert body["path"] == path


@pytest.mark.parametrize(
    "target",
    [b"/../b/secret", b"/a/%2e%2e/%2e%2e/b", b"/a%zz", b"example.com:80"],
    ids=["above-root", "encoded-above-root", "bad-percent", "authority-form"],
)
async def test_unnormalizable_target_is_400(
    upstreams: UpstreamFactory, gateway: GatewayFactory, engine: str, target: bytes
) -> None:
    gw = await _a_and_b(upstreams, gateway, engine)
    assert gw.port is not None
    c = await RawClient.connect(gw.port)
    try:
        await c.send(b"GET %s HTTP/1.1\r\nHost: x.local\r\nConnection: close\r\n\r\n" % target)
        r = await c.response(limit=30)
    finally:
        await c.close()
    assert r.status == 400
    if engine == "fast" or target.startswith(b"/"):  # aiohttp's parser refuses the rest itself
        assert "error" in json.loads(r.body)
