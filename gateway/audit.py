"""The audit trail: who changed what, when, and why (README.md "Audit").

Why beside the state document and not inside it: the state document is
rewritten, checksummed and fsynced on every change and every process
re-reads it on every change; 1,000 records with their before/after would
multiply that cost and, on Consul, crowd the 512 KB value limit
(https://developer.hashicorp.com/consul/docs/dynamic-app-config/kv). So the
file store keeps `<state path>.audit.jsonl` (one JSON record a line, appended
under flock) and the Consul store the key `<kv_prefix>/audit` (a JSON list,
CAS-written like the state).

Why a crash cannot lose a record: the record of a change is written IN the
state document that makes the change (its `audit` list), so the change and
its record are one atomic write (file rename) or one CAS (Consul), and a
write that fails stores neither. Right after, the record is copied to the
trail; a copy cut short by a crash is made by the next change of any process
before its own write replaces the document (records are appended only when
absent, so a copy made twice is kept once), and by the next start. Reads
show the trail plus the stored document's records the trail lacks. A large
record (a segments list) travels cut to its fields' sizes (`carried`), so the
document stays well under Consul's value limit; the trail gets it whole unless
a crash cut the copy short.

Who acts comes from `acting(...)`: the admin API sets the token's name, the
guard `guard`, the rollout driver `rollout`, a reload `reload`; the control
plane calls `Auditor.prepare` before and `Auditor.committed` after every
audited change.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import datetime as dt
import fcntl
import json
import logging
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp

from gateway.config import ConsulConfig, StateConfig
from gateway.errors import Unavailable
from gateway.statedoc import CHANGED
from gateway.store.doc import ServiceState, StateDoc

log = logging.getLogger("gateway.audit")

KEEP = 1000
# Records a state document carries while the trail cannot take them (e.g. the audit key
# refused for a while); past this many the oldest is dropped, logged as an error.
PENDING_MAX: Final = 100
# A record larger than this travels in the state document with `before`/`after` cut to
# the changed fields' names and sizes (the trail gets it whole unless a crash intervenes):
# a large segments list must not push the document past Consul's 512 KB value limit.
CARRY_MAX_BYTES: Final = 16 * 1024
# How much of the file trail's end is searched for a record before appending it: copies
# are made right after the write, so a record already there is among the last ones.
_TAIL_BYTES: Final = 128 * 1024
# Leave room under Consul's 512 KB value limit for the JSON list's own bytes.
_CONSUL_MAX_BYTES = 480 * 1024


@dataclass(frozen=True, slots=True)
class Acting:
    actor: str
    source: str
    action: str
    reason: str | None = None


_CURRENT: contextvars.ContextVar[Acting | None] = contextvars.ContextVar(
    "gateway_audit_acting", default=None
)


@contextlib.contextmanager
def acting(actor: str, source: str, action: str, reason: str | None = None) -> Iterator[Acting]:
    """Every change made inside the block is audited as this actor's."""
    a = Acting(actor, source, action, reason)
    token = _CURRENT.set(a)
    try:
        yield a
    finally:
        _CURRENT.reset(token)


def current() -> Acting | None:
    return _CURRENT.get()


