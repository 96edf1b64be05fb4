"""Hostile input from outside (issue 14 QA round): each case here once got a 500, a hang or a crash.

Admin requests go over real sockets to a started gateway; config files go
through `gateway check` as a process and through `POST /admin/reload`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import changes, preview
from gateway import config as C
from gateway.app import Gateway
from gateway.errors import BadRequest
from gateway.routing import WeightTable
from tests.conftest import gateway_check, gateway_config, two_releases
from tests.engine_helpers import RawClient

TIMEOUT = aiohttp.ClientTimeout(total=60)


async def _admin(upstreams: Any, gateway: Any, **top: Any) -> tuple[Gateway, str]:
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(gateway_config(two_releases(st.url, gr.url), **top))
    return gw, f"http://127.0.0.1:{gw.admin_port}"


# --------------------------------------------------------------------------- audit query


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=%C2%B2", "limit"),  # "²".isdigit() is True, int("²") raises
        ("limit=" + "1" * 5000, "limit"),  # beyond int()'s 4,300-digit limit
        ("since=nan", "since"),
        ("since=inf", "since"),
        ("since=1e999", "since"),
        ("since=" + "9" * 400 + "s", "since"),  # a duration of float('inf') seconds
    ],
    ids=["superscript-limit", "5000-digit-limit", "nan", "inf", "1e999", "400-digit-duration"],
)
async def test_audit_query_out_of_range_is_a_json_400(
    upstreams: Any, gateway: Any, query: str, field: str
) -> None:
    _, admin = await _admin(upstreams, gateway)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(f"{admin}/admin/audit?{query}") as r:
            assert r.status == 400, await r.text()
            assert (await r.json())["field"] == field


# --------------------------------------------------------------------------- bearer token bytes


@pytest.mark.parametrize(
    "cred",
    [b"\xff\xfe", b"s3cret\xff", b"\xc3\xa9", b"s3cre"],
    ids=["not-utf8", "token-then-bad-byte", "utf8-e-acute", "wrong"],
)
async def test_a_bearer_token_of_any_bytes_is_a_401_not_a_500(
    upstreams: Any, gateway: Any, tmp_path: Path, cred: bytes
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("ops s3cret write\n")
    admin = {"listen": "127.0.0.1:0", "token_env": None, "tokens_file": str(tokens)}
    gw, _ = await _admin(upstreams, gateway, admin=admin)
    c = await RawClient.connect(gw.admin_port)
    try:
        await c.send(
            b"GET /admin/services HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
            b"Authorization: Bearer " + cred + b"\r\n\r\n"
        )
        r = await c.response(limit=30)
    finally:
        await c.close()
    assert r.status == 401, r.body[:300]
    assert json.loads(r.body)["field"] == "Authorization"


# --------------------------------------------------------------------------- JSON bodies


def _nested_nots(n: int) -> bytes:
    """Segments whose header value nests `n` `{"not": ...}` (as text: json.dumps recurses)."""
    value = b'{"not": ' * n + b'"1"' + b"}" * n
    return b'[{"name": "a", "match": {"header": {"X": ' + value + b'}}, "release": "gray"}]'


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/admin/services/svc/weights", b'{"gray": 1, "gray": 99}'),
        ("PUT", "/admin/services/svc/baseline", b'{"baseline": "gray", "baseline": "stable"}'),
        ("POST", "/admin/weights", b'{"service": "svc", "gray_weight": 5, "gray_weight": 50}'),
        ("PUT", "/admin/services/svc/segments", _nested_nots(700)),
    ],
    ids=["weights-duplicate", "baseline-duplicate", "platform-duplicate", "segments-700-deep"],
)
async def test_ambiguous_or_too_deep_json_is_a_400_and_changes_nothing(
    upstreams: Any, gateway: Any, method: str, path: str, body: bytes
) -> None:
    """A repeated name silently kept the last value; 700 nested objects were stored (3 MB),
    and some 970 parsed, then failed with a 500 where the list is encoded again."""
    gw, admin = await _admin(upstreams, gateway)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.request(method, admin + path, data=body) as r:
            assert r.status == 400, await r.text()
            assert (await r.json())["field"] == "body"
    assert gw.holder.current.version == 0


@pytest.mark.parametrize(
    ("depth", "ok"),
    [(1, True), (64, True), (65, False), (5000, False)],
    ids=["one", "at-limit", "over-limit", "5000"],
)
def test_json_depth_limit(depth: int, ok: bool) -> None:
    assert changes.MAX_JSON_DEPTH == 64
    body = ("[" * depth + "]" * depth).encode()
    if ok:
        assert changes.parse_json(body) is not None
    else:
        with pytest.raises(BadRequest) as e:
            changes.parse_json(body)
        assert e.value.field == "body"


# --------------------------------------------------------------------------- YAML aliases

_SERVICES = (
    "services: {svc: {releases: {stable: {weight: 1, upstreams: ['http://127.0.0.1:9']}}}}\n"
)


def _bomb(levels: int) -> str:
    """Nested aliases: `levels` levels of ten make 10**levels strings from a few lines."""
    lines = ['l0: &l0 ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + f"\nlisten: *l{levels - 1}\n" + _SERVICES


def _merge_bomb(levels: int) -> str:
    """Merge keys that double at every level (PyYAML copies merged pairs per level)."""
    lines = ["m0: &m0 {a: 1, b: 2}"]
    for i in range(1, levels):
        lines.append(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}]}}")
    return "\n".join(lines) + "\n" + _SERVICES


ALIAS_CASES = [
    ("billion-laughs", _bomb(9), "aliases expand"),
    ("merge-doubling", _merge_bomb(40), "aliases expand"),
    (
        "recursive-segment-not",
        "services:\n  svc:\n    releases: {stable: {weight: 1, upstreams: ['http://127.0.0.1:9']}}\n"
        "    segments: [{name: a, match: {header: {X: &h {not: *h}}}, release: stable}]\n",
        "contains it",
    ),
    ("recursive-list", "x: &a [*a]\n" + _SERVICES, "contains it"),
]


@pytest.mark.parametrize(
    ("text", "phrase"), [c[1:] for c in ALIAS_CASES], ids=[c[0] for c in ALIAS_CASES]
)
def test_gateway_check_refuses_alias_bombs_and_cycles_at_once(
    tmp_path: Path, text: str, phrase: str
) -> None:
    """A 10**9-string bomb ran out of memory; a recursive `not:` was a RecursionError trace."""
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(text)
    p = gateway_check(cfg)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "(yaml)" in p.stderr and phrase in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert len(p.stderr) < 10_000  # the error names the problem, not the expanded values


def test_aliases_that_reuse_a_block_stay_allowed() -> None:
    """Anchors for a shared release block, as operators write them, are not a bomb."""
    release = "{weight: 1, upstreams: ['http://127.0.0.1:9'], outlier: {}}"
    lines = [
        "services:",
        f"  s0: {{match: {{hosts: [h0.local]}}, releases: {{stable: &rel {release}}}}}",
    ]
    for i in range(1, 300):
        lines.append(f"  s{i}: {{match: {{hosts: [h{i}.local]}}, releases: {{stable: *rel}}}}")
    cfg = C.loads("\n".join(lines) + "\n", env={})
    assert len(cfg.services) == 300


async def test_reload_of_an_alias_bomb_answers_at_once_and_keeps_serving(
    upstreams: Any, tmp_path: Path
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(gateway_config(two_releases(st.url, gr.url, 100, 0))))
    gw = Gateway(C.load(str(cfg), env={}))
    await gw.start()
    try:
        snap = gw.holder.current
        cfg.write_text(_bomb(9))
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            async with s.post(f"http://127.0.0.1:{gw.admin_port}/admin/reload") as r:
                assert r.status == 400
                body = await r.json()
            assert body["field"] == "(yaml)" and "aliases expand" in body["errors"][0]["error"]
            async with s.get(f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": "u"}) as r:
                assert r.status == 200 and r.headers["X-Release-Stage"] == "stable"
        assert gw.holder.current is snap
    finally:
        await gw.stop(1.0)


# --------------------------------------------------------------------------- preview load


async def test_concurrent_previews_queue_agree_with_the_hash_and_requests_go_on(
    upstreams: Any, gateway: Any
) -> None:
    """Eight 1M-key previews in threads took the data path's median from 0.5 ms to 49 ms.

    They now hash a chunk per loop turn, one preview at a time (gateway/admin.py);
    the numbers must stay those of one pass over the keys.
    """
    gw, admin = await _admin(upstreams, gateway)
    sv = gw.holder.current.services["svc"]
    sample = 3 * 256 * 10 + 7  # not a whole number of chunks
    old = sv.table
    new = WeightTable.build(sv.cfg.salt or sv.cfg.name, {**old.raw, "gray": 40.0})
    want = preview.preview(old, new, sample).to_json()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:

        async def one() -> dict[str, Any]:
            url = f"{admin}/admin/services/svc/preview?gray=40&sample={sample}"
            async with s.get(url) as r:
                assert r.status == 200, await r.text()
                got: dict[str, Any] = await r.json()
                return got

        previews = [asyncio.ensure_future(one()) for _ in range(4)]
        for i in range(20):  # the data path answers while they run
            headers = {"X-User-ID": f"u{i}"}
            async with s.get(f"http://127.0.0.1:{gw.port}/", headers=headers) as r:
                assert r.status == 200
        for got in await asyncio.gather(*previews):
            assert {k: got[k] for k in want} == want


# --------------------------------------------------------------------------- HEAD


@pytest.mark.parametrize(
    "path", ["/healthz", "/readyz", "/metrics", "/admin/services", "/admin/services/svc"]
)
async def test_head_is_answered_like_get_on_the_admin_listener(
    upstreams: Any, gateway: Any, path: str
) -> None:
    """RFC 9110 §9.1: GET and HEAD; the admin listener answered HEAD with 405 (a probe's HEAD)."""
    _, admin = await _admin(upstreams, gateway)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(admin + path) as g:
            want = g.status
        async with s.head(admin + path) as r:
            assert r.status == want == 200
            assert await r.read() == b""


# --------------------------------------------------------------------------- HTTP/1.0 without Host


async def test_an_http10_request_without_host_reaches_the_upstream_with_a_host(
    upstreams: Any, gateway: Any, engine: str
) -> None:
    """RFC 9112 §3.2: HTTP/1.1 to the upstream carries Host (empty when there is no authority).

    HTTP/1.0 needs no Host; the gateway forwarded it as HTTP/1.1 without one and an
    aiohttp upstream answered 400 "Missing 'Host' header".
    """
    st, gr = await upstreams("stable"), await upstreams("gray")
    gw = await gateway(gateway_config(two_releases(st.url, gr.url, 100, 0), engine=engine))
    c = await RawClient.connect(gw.port)
    try:
        await c.send(b"GET /h10 HTTP/1.0\r\nX-User-ID: u1\r\n\r\n")
        r = await c.response(limit=30)
    finally:
        await c.close()
    assert r.status == 200, r.body[:300]
    body = json.loads(r.body)
    assert body["release"] == "stable" and "Host" in body["headers"]
    assert "X-Forwarded-Host" not in body["headers"]
