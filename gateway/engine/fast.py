"""A lean HTTP/1.1 forwarding engine on asyncio Protocols and httptools (llhttp).

Why: the aiohttp server + ClientSession forwarder spends ~89 µs of CPU per
request, nginx ~13; uvloop Protocols with llhttp and pooled keep-alive
upstreams get within reach of nginx (benchmarks/RESULTS.md). Policy stays behind the
`Handler` interface of `engine.api`; the engine only moves bytes and frames.
Layout: `fast_client` (client connections), `fast_upstream` (upstream
connections and the response relay), `fast_pool` (keep-alive pool, connects),
`fast_wire` (wire constants and the per-request record), `fast_accept`
(accepting client connections in batches), `fast_park` (idle connections parked
outside uvloop until their next byte).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Final, cast

from gateway.config import Timeouts
from gateway.engine.api import Handler, Limits, body_min_bytes
from gateway.engine.fast_accept import Acceptor
from gateway.engine.fast_client import ClientConn, ClientContext
from gateway.engine.fast_park import ParkingLot
from gateway.engine.fast_pool import Pool

__all__ = ["FastEngine"]

# A request head (request line and fields) above this gets 431 (RFC 6585 §5): llhttp sets
# no limit of its own; 64 KiB is above what browsers send with large cookies.
MAX_HEADER_BYTES: Final = 65536
# A longer request-target gets 414: RFC 9112 §3 asks for request lines of at least 8000 octets.
MAX_TARGET_BYTES: Final = 8192
# Every timeout's default is the config's (docs/configuration.md#timeouts): one place.
_DEFAULT: Final = Timeouts()

# The listen backlog is the caller's: gateway/app.py's bind_socket (LISTEN_BACKLOG).
# Idle keep-alive connections kept per upstream endpoint: above the client connections
# one worker serves at once (the 1,000-connection benchmark, benchmarks/README.md), so a
# busy endpoint's connections are reused rather than closed and reopened.
POOL_PER_HOST: Final = 1024
# At the end of a drain, connections whose last response is written get at least this
# long to flush it before they are cut; after an abort, this long for the closes to land.
LAST_FLUSH_SECONDS: Final = 0.05
ABORTED_CLOSE_SECONDS: Final = 1.0


class FastEngine:
    """HTTP/1.1 reverse-proxy engine: llhttp parsing, pooled keep-alive upstreams.

    Why: RFC 9112 framing done once in C (llhttp) and relayed from protocol
    callbacks, with smuggling defences (RFC 9112 §6.3, §11.2) and hop-by-hop
    handling (RFC 9110 §7.6.1) in the engine, policy behind `engine.api`.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_target_bytes: int = MAX_TARGET_BYTES,
        keepalive_timeout: float = _DEFAULT.idle,
        header_timeout: float = _DEFAULT.header,
        body_timeout: float = _DEFAULT.body,
        body_min_rate: float = _DEFAULT.body_min_rate,
        upstream_pool_per_host: int = POOL_PER_HOST,
        upstream_idle_timeout: float = _DEFAULT.upstream_idle,
        upstream_limits: Limits | None = None,
        tls: ssl.SSLContext | None = None,
        park_after: float = _DEFAULT.idle_park,
    ) -> None:
        self.handler = handler
        # HTTPS listener (README "TLS"): the context new connections get; set_tls swaps it.
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"  # X-Forwarded-Proto
        self.max_header_bytes = max_header_bytes
        self.max_target_bytes = max_target_bytes
        self.keepalive_timeout = keepalive_timeout
        # Idle this long, a plain-HTTP connection is parked outside uvloop (engine/fast_park.py).
        self.park_after = park_after
        self.header_timeout = header_timeout
        # A request body must bring this many bytes in every `body_timeout`
        # window (at least one), else 408: a trickle is as stalled as silence.
        self.body_timeout = body_timeout
        self.body_min_bytes = body_min_bytes(body_min_rate, body_timeout)
        self.upstream_pool_per_host = upstream_pool_per_host
        self.upstream_idle_timeout = upstream_idle_timeout
        self.upstream_limits = upstream_limits if upstream_limits is not None else Limits()
        self._ctx: ClientContext | None = None  # made by serve: what connections share
        self._pool: Pool | None = None
        self._server: Acceptor | None = None

    @property
    def in_flight(self) -> int:
        """Requests read and not yet fully answered (what a graceful stop waits for)."""
        return self._ctx.in_flight if self._ctx is not None else 0

    @property
    def parked(self) -> int:
        """Idle connections parked outside uvloop (engine/fast_park.py)."""
        lot = self._ctx.lot if self._ctx is not None else None
        return len(lot) if lot is not None else 0

    @property
    def _clients(self) -> dict[ClientConn, None]:
        """The open client connections (for tests and the drain)."""
        return self._ctx.clients if self._ctx is not None else {}

    async def serve(self, sock: socket.socket) -> None:
        """Start serving on a bound, listening socket; return once accepting.

        The socket listens already, with the caller's backlog (gateway/app.py's bind_socket).
        """
        loop = asyncio.get_running_loop()
        pool = Pool(
            loop, self.upstream_pool_per_host, self.upstream_idle_timeout, self.upstream_limits
        )
        self._pool = pool
        self._ctx = ClientContext(
            loop,
            pool,
            self.handler,
            scheme=self.scheme,
            max_header_bytes=self.max_header_bytes,
            max_target_bytes=self.max_target_bytes,
            keepalive_timeout=self.keepalive_timeout,
            header_timeout=self.header_timeout,
            body_timeout=self.body_timeout,
            body_min_bytes=self.body_min_bytes,
        )
        self._server = Acceptor(loop, sock, self._protocol)
        self._server.tls = self.tls
        self._server.tls_timeout = self.header_timeout
        if self.tls is None and self.park_after > 0:
            self._ctx.park_idle(ParkingLot(loop, self._server.adopt, sock.family), self.park_after)
        self._server.start()

    def set_tls(self, ctx: ssl.SSLContext) -> None:
        """New certificate files (reload): connections accepted from now on use `ctx`.

        Open connections keep the session they negotiated (README "TLS").
        """
        self.tls = ctx
        if self._server is not None:
            self._server.tls = ctx

    def _protocol(self) -> asyncio.Protocol:
        # ClientConn is a protocol by duck typing (see its docstring).
        assert self._ctx is not None
        return cast(asyncio.Protocol, ClientConn(self._ctx))

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting, drain in-flight exchanges, then abort the rest.

        Why: RFC 9112 §9.6 graceful close: idle keep-alive connections are
        closed, in-flight responses carry `Connection: close`, and nothing
        is cut before `drain_timeout` unless it is idle.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        if self._server is not None:
            self._server.close()
        ctx = self._ctx
        if ctx is not None:
            await self._drain(ctx, loop, deadline)
        if self._pool is not None:
            await self._pool.close()
        if self._server is not None:
            await self._server.wait_closed()

    @staticmethod
    async def _drain(ctx: ClientContext, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        ctx.closing = True
        if ctx.lot is not None:
            ctx.lot.close()  # parked connections are idle: closed at once
        clients = ctx.clients
        for c in clients:
            c.close_soon = True
        for c in list(clients):
            c.close_if_idle()
        if ctx.in_flight > 0:
            ctx.drained = asyncio.Event()
            try:
                async with asyncio.timeout_at(deadline):
                    await ctx.drained.wait()
            except TimeoutError:
                pass
        if not clients:
            return
        # Finished connections flush their last response; the rest are cut.
        ctx.gone = asyncio.Event()
        for c in list(clients):
            c.shutdown_now()
        for last_try in (False, True):
            if not clients:
                break
            try:
                async with asyncio.timeout_at(max(deadline, loop.time() + LAST_FLUSH_SECONDS)):
                    await ctx.gone.wait()
            except TimeoutError:
                if last_try:
                    break
                for c in list(clients):
                    c.abort()
                deadline = loop.time() + ABORTED_CLOSE_SECONDS
