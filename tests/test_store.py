"""State store (issue 4 §4): canonical document, atomic CAS writes, watch, corruption handling."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as C
from gateway.app import Gateway
from gateway.errors import Conflict, StateError
from gateway.store import EMPTY, ServiceState, StateDoc, decode, encode, open_store
from gateway.store.doc import checksum
from gateway.store.file import FileStore
from gateway.store.memory import MemoryStore

DOC = StateDoc(
    3,
    {
        "user-api": ServiceState(
            {"stable": 95.0, "gray": 5.0}, {"error_rate": 0.01, "min_requests": 50}
        )
    },
)


def _signed(body: dict[str, Any]) -> bytes:
    return json.dumps({**body, "checksum": checksum(body)}).encode()


def test_encode_decode_round_trip_and_unknown_service_fields_survive() -> None:
    assert decode(encode(DOC)) == DOC
    assert decode(encode(EMPTY)) == EMPTY
    body = json.loads(encode(DOC))
    del body["checksum"]
    body["services"]["user-api"]["owner"] = {"team": "payments", "since": 2}
    doc = decode(_signed(body))
    assert doc.services["user-api"].extra == {"owner": {"team": "payments", "since": 2}}
    assert decode(encode(doc)) == doc


def _valid_body() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(encode(DOC))
    del body["checksum"]
    return body


def _edit(fn: Callable[[dict[str, Any]], None]) -> bytes:
    body = _valid_body()
    fn(body)
    return _signed(body)


CORRUPT = [
    ("truncated", encode(DOC)[:-20], "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("binary", b"\x00\xff\xfe", "not valid JSON"),
    ("not-object", b"[1, 2]", "top level is not an object"),
    ("no-checksum", json.dumps(_valid_body()).encode(), "no checksum"),
    (
        "checksum-mismatch",
        encode(DOC).replace(b'"gray": 5.0', b'"gray": 50.0'),
        "checksum mismatch",
    ),
    ("nan", encode(DOC).replace(b'"gray": 5.0', b'"gray": NaN'), "not valid JSON"),
    ("version-type", _edit(lambda b: b.update(version="3")), "version"),
    ("version-negative", _edit(lambda b: b.update(version=-1)), "version"),
    ("services-type", _edit(lambda b: b.update(services=[])), "services must be an object"),
    (
        "weight-negative",
        _edit(lambda b: b["services"]["user-api"]["weights"].update(gray=-1)),
        "services.user-api.weights.gray",
    ),
    (
        "weight-string",
        _edit(lambda b: b["services"]["user-api"]["weights"].update(gray="5")),
        "services.user-api.weights.gray",
    ),
    (
        "weights-type",
        _edit(lambda b: b["services"]["user-api"].update(weights=[5])),
        "services.user-api.weights",
    ),
    (
        "guard-unknown",
        _edit(lambda b: b["services"]["user-api"]["guard"].update(p99=1)),
        "services.user-api.guard.p99",
    ),
    (
        "guard-range",
        _edit(lambda b: b["services"]["user-api"]["guard"].update(error_rate=3)),
        "services.user-api.guard.error_rate",
    ),
    ("format", _edit(lambda b: b.update(format=99)), "format 99"),
]


@pytest.mark.parametrize(("data", "needle"), [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_documents_are_refused_whole_with_a_clear_message(data: bytes, needle: str) -> None:
    with pytest.raises(StateError) as e:
        decode(data, "var/state.json")
    assert e.value.message.startswith("var/state.json: corrupt state document: ")
    assert needle in e.value.message


async def test_file_store_writes_atomically_with_cas(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "state.json"
    store = FileStore(path)
    assert store.load() == EMPTY  # no file yet: empty state, nothing created
    assert not path.parent.exists()
    v1 = await store.write(DOC, 0)
    assert v1.version == 1 and decode(path.read_bytes()) == v1
    with pytest.raises(Conflict):
        await store.write(DOC, 0)
    assert decode(path.read_bytes()) == v1
    v2 = await store.write(v1.with_service("x", ServiceState({"a": 1.0})), 1)
    assert v2.version == 2
    leftovers = sorted(p.name for p in path.parent.iterdir())
    assert leftovers == ["state.json", "state.json.lock"]  # no temp files left behind
    # another process (a second store on the same file) sees it and CAS applies across them
    other = FileStore(path)
    assert other.load() == v2
    with pytest.raises(Conflict):
        await other.write(DOC, 1)


async def test_file_store_replaces_a_corrupt_file_on_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = FileStore(path)
    v1 = await store.write(DOC, 0)
    path.write_bytes(b"{torn")
    v2 = await store.write(v1, 1)
    assert decode(path.read_bytes()) == v2 and v2.version == 2


async def _next(it: AsyncIterator[StateDoc], within: float = 5.0) -> StateDoc:
    return await asyncio.wait_for(anext(it), within)


async def test_file_watch_sees_other_writers_and_skips_corrupt_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    writer, reader = FileStore(path), FileStore(path, poll_interval=0.02)
    reader.load()
    watch = reader.watch()
    try:
        t0 = time.monotonic()
        v1 = await writer.write(DOC, 0)
        assert await _next(watch) == v1
        assert time.monotonic() - t0 < 1.0
        # a torn file with a higher version is never yielded (never half-applied) ...
        caplog.set_level(logging.ERROR, "gateway.store")
        path.write_bytes(encode(StateDoc(9, {}))[:-30])
        pending = asyncio.ensure_future(_next(watch))
        deadline = time.monotonic() + 5
        while "corrupt state document" not in caplog.text:
            assert time.monotonic() < deadline, "corruption was not reported"
            await asyncio.sleep(0.01)
        assert not pending.done()
        # ... and the next good document is
        path.write_bytes(encode(StateDoc(2, {})))
        assert (await pending).version == 2
    finally:
        await watch.aclose()


async def test_memory_store_cas_and_watch() -> None:
    store = MemoryStore()
    watch = store.watch()
    pending = asyncio.ensure_future(_next(watch))
    await asyncio.sleep(0)
    v1 = await store.write(DOC, 0)
    assert await pending == v1 and store.load() == v1
    with pytest.raises(Conflict):
        await store.write(DOC, 0)
    await watch.aclose()


async def test_consul_store_unreachable_is_a_clear_startup_error() -> None:
    from tests.conftest import free_port

    cfg = C.build(
        {
            "state": {"store": "consul"},
            "consul": {"address": f"http://127.0.0.1:{free_port()}"},
            "services": {
                "s": {"releases": {"stable": {"weight": 1, "upstreams": ["http://127.0.0.1:1"]}}}
            },
        },
        env={},
    )
    store = open_store(cfg.state, cfg.consul)
    opener = store.open
    with pytest.raises(StateError) as e:
        await opener()
    assert e.value.field == "consul.address" and "cannot read" in e.value.message
    await store.close()


# --------------------------------------------------------------------------- gateway level


def _config(tmp: Path, state: Path) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token_env": None},
        "state": {"store": "file", "path": str(state), "poll_interval": "20ms"},
        "drain_timeout": "1s",
        "services": {
            "user-api": {
                "releases": {
                    "stable": {"weight": 95, "upstreams": ["http://127.0.0.1:9"]},
                    "gray": {"weight": 5, "upstreams": ["http://127.0.0.1:9"]},
                }
            }
        },
    }


async def test_gateway_refuses_to_start_on_a_corrupt_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(encode(DOC)[:-10])
    gw = Gateway(C.build(_config(tmp_path, state), env={}))
    with pytest.raises(StateError) as e:
        await gw.start()
    assert str(state) in e.value.message
    assert gw.port is None and gw.admin_port is None  # nothing was listening


def test_gateway_run_exits_2_naming_the_corrupt_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_bytes(b'{"version": 4, "services": {}, "checksum": "sha256:00"}')
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path, state)))
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert f"{state}: corrupt state document: checksum mismatch" in r.stderr


async def test_a_worker_never_applies_a_corrupt_file_and_keeps_the_last_good_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state.json"
    cfg = C.build(_config(tmp_path, state), env={})
    master, worker = Gateway(cfg, data=False), Gateway(cfg, admin=False)
    await master.start()
    await worker.start()
    try:
        await master.control.set_weights("user-api", {"gray": 50}, None)
        deadline = time.monotonic() + 1.0
        while worker.holder.current.version != 1:
            assert time.monotonic() < deadline, "the worker did not apply version 1 within 1 s"
            await asyncio.sleep(0.01)
        good = worker.holder.current
        assert good.services["user-api"].table.raw == {"stable": 95, "gray": 50}
        caplog.set_level(logging.ERROR, "gateway.store")
        bad = json.loads(state.read_bytes())
        bad["version"] = 7
        bad["services"]["user-api"]["weights"] = {"stable": 0, "gray": 1}
        state.write_text(json.dumps(bad))  # checksum no longer matches
        deadline = time.monotonic() + 5
        while "checksum mismatch" not in caplog.text:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert worker.holder.current is good
        assert master.holder.current.version == 1
    finally:
        await worker.stop(0)
        await master.stop(0)
