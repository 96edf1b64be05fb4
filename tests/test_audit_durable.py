"""What a crash leaves of the audit trail (README.md "Audit", docs/admin-api.md).

The record of a change is written in the state document that makes the change:
one atomic file write, one Consul CAS. Here: the stores write it that way and a
failed write keeps neither (store layer); a record of a lost race, of a refused
change or of a copy the trail did not take is never lost nor kept twice (control
plane, real stores); and a gateway process killed with SIGKILL while changes
pour in leaves a record for every change in force, copied by its restart or by
the next change of a replica that lives on (file store and Consul).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import audit
from gateway import config as config_mod
from gateway.audit import Auditor, FileAudit
from gateway.config import ConsulConfig
from gateway.control import ControlPlane
from gateway.errors import Conflict
from gateway.state import SnapshotHolder, build_snapshot
from gateway.store import ServiceState, StateDoc, decode
from gateway.store.consul import ConsulStore
from gateway.store.file import FileStore
from tests.conftest import gateway_config, run_gateway_process, two_releases
from tests.consul_double import ConsulDouble
from tests.loadclient import ThreadedUpstreams


def _rec(version: int, actor: str = "deployer", gray: float = 10.0) -> dict[str, Any]:
    return {
        "time": "2026-01-01T00:00:00.000Z",
        "actor": actor,
        "source": "admin",
        "action": "weights.set",
        "service": "svc",
        "before": {"weights": {"stable": 100, "gray": 0}},
        "after": {"weights": {"stable": 100, "gray": gray}},
        "reason": None,
        "state_version": version,
    }


def _doc(gray: float, *records: dict[str, Any]) -> StateDoc:
    return StateDoc(0, {"svc": ServiceState(weights={"stable": 100.0, "gray": gray})}, records)


@pytest.fixture
async def consul() -> AsyncIterator[ConsulDouble]:
    async with ConsulDouble(jitter=False) as d:
        yield d


# --------------------------------------------------------------------------- store layer


async def test_file_store_writes_the_change_and_its_record_in_one_rename(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = FileStore(path)
    stored = await store.write(_doc(10.0, _rec(1)), 0)
    on_disk = decode(path.read_bytes())  # checksummed together: one document, one rename
    assert on_disk == stored and on_disk.audit == (_rec(1),)
    assert _names(tmp_path) == ["state.json", "state.json.lock"]  # no trail written beside
    before = path.read_bytes()
    with pytest.raises(Conflict):  # a write that fails stores neither the change nor its record
        await store.write(_doc(20.0, _rec(1, "loser", 20.0)), 0)
    assert path.read_bytes() == before
    assert FileStore(path).load().audit == (_rec(1),)  # what the next start reads


async def test_consul_store_writes_the_change_and_its_record_in_one_cas(
    consul: ConsulDouble,
) -> None:
    cfg = ConsulConfig(address=consul.address, kv_prefix="gw/one")
    a, b = ConsulStore(cfg), ConsulStore(cfg)
    await a.open()
    await b.open()  # b has not heard of what a writes next: a replica a CAS behind
    try:
        start = len(consul.requests)
        await a.write(_doc(10.0, _rec(1)), 0)
        puts = [r for r in consul.requests[start:] if r.method == "PUT"]
        assert [(r.path, "cas" in r.query) for r in puts] == [("/v1/kv/gw/one/state", True)]
        value = consul.kv["gw/one/state"].value
        assert value is not None and decode(value).audit == (_rec(1),)
        with pytest.raises(Conflict):  # b's CAS fails: neither its change nor its record
            await b.write(_doc(20.0, _rec(1, "loser", 20.0)), 0)
        assert consul.kv["gw/one/state"].value == value
        assert "gw/one/audit" not in consul.kv
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("kind", ["memory", "file", "consul"], ids=["memory", "file", "consul"])
async def test_a_record_copied_twice_is_kept_once(
    kind: str, tmp_path: Path, consul: ConsulDouble
) -> None:
    trail: audit.AuditStore = audit.MemoryAudit()
    if kind == "file":
        trail = FileAudit(tmp_path / "a.jsonl")
    elif kind == "consul":
        trail = audit.ConsulAudit(ConsulConfig(address=consul.address, kv_prefix="t"))
    try:
        await trail.append_new([_rec(1), _rec(2)])
        await trail.append_new([_rec(2), _rec(3)])  # 2 again: copied by two processes
        await trail.append(_rec(3, "reload"))  # not a copy: always appended
        await trail.append_new([_rec(3)])
        got = [(r["actor"], r["state_version"]) for r in await trail.read()]
    finally:
        await trail.close()
    assert got == [("deployer", 1), ("deployer", 2), ("deployer", 3), ("reload", 3)]


def _torn(path: Path) -> None:
    path.write_bytes(audit.key(_rec(1)).encode() + b"\n" + b'{"time": "2026-01-')


@pytest.mark.parametrize("copy", [False, True], ids=["append", "append_new"])
async def test_a_line_torn_by_a_power_cut_does_not_swallow_the_next_record(
    tmp_path: Path, copy: bool
) -> None:
    path = tmp_path / "a.jsonl"
    _torn(path)
    trail = FileAudit(path)
    await (trail.append_new([_rec(2)]) if copy else trail.append(_rec(2)))
    assert [r["state_version"] for r in await trail.read()] == [1, 2]


# --------------------------------------------------------------------------- control plane

RAW: dict[str, Any] = {
    "services": two_releases("http://127.0.0.1:9001", "http://127.0.0.1:9011", 100, 0),
}


@contextlib.asynccontextmanager
async def _plane(state: Path, trail: Path) -> AsyncIterator[tuple[ControlPlane, Auditor]]:
    """One process's control plane and auditor on shared files; it hears others only on write."""
    cfg = config_mod.build(RAW, env={})
    cp = ControlPlane(
        cfg, SnapshotHolder(build_snapshot(cfg)), store=FileStore(state, poll_interval=3600)
    )
    auditor = Auditor(FileAudit(trail))
    cp.journal = auditor
    auditor.pending = lambda: cp.doc.audit
    await cp.start(admin=True)
    try:
        yield cp, auditor
    finally:
        await cp.stop()


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _trail(path: Path) -> list[tuple[str, int]]:
    return [(r["actor"], r["state_version"]) for r in _records(path)]


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_a_lost_race_or_a_refused_change_leaves_no_record(tmp_path: Path) -> None:
    state, trail = tmp_path / "state.json", tmp_path / "state.json.audit.jsonl"
    async with _plane(state, trail) as (a, _), _plane(state, trail) as (b, _):
        with audit.acting("b", "admin", "weights.set"):
            await b.set_weights("svc", {"gray": 5}, None)
        with audit.acting("a", "admin", "weights.set"), pytest.raises(Conflict):
            await a.set_weights("svc", {"gray": 7}, 0)  # If-Match 0: stale, refused
        # Without If-Match, a's first try (built on version 0) loses the CAS and is redone
        # on version 1: only the change that was stored has a record.
        with audit.acting("a", "admin", "weights.set"):
            assert (await a.set_weights("svc", {"gray": 9}, None)).version == 2
    assert _trail(trail) == [("b", 1), ("a", 2)]
    assert [r["after"]["weights"]["gray"] for r in FileStore(state).load().audit] == [9]


