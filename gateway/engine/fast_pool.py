"""Keep-alive pool of upstream connections, and opening new ones.

Why: reusing connections is most of the speed (RFC 9112 §9.3 persistence;
dropping pooled connections costs 4x); a fresh connection is only
opened when no idle one is left, within `Forward.connect_timeout`, and only
while the endpoint has fewer than its `upstream.max_connections` open; else
the request waits up to `upstream.queue_timeout` for one to come free
(docs/configuration.md#upstream-connection-limits), then gets 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from functools import partial
from typing import Final, cast

from gateway.engine.api import (
    ERR_CONNECT,
    ERR_LIMIT,
    ERR_PROTOCOL,
    ERR_TIMEOUT,
    ERR_TLS,
    Limits,
    UpstreamErrorKind,
)
from gateway.engine.fast_timers import Wheel
from gateway.engine.fast_upstream import Key, Upstream
from gateway.engine.fast_wire import X_FINISHED, Exchange
from gateway.engine.tls_conn import open_client
from gateway.tls import describe, is_tls_error
from gateway.tls_config import UpstreamTLS

log = logging.getLogger(__name__)

# On close, how long the aborted upstream connections get to report connection_lost
# (each one's exchange is answered or counted there) before the engine stops anyway.
CLOSE_WAIT_SECONDS: Final = 1.0


class Waiter:
    """A request waiting for its endpoint to fall below the cap (or for an idle connection)."""

    __slots__ = ("ex", "replay", "cap", "timer")

    def __init__(self, ex: Exchange, replay: list[bytes] | None, cap: int) -> None:
        self.ex = ex
        self.replay = replay
        self.cap = cap
        self.timer: asyncio.TimerHandle | None = None


class IdleList:
    """One endpoint's idle connections, the most recently released first.

    Why linked through the connections themselves (`Upstream.idle_prev` and
    `idle_next`, as nginx's `ngx_queue_t`): `release` pushes, `acquire` pops the
    most recent (LIFO) and `discard` (every close of a pooled connection)
    unlinks one anywhere, each in O(1) with a few attribute writes; an ordered
    dict needed a hashed entry per release and a tuple per `popitem`.
    """

    __slots__ = ("first", "count", "port", "other_port")

    def __init__(self, port: int) -> None:
        self.first: Upstream | None = None
        self.count = 0
        self.port = port
        # The same host's list for another port (`Pool.idle_by_host`); None: no other.
        self.other_port: IdleList | None = None

    def push(self, up: Upstream) -> None:
        if up.pooled:  # (released twice: moved to the front, never linked twice)
            self.unlink(up)
        first = self.first
        up.idle_next = first
        up.idle_prev = None
        if first is not None:
            first.idle_prev = up
        self.first = up
        up.pooled = True
        self.count += 1

    def pop(self) -> Upstream | None:
        """The most recently pushed connection, unlinked; None when empty."""
        up = self.first
        if up is not None:
            self.unlink(up)
        return up

    def unlink(self, up: Upstream) -> None:
        """Take `up` out (it is in this list: `up.pooled`)."""
        prev = up.idle_prev
        nxt = up.idle_next
        if prev is None:
            self.first = nxt
        else:
            prev.idle_next = nxt
        if nxt is not None:
            nxt.idle_prev = prev
        up.idle_prev = up.idle_next = None
        up.pooled = False
        self.count -= 1

    def conns(self) -> list[Upstream]:
        """The connections in it, the most recent first."""
        out = []
        up = self.first
        while up is not None:
            out.append(up)
            up = up.idle_next
        return out


class Pool:
    """Idle keep-alive connections per (host, port), most recently used first.

    Each key's idle connections are an `IdleList`: `release` pushes, `acquire`
    pops the most recent (LIFO), and `discard` (every close of a pooled
    connection) unlinks one in O(1) instead of scanning a list.
    """

    __slots__ = (
        "loop",
        "per_host",
        "idle_timeout",
        "idle_by_host",
        "conns",
        "tasks",
        "all_closed",
        "limits",
        "open",
        "waiting",
        "wheel",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        per_host: int,
        idle_timeout: float,
        limits: Limits | None = None,
    ) -> None:
        self.loop = loop
        self.per_host = per_host
        self.idle_timeout = idle_timeout
        # Idle connections by host, then port: a host's lists are chained by `other_port`
        # (a host rarely has two ports), so `acquire` makes no (host, port) tuple and no
        # int object for a dict lookup by port.
        self.idle_by_host: dict[str, IdleList] = {}
        self.conns: set[Upstream] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.all_closed: asyncio.Event | None = None
        self.limits = limits if limits is not None else Limits()
        # Per endpoint: connections open or being opened (a connection that is
        # both for a moment counts twice: never more than the cap on the wire).
        self.open: dict[Key, int] = {}
        # Per endpoint at its cap: requests waiting, first come first served.
        self.waiting: dict[Key, deque[Waiter]] = {}
        # Every timeout of this engine's connections, client and upstream, on one loop timer.
        self.wheel = Wheel(loop)

    def idle_set(self, key: Key) -> IdleList:
        """The idle list of `key`, made on first use; each connection keeps its own (`release`)."""
        host, port = key
        first = self.idle_by_host.get(host)
        idle = _of_port(first, port)
        if idle is None:
            idle = IdleList(port)
            idle.other_port = first
            self.idle_by_host[host] = idle
        return idle

    def acquire(self, host: str, port: int, tls: UpstreamTLS | None = None) -> Upstream | None:
        idle = _of_port(self.idle_by_host.get(host), port)
        if idle is None:
            return None
        while (up := idle.pop()) is not None:
            if up.tls is not tls:  # opened plain, or with another TLS config (a reload)
                up.close()
                continue
            if not up.closed:
                return up
        return None

    def release(self, up: Upstream, now: float = -1.0) -> None:
        """`up` is idle from loop time `now` (the caller's clock read; -1: read it here)."""
        if self.waiting and self._hand_over(up):
            return
        idle = up.idle_set
        if idle.count >= self.per_host:
            up.close()
            return
        idle.push(up)
        if now < 0.0:
            now = self.loop.time()
        up.idle_since = now
        up.arm(now + min(up.read_timeout, self.idle_timeout))  # (keeps an earlier deadline)

    def discard(self, up: Upstream) -> None:
        if up.pooled:
            up.idle_set.unlink(up)

    def connect(self, ex: Exchange, replay: list[bytes] | None = None) -> None:
        """Open a fresh connection for `ex` (RFC 9112 §9.3: new connection when none idle).

        At the endpoint's cap the request waits instead (`Waiter`), for the
        first connection released to the pool or closed.
        """
        fwd = ex.fwd
        assert fwd is not None
        key = (fwd.host, fwd.port)
        cap, wait = self.limits.get(fwd.service)
        n = self.open.get(key, 0)
        if n >= cap:  # (below it, nobody waits: `closed` wakes waiters while there is room)
            self._wait(key, ex, replay, cap, wait)
            return
        self.open[key] = n + 1
        self._spawn(ex, replay)

    def _spawn(self, ex: Exchange, replay: list[bytes] | None) -> None:
        task = self.loop.create_task(self._connect(ex, replay))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- the cap: counting, waiting, handing over ----------------------------

    def opened(self, key: Key) -> None:
        """An upstream connection is established (Upstream.connection_made)."""
        self.open[key] = self.open.get(key, 0) + 1

    def closed(self, key: Key) -> None:
        """One fewer connection (or attempt) to `key`: a waiter may open one now."""
        n = self.open.get(key, 0) - 1
        if n > 0:
            self.open[key] = n
        else:
            self.open.pop(key, None)
        if self.waiting:
            self._wake(key)

    def _wait(
        self, key: Key, ex: Exchange, replay: list[bytes] | None, cap: int, wait: float
    ) -> None:
        w = Waiter(ex, replay, cap)
        q = self.waiting.get(key)
        if q is None:
            q = self.waiting[key] = deque()
        q.append(w)
        when = self.loop.time() + wait
        if ex.deadline and ex.deadline < when:
            when = ex.deadline  # timeouts.total ends first: 504 as for any attempt
        w.timer = self.loop.call_at(when, self._expired, key, w)

    def _expired(self, key: Key, w: Waiter) -> None:
        w.timer = None
        q = self.waiting.get(key)
        if q is not None:
            try:
                q.remove(w)
            except ValueError:
                return
            if not q:
                del self.waiting[key]
        ex = w.ex
        if ex.state == X_FINISHED or ex.client.closed:
            return
        if ex.deadline and self.loop.time() >= ex.deadline:
            ex.client.upstream_failed(ex, ERR_TIMEOUT)
        else:
            ex.client.upstream_failed(ex, ERR_LIMIT)

    def _next(self, key: Key) -> Waiter | None:
        """The first waiter for `key` whose client still wants an answer, dequeued."""
        q = self.waiting.get(key)
        while q:
            w = q.popleft()
            if w.timer is not None:
                w.timer.cancel()
                w.timer = None
            ex = w.ex
            if ex.state != X_FINISHED and not ex.client.closed:
                if not q:
                    del self.waiting[key]
                return w
        self.waiting.pop(key, None)
        return None

    def _wake(self, key: Key) -> None:
        q = self.waiting.get(key)
        while q:
            n = self.open.get(key, 0)
            if n >= q[0].cap:
                return
            w = self._next(key)
            if w is None:
                return
            self.open[key] = n + 1
            self._spawn(w.ex, w.replay)
            q = self.waiting.get(key)

    def _hand_over(self, up: Upstream) -> bool:
        """A reusable connection goes to the first waiter for its endpoint instead of idling."""
        q = self.waiting.get(up.key)
        if not q:
            return False
        first = q[0].ex
        if first.upgrade is not None or first.fwd is None or first.fwd.tls is not up.tls:
            # An upgrade needs a connection of its own, and one opened plain (or with
            # another TLS config) is not reused: closing it makes room for a new one.
            up.close()
            return True
        w = self._next(up.key)
        if w is None:
            return False
        _attach(up, w.ex, True, w.replay)
        return True

    async def _connect(self, ex: Exchange, replay: list[bytes] | None) -> None:
        fwd = ex.fwd
        assert fwd is not None
        key = (fwd.host, fwd.port)
        limit = fwd.connect_timeout
        final = False  # the limit is timeouts.total's: no attempt may follow
        if ex.deadline:
            left = ex.deadline - self.loop.time()
            if left <= limit:
                limit = left if left > 0.0 else 0.0
                final = True
        try:
            try:
                async with asyncio.timeout(limit):
                    tls = fwd.tls
                    if tls is None:
                        _, proto = await self.loop.create_connection(
                            partial(_upstream, self, key, None), fwd.host, fwd.port
                        )
                    else:  # README "TLS": SNI and the checked name are server_name or the host
                        assert tls.context is not None
                        proto = await open_client(
                            self.loop,
                            partial(_upstream, self, key, tls),
                            fwd.host,
                            fwd.port,
                            tls.context,
                            tls.server_name or fwd.host,
                            limit,
                        )
                    up = cast(Upstream, proto)
            finally:
                self.closed(key)  # the attempt's own count; a made connection counts itself
        except asyncio.CancelledError:
            ex.client.abort()  # shutdown: its connection_lost reports client_abort
            raise
        except TimeoutError:
            self._connect_failed(ex, ERR_TIMEOUT, replay, final)
            return
        except OSError as e:
            if is_tls_error(e):
                # A certificate the context refuses is no network fault: answered, not retried.
                fwd.detail = describe(e)
                ex.client.upstream_failed(ex, ERR_TLS)
            else:
                self._connect_failed(ex, ERR_CONNECT, replay, final)
            return
        except Exception:  # e.g. a host name IDNA cannot encode: still an answer
            log.exception("fast engine: connecting to %s:%s failed", fwd.host, fwd.port)
            ex.client.upstream_failed(ex, ERR_CONNECT)
            return
        if ex.state == X_FINISHED or ex.client.closed:
            if ex.upgrade is None and not up.closed:
                self.release(up)
            else:
                up.close()
            return
        _attach(up, ex, False, replay)

    def resend(self, ex: Exchange, replay: list[bytes] | None) -> None:
        """Send `ex` to the endpoint failover chose: an idle connection there, else a new one.

        Why not always a new one: when an endpoint dies, every request in flight
        on it fails over at once, and a burst of fresh connections to the
        survivors can overflow their listen queues (SYNs dropped, connect timeouts).
        """
        fwd = ex.fwd
        assert fwd is not None
        up = self.acquire(fwd.host, fwd.port, fwd.tls)
        if up is None:
            self.connect(ex, replay)
            return
        _attach(up, ex, True, replay)

    def _connect_failed(
        self, ex: Exchange, kind: UpstreamErrorKind, replay: list[bytes] | None, final: bool
    ) -> None:
        """No byte reached the endpoint: any method may go to another one (README "Failover")."""
        fwd = ex.fwd
        assert fwd is not None
        if (
            not final
            and ex.state != X_FINISHED
            and not ex.client.closed
            and ex.upgrade is None
            and fwd.retry is not None
            and fwd.retry.again(fwd, kind)
        ):
            self.resend(ex, replay)
            return
        ex.client.upstream_failed(ex, kind)

    async def close(self) -> None:
        for q in self.waiting.values():
            for w in q:
                if w.timer is not None:
                    w.timer.cancel()
        self.waiting.clear()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for first in self.idle_by_host.values():
            idle: IdleList | None = first
            while idle is not None:
                for up in idle.conns():
                    up.close()
                idle = idle.other_port
        self.idle_by_host.clear()
        for up in list(self.conns):
            up.abandon()
        if self.conns:
            self.all_closed = asyncio.Event()
            try:
                async with asyncio.timeout(CLOSE_WAIT_SECONDS):
                    await self.all_closed.wait()
            except TimeoutError:
                pass
        self.wheel.close()


def _of_port(idle: IdleList | None, port: int) -> IdleList | None:
    """The list for `port` in a host's chain of idle lists (from `idle`), if there is one."""
    while idle is not None and idle.port != port:
        idle = idle.other_port
    return idle


def _attach(up: Upstream, ex: Exchange, reused: bool, replay: list[bytes] | None) -> None:
    """`up.attach`, and a 502 for the client should that fail (a bug must not leave it hanging)."""
    try:
        up.attach(ex, reused, replay)
    except Exception:
        log.exception("fast engine: attaching an upstream failed")
        up.abandon()
        ex.client.upstream_failed(ex, ERR_PROTOCOL)


def _upstream(pool: Pool, key: Key, tls: UpstreamTLS | None) -> asyncio.Protocol:
    # Upstream is a protocol by duck typing, like ClientConn (native when compiled).
    return cast(asyncio.Protocol, Upstream(pool, key, tls))
