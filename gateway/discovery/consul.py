"""Consul discovery: one blocking-query watch per distinct (service, tags, datacenter).

Why blocking queries on `/v1/health/service/<service>?tag=..&passing=1`: a release is a
service plus tags (README "Consul discovery") and only instances whose every check is
`passing` are healthy (Consul API docs, Health: list service instances); the agent wakes
the watch on any change (Consul API docs, Blocking Queries). Why
aiohttp and not py-consul's `consul.aio`: in py-consul 1.8 its constructor passes
the deprecated `ssl_context`/`verify_ssl` to `TCPConnector` (a DeprecationWarning on
aiohttp 3.14, an error under `filterwarnings = error`, and TLS client certs are not
applied — criteo/py-consul#100), `health.service()` returns only `(index, data)` so
`X-Consul-Results-Filtered-By-ACLs` (Consul API docs) is unreadable, it has no per-request
timeout, and `CONSUL_HTTP_TOKEN` silently beats the configured token.

A dead or misbehaving Consul keeps the last known good endpoints (README "Consul discovery"): errors
never publish an empty set, are logged once per outage and retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote

import aiohttp

from gateway.config import ConsulConfig, ConsulSelector, Endpoint
from gateway.discovery.pacing import Backoff, Pacing, TokenBucket

log = logging.getLogger("gateway.discovery.consul")

ReleaseKey = tuple[str, str]  # (service, release) as in state.build_snapshot
EndpointSets = dict[ReleaseKey, tuple[Endpoint, ...]]


class DiscoveryObserver(Protocol):
    """What the watch loop reports (e.g. gateway.discovery.metrics.DiscoveryMetrics)."""

    def watch_ok(self, releases: tuple[ReleaseKey, ...]) -> None: ...

    def watch_error(self, releases: tuple[ReleaseKey, ...], kind: str) -> None: ...


# --------------------------------------------------------------------------- pure parts


@dataclass(frozen=True, slots=True)
class WatchKey:
    """One health query; tags are lower-cased and sorted since matching is AND + EqualFold (§3)."""

    service: str
    tags: tuple[str, ...]
    datacenter: str | None

    @classmethod
    def of(cls, sel: ConsulSelector) -> WatchKey:
        return cls(
            sel.service, tuple(sorted({t.lower() for t in sel.tags})), sel.datacenter or None
        )

    def __str__(self) -> str:
        tags = ",".join(self.tags)
        return f"{self.service}[{tags}]" + (f"@{self.datacenter}" if self.datacenter else "")


def endpoint_of(entry: object) -> Endpoint | None:
    """One health entry -> Endpoint, or None when it is unusable or not entirely passing.

    Why each rule: an empty Service.Address means the node's address, Weights may be
    missing (default 1), `passing` means every check, node checks included (§3), and
    Service.Meta `scheme: https` marks an instance that speaks TLS (README "TLS").
    Parsing is tolerant (`.get` with defaults) because field sets vary by version (§8).
    """
    if not isinstance(entry, Mapping):
        return None
    svc, node = entry.get("Service"), entry.get("Node")
    if not isinstance(svc, Mapping):
        return None
    host = svc.get("Address") or (node.get("Address") if isinstance(node, Mapping) else None)
    port = svc.get("Port")
    if not isinstance(host, str) or not host:
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return None
    checks = entry.get("Checks") or []
    if not isinstance(checks, list) or any(
        not isinstance(c, Mapping) or c.get("Status") != "passing" for c in checks
    ):
        return None
    weights = svc.get("Weights")
    w = weights.get("Passing") if isinstance(weights, Mapping) else None
    weight = w if isinstance(w, int) and not isinstance(w, bool) and w >= 1 else 1
    # README "TLS": an instance registered with Meta {"scheme": "https"} speaks TLS.
    meta = svc.get("Meta")
    tls = isinstance(meta, Mapping) and meta.get("scheme") == "https"
    return Endpoint(host.strip("[]"), port, weight, tls)


def parse_health(body: bytes) -> tuple[tuple[Endpoint, ...], int]:
    """A health response body -> (endpoints sorted by address, entries skipped).

    Sorted because `?passing` reorders entries (§3): equal sets must compare equal.
    Duplicates of one host:port keep the highest weight. ValueError on a non-array.
    """
    data = json.loads(body)
    if not isinstance(data, list):
        raise ValueError(f"expected a JSON array, got {type(data).__name__}")
    best: dict[tuple[str, int], Endpoint] = {}
    skipped = 0
    for entry in data:
        ep = endpoint_of(entry)
        if ep is None:
            skipped += 1
            continue
        old = best.get((ep.host, ep.port))
        if old is None or ep.weight > old.weight:
            best[(ep.host, ep.port)] = ep
    return tuple(sorted(best.values(), key=lambda e: (e.host, e.port))), skipped


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking call (§2): 0 when it went backwards, else at least 1."""
    if returned < previous:
        return 0
    return max(returned, 1)


def go_duration(seconds: float) -> str:
    """Seconds as a Go duration with a unit ('30000ms'); a bare number is a 400 (§2)."""
    return f"{max(1, round(seconds * 1000))}ms"


