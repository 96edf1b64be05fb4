"""Keep-alive pool of upstream connections, and opening new ones.

Why: reusing connections is most of the speed (RFC 9112 §9.3 persistence;
dropping pooled connections costs 4x); a fresh connection is only
opened when no idle one is left, within `Forward.connect_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import cast

from gateway.engine.api import ERR_CONNECT, ERR_PROTOCOL, ERR_TIMEOUT, ERR_TLS
from gateway.engine.fast_upstream import Key, Upstream
from gateway.engine.fast_wire import Exchange
from gateway.tls import describe, is_tls_error
from gateway.tls_config import UpstreamTLS

log = logging.getLogger(__name__)


class Pool:
    """Idle keep-alive connections per (host, port), most recently used first.

    Each key's idle set is an insertion-ordered dict used as an ordered set: `release`
    appends, `acquire` pops the most recent (LIFO, `dict.popitem`), and `discard` (every
    close of a pooled connection) removes one in O(1) instead of scanning a list.
    """

    __slots__ = ("loop", "per_host", "idle_timeout", "idle_conns", "conns", "tasks", "all_closed")

    def __init__(self, loop: asyncio.AbstractEventLoop, per_host: int, idle_timeout: float) -> None:
        self.loop = loop
        self.per_host = per_host
        self.idle_timeout = idle_timeout
        self.idle_conns: dict[Key, dict[Upstream, None]] = {}
        self.conns: set[Upstream] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.all_closed: asyncio.Event | None = None

    def acquire(self, host: str, port: int, tls: UpstreamTLS | None = None) -> Upstream | None:
        idle = self.idle_conns.get((host, port))
        while idle:
            up = idle.popitem()[0]
            if up.tls is not tls:  # opened plain, or with another TLS config (a reload)
                up.close()
                continue
            if not up.closed:
                return up
        return None

    def release(self, up: Upstream) -> None:
        idle = self.idle_conns.get(up.key)
        if idle is None:
            idle = self.idle_conns[up.key] = {}
        if len(idle) >= self.per_host:
            up.close()
            return
        idle[up] = None
        now = self.loop.time()
        up.idle_since = now
        when = now + min(up.rt, self.idle_timeout)
        if up.timer is None or up.tw > when:  # a read timer may be set later than the idle end
            up._arm(when)

    def discard(self, up: Upstream) -> None:
        idle = self.idle_conns.get(up.key)
        if idle:
            idle.pop(up, None)

    def connect(self, ex: Exchange, replay: list[bytes] | None = None) -> None:
        """Open a fresh connection for `ex` (RFC 9112 §9.3: new connection when none idle)."""
        task = self.loop.create_task(self._connect(ex, replay))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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
            async with asyncio.timeout(limit):
                tls = fwd.tls
                if tls is None:
                    _, proto = await self.loop.create_connection(
                        partial(_upstream, self, key, None), fwd.host, fwd.port
                    )
                else:  # README "TLS": SNI and the checked name are server_name or the host
                    _, proto = await self.loop.create_connection(
                        partial(_upstream, self, key, tls),
                        fwd.host,
                        fwd.port,
                        ssl=tls.context,
                        server_hostname=tls.server_name or fwd.host,
                    )
                up = cast(Upstream, proto)
        except asyncio.CancelledError:
            ex.client.abort()  # shutdown: its connection_lost reports client_abort
            raise
        except TimeoutError:
            self._connect_failed(ex, 504, ERR_TIMEOUT, replay, final)
            return
        except OSError as e:
            if is_tls_error(e):
                # A certificate the context refuses is no network fault: answered, not retried.
                fwd.detail = describe(e)
                ex.client.upstream_failed(ex, 502, ERR_TLS)
            else:
                self._connect_failed(ex, 502, ERR_CONNECT, replay, final)
            return
        except Exception:  # e.g. a host name IDNA cannot encode: still an answer
            log.exception("fast engine: connecting to %s:%s failed", fwd.host, fwd.port)
            ex.client.upstream_failed(ex, 502, ERR_CONNECT)
            return
        if ex.finished or ex.client.closed:
            if ex.upgrade is None and not up.closed:
                self.release(up)
            else:
                up.close()
            return
        try:
            up.attach(ex, False, replay)
        except Exception:  # a bug must not leave the client hanging
            log.exception("fast engine: attaching an upstream failed")
            up.abandon()
            ex.client.upstream_failed(ex, 502, ERR_PROTOCOL)

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
        try:
            up.attach(ex, True, replay)
        except Exception:  # a bug must not leave the client hanging
            log.exception("fast engine: attaching an upstream failed")
            up.abandon()
            ex.client.upstream_failed(ex, 502, ERR_PROTOCOL)

    def _connect_failed(
        self, ex: Exchange, status: int, kind: str, replay: list[bytes] | None, final: bool
    ) -> None:
        """No byte reached the endpoint: any method may go to another one (README "Failover")."""
        fwd = ex.fwd
        assert fwd is not None
        if (
            not final
            and not ex.finished
            and not ex.client.closed
            and ex.upgrade is None
            and fwd.retry is not None
            and fwd.retry.again(fwd, kind)
        ):
            self.resend(ex, replay)
            return
        ex.client.upstream_failed(ex, status, kind)

    async def close(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for idle in self.idle_conns.values():
            for up in list(idle):
                up.close()
        self.idle_conns.clear()
        for up in list(self.conns):
            up.abandon()
        if self.conns:
            self.all_closed = asyncio.Event()
            try:
                async with asyncio.timeout(1.0):
                    await self.all_closed.wait()
            except TimeoutError:
                pass


def _upstream(pool: Pool, key: Key, tls: UpstreamTLS | None) -> asyncio.Protocol:
    # Upstream is a protocol by duck typing, like ClientConn (native when compiled).
    return cast(asyncio.Protocol, Upstream(pool, key, tls))
