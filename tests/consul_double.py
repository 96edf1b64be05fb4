"""A Consul agent double: the HTTP API subset the gateway uses, faithful to Consul's docs.

Why a double: no Consul binary can be installed on the build machines, so
the discovery client is tested against this aiohttp app on 127.0.0.1. Every rule
it implements is one of Consul's HTTP API (website/content/api-docs: health.mdx,
kv.mdx, features/blocking.mdx, agent/service.mdx) and is pinned by
tests/test_consul_double.py,
which also runs against a real agent when GATEWAY_TEST_REAL_CONSUL=1 asks for it.

Deliberate limits (each answers 404/500 rather than pretending): one node runs the
agent (more can be added with `add_node`), no streaming backend, no ?near sorting,
no ?cached hits, only TTL checks change status (HTTP/TCP checks keep their initial
status), sessions are not validated, `filter` supports ==, !=, in, not in,
is (not) empty, and/or/not and parentheses over Service.*/Node.* scalar fields,
Service.Tags and the Meta maps — anything else is the 500 a parse error gives.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import ssl
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from multidict import CIMultiDict, MultiDictProxy

KIB = 1024
STATUSES = ("passing", "warning", "critical")
ALL = ("",)  # an ACL rule list granting every prefix


# --------------------------------------------------------------------------- Go parsing rules


class GoParseError(ValueError):
    pass


_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_go_duration(text: str) -> float:
    """Go `time.ParseDuration` in seconds: '10s', '1m30s', '500ms', '-1s', '0'; '10' is an error."""
    s = text
    neg = False
    if s[:1] in ("+", "-"):
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise GoParseError(f"time: invalid duration {text!r}")
    total = 0.0
    while s:
        m = re.match(r"([0-9]*)(?:\.([0-9]*))?", s)
        assert m is not None
        whole, frac = m.group(1), m.group(2)
        if not whole and not frac:  # neither digits before nor after the '.'
            raise GoParseError(f"time: invalid duration {text!r}")
        s = s[m.end() :]
        u = re.match(r"[^0-9.]*", s)
        assert u is not None
        unit = u.group(0)
        s = s[u.end() :]
        if not unit:
            raise GoParseError(f"time: missing unit in duration {text!r}")
        if unit not in _GO_UNITS:
            raise GoParseError(f"time: unknown unit {unit!r} in duration {text!r}")
        total += float(f"{whole or 0}.{frac or 0}") * _GO_UNITS[unit]
    return -total if neg else total


def parse_go_uint(text: str) -> int:
    """Go `strconv.ParseUint(s, 10, 64)`: decimal digits only, no sign, no underscores."""
    if not re.fullmatch(r"[0-9]+", text):
        raise GoParseError(f'strconv.ParseUint: parsing "{text}": invalid syntax')
    v = int(text)
    if v >= 1 << 64:
        raise GoParseError(f'strconv.ParseUint: parsing "{text}": value out of range')
    return v


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_go_bool(text: str) -> bool:
    """Go `strconv.ParseBool`."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise GoParseError(f'strconv.ParseBool: parsing "{text}": invalid syntax')


def rpc_query_timeout(
    wait: float | None, max_query_time: float, default_query_time: float
) -> float:
    """`RPCQueryTimeout` before jitter: capped at max, default when absent or <= 0 (§2)."""
    if wait is None or wait <= 0:
        return default_query_time
    return min(wait, max_query_time)