# --------------------------------------------------------------------------- I/O


class ConsulError(Exception):
    """A failed health query; `kind` is a closed set for metrics and logs."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # connect | timeout | http | acl | protocol


@dataclass(frozen=True, slots=True)
class HealthAnswer:
    index: int
    endpoints: tuple[Endpoint, ...]
    skipped: int
    filtered_by_acls: bool


@dataclass(eq=False)
class _Watch:
    key: WatchKey
    releases: tuple[ReleaseKey, ...]
    endpoints: tuple[Endpoint, ...] | None = None  # None until the first good answer
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    outage_since: float | None = None
    failures: int = 0
    acl_warned: bool = False


def _default_session() -> aiohttp.ClientSession:
    # No session-wide timeout: each request sets its own from the blocking wait.
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), trust_env=False)


class ConsulDiscovery:
    """Watches Consul for every selector and calls `on_update` with all endpoint sets.

    `on_update` gets the complete mapping {(service, release): endpoints} for every
    selector that has had at least one good answer, whenever any set changes
    (identical sets are not re-published). A key that is absent is not known yet.
    """

    def __init__(
        self,
        consul_cfg: ConsulConfig,
        selectors: Mapping[ReleaseKey, ConsulSelector],
        on_update: Callable[[EndpointSets], None],
        *,
        session_factory: Callable[[], aiohttp.ClientSession] = _default_session,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        pacing: Pacing | None = None,
        initial_wait: float = 5.0,
        metrics: DiscoveryObserver | None = None,
    ) -> None:
        self.cfg = consul_cfg
        self.base = consul_cfg.address.rstrip("/")
        self.wait = max(0.001, consul_cfg.poll_wait)
        self.on_update = on_update
        self.pacing = pacing or Pacing()
        self.initial_wait = initial_wait
        self.metrics = metrics
        self._session_factory = session_factory
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._headers = {"X-Consul-Token": consul_cfg.token} if consul_cfg.token else {}
        # Consul over TLS (README "TLS"): the context from CONSUL_CACERT & co., else the defaults.
        self._ssl: ssl.SSLContext | bool = consul_cfg.tls if consul_cfg.tls is not None else True
        self._session: aiohttp.ClientSession | None = None
        self._watches: dict[WatchKey, _Watch] = {}
        self._published: EndpointSets | None = None
        self._holding = False
        self._plan(selectors)

    # ------------------------------------------------------------------ lifecycle
    def _plan(self, selectors: Mapping[ReleaseKey, ConsulSelector]) -> dict[WatchKey, _Watch]:
        grouped: dict[WatchKey, list[ReleaseKey]] = {}
        for rk, sel in selectors.items():
            grouped.setdefault(WatchKey.of(sel), []).append(rk)
        fresh: dict[WatchKey, _Watch] = {}
        for wk, rks in grouped.items():
            old = self._watches.get(wk)
            if old is not None:
                old.releases = tuple(sorted(rks))
                fresh[wk] = old
            else:
                fresh[wk] = _Watch(wk, tuple(sorted(rks)))
        gone = {wk: w for wk, w in self._watches.items() if wk not in fresh}
        self._watches = fresh
        return gone

    async def start(self) -> None:
        """Start every watch; wait up to `initial_wait` s for each one's first answer."""
        if self._session is not None:
            return
        self._session = self._session_factory()
        self._holding = True  # one update for the initial round, not one per watch
        try:
            for w in self._watches.values():
                self._spawn(w)
            await self._settle(list(self._watches.values()))
        finally:
            self._holding = False
        self._publish()

    async def set_selectors(self, selectors: Mapping[ReleaseKey, ConsulSelector]) -> None:
        """Follow a config reload: keep unchanged watches, start new ones, stop removed ones."""
        gone = self._plan(selectors)
        await self._cancel(list(gone.values()))
        if self._session is not None:
            new = [w for w in self._watches.values() if w.task is None]
            for w in new:
                self._spawn(w)
            self._holding = True
            try:
                await self._settle(new)
            finally:
                self._holding = False
        self._publish()

    async def stop(self) -> None:
        """Cancel every watch (parked calls included) and close the HTTP session."""
        await self._cancel(list(self._watches.values()))
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _spawn(self, w: _Watch) -> None:
        w.task = asyncio.create_task(self._run(w), name=f"consul-watch {w.key}")

    async def _settle(self, watches: list[_Watch]) -> None:
        if not watches or self.initial_wait <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.initial_wait):
                await asyncio.gather(*(w.settled.wait() for w in watches))

    @staticmethod
    async def _cancel(watches: list[_Watch]) -> None:
        tasks = [w.task for w in watches if w.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in watches:
            w.task = None

    # ------------------------------------------------------------------ the loop
    async def _run(self, w: _Watch) -> None:
        bucket = TokenBucket(self.pacing.rate, self.pacing.burst, self._clock())
        backoff = Backoff(self.pacing.backoff_base, self.pacing.backoff_cap, self._rng)
        index = 0
        while True:
            delay = bucket.delay(self._clock())
            if delay > 0:
                await self._sleep(delay)
            try:
                ans = await self._fetch(w.key, index)
            except ConsulError as e:
                self._failed(w, e)
                index = 0  # after an outage the agent may be a new one: re-read at once
                w.settled.set()
                await self._sleep(backoff.next())
                continue
            backoff.reset()
            self._recovered(w)
            nxt = next_index(index, ans.index)
            if nxt == 0:
                log.info("consul watch %s: index went back %d -> %d", w.key, index, ans.index)
            index = nxt
            self._apply(w, ans)
            w.settled.set()

    async def _fetch(self, key: WatchKey, index: int) -> HealthAnswer:
        assert self._session is not None
        params: list[tuple[str, str]] = [("tag", t) for t in key.tags]
        params.append(("passing", "1"))
        if key.datacenter:
            params.append(("dc", key.datacenter))
        if index > 0:  # index 0 is a plain read; never block with it (§2)
            params += [("index", str(index)), ("wait", go_duration(self.wait))]
        url = f"{self.base}/v1/health/service/{quote(key.service, safe='')}"
        # The server may hold the call for wait + wait/16 (jitter); give it slack on top.
        timeout = aiohttp.ClientTimeout(
            total=self.wait + self.wait / 16 + self.pacing.slack, sock_connect=self.pacing.slack
        )
        try:
            async with self._session.get(
                url, params=params, headers=self._headers, timeout=timeout, ssl=self._ssl
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    text = body[:200].decode("utf-8", "replace").strip()
                    kind = "acl" if resp.status == 403 else "http"
                    raise ConsulError(kind, f"HTTP {resp.status}: {text}")
                raw_index = resp.headers.get("X-Consul-Index", "")
                filtered = resp.headers.get("X-Consul-Results-Filtered-By-ACLs", "") == "true"
        except TimeoutError as e:
            raise ConsulError("timeout", f"no answer within {timeout.total:.0f}s") from e
        except aiohttp.ClientConnectionError as e:
            raise ConsulError("connect", str(e) or type(e).__name__) from e
        except aiohttp.ClientError as e:
            raise ConsulError("protocol", str(e) or type(e).__name__) from e
        if not (raw_index.isascii() and raw_index.isdigit()):
            raise ConsulError("protocol", f"bad X-Consul-Index {raw_index!r}")
        try:
            endpoints, skipped = parse_health(body)
        except ValueError as e:
            raise ConsulError("protocol", f"bad health body: {e}") from e
        return HealthAnswer(int(raw_index), endpoints, skipped, filtered)

    # ------------------------------------------------------------------ outcomes
    def _failed(self, w: _Watch, e: ConsulError) -> None:
        w.failures += 1
        if self.metrics is not None:
            self.metrics.watch_error(w.releases, e.kind)
        if w.outage_since is not None:
            log.debug("consul watch %s: still failing: %s", w.key, e)
            return
        w.outage_since = self._clock()
        kept = (
            "no endpoints known yet"
            if w.endpoints is None
            else f"keeping {len(w.endpoints)} last known endpoint(s)"
        )
        log.warning("consul watch %s: %s (%s); %s, retrying", w.key, e, e.kind, kept)

    def _recovered(self, w: _Watch) -> None:
        if self.metrics is not None:
            self.metrics.watch_ok(w.releases)
        if w.outage_since is None:
            return
        log.info(
            "consul watch %s: recovered after %.1fs and %d failed attempt(s)",
            w.key,
            self._clock() - w.outage_since,
            w.failures,
        )
        w.outage_since = None
        w.failures = 0

    def _apply(self, w: _Watch, ans: HealthAnswer) -> None:
        if ans.skipped:
            log.debug("consul watch %s: skipped %d unusable entries", w.key, ans.skipped)
        if ans.filtered_by_acls:
            if not w.acl_warned:
                w.acl_warned = True
                log.warning(
                    "consul watch %s: ACLs hid instances from this token "
                    "(X-Consul-Results-Filtered-By-ACLs); it needs service:read and node:read. %s",
                    w.key,
                    "Keeping the last known endpoints."
                    if not ans.endpoints
                    else f"Using the {len(ans.endpoints)} visible instance(s).",
                )
            if self.metrics is not None:
                self.metrics.watch_error(w.releases, "acl_filtered")
            if not ans.endpoints:
                return  # a mis-scoped token looks like zero instances: never publish that
        else:
            w.acl_warned = False
        if w.endpoints == ans.endpoints:
            return
        w.endpoints = ans.endpoints
        self._publish()

    def snapshot(self) -> EndpointSets:
        """The current endpoint sets of every selector that has been answered."""
        out: EndpointSets = {}
        for w in self._watches.values():
            if w.endpoints is not None:
                for rk in w.releases:
                    out[rk] = w.endpoints
        return out

    def _publish(self) -> None:
        if self._holding:
            return
        current = self.snapshot()
        if current == self._published or (self._published is None and not current):
            return
        self._published = current
        try:
            self.on_update(dict(current))
        except Exception:  # a broken listener must not stop discovery
            log.exception("consul discovery: on_update failed")
