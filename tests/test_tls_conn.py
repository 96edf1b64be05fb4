"""The fast engine's own TLS layer (gateway/engine/tls_conn.py) over real sockets.

Why these cases: the engine no longer uses the event loop's TLS transport, so
what that transport did for us is checked here: records split across reads and
several records in one read reach the application whole and in order, a large
response leaves in several records, `close()` sends close_notify (RFC 8446 §6.1)
rather than a bare FIN, a client's close_notify is its EOF, the handshake has a
deadline, and an acceptor that closes cuts the handshakes still under way.
The acceptor is real (gateway/engine/fast_accept.py); the application is a
small echo protocol, so what is checked is the TLS layer alone.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import AsyncIterator

import pytest

from gateway.engine.fast_accept import Acceptor
from gateway.engine.tls_conn import READ_SIZE, T_CLOSED, TLSConn
from gateway.tls import server_context
from tests.tls_helpers import PKI

DEADLINE = 30.0  # generous: the box is shared
BIG = bytes(range(256)) * (128 * 1024)  # 32 MiB: more than the kernel's socket buffers hold


class Echo(asyncio.Protocol):
    """Echoes what it reads; `q` closes the connection, `Q` closes after echoing."""

    def __init__(self, record: list[Echo]) -> None:
        self.record = record
        self.data = bytearray()
        self.events: list[str] = []
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.Event()
        self.got = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.events.append("made")
        self.record.append(self)

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.data += data
        self.got.set()
        assert self.transport is not None
        if data.endswith(b"q"):
            self.transport.close()
        elif data.endswith(b"Q"):
            self.transport.write(bytes(self.data))
            self.transport.close()
        elif data.endswith(b"B"):
            self.transport.write(BIG)
            self.transport.close()
        elif data.endswith(b"!"):
            self.transport.write(bytes(self.data))
            self.data.clear()

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        if self.data.startswith(b"half"):  # as a tunnel does: answer, then close
            assert self.transport is not None
            self.transport.write(b"bye")
            self.transport.close()
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set()


@pytest.fixture
async def served(pki: PKI) -> AsyncIterator[tuple[Acceptor, int, list[Echo]]]:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    record: list[Echo] = []
    acc = Acceptor(loop, sock, lambda: Echo(record))
    acc.tls = server_context(str(pki.server.cert), str(pki.server.key), None)
    acc.tls_timeout = 60.0
    acc.start()
    yield acc, port, record
    acc.close()
    for e in record:
        if e.transport is not None:
            e.transport.abort()


def client(pki: PKI, port: int, **kw: object) -> ssl.SSLSocket:
    """A blocking TLS client (it tells close_notify from a bare FIN: suppress_ragged_eofs off)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    ctx = pki.client_ctx()
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False, **kw)  # type: ignore[arg-type]


def read_until_close_notify(c: ssl.SSLSocket) -> bytes:
    """Everything until the server's close_notify; a FIN without one raises SSLEOFError."""
    out = bytearray()
    while chunk := c.recv(65536):
        out += chunk
    return bytes(out)


def read_exactly(c: ssl.SSLSocket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = c.recv(n - len(out))
        assert chunk, f"closed after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


async def wait_for(cond: object, what: str) -> None:
    """Poll a condition with a deadline (no sleeping to synchronise)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not cond():  # type: ignore[operator]
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def handshake_by_hand(
    pki: PKI, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A client whose TLS runs over memory BIOs, handshake done: the test frames TCP itself."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = pki.client_ctx().wrap_bio(inc, out, server_hostname="127.0.0.1")
    async with asyncio.timeout(DEADLINE):
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                w.write(out.read())
                inc.write(await r.read(65536))
        w.write(out.read())
    return r, w, obj, inc, out


async def test_close_sends_close_notify_after_the_last_bytes(
    served: tuple[Acceptor, int, list[Echo]], pki: PKI
) -> None:
    _, port, record = served

    def talk() -> tuple[bytes, str | None, str | None]:
        with client(pki, port) as c:
            c.sendall(b"hello Q")
            return read_until_close_notify(c), c.selected_alpn_protocol(), c.version()

    data, alpn, version = await asyncio.to_thread(talk)
    assert data == b"hello Q"
    assert alpn == "http/1.1" and version in ("TLSv1.2", "TLSv1.3")
    async with asyncio.timeout(DEADLINE):
        await record[0].lost.wait()
    assert record[0].events == ["made", "lost"]


@pytest.mark.parametrize(
    "pieces",
    [
        [b"a" * 10 + b"!"],
        [b"a" * (READ_SIZE + 5000) + b"!"],  # one write: more than one record
        [b"x" * 100, b"y" * 100, b"z!"],  # several records, sent one by one
    ],
    ids=["one-record", "records-over-16k", "three-records"],
)
async def test_what_the_client_sends_reaches_the_application_whole_and_in_order(
    served: tuple[Acceptor, int, list[Echo]], pki: PKI, pieces: list[bytes]
) -> None:
    _, port, _ = served
    want = b"".join(pieces)

    def talk() -> bytes:
        with client(pki, port) as c:
            for p in pieces:
                c.sendall(p)
            return read_exactly(c, len(want))

    assert await asyncio.to_thread(talk) == want


async def test_records_split_across_tcp_segments_and_joined_in_one_are_both_read(
    served: tuple[Acceptor, int, list[Echo]], pki: PKI
) -> None:
    """Drive the client's TLS by hand to control TCP framing: byte by byte, then all at once."""
    _, port, record = served
    r, w, obj, inc, out = await handshake_by_hand(pki, port)
    async with asyncio.timeout(DEADLINE):
        obj.write(b"one ")
        trickle = out.read()
        for i in range(len(trickle)):  # a record one byte per TCP write
            w.write(trickle[i : i + 1])
            await w.drain()
        obj.write(b"two ")
        obj.write(b"three!")
        w.write(out.read())  # two records in one TCP write
        echoed = b""
        while not echoed.endswith(b"!"):
            inc.write(await r.read(65536))
            try:
                while True:
                    echoed += obj.read(65536)
            except ssl.SSLWantReadError:
                pass
    assert echoed == b"one two three!"
    # The client's close_notify is its EOF: the application hears of it and the
    # connection is closed (ours goes back).
    try:
        obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    w.write(out.read())
    async with asyncio.timeout(DEADLINE):
        await record[0].lost.wait()
    assert record[0].events == ["made", "eof", "lost"]
    w.close()


async def test_a_response_larger_than_a_record_arrives_whole(
    served: tuple[Acceptor, int, list[Echo]], pki: PKI
) -> None:
    _, port, _ = served
    body = bytes(range(256)) * 300  # 76,800 bytes: five records at least

    def talk() -> bytes:
        with client(pki, port) as c:
            c.sendall(body + b"Q")
            return read_until_close_notify(c)

    assert await asyncio.to_thread(talk) == body + b"Q"


async def test_the_transport_tells_what_was_negotiated(
    served: tuple[Acceptor, int, list[Echo]], pki: PKI
) -> None:
    _, port, record = served

    def talk() -> bytes:
        with client(pki, port) as c:
            c.sendall(b"hi!")
            return read_exactly(c, 3)

    assert await asyncio.to_thread(talk) == b"hi!"
    tr = record[0].transport
    assert isinstance(tr, TLSConn)
    assert tr.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    assert tr.get_extra_info("cipher") is not None
    assert tr.get_extra_info("peercert") is None  # no client certificate asked for
    assert tr.get_extra_info("peername")[0] == "127.0.0.1"
    assert tr.get_extra_info("nothing", 7) == 7
    assert tr.can_write_eof() is False


async def test_a_client_that_stalls_the_handshake_is_dropped_after_the_timeout(
    served: tuple[Acceptor, int, list[Echo]],
) -> None:
    acc, port, record = served
    acc.tls_timeout = 0.3
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"\x16\x03\x01")  # the start of a ClientHello, and no more
    async with asyncio.timeout(DEADLINE):
        assert await r.read() == b""
    w.close()
    assert record == []
    await wait_for(lambda: not acc._handshaking, "the acceptor to forget the handshake")


