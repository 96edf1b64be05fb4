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
from array import array
from collections.abc import Callable
from typing import Final, cast

log = logging.getLogger(__name__)

# Readiness events taken per wake-up of the loop: a burst of returning clients is
# adopted over a few iterations, as engine/fast_accept.py's ACCEPT_BATCH does for new ones.
WAKE_BATCH: Final = 256
# The kernel says "readable" for a request, and also for a FIN (EPOLLRDHUP) or an error.
_WATCH: Final = select.EPOLLIN | select.EPOLLRDHUP
_GONE: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# Swept entries are dropped from the front of the arrays once this many have piled up.
COMPACT_AFTER: Final = 4096
# After this many parkings, the C allocator is asked to return its free pages to the
# system (glibc's malloc_trim): the transports were freed, but C's free() keeps freed
# memory below the top of its heap. At most once per TRIM_DELAY, TRIM_DELAY after the
# parking that asked, so a burst's last transports are freed first. A trim with little
# to return costs ~0.1 ms, after 10,000 parked connections ~1 ms.
TRIM_AFTER: Final = 1024
TRIM_DELAY: Final = 1.0


class ParkingLot:
    """Descriptors of parked idle connections, each with its keep-alive deadline.

    `adopt` serves a woken socket as a newly accepted one. Deadlines are kept
    in parking order, which is their order too (every connection gets the same
    keep-alive timeout, counted from its last response); one loop timer sweeps
    the due ones from the front.

    Why arrays and no Python object per connection: the transports a burst of
    connections needed are freed when they park, and the allocator can hand
    their memory back only if nothing allocated meanwhile lives among it.
    """

    __slots__ = (
        "loop",
        "adopt",
        "family",
        "epoll",
        "fds",
        "ends",
        "seq",
        "head",
        "base",
        "count",
        "handle",
        "closed",
        "trim",
        "untrimmed",
        "trim_handle",
    )

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
        # Parkings in order: descriptor and the loop time its keep-alive timeout ends.
        # Entry k is number base + k; entries before `head` are swept or stale.
        self.fds = array("i")
        self.ends = array("d")
        self.head = 0
        self.base = 0
        # Per descriptor, 1 + the number of its current parking; 0: not parked.
        self.seq = array("q")
        self.count = 0
        self.handle: asyncio.TimerHandle | None = None
        self.closed = False
        self.trim = _malloc_trim()  # None where the C library has none (not glibc)
        self.untrimmed = 0  # parkings since the last trim
        self.trim_handle: asyncio.TimerHandle | None = None
        loop.add_reader(self.epoll.fileno(), self._ready)

    def __len__(self) -> int:
        return self.count

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
        seq = self.seq
        if parked >= len(seq):
            more = max(parked + 1, 2 * len(seq), 1024) - len(seq)
            seq.frombytes(bytes(seq.itemsize * more))  # zeros: not parked
        seq[parked] = self.base + len(self.fds) + 1
        self.fds.append(parked)
        self.ends.append(deadline)
        self.count += 1
        if self.handle is None:
            self.handle = self.loop.call_at(deadline, self._sweep)
        self.untrimmed += 1
        if self.untrimmed >= TRIM_AFTER and self.trim_handle is None and self.trim is not None:
            self.trim_handle = self.loop.call_later(TRIM_DELAY, self._trim)
        return True

    def _trim(self) -> None:
        self.trim_handle = None
        self.untrimmed = 0
        if self.trim is not None:
            try:
                self.trim(0)
            except Exception:  # never stop the loop for the lot's sake
                log.exception("fast engine: malloc_trim failed")

    def close(self) -> None:
        """Close every parked connection (they are idle: RFC 9112 §9.6) and stop watching."""
        if self.closed:
            return
        self.closed = True
        for h in (self.handle, self.trim_handle):
            if h is not None:
                h.cancel()
        self.handle = self.trim_handle = None
        self.loop.remove_reader(self.epoll.fileno())
        for k in range(self.head, len(self.fds)):
            if self._unpark(k):
                _close_quietly(self.fds[k])
        self.epoll.close()

    def _unpark(self, k: int) -> bool:
        """Entry k leaves the lot if it is its descriptor's current parking."""
        fd = self.fds[k]
        if self.seq[fd] != self.base + k + 1:
            return False  # woken (and perhaps parked again later) meanwhile
        self.seq[fd] = 0
        self.count -= 1
        return True

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
        if fd >= len(self.seq) or not self.seq[fd]:
            return  # closed by a sweep meanwhile
        self.seq[fd] = 0
        self.count -= 1
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
        fds, ends = self.fds, self.ends
        k, n = self.head, len(fds)
        while k < n:
            if self.seq[fds[k]] == self.base + k + 1:  # still parked
                if ends[k] > now:
                    self.handle = self.loop.call_at(ends[k], self._sweep)
                    break
                self._unpark(k)
                fd = fds[k]
                try:
                    self.epoll.unregister(fd)
                except OSError:
                    pass
                _close_quietly(fd)  # the idle timeout: closed quietly, as a transport would be
            k += 1
        self.head = k
        if k >= COMPACT_AFTER and 2 * k >= n:  # drop the swept front: amortised O(1)
            del fds[:k]
            del ends[:k]
            self.base += k
            self.head = 0


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim(pad)` (malloc_trim(3)), or None under another C library."""
    try:
        import ctypes

        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return cast(Callable[[int], int], fn)
