"""Random state documents with correct checksums, written while the gateway serves (issue 10).

The gateway must keep serving, apply every valid document, never apply an
invalid one, and keep answering its admin API in JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import config as C
from gateway.app import Gateway
from gateway.rollout import STATES
from gateway.statedoc import GUARD_FIELDS, MAX_WEIGHT, MIN_WEIGHT
from gateway.store import decode
from tests.test_state_integrity import file_config, good_body, signed, write_atomically

_json: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
_non_number = _json.filter(lambda v: not isinstance(v, int | float) or isinstance(v, bool))
_positive = st.floats(min_value=MIN_WEIGHT, max_value=MAX_WEIGHT)
_weight = st.one_of(st.just(0), _positive, st.integers(1, int(MAX_WEIGHT)))
_bad_weight = st.one_of(
    _non_number,
    st.floats(max_value=-1e-300, allow_infinity=False),
    st.floats(min_value=MAX_WEIGHT * (1 + 1e-9), allow_infinity=False),
    st.integers(int(MAX_WEIGHT) + 1, 10**400),
    st.floats(min_value=5e-324, max_value=MIN_WEIGHT * (1 - 1e-9)),
)
_guard = st.fixed_dictionaries(
    {},
    optional={
        "error_rate": st.floats(0, 1),
        "min_requests": st.integers(1, 10**9),
        "latency_p95_ms": st.floats(0, 3.6e6),
    },
)
_bad_guard = st.one_of(
    st.builds(lambda v: {"error_rate": v}, st.floats(min_value=1.0001, allow_infinity=False)),
    st.builds(lambda v: {"min_requests": v}, st.integers(-10, 0) | st.integers(10**9 + 1, 10**400)),
    st.builds(lambda k: {k: 1}, st.text(max_size=8).filter(lambda k: k not in GUARD_FIELDS)),
)
_rollout = st.builds(
    lambda w, state: {
        "release": "gray",
        "state": state,
        "step": 0,
        "step_started": 1.0,
        "paused_left": None,
        "reason": None,
        "steps": [{"weight": w, "pause": None}],
    },
    st.floats(0, 100),
    st.sampled_from(["Progressing", "Paused", "Promoted", "RolledBack"]),
)
_bad_rollout = st.one_of(
    st.builds(
        lambda steps: {"release": "gray", "steps": steps},
        st.just([]) | _non_number.filter(lambda v: not isinstance(v, list)),
    ),
    st.builds(
        lambda s: {"release": "gray", "state": s, "steps": [{"weight": 1, "pause": None}]},
        _json.filter(lambda s: not isinstance(s, str) or s not in STATES),
    ),
    _non_number,
)


def _doc(stable: Any, gray: Any, guard: Any, rollout: Any) -> dict[str, Any]:
    body = good_body()
    svc = body["services"]["svc"]
    svc["weights"] = {"stable": stable, "gray": gray}
    svc["guard"] = guard
    if rollout is not None:
        svc["rollout"] = rollout
    return body


_valid = st.builds(_doc, _weight, _positive, _guard, st.none() | _rollout)
_invalid = st.one_of(
    st.builds(_doc, _weight, _bad_weight, _guard, st.none()),
    st.builds(_doc, _weight, _positive, _bad_guard, st.none()),
    st.builds(_doc, _weight, _positive, _guard, _bad_rollout),
    st.builds(
        lambda extra: {**extra, "format": 1, "version": 0},  # no "services": refused
        st.dictionaries(st.text(max_size=8).filter(lambda k: k != "services"), _json, max_size=3),
    ),
)
_case = st.one_of(st.tuples(st.just(True), _valid), st.tuples(st.just(False), _invalid))


class _Refusals(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "not applied" in record.getMessage():
            self.count += 1


@pytest.fixture
async def served(tmp_path: Path, upstreams: Any) -> AsyncIterator[tuple[Gateway, Path]]:
    stable, gray = await upstreams("stable"), await upstreams("gray")
    state = tmp_path / "state.json"
    state.write_bytes(signed(good_body(version=1)))
    gw = Gateway(C.build(file_config(state, stable.url, gray.url), env={}))
    gw.driver.interval = 3600.0  # stored rollouts stay as written
    await gw.start()
    try:
        yield gw, state
    finally:
        await gw.stop(1.0)


async def test_random_state_documents_never_stop_the_gateway(
    served: tuple[Gateway, Path],
) -> None:
    gw, state = served
    loop = asyncio.get_running_loop()
    refusals = _Refusals()
    store_log = logging.getLogger("gateway.store")
    store_log.addHandler(refusals)
    seen = {True: 0, False: 0}
    session = aiohttp.ClientSession()

    async def one(valid: bool, body: dict[str, Any]) -> None:
        before, refused = gw.holder.current.version, refusals.count
        if "services" in body:
            body["version"] = before + 1
        write_atomically(state, signed(body))
        deadline = time.monotonic() + 15
        while True:
            if gw.holder.current.version != before or refusals.count != refused:
                break
            assert time.monotonic() < deadline, "the watch neither applied nor refused it"
            await asyncio.sleep(0.005)
        if valid:
            assert gw.holder.current.version == before + 1, "a valid document was refused"
            weights = body["services"]["svc"]["weights"]
            table = gw.holder.current.services["svc"].table
            assert table.raw == {k: float(v) for k, v in weights.items()}
        else:
            assert gw.holder.current.version == before, "an invalid document was applied"
            assert refusals.count == refused + 1
        admin = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc"
        async with session.get(admin) as r:
            assert r.status == 200 and r.content_type == "application/json"
            assert (await r.json())["state_version"] == gw.holder.current.version
        async with session.get(f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": "u"}) as r:
            assert r.status == 200

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(case=_case)
    def check(case: tuple[bool, dict[str, Any]]) -> None:
        valid, body = case
        body = json.loads(json.dumps(body))  # a fresh copy per example
        asyncio.run_coroutine_threadsafe(one(valid, body), loop).result(60)
        seen[valid] += 1

    try:
        await asyncio.to_thread(check)
    finally:
        store_log.removeHandler(refusals)
        await session.close()
    assert seen[True] >= 5 and seen[False] >= 5, seen
    # Whatever the last file was, the gateway's state is one a restart accepts.
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{gw.admin_port}/admin/services/svc/weights"
        async with s.put(url, json={"gray": 3}) as r:
            assert r.status == 200, await r.text()
    assert decode(state.read_bytes()).version == gw.holder.current.version
