"""Accepting client connections in batches, for the fast engine.

Why not `loop.create_server`: libuv (under uvloop) accepts one connection per
event-loop iteration. Under load an iteration lasts tens of milliseconds, so a
burst of new connections waits in the kernel's accept queue for seconds:
measured with 1,000 connections opened at once against a loaded gateway, the
queue drained at 25-65 connections per second and 15 % of clients hit a 2 s
timeout. asyncio's own loop accepts up to a backlog's worth per readiness
event; this does the same (nginx's `multi_accept on`), then hands each socket
to the loop as an ordinary transport.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Final, cast

from gateway.engine.tls_conn import TLSConn

log = logging.getLogger(__name__)

# Accepted per readiness event: enough to empty a burst in a few iterations,
# few enough that requests on open connections keep being served meanwhile.
ACCEPT_BATCH: Final = 256
# Out of file descriptors (or kernel memory): stop accepting this long, as asyncio does.
PAUSE_SECONDS: Final = 1.0
_RESOURCE_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor:
    """Accept from a listening socket up to `batch` at a time; each becomes a transport."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        batch: int = ACCEPT_BATCH,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.batch = batch
        self.closed = False
        self._reading = False
        self._tasks: set[asyncio.Task[object]] = set()
        # HTTPS (README "TLS"): each accepted socket is wrapped with the context
        # current at accept time, so a reload's new certificate serves new connections.
        self.tls: ssl.SSLContext | None = None
        self.tls_timeout = 30.0  # the handshake, as a request head's header_timeout
        self._handshaking: dict[TLSConn, None] = {}  # cut when the acceptor closes

    def start(self) -> None:
        """Begin accepting (the socket is already bound and listening)."""
        if self.closed or self._reading:
            return
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._ready)
        self._reading = True

    def close(self) -> None:
        """Stop accepting and close the listening socket: new connections are refused."""
        if self.closed:
            return
        self.closed = True
        self._stop()
        self.sock.close()
        for conn in list(self._handshaking):
            conn.abort()

    async def wait_closed(self) -> None:
        """Wait until the connections accepted before `close` have their transports."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _stop(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _ready(self) -> None:
        for _ in range(self.batch):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as exc:
                # Out of descriptors or memory (or anything else accept can say): stop
                # for a moment rather than spin on a listener that stays readable.
                level = logging.ERROR if exc.errno in _RESOURCE_ERRORS else logging.WARNING
                log.log(
                    level,
                    "fast engine: cannot accept (%s); pausing new connections for %.0f s",
                    exc.strerror or exc,
                    PAUSE_SECONDS,
                )
                self._stop()
                self.loop.call_later(PAUSE_SECONDS, self.start)
                return
            try:
                self.adopt(conn)
            except OSError:  # reset before it was set up: nothing to serve
                conn.close()

    def adopt(self, conn: socket.socket) -> None:
        """Serve an accepted socket, or a parked idle one that became readable.

        Only plain-HTTP connections are parked (engine/fast_park.py), so those take
        the plain branch.
        """
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is None:
            coro = self.loop.connect_accepted_socket(self.protocol_factory, conn)
        else:
            # TLS done by the engine itself on the plain transport (engine/tls_conn.py).
            tls = TLSConn(
                self.loop, self.tls, self.protocol_factory, self.tls_timeout, self._handshake
            )
            coro = self.loop.connect_accepted_socket(lambda: cast(asyncio.Protocol, tls), conn)
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._adopted)

    def _handshake(self, conn: TLSConn, started: bool) -> None:
        if started:
            self._handshaking[conn] = None
        else:
            self._handshaking.pop(conn, None)

    def _adopted(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            if self.tls is not None and isinstance(exc, OSError | TimeoutError):
                # A client that fails the handshake (no certificate for client_ca,
                # plain HTTP to the HTTPS port, a scanner) is the client's problem.
                log.debug("fast engine: TLS handshake with a client failed: %s", exc)
                return
            log.warning("fast engine: an accepted connection failed: %s", exc)
