"""Random admin requests (issue 10): every answer is JSON below 500; the state moves only on 2xx.

Bodies are any JSON (near-valid shapes too), raw bytes, huge numbers and
sizes up to 2 MB; `If-Match` is anything from absent to 5,000 digits. At the
end the state file must be one the next start accepts.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import config as C
from gateway.app import Gateway
from gateway.store import decode
from tests.test_state_integrity import file_config, good_body, signed

ROUTES = [
    ("PUT", "/admin/services/{s}/weights"),
    ("DELETE", "/admin/services/{s}/weights"),
    ("POST", "/admin/weights"),
    ("POST", "/admin/services/{s}/rollout"),
    ("POST", "/admin/services/{s}/promote"),
    ("POST", "/admin/services/{s}/pause"),
    ("POST", "/admin/services/{s}/resume"),
    ("POST", "/admin/services/{s}/abort"),
    ("GET", "/admin/services/{s}/explain"),
    ("GET", "/admin/services/{s}/preview"),
    ("GET", "/admin/services/{s}"),
]
_KEYS = ["stable", "gray", "service", "gray_weight", "metrics_threshold", "release", "steps"]
_KEYS += ["weight", "pause", "error_rate", "min_requests", "latency_p95_ms", "svc"]

_number = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1e-6, 1e-7, 1e6, 1e6 + 1, 1e308, 1e-320, 100, 50, 5]),
)
_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | _number | st.text(max_size=10) | st.sampled_from(_KEYS),
    lambda c: (
        st.lists(c, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), c, max_size=4)
    ),
    max_leaves=16,
)
_body = st.one_of(
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.builds(lambda n: b'{"gray": ' + b"9" * n + b"}", st.integers(300, 6000)),
    st.builds(
        lambda n: b'{"service": "svc", "gray_weight": 1' + b"0" * n + b"}", st.integers(1, 500)
    ),
    st.builds(
        lambda chunk, n: chunk * n, st.binary(min_size=1, max_size=16), st.integers(0, 131072)
    ),
    st.builds(lambda n: b"[" * n, st.integers(1, 2 * 1024 * 1024)),
    st.builds(lambda n: b" " * n, st.sampled_from([1024 * 1024, 1024 * 1024 + 1, 2 * 1024 * 1024])),
)
_if_match = st.one_of(
    st.none(),
    st.just("CURRENT"),
    st.just("*"),
    # What a client can put in a header: visible ASCII and space, plus non-ASCII digits.
    st.text(
        alphabet=st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("²٣"),
        max_size=20,
    ),
    st.builds(lambda n: "7" * n, st.integers(1, 5000)),
)
_query = st.dictionaries(
    st.sampled_from(["user", "header", "cookie", "client_ip", "sample", "stable", "gray", "x"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=30)
    | _number.map(str),
    max_size=3,
)
_request = st.tuples(
    st.sampled_from(ROUTES), st.sampled_from(["svc", "svc", "nope"]), _body, _if_match, _query
)


@pytest.fixture
async def admin_gw(tmp_path: Path, upstreams: Any) -> AsyncIterator[tuple[Gateway, Path]]:
    stable, gray = await upstreams("stable"), await upstreams("gray")
    state = tmp_path / "state.json"
    state.write_bytes(signed(good_body(version=1)))
    gw = Gateway(C.build(file_config(state, stable.url, gray.url), env={}))
    gw.driver.interval = 3600.0  # only requests change the state in this test
    await gw.start()
    try:
        yield gw, state
    finally:
        await gw.stop(1.0)


async def test_random_admin_requests_get_json_below_500(admin_gw: tuple[Gateway, Path]) -> None:
    gw, state = admin_gw
    loop = asyncio.get_running_loop()
    statuses: dict[int, int] = {}
    base = f"http://127.0.0.1:{gw.admin_port}"
    session = aiohttp.ClientSession()

    async def one(req: tuple[Any, ...]) -> None:
        (method, path), service, body, if_match, query = req
        before = gw.holder.current.version
        headers = {"Content-Type": "application/json"}
        if if_match == "CURRENT":
            if_match = f'"{before}"'
        if if_match is not None:
            headers["If-Match"] = if_match
        url = base + path.format(s=service)
        params = query if method == "GET" else None
        async with session.request(
            method, url, data=io.BytesIO(body), headers=headers, params=params
        ) as r:
            text = await r.text()
            assert r.status < 500, (r.status, text[:300])
            assert r.content_type == "application/json", (r.status, text[:300])
            doc = json.loads(text)
            if r.status >= 400:
                assert set(doc) >= {"error", "field"} and isinstance(doc["error"], str)
            statuses[r.status] = statuses.get(r.status, 0) + 1
        after = gw.holder.current.version
        if not 200 <= r.status < 300 or method == "GET":
            assert after == before, (method, path, r.status, text[:300])

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )
    @given(req=_request)
    def check(req: tuple[Any, ...]) -> None:
        asyncio.run_coroutine_threadsafe(one(req), loop).result(60)

    try:
        await asyncio.to_thread(check)
    finally:
        await session.close()
    assert sum(statuses.values()) >= 100 and any(400 <= s < 500 for s in statuses), statuses
    # No API call wrote a document that the next start would refuse.
    assert decode(state.read_bytes()).version == gw.holder.current.version
    again = Gateway(gw.config, admin=False, data=False)
    await again.control.start(admin=False, data=False)
    try:
        assert again.control.doc == gw.control.doc
    finally:
        await again.control.stop()
