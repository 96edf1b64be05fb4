"""The fast engine's acceptor: a burst of queued connections is taken in one readiness event.

Why it exists: libuv accepts one connection per event-loop iteration, so under load a burst
of new clients waited seconds in the accept queue (gateway/engine/fast_accept.py). These
tests hold the loop still, queue real connections in the kernel, and count what one call
takes: no timing involved.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket

import pytest

from gateway.engine.fast_accept import Acceptor


class Counting(asyncio.Protocol):
    made: list[Counting] = []
    changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        Counting.made.append(self)
        Counting.changed.set()

    @classmethod
    def reset(cls) -> None:
        cls.made = []
        cls.changed = asyncio.Event()

    @classmethod
    async def wait_for(cls, n: int) -> None:
        async with asyncio.timeout(10):
            while len(cls.made) < n:
                cls.changed.clear()
                await cls.changed.wait()


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    return sock


def _queue_clients(port: int, n: int) -> list[socket.socket]:
    """Connect `n` clients; the kernel completes each handshake into the accept queue."""
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]


async def _settle(acc: Acceptor) -> None:
    await acc.wait_closed()  # every accepted socket has its transport and protocol


@pytest.mark.parametrize(
    ("queued", "batch", "taken"), [(40, 256, 40), (40, 16, 16)], ids=["all", "capped"]
)
async def test_one_readiness_event_takes_the_whole_queue_up_to_the_batch(
    queued: int, batch: int, taken: int
) -> None:
    loop = asyncio.get_running_loop()
    sock = _listener()
    clients = _queue_clients(sock.getsockname()[1], queued)
    Counting.reset()
    acc = Acceptor(loop, sock, Counting, batch=batch)
    try:
        sock.setblocking(False)
        acc._ready()  # one readiness callback, the loop not running in between
        await _settle(acc)
        assert len(Counting.made) == taken
        acc.start()  # the rest follow on the next events
        await Counting.wait_for(queued)
        peers = {p.transport.get_extra_info("peername") for p in Counting.made}
        assert peers == {c.getsockname() for c in clients}
        assert all(
            p.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for p in Counting.made
        )
    finally:
        acc.close()
        for p in Counting.made:
            p.transport.close()
        for c in clients:
            c.close()


async def test_close_refuses_new_connections() -> None:
    loop = asyncio.get_running_loop()
    sock = _listener()
    port = sock.getsockname()[1]
    acc = Acceptor(loop, sock, Counting)
    acc.start()
    acc.close()
    acc.close()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


class _Failing(socket.socket):
    """A listening socket whose accept fails as the kernel can (EMFILE at the fd limit, ...)."""

    failing = True
    code = errno.EMFILE

    def accept(self) -> tuple[socket.socket, object]:
        if self.failing:
            raise OSError(self.code, os.strerror(self.code))
        return super().accept()


@pytest.mark.parametrize("code", [errno.EMFILE, errno.EPROTO], ids=["emfile", "eproto"])
async def test_accept_errors_pause_accepting_then_resume(
    code: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.engine import fast_accept

    monkeypatch.setattr(fast_accept, "PAUSE_SECONDS", 0.05)
    loop = asyncio.get_running_loop()
    sock = _Failing()
    sock.code = code
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    client = socket.create_connection(("127.0.0.1", sock.getsockname()[1]))
    Counting.reset()
    acc = Acceptor(loop, sock, Counting)
    try:
        acc.start()
        acc._ready()  # the listener is readable: one event, and accept fails
        assert any("cannot accept" in r.getMessage() for r in caplog.records)
        assert not acc._reading  # paused: no busy loop on a readable listener
        sock.failing = False
        await Counting.wait_for(1)  # resumed after the pause; the queued client is served
        assert acc._reading
    finally:
        acc.close()
        for p in Counting.made:
            p.transport.close()
        client.close()