def iso(t: float) -> str:
    """RFC 3339 UTC time with milliseconds."""
    return (
        dt.datetime.fromtimestamp(t, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def parse_time(value: str, now: float) -> float | None:
    """`--since` / `since=`: RFC 3339, epoch seconds, or a duration ago (`10m`)."""
    from gateway.config import parse_duration

    v = value.strip()
    if not v:
        return None
    try:
        epoch = float(v)
    except ValueError:
        pass
    else:
        return epoch if math.isfinite(epoch) else None  # "nan", "inf", 400 digits
    d = parse_duration(v)
    if d is not None:
        return now - d if math.isfinite(d) else None
    try:
        t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def record_time(rec: Mapping[str, Any]) -> float:
    t = rec.get("time")
    if isinstance(t, str):
        parsed = parse_time(t, 0.0)
        if parsed is not None:
            return parsed
    return 0.0


def diff(
    before: ServiceState | None, after: ServiceState | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Only the fields that changed, before and after (whole documents would drown the change).

    The service's change mark (statedoc.CHANGED) is left out: it is the record's
    own `state_version`.
    """
    b = before.to_json() if before is not None else {}
    a = after.to_json() if after is not None else {}
    keys = sorted(k for k in set(a) | set(b) if k != CHANGED and a.get(k) != b.get(k))
    if not keys:
        return ({}, {})
    return ({k: b[k] for k in keys if k in b}, {k: a[k] for k in keys if k in a})


def _canonical(record: Mapping[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


def key(record: Mapping[str, Any]) -> str:
    """A record's identity: all but `before`/`after`, which a document may carry cut."""
    return _canonical({k: v for k, v in record.items() if k not in ("before", "after")})


def carried(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """The record as a state document carries it: whole, or cut when large (CARRY_MAX_BYTES)."""
    if len(_canonical(record)) <= CARRY_MAX_BYTES:
        return record

    def cut(fields: object) -> object:
        if not isinstance(fields, Mapping):
            return fields
        return {
            k: {"omitted_bytes": len(json.dumps(v, separators=(",", ":"), sort_keys=True))}
            for k, v in fields.items()
        }

    return {**record, "before": cut(record.get("before")), "after": cut(record.get("after"))}


def _line(record: Mapping[str, Any]) -> bytes:
    return (_canonical(record) + "\n").encode()


class AuditStore(Protocol):
    async def append(self, record: dict[str, Any]) -> None: ...

    async def append_new(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append, in order, those of `records` the trail does not hold yet."""
        ...

    async def read(self) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class MemoryAudit:
    """For `state.store: memory` (demos, tests): this process only."""

    def __init__(self, *, keep: int = KEEP) -> None:
        self.records: list[dict[str, Any]] = []
        self.keep = keep

    async def append(self, record: dict[str, Any]) -> None:
        self.records = [*self.records, record][-self.keep :]

    async def append_new(self, records: Sequence[Mapping[str, Any]]) -> None:
        have = {key(r) for r in self.records}
        new = [dict(r) for r in records if key(r) not in have]
        self.records = [*self.records, *new][-self.keep :]

    async def read(self) -> list[dict[str, Any]]:
        return list(self.records)

    async def close(self) -> None:
        return None


def _parse_lines(data: bytes) -> list[dict[str, Any]]:
    out = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line after a crash: skip it, keep the rest
        if isinstance(rec, dict):
            out.append(rec)
    return out


class FileAudit:
    """JSON lines beside the state file; every worker appends under one flock."""

    def __init__(
        self, path: str | os.PathLike[str], *, max_bytes: int = 1 << 20, keep: int = KEEP
    ) -> None:
        self.keep = keep
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.max_bytes = max_bytes  # past this size the next append rewrites the last KEEP

    def __repr__(self) -> str:
        return f"FileAudit({str(self.path)!r})"

    async def append(self, record: dict[str, Any]) -> None:
        await asyncio.to_thread(self._append, [record], False)

    async def append_new(self, records: Sequence[Mapping[str, Any]]) -> None:
        await asyncio.to_thread(self._append, records, True)

    def _append(self, records: Sequence[Mapping[str, Any]], only_new: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            # Only the last byte matters to a plain append (see below).
            tail = self._tail(size, _TAIL_BYTES if only_new else 1)
            if only_new:
                start = 0 if size <= len(tail) else tail.find(b"\n") + 1  # skip a cut line
                have = {key(r) for r in _parse_lines(tail[start:])}
                records = [r for r in records if key(r) not in have]
                if not records:
                    return
            lines = b"".join(_line(r) for r in records)
            # Trim only now and then (readers take the last KEEP anyway): appends stay cheap.
            if size > self.max_bytes:
                kept = [*_parse_lines(self.path.read_bytes()), *records][-self.keep :]
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
                with os.fdopen(fd, "wb") as f:
                    f.write(b"".join(_line(r) for r in kept))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            else:
                # A line torn by a power cut has no newline: end it, or the first record
                # appended would join it and be unreadable.
                torn = b"\n" if tail and not tail.endswith(b"\n") else b""
                with open(self.path, "ab") as f:
                    f.write(torn + lines)
                    f.flush()
                    os.fsync(f.fileno())

    def _tail(self, size: int, n: int) -> bytes:
        """The trail's last `n` bytes (all of it when smaller)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, size - n))
                return f.read(n)
        except FileNotFoundError:
            return b""

    async def read(self) -> list[dict[str, Any]]:
        def _read() -> list[dict[str, Any]]:
            try:
                return _parse_lines(self.path.read_bytes())[-self.keep :]
            except FileNotFoundError:
                return []

        return await asyncio.to_thread(_read)

    async def close(self) -> None:
        return None


# Compare-and-set attempts for one audit append: every process that acts (each replica's
# guard, each admin write) appends to the same key, so a burst of changes loses races;
# each attempt re-reads and re-appends; the record is logged whether or not one succeeds.
_CONSUL_CAS_ATTEMPTS: Final = 20
# One Consul KV call. The change (its record inside) is stored before the copy and the
# answer waits for it: a hung Consul fails the copy after this long (logged), and never
# undoes the change; the next change tries the copy again before its own write.
_CONSUL_TIMEOUT_S: Final = 10.0


class ConsulAudit:
    """A JSON list under `<kv_prefix>/audit`, read-modify-write with `?cas=` like the state."""

    def __init__(self, cfg: ConsulConfig, *, retries: int = _CONSUL_CAS_ATTEMPTS) -> None:
        self.url = f"{cfg.address.rstrip('/')}/v1/kv/{cfg.kv_prefix.strip('/')}/audit"
        self.headers = {"X-Consul-Token": cfg.token} if cfg.token else {}
        self.retries = retries
        self.tls = cfg.tls  # Consul over TLS (README "TLS")
        self._session: aiohttp.ClientSession | None = None

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_CONSUL_TIMEOUT_S),
                trust_env=False,
                connector=aiohttp.TCPConnector(ssl=self.tls if self.tls is not None else True),
            )
        return self._session

    async def _get(self) -> tuple[list[dict[str, Any]], int]:
        async with self._s().get(self.url, headers=self.headers) as r:
            if r.status == 404:
                return [], 0
            if r.status != 200:
                raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
            entries: Any = await r.json()
        entry = entries[0]
        raw = base64.b64decode(entry.get("Value") or b"")
        try:
            recs = json.loads(raw) if raw else []
        except ValueError:
            log.error("audit: %s is not a JSON list; starting a new one", self.url)
            recs = []
        if not isinstance(recs, list):
            recs = []
        return [r for r in recs if isinstance(r, dict)], int(entry["ModifyIndex"])

    async def append(self, record: dict[str, Any]) -> None:
        await self._put([record], only_new=False)

    async def append_new(self, records: Sequence[Mapping[str, Any]]) -> None:
        await self._put(records, only_new=True)

    async def _put(self, records: Sequence[Mapping[str, Any]], *, only_new: bool) -> None:
        for _ in range(self.retries):
            recs, modify = await self._get()
            new = list(records)
            if only_new:
                have = {key(r) for r in recs}
                new = [r for r in new if key(r) not in have]
                if not new:
                    return
            recs = [*recs, *(dict(r) for r in new)][-KEEP:]
            body = json.dumps(recs, separators=(",", ":"), sort_keys=True).encode()
            while len(body) > _CONSUL_MAX_BYTES and len(recs) > 1:
                recs = recs[len(recs) // 10 or 1 :]
                body = json.dumps(recs, separators=(",", ":"), sort_keys=True).encode()
            async with self._s().put(
                self.url, params={"cas": str(modify)}, data=body, headers=self.headers
            ) as r:
                text = (await r.text()).strip()
                if r.status != 200:
                    raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
            if text == "true":
                return
        raise RuntimeError(f"audit: {self.url} kept changing; record not written")

    async def read(self) -> list[dict[str, Any]]:
        try:
            return (await self._get())[0]
        except (aiohttp.ClientError, TimeoutError) as e:
            raise Unavailable(f"cannot read the audit from Consul: {e}", "consul.address") from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def open_audit(state: StateConfig, consul: ConsulConfig) -> AuditStore:
    """The audit beside the configured state store."""
    if state.store == "file":
        return FileAudit(state.path + ".audit.jsonl")
    if state.store == "consul":
        return ConsulAudit(consul)
    return MemoryAudit()


class Auditor:
    """Builds records, logs each as one JSON line and appends it to the audit store.

    A change's record travels in the state document that makes the change
    (`prepare`), then is copied to the trail (`committed`); see the module docstring.
    """

    def __init__(self, store: AuditStore, wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.wall = wall
        # The records of the state document in force (the app points it at the control
        # plane's): reads show those the trail lacks, e.g. after a crash cut a copy short.
        self.pending: Callable[[], Sequence[Mapping[str, Any]]] = tuple
        self._copied: deque[str] = deque(maxlen=64)  # keys this process put in the trail
        # The last record prepared, whole (the document may carry it cut); the control
        # plane's lock makes prepare, write and committed one sequence per process.
        self._whole: dict[str, Mapping[str, Any]] = {}

    def build(
        self,
        *,
        action: str,
        service: str | None,
        before: Any,
        after: Any,
        state_version: int,
        actor: str | None = None,
        source: str | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        ctx = current()
        return {
            "time": iso(self.wall()),
            "actor": actor or (ctx.actor if ctx else "unknown"),
            "source": source or (ctx.source if ctx else "internal"),
            "action": action,
            "service": service,
            "before": before,
            "after": after,
            "reason": reason if reason is not None else (ctx.reason if ctx else None),
            "state_version": state_version,
        }

    async def record(self, **fields: Any) -> dict[str, Any]:
        """A record of something that is not a state write (a reload): logged and appended."""
        rec = self.build(**fields)
        log.info(json.dumps({"audit": rec}, separators=(",", ":"), sort_keys=True))
        try:
            await self.store.append(rec)
        except Exception:  # the reload is done; a lost record must not undo it
            log.exception("audit: could not append the record for %s", rec["action"])
        return rec

    async def prepare(
        self,
        service: str,
        before: ServiceState | None,
        after: ServiceState | None,
        cur: StateDoc,
    ) -> tuple[Mapping[str, Any], ...]:
        """The records the next document carries: `cur`'s the trail lacks, then this change's.

        Why copy `cur`'s first: the next document replaces them, and a copy cut
        short (its writer was killed) must be in the trail before that.
        """
        ctx = current()
        b, a = diff(before, after)
        rec = self.build(
            action=ctx.action if ctx else "change",
            service=service,
            before=b,
            after=a,
            state_version=cur.version + 1,
        )
        left = await self.copy(cur.audit)
        if len(left) >= PENDING_MAX:
            log.error(
                "audit: the trail took no record for %d changes; dropping the oldest: %s",
                len(left),
                key(left[0]),
            )
            left = left[-(PENDING_MAX - 1) :]
        self._whole = {key(rec): rec}
        return (*left, carried(rec))

    async def committed(self, records: Sequence[Mapping[str, Any]]) -> None:
        """The document carrying `records` is stored: log this change's, copy them all."""
        whole = [self._whole.get(key(r), r) for r in records]
        if whole:
            log.info(json.dumps({"audit": whole[-1]}, separators=(",", ":"), sort_keys=True))
        await self.copy(whole)

    async def copy(self, records: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any], ...]:
        """Put `records` in the trail unless there already; those it could not take."""
        todo = tuple(r for r in records if key(r) not in self._copied)
        if not todo:
            return ()
        try:
            await self.store.append_new(todo)
        except Exception:  # the change itself is stored, record included: it stays there
            log.exception("audit: could not copy %d record(s) to the trail", len(todo))
            return todo
        self._copied.extend(key(r) for r in todo)
        return ()

    async def query(
        self, service: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        recs = await self.store.read()
        have = {key(r) for r in recs}
        recs = [*recs, *(dict(r) for r in self.pending() if key(r) not in have)][-KEEP:]
        if service is not None:
            recs = [r for r in recs if r.get("service") == service]
        if since is not None:
            recs = [r for r in recs if record_time(r) >= since]
        return recs[-limit:] if limit > 0 else []