async def test_a_record_the_trail_did_not_take_is_read_from_the_state_and_copied_later(
    tmp_path: Path,
) -> None:
    state, trail = tmp_path / "state.json", tmp_path / "audit.jsonl"
    blocked = tmp_path / "audit.jsonl.lock"
    blocked.mkdir()  # the trail's lock cannot be opened: appends fail, reads work
    async with _plane(state, trail) as (cp, auditor):
        with audit.acting("first", "admin", "weights.set"):
            await cp.set_weights("svc", {"gray": 5}, None)  # accepted; the copy fails
        assert not trail.exists()
        assert [(r["actor"], r["state_version"]) for r in await auditor.query()] == [("first", 1)]
        blocked.rmdir()  # the trail takes writes again
        with audit.acting("second", "admin", "weights.set"):
            await cp.set_weights("svc", {"gray": 6}, None)
        assert _trail(trail) == [("first", 1), ("second", 2)]
        assert [(r["actor"], r["state_version"]) for r in await auditor.query()] == [
            ("first", 1),
            ("second", 2),
        ]


async def test_a_start_copies_the_record_a_killed_writer_left_in_the_state(
    tmp_path: Path, upstreams: Any, gateway: Any
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    state = tmp_path / "state.json"
    # What a writer killed between its state write and its copy to the trail leaves.
    await FileStore(state).write(_doc(10.0, _rec(1)), 0)
    doc = gateway_config(
        two_releases(st.url, gr.url, 100, 0), state={"store": "file", "path": str(state)}
    )
    await gateway(doc)
    assert _records(Path(f"{state}.audit.jsonl")) == [_rec(1)]


async def test_a_large_record_travels_cut_in_the_state_and_reaches_the_trail_whole(
    tmp_path: Path,
) -> None:
    trail = FileAudit(tmp_path / "a.jsonl")
    auditor = Auditor(trail, wall=lambda: 0.0)
    users = [f"user-{i}" for i in range(5000)]  # e.g. a segments list: ~60 KB of JSON
    after = ServiceState(extra={"segments": users})
    with audit.acting("deployer", "admin", "segments.set"):
        records = await auditor.prepare("svc", ServiceState(), after, StateDoc(3))
    (rec,) = records
    size = len(json.dumps(users, separators=(",", ":")))
    assert rec["after"] == {"segments": {"omitted_bytes": size}} and rec["state_version"] == 4
    assert len(json.dumps(rec)) < audit.CARRY_MAX_BYTES  # the document stays small
    await auditor.committed(records)
    (whole,) = await trail.read()
    assert whole["after"] == {"segments": users} and audit.key(whole) == audit.key(rec)
    # Another process copying what the document carried adds nothing: the same record.
    await Auditor(FileAudit(tmp_path / "a.jsonl")).copy(records)
    assert await trail.read() == [whole]
    # Had the writer been killed before its copy, the trail would get the cut record.
    elsewhere = FileAudit(tmp_path / "b.jsonl")
    await Auditor(elsewhere).copy(records)
    assert await elsewhere.read() == [rec]


async def test_the_admin_api_shows_a_change_whose_copy_the_trail_refused(
    tmp_path: Path, upstreams: Any, gateway: Any
) -> None:
    st, gr = await upstreams("stable"), await upstreams("gray")
    state = tmp_path / "state.json"
    blocked = tmp_path / "state.json.audit.jsonl.lock"
    blocked.mkdir()  # the trail's lock cannot be opened: every copy fails
    doc = gateway_config(
        two_releases(st.url, gr.url, 100, 0), state={"store": "file", "path": str(state)}
    )
    gw = await gateway(doc)
    admin = f"http://127.0.0.1:{gw.admin_port}/admin"
    async with aiohttp.ClientSession() as s:
        for gray in (5, 6):
            async with s.put(f"{admin}/services/svc/weights", json={"gray": gray}) as r:
                assert r.status == 200, await r.text()
        async with s.get(f"{admin}/audit") as r:
            got = (await r.json())["records"]
    assert [(r["state_version"], r["after"]["weights"]["gray"]) for r in got] == [(1, 5), (2, 6)]
    assert [r["state_version"] for r in FileStore(state).load().audit] == [1, 2]
    assert "state.json.audit.jsonl" not in _names(tmp_path)


# --------------------------------------------------------------------------- SIGKILL

WRITE = "d3ploy-s3cret"
ROUNDS = 3


def _call(base: str, method: str, path: str, body: object = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        base + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {WRITE}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def _until(cond: Callable[[], bool], within: float = 60.0) -> None:
    end = time.monotonic() + within
    while not cond():
        assert time.monotonic() < end, "condition not met before the deadline"
        time.sleep(0.01)


@contextlib.contextmanager
def _threaded_consul() -> Iterator[ConsulDouble]:
    """The Consul double on its own loop thread, for gateway processes to reach."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, ConsulDouble] = {}
    done = asyncio.Event()

    async def serve() -> None:
        async with ConsulDouble(jitter=False) as d:
            box["d"] = d
            ready.set()
            await done.wait()

    t = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    t.start()
    assert ready.wait(30)
    try:
        yield box["d"]
    finally:
        loop.call_soon_threadsafe(done.set)
        t.join(30)
        loop.close()


def _hammer(admin: str, stop: threading.Event, accepted: list[int], seed: int) -> None:
    """PUT weights until stopped or the gateway is gone; the versions answered 200."""
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            status, body = _call(
                admin, "PUT", "/admin/services/svc/weights", {"gray": rng.randint(1, 60)}
            )
        except OSError:  # killed under us
            return
        if status == 200:
            accepted.append(int(body["state_version"]))


@contextlib.contextmanager
def _stores(tmp_path: Path, store: str) -> Iterator[tuple[dict[str, Any], Callable[[], Any]]]:
    """A gateway config on `store` and a reader of its trail as stored (file line or KV key)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"deployer {WRITE} write\n")
    with ThreadedUpstreams(["stable", "gray"]) as up, contextlib.ExitStack() as stack:
        doc = gateway_config(
            two_releases(up.url("stable"), up.url("gray"), 100, 0),
            admin={"tokens_file": str(tokens)},
            state={"store": "file", "path": str(tmp_path / "state.json")},
        )
        trail: Callable[[], Any] = lambda: _records(tmp_path / "state.json.audit.jsonl")  # noqa: E731
        if store == "consul":
            consul = stack.enter_context(_threaded_consul())
            doc["state"] = {"store": "consul"}
            doc["consul"] = {"address": consul.address, "kv_prefix": "gw/crash"}
            trail = lambda: json.loads(consul.kv["gw/crash/audit"].value or b"[]")  # noqa: E731
        yield doc, trail


def _kill_at_random(
    victim: Any, admins: list[str], accepted: list[int], rng: random.Random
) -> None:
    """Hammer every admin with changes; SIGKILL `victim` after a random number of them."""
    stop = threading.Event()
    threads = [
        threading.Thread(target=_hammer, args=(admin, stop, accepted, rng.random()))
        for admin in admins
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    # A random moment: after some changes, with the next ones in flight.
    goal = len(accepted) + rng.randint(5, 40)
    _until(lambda: len(accepted) >= goal or victim.proc.poll() is not None)
    victim.proc.kill()  # SIGKILL: no cleanup, no flush
    victim.proc.wait(30)
    stop.set()
    for t in threads:
        t.join(60)


def _check(admin: str, accepted: list[int], trail: list[dict[str, Any]]) -> None:
    status, svc = _call(admin, "GET", "/admin/services/svc")
    assert status == 200
    in_force = int(svc["state_version"])
    status, got = _call(admin, "GET", "/admin/audit?limit=1000")
    assert status == 200
    recs = got["records"]
    assert accepted and max(accepted) <= in_force
    # Every change in force has its record, exactly once, and no record names a change
    # that was never stored: one record per version 1..in_force, in order.
    assert [r["state_version"] for r in recs] == list(range(1, in_force + 1))
    assert all(r["actor"] == "deployer" and r["action"] == "weights.set" for r in recs)
    assert recs[-1]["after"]["weights"]["gray"] == svc["weights"]["gray"]
    assert trail == recs  # the trail as stored is complete too: nothing left to copy


@pytest.mark.slow
@pytest.mark.parametrize("store", ["file", "consul"], ids=["file", "consul"])
def test_sigkill_while_changes_pour_in_never_leaves_a_change_without_its_record(
    tmp_path: Path, store: str
) -> None:
    rng = random.Random()
    accepted: list[int] = []
    with _stores(tmp_path, store) as (doc, trail):
        for n in range(ROUNDS):
            (tmp_path / f"run{n}").mkdir()
            with run_gateway_process(tmp_path / f"run{n}", doc) as gp:
                _kill_at_random(gp, [gp.admin], accepted, rng)
        (tmp_path / "last").mkdir()
        with run_gateway_process(tmp_path / "last", doc) as gp:  # the start copies what is due
            _check(gp.admin, accepted, trail())


@pytest.mark.slow
@pytest.mark.parametrize("store", ["file", "consul"], ids=["file", "consul"])
def test_a_replica_killed_mid_change_has_its_record_copied_by_the_next_change_elsewhere(
    tmp_path: Path, store: str
) -> None:
    rng = random.Random()
    accepted: list[int] = []
    with _stores(tmp_path, store) as (doc, trail):
        (tmp_path / "survivor").mkdir()
        with run_gateway_process(tmp_path / "survivor", doc) as survivor:
            for n in range(ROUNDS):
                (tmp_path / f"victim{n}").mkdir()
                with run_gateway_process(tmp_path / f"victim{n}", doc) as victim:
                    _kill_at_random(victim, [survivor.admin, victim.admin], accepted, rng)
                # The survivor's next change copies what the victim's document carried.
                status, body = _call(
                    survivor.admin, "PUT", "/admin/services/svc/weights", {"gray": 61 + n}
                )
                assert status == 200, body
                accepted.append(int(body["state_version"]))
            _check(survivor.admin, accepted, trail())
