"""A lean HTTP/1.1 forwarding engine on asyncio Protocols and httptools (llhttp).

Why: the aiohttp server + ClientSession forwarder spends ~89 µs of CPU per
request, nginx ~13; uvloop Protocols with llhttp and pooled keep-alive
upstreams get within reach of nginx (benchmarks/RESULTS.md). Policy stays behind the
`Handler` interface of `engine.api`; the engine only moves bytes and frames.
Layout: `fast_client` (client connections), `fast_upstream` (upstream
connections and the response relay), `fast_pool` (keep-alive pool, connects),
`fast_wire` (wire constants and the per-request record), `fast_accept`
(accepting client connections in batches).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import cast

from gateway.engine.api import Handler, Limits
from gateway.engine.fast_accept import Acceptor
from gateway.engine.fast_client import ClientConn
from gateway.engine.fast_pool import Pool

__all__ = ["FastEngine"]


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
        max_header_bytes: int = 65536,
        max_target_bytes: int = 8192,
        keepalive_timeout: float = 75.0,
        header_timeout: float = 30.0,
        body_timeout: float = 10.0,
        body_min_rate: float = 240.0,
        upstream_pool_per_host: int = 256,
        upstream_idle_timeout: float = 60.0,
        upstream_limits: Limits | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        # HTTPS listener (README "TLS"): the context new connections get; set_tls swaps it.
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"  # X-Forwarded-Proto
        self.max_header_bytes = max_header_bytes
        self.max_target_bytes = max_target_bytes
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        # A request body must bring this many bytes in every `body_timeout`
        # window (at least one), else 408: a trickle is as stalled as silence.
        self.body_timeout = body_timeout
        self.body_min_bytes = max(1.0, body_min_rate * body_timeout)
        self.upstream_pool_per_host = upstream_pool_per_host
        self.upstream_idle_timeout = upstream_idle_timeout
        self.upstream_limits = upstream_limits if upstream_limits is not None else Limits()
        self.closing = False
        # How late the lazy per-connection timer may notice a shorter timeout;
        # a body's window arms its own deadline (ClientConn.on_headers_complete).
        self._tick = min(keepalive_timeout, header_timeout)
        self._in_flight = 0
        self._clients: set[ClientConn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: Pool | None = None
        self._server: Acceptor | None = None
        self._drained: asyncio.Event | None = None
        self._gone: asyncio.Event | None = None

    @property
    def in_flight(self) -> int:
        """Requests read and not yet fully answered (what a graceful stop waits for)."""
        return self._in_flight

    async def serve(self, sock: socket.socket) -> None:
        """Start serving on a bound, listening socket; return once accepting."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._pool = Pool(
            loop, self.upstream_pool_per_host, self.upstream_idle_timeout, self.upstream_limits
        )
        sock.listen(4096)  # a deep accept queue for connection bursts (capped by somaxconn)
        self._server = Acceptor(loop, sock, self._protocol)
        self._server.tls = self.tls
        self._server.tls_timeout = self.header_timeout
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
        return cast(asyncio.Protocol, ClientConn(self))

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting, drain in-flight exchanges, then abort the rest.

        Why: RFC 9112 §9.6 graceful close: idle keep-alive connections are
        closed, in-flight responses carry `Connection: close`, and nothing
        is cut before `drain_timeout` unless it is idle.
        """
        self.closing = True
        for c in self._clients:
            c.close_soon = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        if self._server is not None:
            self._server.close()
        for c in list(self._clients):
            c.close_if_idle()
        if self._in_flight > 0:
            self._drained = asyncio.Event()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._drained.wait()
            except TimeoutError:
                pass
        if self._clients:
            # Finished connections flush their last response; the rest are cut.
            self._gone = asyncio.Event()
            for c in list(self._clients):
                c.shutdown_now()
            for last_try in (False, True):
                if not self._clients:
                    break
                try:
                    async with asyncio.timeout_at(max(deadline, loop.time() + 0.05)):
                        await self._gone.wait()
                except TimeoutError:
                    if last_try:
                        break
                    for c in list(self._clients):
                        c.abort()
                    deadline = loop.time() + 1.0
        if self._pool is not None:
            await self._pool.close()
        if self._server is not None:
            await self._server.wait_closed()