async def test_closing_the_acceptor_cuts_handshakes_under_way(
    served: tuple[Acceptor, int, list[Echo]], pki: PKI
) -> None:
    acc, port, record = served
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await wait_for(lambda: acc._handshaking, "the connection to be adopted")
    acc.close()  # the handshake timeout is 60 s: only the close can end it this soon
    async with asyncio.timeout(DEADLINE):
        assert await r.read() == b""
    w.close()
    assert record == [] and not acc._handshaking


async def test_garbage_instead_of_a_client_hello_closes_without_an_application(
    served: tuple[Acceptor, int, list[Echo]], pki: PKI
) -> None:
    acc, port, record = served
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(DEADLINE):
        answer = await r.read()
    w.close()
    assert not answer.startswith(b"HTTP/")  # at most a TLS alert
    assert record == []
    await wait_for(lambda: not acc._handshaking, "the acceptor to forget the handshake")

    def talk() -> bytes:  # and the next client is served
        with client(pki, port) as c:
            c.sendall(b"ok!")
            return read_exactly(c, 3)

    assert await asyncio.to_thread(talk) == b"ok!"


async def test_a_client_fin_without_close_notify_is_its_eof_and_the_answer_still_goes_out(
    served: tuple[Acceptor, int, list[Echo]], pki: PKI
) -> None:
    """A FIN (no close_notify) reaches the application as EOF; an application that keeps
    the connection (a tunnel) can still answer, and its close sends close_notify."""
    _, port, record = served
    r, w, obj, inc, out = await handshake_by_hand(pki, port)
    got = b""
    async with asyncio.timeout(DEADLINE):
        obj.write(b"half")
        w.write(out.read())
        await wait_for(lambda: record and record[0].got.is_set(), "the bytes to arrive")
        w.write_eof()  # a bare FIN
        closed_cleanly = False
        while True:
            chunk = await r.read(65536)
            if not chunk:
                break
            inc.write(chunk)
            try:
                while piece := obj.read(65536):
                    got += piece
                closed_cleanly = True  # read() returned b"": the server's close_notify
            except ssl.SSLWantReadError:
                pass
    w.close()
    assert got == b"bye" and closed_cleanly
    async with asyncio.timeout(DEADLINE):
        await record[0].lost.wait()
    assert record[0].events == ["made", "eof", "lost"]


async def test_a_large_response_to_a_client_that_reads_late_is_sent_whole_after_the_close_wait(
    served: tuple[Acceptor, int, list[Echo]], pki: PKI
) -> None:
    """The close's wait for the client's close_notify ends in a close, not an abort: what
    the client has not read yet (most of 32 MiB) still reaches it, then close_notify."""
    _, port, record = served
    go = threading.Event()

    def talk() -> bytes:
        with client(pki, port) as c:
            c.sendall(b"B")
            assert go.wait(DEADLINE)  # not reading until the close wait is over
            return read_until_close_notify(c)

    reader = asyncio.ensure_future(asyncio.to_thread(talk))
    await wait_for(lambda: record and record[0].transport.state == T_CLOSED, "the close wait")
    go.set()
    assert await reader == BIG
