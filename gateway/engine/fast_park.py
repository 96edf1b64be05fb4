"""Idle keep-alive client connections parked outside the event loop's transports.

Why: an idle keep-alive connection served by a uvloop transport holds the
transport, its libuv handle, a socket object, a weak reference, a context and
bound methods: ~1.3 KiB before the engine's own state (benchmarks/README.md
"Idle connections"), where nginx keeps only the connection struct and its
event. A connection idle for `timeouts.idle_park` (docs/configuration.md#timeouts)
is handed here instead: its descriptor is duplicated (libuv closes the one it
owns when the transport closes), the transport and the engine's connection
object are released, and the duplicate waits in ONE shared epoll set whose own
descriptor the loop watches. Nothing is read while a connection is parked: at
its next readiness (a new request, or the client's FIN or reset) it is unregistered
and adopted again exactly as an accepted socket (engine/fast_accept.py), so the
bytes still in the kernel's buffer are parsed as usual. What stays per parked
connection is its descriptor and its keep-alive deadline.

HTTPS connections are never parked: their TLS session lives in the transport.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

# Readiness events taken per wake-up of the loop: a burst of returning clients is
# adopted over a few iterations, as engine/fast_accept.py's ACCEPT_BATCH does for new ones.
WAKE_BATCH: Final = 256
# The kernel says "readable" for a request, and also for a FIN (EPOLLRDHUP) or an error.
_WATCH: Final = select.EPOLLIN | select.EPOLLRDHUP
_GONE: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class ParkingLot:
    """Descriptors of parked idle connections, each with its keep-alive deadline.

    `adopt` serves a woken socket as a newly accepted one. Deadlines are kept
    in parking order, which is their order too (every connection gets the same
    keep-alive timeout, counted from its last response); one loop timer sweeps
    the due ones from the front.
    """

    __slots__ = ("loop", "adopt", "family", "epoll", "deadlines", "handle", "closed")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        adopt: Callable[[socket.socket], None],
        family: int,
    ) -> None:
        self.loop = loop
        self.adopt = adopt
        self.family = family  # the listener's: a woken descriptor is one of its connections
        self.epoll = select.epoll()  # close-on-exec, as every descriptor Python opens
        # descriptor -> loop time its keep-alive timeout ends; insertion (= parking) order
        self.deadlines: dict[int, float] = {}
        self.handle: asyncio.TimerHandle | None = None
        self.closed = False
        loop.add_reader(self.epoll.fileno(), self._ready)

    def __len__(self) -> int:
        return len(self.deadlines)

    def park(self, fd: int, deadline: float) -> bool:
        """Watch a duplicate of `fd` until it is readable or `deadline`; False: not parked.

        The caller then closes its transport (which closes `fd`, not the duplicate).
        """
        if self.closed:
            return False
        try:
            parked = os.dup(fd)
        except OSError:  # out of descriptors: the connection stays a transport
            return False
        try:
            self.epoll.register(parked, _WATCH)
        except OSError:
            os.close(parked)
            return False
        self.deadlines[parked] = deadline
        if self.handle is None:
            self.handle = self.loop.call_at(deadline, self._sweep)
        return True

    def close(self) -> None:
        """Close every parked connection (they are idle: RFC 9112 §9.6) and stop watching."""
        if self.closed:
            return
        self.closed = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.loop.remove_reader(self.epoll.fileno())
        for fd in self.deadlines:
            _close_quietly(fd)
        self.deadlines.clear()
        self.epoll.close()

    def _ready(self) -> None:
        try:
            events = self.epoll.poll(0, WAKE_BATCH)
        except OSError as exc:  # never stop the loop for the lot's sake
            log.warning("fast engine: polling parked connections failed: %s", exc)
            return
        for fd, ev in events:
            try:
                self._wake(fd, ev)
            except Exception:
                log.exception("fast engine: a parked connection could not be woken")

    def _wake(self, fd: int, ev: int) -> None:
        if self.deadlines.pop(fd, None) is None:
            return  # closed by a sweep meanwhile
        self.epoll.unregister(fd)
        sock = socket.socket(self.family, socket.SOCK_STREAM, 0, fileno=fd)
        if ev & _GONE:
            # The client's FIN or reset, perhaps after a request: only a bare goodbye
            # is closed here; anything sent first is served as before (eof_received).
            try:
                first = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                first = b"?"  # nothing to read after all: adopt, the transport sees what comes
            except OSError:
                first = b""  # reset
            if not first:
                sock.close()
                return
        try:
            self.adopt(sock)
        except OSError:  # reset before it was set up: nothing to serve
            sock.close()

    def _sweep(self) -> None:
        self.handle = None
        now = self.loop.time()
        deadlines = self.deadlines
        due: list[int] = []
        following = 0.0
        for fd, at in deadlines.items():
            if at > now:
                following = at
                break
            due.append(fd)
        for fd in due:
            del deadlines[fd]
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass
            _close_quietly(fd)  # the idle timeout: closed quietly, as a transport would be
        if deadlines:
            self.handle = self.loop.call_at(following, self._sweep)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
