"""The audit trail: who changed what, when, and why (README.md "Audit").

Why beside the state document and not inside it: the state document is
rewritten, checksummed and fsynced on every change and every process
re-reads it on every change; 1,000 records with their before/after would
multiply that cost and, on Consul, crowd the 512 KB value limit
(https://developer.hashicorp.com/consul/docs/dynamic-app-config/kv). So the
file store keeps `<state path>.audit.jsonl` (one JSON record a line, appended
under flock) and the Consul store the key `<kv_prefix>/audit` (a JSON list,
CAS-written like the state). A record is written right after the change it
describes is stored and carries the state version that change produced.

Who acts comes from `acting(...)`: the admin API sets the token's name, the
guard `guard`, the rollout driver `rollout`, a reload `reload`; the control
plane calls `Auditor.on_change` after every stored change.
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
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from gateway.config import ConsulConfig, StateConfig
from gateway.errors import Unavailable
from gateway.store.doc import ServiceState

log = logging.getLogger("gateway.audit")

KEEP = 1000
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
        return float(v)
    except ValueError:
        pass
    d = parse_duration(v)
    if d is not None:
        return now - d
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
    """Only the fields that changed, before and after (whole documents would drown the change)."""
    b = before.to_json() if before is not None else {}
    a = after.to_json() if after is not None else {}
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if not keys:
        return ({}, {})
    return ({k: b[k] for k in keys if k in b}, {k: a[k] for k in keys if k in a})


class AuditStore(Protocol):
    async def append(self, record: dict[str, Any]) -> None: ...

    async def read(self) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class MemoryAudit:
    """For `state.store: memory` (demos, tests): this process only."""

    def __init__(self, *, keep: int = KEEP) -> None:
        self.records: list[dict[str, Any]] = []
        self.keep = keep

    async def append(self, record: dict[str, Any]) -> None:
        self.records = [*self.records, record][-self.keep :]

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
        await asyncio.to_thread(self._append, record)

    def _append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
        with open(self.lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            # Trim only now and then (readers take the last KEEP anyway): appends stay cheap.
            if size > self.max_bytes:
                kept = _parse_lines(self.path.read_bytes())[-(self.keep - 1) :]
                body = b"".join(
                    (json.dumps(r, separators=(",", ":"), sort_keys=True) + "\n").encode()
                    for r in kept
                )
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
                with os.fdopen(fd, "wb") as f:
                    f.write(body + line)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            else:
                with open(self.path, "ab") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())

    async def read(self) -> list[dict[str, Any]]:
        def _read() -> list[dict[str, Any]]:
            try:
                return _parse_lines(self.path.read_bytes())[-self.keep :]
            except FileNotFoundError:
                return []

        return await asyncio.to_thread(_read)

    async def close(self) -> None:
        return None


class ConsulAudit:
    """A JSON list under `<kv_prefix>/audit`, read-modify-write with `?cas=` like the state."""

    def __init__(self, cfg: ConsulConfig, *, retries: int = 20) -> None:
        self.url = f"{cfg.address.rstrip('/')}/v1/kv/{cfg.kv_prefix.strip('/')}/audit"
        self.headers = {"X-Consul-Token": cfg.token} if cfg.token else {}
        self.retries = retries
        self.tls = cfg.tls  # Consul over TLS (README "TLS")
        self._session: aiohttp.ClientSession | None = None

    def _s(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=10),
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
        for _ in range(self.retries):
            recs, modify = await self._get()
            recs = [*recs, record][-KEEP:]
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
    """Builds records, logs each as one JSON line and appends it to the audit store."""

    def __init__(self, store: AuditStore, wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self.wall = wall

    async def record(
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
        rec = {
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
        log.info(json.dumps({"audit": rec}, separators=(",", ":"), sort_keys=True))
        try:
            await self.store.append(rec)
        except Exception:  # the change itself is stored; a lost record must not undo it
            log.exception("audit: could not append the record for %s", action)
        return rec

    async def on_change(
        self,
        service: str,
        before: ServiceState | None,
        after: ServiceState | None,
        state_version: int,
    ) -> None:
        """The control plane's hook, called after each stored change."""
        ctx = current()
        b, a = diff(before, after)
        await self.record(
            action=ctx.action if ctx else "change",
            service=service,
            before=b,
            after=a,
            state_version=state_version,
        )

    async def query(
        self, service: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        recs = await self.store.read()
        if service is not None:
            recs = [r for r in recs if r.get("service") == service]
        if since is not None:
            recs = [r for r in recs if record_time(r) >= since]
        return recs[-limit:] if limit > 0 else []
