"""The OpenAPI document stays true (issue 4 §2): a property-based check against the live app.

Why hypothesis instead of schemathesis: the same idea (generate requests
from the document, check every answer against it) without another
dependency tree; requests are drawn from each documented operation's own
schemas plus junk, and every answer must be a documented status whose body
validates against the documented schema (jsonschema, OpenAPI 3.1 = JSON
Schema 2020-12).
"""

from __future__ import annotations

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
from tests.test_admin import OPENAPI, TOKEN, TOKEN_ENV, Admin, admin_doc, check_documented

SERVICES = st.sampled_from(["user-api", "catalog", "nope", "user%20api"])
RELEASES = st.sampled_from(["stable", "gray", "batch-1", "blue", ""])
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=8),
)
JUNK = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
WEIGHTS = st.dictionaries(
    RELEASES, st.one_of(st.integers(-5, 200), st.floats(0, 100), JUNK), max_size=3
)
THRESHOLDS = st.dictionaries(
    st.sampled_from(["error_rate", "latency_p95_ms", "latency_p95_delta_ms", "min_requests", "x"]),
    st.one_of(st.floats(0, 2), st.integers(-1, 1000), JUNK),
    max_size=3,
)
PLATFORM = st.fixed_dictionaries(
    {"service": SERVICES},
    optional={
        "gray_weight": st.one_of(st.floats(-10, 120), st.integers(0, 100), JUNK),
        "metrics_threshold": st.one_of(THRESHOLDS, JUNK),
    },
)
QUERY_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)


def _operations() -> list[tuple[str, str]]:
    return [
        (m.upper(), p)
        for p, item in OPENAPI["paths"].items()
        for m in item
        if m in ("get", "put", "post", "delete")
    ]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes | None, dict[str, str]]:
    method, template = draw(st.sampled_from(_operations()))
    path = template.replace("{service}", draw(SERVICES))
    query: dict[str, str] = {}
    body: bytes | None = None
    headers: dict[str, str] = {}
    if template.endswith("/explain"):
        for name in draw(
            st.lists(st.sampled_from(["user", "header", "cookie", "client_ip", "z"]), max_size=3)
        ):
            query[name] = draw(
                st.one_of(
                    QUERY_VALUE,
                    st.sampled_from(["X-Release-Stage:gray", "uid=bob", "10.0.0.1", "::1"]),
                )
            )
    elif template.endswith("/preview"):
        for rel in draw(st.lists(RELEASES, max_size=3)):
            query[rel or "sample"] = draw(
                st.one_of(QUERY_VALUE, st.integers(-1, 200).map(str), st.just("1000"))
            )
        query.setdefault("sample", draw(st.sampled_from(["1000", "0", "x", "1000001"])))
    elif method in ("PUT", "POST"):
        if template.endswith("/weights") and method == "PUT":
            obj: Any = draw(st.one_of(WEIGHTS, JUNK))
        else:
            obj = draw(st.one_of(PLATFORM, JUNK))
        body = draw(st.one_of(st.just(json.dumps(obj).encode()), st.binary(max_size=8)))
    if method in ("PUT", "POST", "DELETE") and draw(st.booleans()):
        headers["If-Match"] = draw(st.sampled_from(['"0"', '"1"', "*", 'W/"2"', "nope"]))
    if draw(st.integers(0, 9)) == 0:
        headers["Authorization"] = "Bearer wrong"
    return method, path, query, body, headers


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Admin]:
    # Unreachable upstreams are fine: the admin API never contacts them.
    doc = admin_doc(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    doc["admin"]["listen"] = "127.0.0.1:0"
    gw = Gateway(C.build(doc, env={TOKEN_ENV: TOKEN}), data=False)
    await gw.start()
    try:
        async with aiohttp.ClientSession() as s:
            yield Admin(gw, s, tmp_path / "state" / "gateway-state.json")
    finally:
        await gw.stop(0)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(req=requests())
async def test_every_answer_is_documented_and_fits_its_schema(
    live: Admin, req: tuple[str, str, dict[str, str], bytes | None, dict[str, str]]
) -> None:
    method, path, query, body, headers = req
    h = {"Authorization": f"Bearer {TOKEN}", **headers}
    if body is not None:
        h["Content-Type"] = "application/json"
    async with live.session.request(
        method, live.base + path, params=query, data=body, headers=h
    ) as r:
        text = await r.text()
        if path == "/metrics":
            assert r.status == 200
            return
        parsed = json.loads(text)
        check_documented(method, path, r.status, parsed)
        assert r.status < 500, text


async def test_oversized_write_is_a_documented_json_413(live: Admin) -> None:
    """A body over the admin limit is refused as JSON, and the document says so."""
    h = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    big = b'{"stable": 1, "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    path = "/admin/services/user-api/weights"
    async with live.session.put(live.base + path, data=io.BytesIO(big), headers=h) as r:
        body = json.loads(await r.text())
    assert r.status == 413 and body["field"] == "body"
    check_documented("PUT", path, 413, body)