def filter_non_passing(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`filterNonPassing`: drop entries with any non-passing check by swapping with the last."""
    out = list(entries)
    n = len(out)
    i = 0
    while i < n:
        if any(c.get("Status") != "passing" for c in out[i]["Checks"]):
            out[i], out[n - 1] = out[n - 1], out[i]
            n -= 1
            continue
        i += 1
    return out[:n]


# --------------------------------------------------------------------------- filter (bexpr subset)


class FilterError(ValueError):
    pass


_TOKEN_RE = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)|(?P<op>==|!=|\(|\))|(?P<word>[A-Za-z0-9_.\-/:]+))'
)


def _tokenize(expr: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN_RE.match(expr, pos)
        if m is None:
            raise FilterError(
                f"Failed to create boolean expression evaluator: 1:{pos + 1} ({pos}): "
                "no match found, expected: ..."
            )
        kind = m.lastgroup or ""
        text = m.group(kind)
        if kind == "str":
            text = json.loads(text) if text.startswith('"') else text[1:-1]
        out.append((kind, text))
        pos = m.end()
    return out


Predicate = Callable[[dict[str, Any]], bool]


def _select(entry: dict[str, Any], selector: str) -> Any:
    parts = selector.split(".")
    if parts[0] not in ("Service", "Node") or len(parts) < 2:
        raise FilterError(f'Selector "{selector}" is not valid')
    cur: Any = entry[parts[0]]
    if parts[1] == "Meta" and len(parts) in (2, 3):
        meta = cur.get("Meta") or {}
        return meta if len(parts) == 2 else meta.get(parts[2])
    if parts[1] == "Weights" and len(parts) == 3 and parts[2] in ("Passing", "Warning"):
        return (cur.get("Weights") or {}).get(parts[2])
    if len(parts) != 2 or parts[1] not in cur or isinstance(cur[parts[1]], dict):
        raise FilterError(f'Selector "{selector}" is not valid')
    return cur[parts[1]]


def compile_filter(expr: str) -> Predicate:
    """A tiny recursive-descent parser for the bexpr subset named in the module docstring."""
    toks = _tokenize(expr)
    pos = 0

    def peek(k: int = 0) -> tuple[str, str] | None:
        return toks[pos + k] if pos + k < len(toks) else None

    def take() -> tuple[str, str]:
        nonlocal pos
        if pos >= len(toks):
            raise FilterError("Failed to create boolean expression evaluator: unexpected end")
        pos += 1
        return toks[pos - 1]

    def value() -> str:
        kind, text = take()
        if kind == "op":
            raise FilterError(f"Failed to create boolean expression evaluator: unexpected {text}")
        return text

    def check_selector(sel: str) -> None:
        _select(_SAMPLE, sel)  # raises for selectors the double does not know

    def match() -> Predicate:
        first = peek()
        if first is None:
            raise FilterError("Failed to create boolean expression evaluator: empty expression")
        if first == ("word", "not"):
            take()
            inner = match()
            return lambda e: not inner(e)
        if first == ("op", "("):
            take()
            inner = or_expr()
            if take() != ("op", ")"):
                raise FilterError("Failed to create boolean expression evaluator: missing )")
            return inner
        nxt = peek(1)
        if nxt is not None and nxt[1] in ("in", "not"):  # "v" in Sel / "v" not in Sel
            v = value()
            negate = take()[1] == "not"
            if negate and take() != ("word", "in"):
                raise FilterError("Failed to create boolean expression evaluator: expected in")
            sel = value()
            check_selector(sel)

            def contains(e: dict[str, Any], v: str = v, sel: str = sel, neg: bool = negate) -> bool:
                got = _select(e, sel)
                hit = v in got if isinstance(got, list | dict | str) else False
                return hit != neg

            return contains
        sel = value()
        check_selector(sel)
        kind, op = take()
        if op in ("==", "!="):
            v = value()
            ne = op == "!="
            return lambda e, sel=sel, v=v, ne=ne: _eq_plain(e, sel, v) != ne
        if op == "is":
            negate = peek() == ("word", "not")
            if negate:
                take()
            if take() != ("word", "empty"):
                raise FilterError("Failed to create boolean expression evaluator: expected empty")

            def empty(e: dict[str, Any], sel: str = sel, neg: bool = negate) -> bool:
                got = _select(e, sel)
                return (not got) != neg

            return empty
        raise FilterError(f"Failed to create boolean expression evaluator: unexpected {op}")

    def and_expr() -> Predicate:
        left = match()
        while peek() == ("word", "and"):
            take()
            right = match()
            left = (lambda a, b: lambda e: a(e) and b(e))(left, right)
        return left

    def or_expr() -> Predicate:
        left = and_expr()
        while peek() == ("word", "or"):
            take()
            right = and_expr()
            left = (lambda a, b: lambda e: a(e) or b(e))(left, right)
        return left

    pred = or_expr()
    if pos != len(toks):
        raise FilterError(
            f"Failed to create boolean expression evaluator: unexpected {toks[pos][1]}"
        )
    return pred


def _eq_plain(e: dict[str, Any], sel: str, v: str) -> bool:
    got = _select(e, sel)
    return (str(got).lower() if isinstance(got, bool) else str(got)) == v


_SAMPLE: dict[str, Any] = {
    "Node": {"ID": "", "Node": "", "Address": "", "Datacenter": "", "Meta": {}},
    "Service": {
        "ID": "",
        "Service": "",
        "Tags": [],
        "Address": "",
        "Port": 0,
        "Meta": {},
        "Weights": {},
        "EnableTagOverride": False,
        "PeerName": "",
    },
}


# --------------------------------------------------------------------------- ACLs


@dataclass(frozen=True)
class AclToken:
    """Prefix rules per resource; `ALL` grants every name, `()` none."""

    secret: str
    service_read: tuple[str, ...] = ()
    node_read: tuple[str, ...] = ()
    key_read: tuple[str, ...] = ()
    key_write: tuple[str, ...] = ()
    service_write: tuple[str, ...] = ()
    accessor: str = field(default_factory=lambda: str(uuid.uuid4()))
    anonymous: bool = False

    def allows(self, kind: str, name: str) -> bool:
        rules: tuple[str, ...] = getattr(self, kind.replace(":", "_"))
        return any(name.startswith(p) for p in rules)


def management_token(secret: str) -> AclToken:
    return AclToken(secret, ALL, ALL, ALL, ALL, ALL)


def read_only_token(secret: str) -> AclToken:
    return AclToken(secret, service_read=ALL, node_read=ALL, key_read=ALL)


class _HttpError(Exception):
    def __init__(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = dict(headers or {})


def _denied(tok: AclToken, perm: str, name: str) -> _HttpError:
    return _HttpError(
        403,
        f"Permission denied: token with AccessorID '{tok.accessor}' lacks permission "
        f"'{perm}' on \"{name}\"",
    )


# --------------------------------------------------------------------------- state


@dataclass
class _Node:
    name: str
    address: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    meta: dict[str, str] = field(default_factory=lambda: {"consul-network-segment": ""})
    create_index: int = 0
    modify_index: int = 0


@dataclass
class _Service:
    id: str
    name: str
    node: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str] | None
    weights: dict[str, int]
    enable_tag_override: bool
    create_index: int = 0
    modify_index: int = 0


@dataclass
class _Check:
    id: str
    node: str
    name: str
    status: str
    service_id: str = ""
    service_name: str = ""
    notes: str = ""
    output: str = ""
    type: str = ""
    ttl: float | None = None
    create_index: int = 0
    modify_index: int = 0


@dataclass
class _KV:
    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str | None = None


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: MultiDictProxy[str]
    headers: CIMultiDict[str]
    timeout: float | None = None  # server-side blocking timeout, jitter included


def _norm_keys(obj: Any) -> Any:
    """Agent decode: keys match case-insensitively, snake_case allowed (mapstructure)."""
    if isinstance(obj, dict):
        return {str(k).replace("_", "").replace("-", "").lower(): v for k, v in obj.items()}
    return obj


class ConsulDouble:
    """The fake agent: state, HTTP app and test hooks; see the module docstring for limits."""

    def __init__(
        self,
        *,
        datacenter: str = "dc1",
        node: str = "node-1",
        node_address: str = "127.0.0.1",
        acl_tokens: Iterable[AclToken] | None = None,
        default_policy: str = "allow",
        max_query_time: float = 600.0,
        default_query_time: float = 300.0,
        kv_max_value_size: int = 512 * KIB,
        jitter: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.datacenter = datacenter
        self.agent_node = node
        self.max_query_time = max_query_time
        self.default_query_time = default_query_time
        self.kv_max_value_size = kv_max_value_size
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.leader = "127.0.0.1:8300"
        self.acl_enabled = acl_tokens is not None
        self.default_policy = default_policy
        self.tokens = {t.secret: t for t in acl_tokens or ()}
        self.anonymous = (
            AclToken("anonymous", ALL, ALL, ALL, ALL, ALL, anonymous=True)
            if default_policy == "allow"
            else AclToken("anonymous", anonymous=True)
        )
        self.requests: list[RecordedRequest] = []
        self._raft = 10  # a fresh cluster has a few bootstrap entries
        self._extinction = 0
        self._service_index: dict[str, int] = {}
        self._kv_index = 0
        self.nodes: dict[str, _Node] = {}
        self.services: dict[str, _Service] = {}
        self.checks: dict[str, _Check] = {}
        self.kv: dict[str, _KV] = {}
        self.tombstones: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._seen = asyncio.Event()
        self._abandon_gen = 0
        self._ttl_timers: dict[str, asyncio.TimerHandle] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.ssl_context: ssl.SSLContext | None = None  # set before start(): served over HTTPS
        self.add_node(node, node_address)
        self._add_check(_Check("serfHealth", node, "Serf Health Status", "passing"))
        self._commit(node_level=node)

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def node_address(self) -> str:
        return self.nodes[self.agent_node].address

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * KIB)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation: a killed agent drops in-flight blocking queries at once.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await runner.setup()
        site = web.TCPSite(
            runner, "127.0.0.1", self.port, reuse_address=True, ssl_context=self.ssl_context
        )
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        self._runner = runner

    async def kill(self) -> None:
        """Stop listening and drop every connection: clients see resets, then refused."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if runner.server is not None:
            for conn in list(runner.server.connections):
                if conn.transport is not None:
                    conn.transport.abort()
        await runner.cleanup()

    async def revive(self) -> None:
        """Listen again on the same port with the same state (an agent restart)."""
        if self._runner is None:
            await self.start()

    async def close(self) -> None:
        for h in self._ttl_timers.values():
            h.cancel()
        self._ttl_timers.clear()
        await self.kill()

    async def __aenter__(self) -> ConsulDouble:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ test hooks
    def set_jitter(self, on: bool) -> None:
        self.jitter = on

    def set_leader(self, leader: str | None) -> None:
        """None: the cluster has no leader (reads fail with 500, ?stale still works)."""
        self.leader = leader or ""

    def add_node(self, name: str, address: str) -> None:
        idx = self._next()
        self.nodes[name] = _Node(name, address, create_index=idx, modify_index=idx)

    def set_node_check(self, status: str, *, node: str | None = None) -> None:
        """Set the node-level serfHealth check (drops every instance on it from ?passing)."""
        self._update_check("serfHealth" if node is None else f"serfHealth:{node}", status, "")

    def deregister(self, service_id: str) -> None:
        self._deregister(service_id)

    def register(self, body: Mapping[str, Any], *, node: str | None = None) -> None:
        """Register as `PUT /v1/agent/service/register` does, optionally on another node."""
        self._register(dict(body), node or self.agent_node, replace_checks=False)

    def restore_snapshot_resetting_indexes(self) -> None:
        """A snapshot restore: same data, every index back to 1, blocked queries return at once."""
        for n in self.nodes.values():
            n.create_index = n.modify_index = 1
        for s in self.services.values():
            s.create_index = s.modify_index = 1
        for c in self.checks.values():
            c.create_index = c.modify_index = 1
        for e in self.kv.values():
            e.create_index = e.modify_index = 1
        self.tombstones.clear()
        self._raft = 1
        self._extinction = 0
        self._kv_index = 1 if self.kv else 0
        self._service_index = {s.name: 1 for s in self.services.values()}
        self._abandon_gen += 1
        self._wake()

    def reap_tombstones(self) -> None:
        self.tombstones.clear()

    async def wait_for_request(
        self, pred: Callable[[RecordedRequest], bool], *, within: float = 10.0, start: int = 0
    ) -> RecordedRequest:
        """The first recorded request from `start` on matching `pred`, waiting up to `within` s."""
        async with asyncio.timeout(within):
            while True:
                for r in self.requests[start:]:
                    if pred(r):
                        return r
                ev = self._seen
                await ev.wait()

    # ------------------------------------------------------------------ index bookkeeping
    def _next(self) -> int:
        self._raft += 1
        return self._raft

    def _wake(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def _commit(self, *, services: Iterable[str] = (), node_level: str | None = None) -> int:
        """Bump the service indexes touched by one raft apply and wake blocked queries."""
        idx = self._raft
        names = set(services)
        if node_level is not None:
            names |= {s.name for s in self.services.values() if s.node == node_level}
        for name in names:
            if any(s.name == name for s in self.services.values()):
                self._service_index[name] = idx
            else:  # the last instance went away: its index entry is gone too
                self._service_index.pop(name, None)
        self._wake()
        return idx

    def _add_check(self, c: _Check) -> None:
        idx = self._next()
        old = self.checks.get(c.id)
        c.create_index = old.create_index if old else idx
        c.modify_index = idx
        self.checks[c.id] = c

    # ------------------------------------------------------------------ agent operations
    def _register(self, raw: dict[str, Any], node: str, *, replace_checks: bool) -> None:
        b = _norm_keys(raw)
        name = b.get("name")
        if not isinstance(name, str) or not name:
            raise _HttpError(400, "Missing service name")
        sid = b.get("id") or name
        port = b.get("port") or 0
        if not isinstance(port, int) or isinstance(port, bool):
            raise _HttpError(400, "Request decode failed: Port must be an integer")
        weights = _norm_keys(b.get("weights") or {})
        w = {"Passing": int(weights.get("passing", 1)), "Warning": int(weights.get("warning", 1))}
        if w["Passing"] < 1:
            raise _HttpError(400, "Passing must be greater than 0")
        tags = [str(t) for t in (b.get("tags") or [])]
        old = self.services.get(sid)
        if old is not None and old.name != name:
            self._deregister(sid)
            old = None
        idx = self._next()
        self.services[sid] = _Service(
            id=sid,
            name=name,
            node=node,
            tags=tags,
            address=str(b.get("address") or ""),
            port=port,
            meta=dict(b["meta"]) if b.get("meta") else None,
            weights=w,
            enable_tag_override=bool(b.get("enabletagoverride", False)),
            create_index=old.create_index if old else idx,
            modify_index=idx,
        )
        defs: list[dict[str, Any]] = []
        if b.get("check"):
            defs.append(_norm_keys(b["check"]))
        defs.extend(_norm_keys(c) for c in b.get("checks") or [])
        new_ids = set()
        for i, cd in enumerate(defs):
            cid = cd.get("checkid") or cd.get("id") or f"service:{sid}"
            if not (cd.get("checkid") or cd.get("id")) and len(defs) > 1:
                cid = f"service:{sid}:{i + 1}"
            status = cd.get("status") or "critical"
            if status not in STATUSES:
                raise _HttpError(400, "Status for checks must 'passing', 'warning', 'critical'")
            ttl = parse_go_duration(cd["ttl"]) if cd.get("ttl") else None
            typ = "ttl" if ttl else ("http" if cd.get("http") else ("tcp" if cd.get("tcp") else ""))
            self._add_check(
                _Check(
                    cid,
                    node,
                    str(cd.get("name") or f"Service '{name}' check"),
                    status,
                    service_id=sid,
                    service_name=name,
                    notes=str(cd.get("notes") or ""),
                    type=typ,
                    ttl=ttl,
                )
            )
            new_ids.add(cid)
            self._arm_ttl(cid)
        if replace_checks:
            for cid in [c.id for c in self.checks.values() if c.service_id == sid]:
                if cid not in new_ids:
                    self._drop_check(cid)
        self._commit(services=[name])

    def _drop_check(self, cid: str) -> None:
        self.checks.pop(cid, None)
        h = self._ttl_timers.pop(cid, None)
        if h is not None:
            h.cancel()

    def _deregister(self, sid: str) -> None:
        svc = self.services.pop(sid, None)
        if svc is None:
            return  # deregistering an unknown service is a no-op (§5)
        for cid in [c.id for c in self.checks.values() if c.service_id == sid]:
            self._drop_check(cid)
        # health.mdx: an unknown service's X-Consul-Index is the last time any service went away
        self._extinction = self._next()
        self._commit(services=[svc.name])

    def _update_check(self, cid: str, status: str, output: str) -> None:
        c = self.checks.get(cid)
        if c is None:
            raise _HttpError(404, f'Unknown check ID "{cid}". Ensure that the check ID is passed')
        if status not in STATUSES:
            raise _HttpError(400, f"Invalid check status: {status!r}")
        if c.status == status and c.output == output:
            return  # the agent only syncs real changes, so no index bump
        c.status, c.output = status, output[: 4 * KIB]
        c.modify_index = self._next()
        if c.service_id:
            self._commit(services=[c.service_name])
        else:
            self._commit(node_level=c.node)

    def _arm_ttl(self, cid: str) -> None:
        c = self.checks.get(cid)
        old = self._ttl_timers.pop(cid, None)
        if old is not None:
            old.cancel()
        if c is None or c.ttl is None:
            return
        loop = asyncio.get_running_loop()

        def expire() -> None:
            self._ttl_timers.pop(cid, None)
            with contextlib.suppress(_HttpError):
                self._update_check(cid, "critical", f"TTL expired: {c.output}")

        self._ttl_timers[cid] = loop.call_later(c.ttl, expire)

    def _maintenance(
        self, cid: str, enable: bool, reason: str, *, service: _Service | None
    ) -> None:
        if enable:
            if cid in self.checks:
                return
            self._add_check(
                _Check(
                    cid,
                    self.agent_node if service is None else service.node,
                    "Service Maintenance Mode" if service else "Node Maintenance Mode",
                    "critical",
                    service_id=service.id if service else "",
                    service_name=service.name if service else "",
                    notes=reason or "Maintenance mode is enabled for this node",
                    type="maintenance",
                )
            )
        else:
            if cid not in self.checks:
                return
            self._drop_check(cid)
            self._next()
        if service is not None:
            self._commit(services=[service.name])
        else:
            self._commit(node_level=self.agent_node)

    # ------------------------------------------------------------------ reads
    def _entry(self, s: _Service) -> dict[str, Any]:
        n = self.nodes[s.node]
        checks = sorted(
            (c for c in self.checks.values() if c.node == s.node and c.service_id in ("", s.id)),
            key=lambda c: c.id,
        )
        svc_tagged = (
            {
                "lan_ipv4": {"Address": s.address, "Port": s.port},
                "wan_ipv4": {"Address": s.address, "Port": s.port},
            }
            if s.address
            else None
        )
        service: dict[str, Any] = {
            "ID": s.id,
            "Service": s.name,
            "Tags": list(s.tags),
            "Address": s.address,
            "Meta": dict(s.meta) if s.meta is not None else None,
            "Port": s.port,
            "Weights": dict(s.weights),
            "EnableTagOverride": s.enable_tag_override,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "PeerName": "",
            "CreateIndex": s.create_index,
            "ModifyIndex": s.modify_index,
        }
        if svc_tagged is not None:
            service["TaggedAddresses"] = svc_tagged
        return {
            "Node": {
                "ID": n.id,
                "Node": n.name,
                "Address": n.address,
                "Datacenter": self.datacenter,
                "TaggedAddresses": {
                    "lan": n.address,
                    "lan_ipv4": n.address,
                    "wan": n.address,
                    "wan_ipv4": n.address,
                },
                "Meta": dict(n.meta),
                "CreateIndex": n.create_index,
                "ModifyIndex": n.modify_index,
            },
            "Service": service,
            "Checks": [
                {
                    "Node": c.node,
                    "CheckID": c.id,
                    "Name": c.name,
                    "Status": c.status,
                    "Notes": c.notes,
                    "Output": c.output,
                    "ServiceID": c.service_id,
                    "ServiceName": c.service_name,
                    "ServiceTags": list(s.tags) if c.service_id else [],
                    "Type": c.type,
                    "Interval": "",
                    "Timeout": "",
                    "ExposedPort": 0,
                    "Definition": {},
                    "CreateIndex": c.create_index,
                    "ModifyIndex": c.modify_index,
                }
                for c in checks
            ],
        }

    def _health_rpc(
        self,
        name: str,
        tags: list[str],
        node_meta: list[tuple[str, str]],
        pred: Predicate | None,
        tok: AclToken,
    ) -> tuple[int, list[dict[str, Any]], bool]:
        idx = self._service_index.get(name, self._extinction)
        wanted = [t.lower() for t in tags]
        rows = []
        filtered = False
        for s in sorted(self.services.values(), key=lambda s: (s.node, s.id)):
            if s.name != name:
                continue
            have = {t.lower() for t in s.tags}
            if not all(t in have for t in wanted):  # serviceTagFilter: AND, EqualFold
                continue
            n = self.nodes[s.node]
            if any(n.meta.get(k) != v for k, v in node_meta):
                continue
            if not (tok.allows("service:read", s.name) and tok.allows("node:read", s.node)):
                filtered = True
                continue
            e = self._entry(s)
            if pred is not None and not pred(e):
                continue
            rows.append(e)
        return max(idx, 1), rows, filtered and not tok.anonymous

    def _kv_max(self) -> int:
        return max(self._kv_index, 1)

    def _kv_json(self, e: _KV) -> dict[str, Any]:
        d: dict[str, Any] = {
            "LockIndex": e.lock_index,
            "Key": e.key,
            "Flags": e.flags,
            "Value": base64.b64encode(e.value).decode() if e.value is not None else None,
            "CreateIndex": e.create_index,
            "ModifyIndex": e.modify_index,
        }
        if e.session:
            d["Session"] = e.session
        return d

    def _kv_list_index(self, prefix: str) -> int:
        if prefix == "":
            return self._kv_max()
        idx = max(
            [e.modify_index for k, e in self.kv.items() if k.startswith(prefix)]
            + [i for k, i in self.tombstones.items() if k.startswith(prefix)]
            + [0]
        )
        return idx or self._kv_max()

    # ------------------------------------------------------------------ HTTP plumbing
    def _token(self, request: web.Request) -> AclToken:
        """`parseTokenInternal`: ?token=, then X-Consul-Token, then Authorization: Bearer."""
        secret = request.query.get("token", "")
        if not secret:
            secret = request.headers.get("X-Consul-Token", "")
        if not secret:
            auth = request.headers.get("Authorization", "").split()
            if len(auth) >= 2 and auth[0].lower() == "bearer":
                secret = auth[1]
        if not self.acl_enabled or not secret:
            return self.anonymous if self.acl_enabled else management_token("")
        tok = self.tokens.get(secret)
        if tok is None:
            raise _HttpError(403, "ACL not found")
        return tok

    def _base_headers(self) -> dict[str, str]:
        return {"X-Consul-Default-ACL-Policy": self.default_policy if self.acl_enabled else "allow"}

    def _meta_headers(self, index: int, consistency: str | None) -> dict[str, str]:
        h = {
            "X-Consul-Index": str(max(index, 1)),  # setIndex rewrites 0 to 1
            "X-Consul-KnownLeader": "true" if self.leader else "false",
            "X-Consul-LastContact": "0",
            "X-Consul-Query-Backend": "blocking-query",
        }
        if consistency:
            h["X-Consul-Effective-Consistency"] = consistency
        return h

    @staticmethod
    def _consistency(q: MultiDictProxy[str]) -> str:
        stale, consistent = "stale" in q, "consistent" in q
        if stale and consistent:
            raise _HttpError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        return "stale" if stale else ("consistent" if consistent else "leader")

    @staticmethod
    def _wait_index(q: MultiDictProxy[str]) -> tuple[float | None, int]:
        """`parseWait`: wait first (Go duration), then index (ParseUint); 400 on either."""
        wait = None
        if q.get("wait", ""):
            try:
                wait = parse_go_duration(q["wait"])
            except GoParseError:
                raise _HttpError(400, "Invalid wait time") from None
        index = 0
        if q.get("index", ""):
            try:
                index = parse_go_uint(q["index"])
            except GoParseError:
                raise _HttpError(400, "Invalid index") from None
        return wait, index

    def _rpc_checks(self, q: MultiDictProxy[str], consistency: str) -> None:
        dc = q.get("dc", "")
        if dc and dc != self.datacenter:
            raise _HttpError(500, "No path to datacenter")
        if not self.leader and consistency != "stale":
            raise _HttpError(500, "No cluster leader")

    async def _blocking(
        self,
        rec: RecordedRequest,
        min_index: int,
        wait: float | None,
        run: Callable[[], tuple[int, Any]],
    ) -> tuple[int, Any]:
        """`blockingquery.Query`: return once the result index passes `min_index` or time is up."""
        if min_index == 0:
            return run()
        timeout = rpc_query_timeout(wait, self.max_query_time, self.default_query_time)
        if self.jitter:
            timeout += self.rng.uniform(0, timeout / 16)
        rec.timeout = timeout
        self._seen.set()
        self._seen = asyncio.Event()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        gen = self._abandon_gen
        while True:
            ev = self._changed
            idx, result = run()
            if idx > min_index or self._abandon_gen != gen:
                return idx, result
            left = deadline - loop.time()
            if left <= 0:
                return idx, result
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await ev.wait()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        rec = RecordedRequest(
            request.method, request.path, request.query, CIMultiDict(request.headers)
        )
        self.requests.append(rec)
        self._seen.set()
        self._seen = asyncio.Event()
        base = self._base_headers()
        try:
            resp = await self._route(request, rec)
        except _HttpError as e:
            # The catch-all 404 is not a wrapped endpoint, so it lacks the ACL policy header.
            unwrapped = e.status == 404 and e.text.startswith("Invalid URL path")
            headers = {**({} if unwrapped else base), **e.headers}
            return web.Response(status=e.status, text=e.text, headers=headers)
        for k, v in base.items():
            resp.headers.setdefault(k, v)
        return resp

    _ROUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("/v1/health/service/", ("GET",)),
        ("/v1/kv/", ("GET", "PUT", "DELETE")),
        ("/v1/agent/service/register", ("PUT",)),
        ("/v1/agent/service/deregister/", ("PUT",)),
        ("/v1/agent/service/maintenance/", ("PUT",)),
        ("/v1/agent/maintenance", ("PUT",)),
        ("/v1/agent/check/pass/", ("PUT",)),
        ("/v1/agent/check/warn/", ("PUT",)),
        ("/v1/agent/check/fail/", ("PUT",)),
        ("/v1/agent/check/update/", ("PUT",)),
        ("/v1/status/leader", ("GET",)),
    )

    async def _route(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        path = request.path
        found = next(
            (
                (p, m)
                for p, m in self._ROUTES
                if (path.startswith(p) if p.endswith("/") else path == p)
            ),
            None,
        )
        if found is None:
            raise _HttpError(404, "Invalid URL path: not a recognized HTTP API endpoint")
        prefix, methods = found
        allow = ",".join(("OPTIONS", *methods))
        if request.method == "OPTIONS":
            return web.Response(status=200, headers={"Allow": allow})
        if request.method not in methods:
            raise _HttpError(405, f"method {request.method} not allowed", {"Allow": allow})
        rest = path[len(prefix) :]
        if prefix == "/v1/health/service/":
            return await self._health_service(request, rec, rest)
        if prefix == "/v1/kv/":
            if request.method == "GET":
                return await self._kv_get(request, rec, rest)
            if request.method == "PUT":
                return await self._kv_put(request, rest)
            return self._kv_delete(request, rest)
        if prefix == "/v1/status/leader":
            return self._json(request, self.leader)
        return await self._agent(request, prefix, rest)

    @staticmethod
    def _json(
        request: web.Request, body: Any, headers: Mapping[str, str] | None = None, status: int = 200
    ) -> web.Response:
        pretty = "pretty" in request.query
        text = json.dumps(
            body, indent=4 if pretty else None, separators=None if pretty else (",", ":")
        )
        return web.Response(
            status=status, text=text, content_type="application/json", headers=headers
        )

    # ------------------------------------------------------------------ handlers
    async def _health_service(
        self, request: web.Request, rec: RecordedRequest, name: str
    ) -> web.StreamResponse:
        q = request.query
        consistency = self._consistency(q)
        wait, min_index = self._wait_index(q)
        if not name:
            raise _HttpError(400, "Missing service name")
        tok = self._token(request)
        self._rpc_checks(q, consistency)
        pred = None
        if q.get("filter"):
            try:
                pred = compile_filter(q["filter"])
            except FilterError as e:
                raise _HttpError(500, str(e)) from None
        node_meta = [tuple(v.split(":", 1)) for v in q.getall("node-meta", []) if ":" in v]
        tags = q.getall("tag", [])

        def run() -> tuple[int, Any]:
            idx, rows, filtered = self._health_rpc(name, tags, node_meta, pred, tok)  # type: ignore[arg-type]
            return idx, (rows, filtered)

        idx, (rows, filtered) = await self._blocking(rec, min_index, wait, run)
        headers = self._meta_headers(idx, consistency)
        if filtered:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        if "cached" in q:
            headers["X-Cache"] = "MISS"
        # ?passing is parsed after the RPC (healthServiceNodes' FIXME), so a bad value
        # still blocks first and its 400 carries the metadata headers.
        if "passing" in q:
            raw = q.get("passing", "")
            try:
                passing = True if raw == "" else parse_go_bool(raw)
            except GoParseError:
                raise _HttpError(400, "Invalid value for ?passing", headers) from None
            if passing:
                rows = filter_non_passing(rows)
        return self._json(request, rows, headers)

    async def _kv_get(
        self, request: web.Request, rec: RecordedRequest, key: str
    ) -> web.StreamResponse:
        q = request.query
        consistency = self._consistency(q)
        wait, min_index = self._wait_index(q)
        keys_mode, recurse = "keys" in q, "recurse" in q
        if not key and not (keys_mode or recurse):
            raise _HttpError(400, "Missing key name")
        tok = self._token(request)
        self._rpc_checks(q, consistency)
        if not (keys_mode or recurse) and not tok.allows("key:read", key):
            raise _denied(tok, "key:read", key)
        sep = q.get("separator", q.get("seperator", ""))

        def run() -> tuple[int, Any]:
            if keys_mode or recurse:
                idx = self._kv_list_index(key)
                entries = [e for k, e in sorted(self.kv.items()) if k.startswith(key)]
                visible = [e for e in entries if tok.allows("key:read", e.key)]
                return idx, (visible, len(visible) != len(entries) and not tok.anonymous)
            e = self.kv.get(key)
            return (e.modify_index if e else self._kv_max()), ([e] if e else [], False)

        idx, (entries, filtered) = await self._blocking(rec, min_index, wait, run)
        headers = self._meta_headers(idx, None)
        if filtered:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        if keys_mode:
            out: list[str] = []
            for e in entries:
                k = e.key
                if sep:
                    cut = k.find(sep, len(key))
                    if cut >= 0:
                        k = k[: cut + len(sep)]
                if not out or out[-1] != k:
                    out.append(k)
            if not out and key != "":
                return web.Response(status=404, headers=headers)
            return self._json(request, out, headers)
        if not entries:
            return web.Response(status=404, headers=headers)  # setMeta ran first (§4)
        if "raw" in q and not recurse:
            headers.update(
                {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
            )
            resp = web.Response(status=200, body=entries[0].value or b"", headers=headers)
            resp.content_type = "text/plain"
            return resp
        return self._json(request, [self._kv_json(e) for e in entries], headers)

    @staticmethod
    def _conflicting(q: MultiDictProxy[str], *flags: str) -> None:
        if sum(1 for f in flags if f in q) > 1:
            raise _HttpError(400, f"Conflicting flags: {urlencode(list(q.items()))}")

    async def _kv_put(self, request: web.Request, key: str) -> web.StreamResponse:
        q = request.query
        if not key:
            raise _HttpError(400, "Missing key name")
        self._conflicting(q, "cas", "acquire", "release")
        tok = self._token(request)
        try:
            flags = parse_go_uint(q["flags"]) if "flags" in q else 0
            cas = parse_go_uint(q["cas"]) if "cas" in q else None
        except GoParseError as e:
            raise _HttpError(500, str(e)) from None
        body = await request.read()
        if len(body) > self.kv_max_value_size:
            raise _HttpError(
                413,
                f"Request body({len(body)} bytes) too large, max size: "
                f"{self.kv_max_value_size} bytes. See "
                "https://developer.hashicorp.com/consul/docs/agent/config/config-files"
                "#kv_max_value_size.",
            )
        if not tok.allows("key:write", key):
            raise _denied(tok, "key:write", key)
        self._rpc_checks(q, "leader")
        old = self.kv.get(key)
        if cas is not None:  # kvsSetCASTxn
            if (cas == 0 and old is not None) or (
                cas != 0 and (old is None or old.modify_index != cas)
            ):
                return self._json(request, False)
        session = q.get("acquire") if "acquire" in q else None
        if "acquire" in q and old is not None and old.session and old.session != session:
            return self._json(request, False)
        if "release" in q and (old is None or old.session != q.get("release")):
            return self._json(request, False)
        idx = self._next()
        entry = _KV(key, body or None, flags, old.create_index if old else idx, idx)
        if old is not None:
            entry.lock_index, entry.session = old.lock_index, old.session
        if "acquire" in q and (old is None or old.session != session):
            entry.lock_index += 1
            entry.session = session
        if "release" in q:
            entry.session = None
        self.kv[key] = entry
        self.tombstones.pop(key, None)
        self._kv_index = idx
        self._wake()
        return self._json(request, True)

    def _kv_delete(self, request: web.Request, key: str) -> web.StreamResponse:
        q = request.query
        self._conflicting(q, "recurse", "cas")
        recurse = "recurse" in q
        if not recurse and not key:
            raise _HttpError(400, "Missing key name")
        tok = self._token(request)
        if not tok.allows("key:write", key):
            raise _denied(tok, "key:write", key)
        self._rpc_checks(q, "leader")
        if "cas" in q:
            try:
                cas = parse_go_uint(q["cas"])
            except GoParseError as e:
                raise _HttpError(500, str(e)) from None
            old = self.kv.get(key)
            if old is None:
                return self._json(request, True)  # kvsDeleteCASTxn: nothing to delete is success
            if cas == 0 or old.modify_index != cas:
                return self._json(request, False)
        doomed = [k for k in self.kv if (k.startswith(key) if recurse else k == key)]
        if doomed:
            idx = self._next()
            for k in doomed:
                del self.kv[k]
                self.tombstones[k] = idx
            self._kv_index = idx
            self._wake()
        return self._json(request, True)

    async def _agent(self, request: web.Request, prefix: str, rest: str) -> web.StreamResponse:
        tok = self._token(request)
        q = request.query
        if prefix == "/v1/agent/service/register":
            try:
                raw = json.loads(await request.read() or b"null")
            except ValueError as e:
                raise _HttpError(400, f"Request decode failed: {e}") from None
            if not isinstance(raw, dict):
                raise _HttpError(400, "Request decode failed: not an object")
            name = _norm_keys(raw).get("name")
            if isinstance(name, str) and name and not tok.allows("service:write", name):
                raise _denied(tok, "service:write", name)
            self._register(raw, self.agent_node, replace_checks="replace-existing-checks" in q)
            return web.Response(status=200)
        if prefix == "/v1/agent/service/deregister/":
            svc = self.services.get(rest)
            if svc is not None and not tok.allows("service:write", svc.name):
                raise _denied(tok, "service:write", svc.name)
            self._deregister(rest)
            return web.Response(status=200)
        if prefix == "/v1/agent/service/maintenance/":
            svc = self.services.get(rest)
            if svc is None:
                raise _HttpError(404, f'Unknown service ID "{rest}"')
            enable = self._enable_param(q)
            self._maintenance(
                f"_service_maintenance:{rest}", enable, q.get("reason", ""), service=svc
            )
            return web.Response(status=200)
        if prefix == "/v1/agent/maintenance":
            self._maintenance(
                "_node_maintenance", self._enable_param(q), q.get("reason", ""), service=None
            )
            return web.Response(status=200)
        cid = rest
        c = self.checks.get(cid)
        if c is not None and c.service_name and not tok.allows("service:write", c.service_name):
            raise _denied(tok, "service:write", c.service_name)
        if prefix == "/v1/agent/check/update/":
            try:
                body = _norm_keys(json.loads(await request.read() or b"{}"))
            except ValueError as e:
                raise _HttpError(400, f"Request decode failed: {e}") from None
            status, output = str(body.get("status", "")), str(body.get("output", ""))
        else:
            status = {"pass": "passing", "warn": "warning", "fail": "critical"}[
                prefix.split("/")[-2]
            ]
            output = q.get("note", "")
        if c is not None and c.type != "ttl":
            raise _HttpError(500, f'CheckID "{cid}" does not have associated TTL')
        self._update_check(cid, status, output)
        self._arm_ttl(cid)
        return web.Response(status=200)

    @staticmethod
    def _enable_param(q: MultiDictProxy[str]) -> bool:
        if "enable" not in q:
            raise _HttpError(400, "Missing value for enable")
        try:
            return parse_go_bool(q["enable"])
        except GoParseError:
            raise _HttpError(400, "Invalid value for enable") from None


async def _serve(port: int) -> None:
    d = ConsulDouble()
    d.port = port
    async with d:
        print(f"consul double on {d.address} (CONSUL_HTTP_ADDR={d.address})", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":  # python -m tests.consul_double [PORT]: a standalone fake agent
    import sys

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(int(sys.argv[1]) if len(sys.argv) > 1 else 8500))
