"""Test doubles for the forwarding engines: a tiny policy, raw sockets, a raw upstream.

Why raw sockets: framing and smuggling cases need exact bytes on the wire,
which no HTTP client library will send or show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.engine.api import Forward, Handler, RequestHead, Respond
from gateway.engine.fast import FastEngine
from gateway.engine.fast_client import _NO_QUEUE, ClientConn

HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
MARK = (b"X-Engine-Test", b"1")


class ProxyHandler:
    """Forward everything to one upstream, mark responses, record outcomes."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        local: Iterable[bytes] = (),
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.local = frozenset(local)
        self.heads: list[RequestHead] = []
        self.done: list[tuple[int, str | None]] = []
        self.calls: dict[int, int] = {}
        self.errors: list[tuple[int, str]] = []
        self._changed = asyncio.Event()
        self.got_head = asyncio.Event()

    def handle(self, head: RequestHead) -> Forward | Respond:
        self.heads.append(head)
        self.got_head.set()
        if head.target in self.local:
            return Respond(200, b"local:" + head.target, [(b"Content-Type", b"text/plain")])
        tokens: set[bytes] = set()
        for n, v in head.headers:
            if n.lower() == b"connection":
                tokens |= {t.strip().lower() for t in v.split(b",")}
        headers = [(n, v) for n, v in head.headers if n.lower() not in HOP | tokens]
        key = len(self.calls)
        self.calls[key] = 0

        def on_done(status: int, kind: str | None) -> None:
            self.calls[key] += 1
            self.done.append((status, kind))
            self._changed.set()

        return Forward(
            self.host,
            self.port,
            headers,
            [MARK],
            "svc",
            "stable",
            self.connect_timeout,
            self.read_timeout,
            on_done,
        )

    def error_body(self, status: int, kind: str, fwd: Forward) -> Respond:
        self.errors.append((status, kind))
        body = json.dumps({"error": kind}).encode()
        return Respond(status, body, [(b"Content-Type", b"application/json")])

    async def wait_done(self, n: int, limit: float = 10.0) -> list[tuple[int, str | None]]:
        """Wait until `n` exchanges reported; check each Forward reported exactly once."""
        async with asyncio.timeout(limit):
            while len(self.done) < n:
                self._changed.clear()
                await self._changed.wait()
        assert all(c <= 1 for c in self.calls.values()), self.calls
        return self.done


@dataclass
class Resp:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw_head: bytes = b""

    def get(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


def _dechunk(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    out: list[bytes] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)
            if end < 0:
                return None
            return b"".join(out), end + 4
        if len(buf) < pos + size + 2:
            return None
        out.append(buf[pos : pos + size])
        pos += size + 2


def parse_head(buf: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], int] | None:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        n, _, v = line.partition(b":")
        headers.append((n, v.strip()))
    return lines[0], headers, end + 4


def parse_response(
    buf: bytes, *, no_body: bool = False, eof: bool = False
) -> tuple[Resp, int] | None:
    """One response from the start of `buf`, or None if it is not all there yet."""
    h = parse_head(buf)
    if h is None:
        return None
    first, headers, pos = h
    status = int(first.split(b" ")[1])
    r = Resp(status, headers, b"", buf[:pos])
    if no_body or status < 200 or status in (204, 304):
        return r, pos
    cl = r.get(b"content-length")
    if cl is not None:
        n = int(cl)
        if len(buf) < pos + n:
            return None
        r.body = buf[pos : pos + n]
        return r, pos + n
    if (r.get(b"transfer-encoding") or b"").lower() == b"chunked":
        d = _dechunk(buf, pos)
        if d is None:
            return None
        r.body, end = d
        return r, end
    if not eof:
        return None
    r.body = buf[pos:]
    return r, len(buf)


class RawClient:
    """A client socket that sends exact bytes and parses responses by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = b""
        self.eof = False

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _more(self) -> None:
        chunk = await self.reader.read(65536)
        if not chunk:
            self.eof = True
        self.buf += chunk

    async def response(self, *, no_body: bool = False, limit: float = 10.0) -> Resp:
        async with asyncio.timeout(limit):
            while True:
                got = parse_response(self.buf, no_body=no_body, eof=self.eof)
                if got is not None:
                    r, used = got
                    self.buf = self.buf[used:]
                    return r
                if self.eof:
                    raise EOFError(f"connection closed; have {self.buf!r}")
                await self._more()

    async def read_until_eof(self, limit: float = 10.0) -> bytes:
        async with asyncio.timeout(limit):
            while not self.eof:
                await self._more()
        data, self.buf = self.buf, b""
        return data

    async def closed_by_peer(self, limit: float = 10.0) -> bool:
        """True once the peer closed (EOF or reset), after draining what it sent."""
        try:
            await self.read_until_eof(limit)
        except ConnectionError:
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def read_request(
    reader: asyncio.StreamReader,
) -> tuple[bytes, list[tuple[bytes, bytes]], bytes, bytes]:
    """(request line, headers, decoded body, raw bytes) of one request; framing by hand."""
    raw = await reader.readuntil(b"\r\n\r\n")
    h = parse_head(raw)
    assert h is not None
    line, headers, _ = h
    lower = {n.lower(): v for n, v in headers}
    body = b""
    if b"content-length" in lower:
        body = await reader.readexactly(int(lower[b"content-length"]))
        raw += body
    elif lower.get(b"transfer-encoding", b"").lower() == b"chunked":
        chunks = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            chunks += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while True:
                    t = await reader.readuntil(b"\r\n")
                    chunks += t
                    if t == b"\r\n":
                        break
                break
            data = await reader.readexactly(size + 2)
            chunks += data
            body += data[:-2]
        raw += chunks
    return line, headers, body, raw


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@dataclass
class RawUpstream:
    """An upstream that runs a script per connection and counts connections."""

    script: Script
    server: asyncio.Server | None = None
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    _tasks: set[asyncio.Task[object]] = field(default_factory=set)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> RawUpstream:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.append(w)
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self.script(r, w, self.connections)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in list(self._tasks):
            t.cancel()
        for w in self._writers:
            w.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self._writers:
            with contextlib.suppress(Exception):
                await w.wait_closed()
        await self.server.wait_closed()


class Env:
    """Servers for one test, on whatever loop runs it; everything closed in `aclose`."""

    def __init__(self) -> None:
        self.engines: list[FastEngine] = []
        self.servers: list[TestServer] = []
        self.raws: list[RawUpstream] = []
        self.clients: list[RawClient] = []

    async def connect(self, port: int) -> RawClient:
        c = await RawClient.connect(port)
        self.clients.append(c)
        return c

    async def engine(self, handler: Handler, **kw: float) -> tuple[FastEngine, int]:
        eng = FastEngine(handler, **kw)  # type: ignore[arg-type]
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = int(sock.getsockname()[1])
        await eng.serve(sock)
        self.engines.append(eng)
        return eng, port

    async def aiohttp_server(self, app: web.Application) -> int:
        """Serve `app` on 127.0.0.1 (the `aiohttp_server` fixture's TestServer); its port."""
        srv = TestServer(app, host="127.0.0.1")
        await srv.start_server()
        self.servers.append(srv)
        assert srv.port is not None
        return srv.port

    async def via(self, script: Script) -> tuple[RawUpstream, ProxyHandler, RawClient]:
        """A scripted upstream, an engine forwarding to it, and a client connected to that."""
        up = await self.raw_upstream(script)
        handler = ProxyHandler(up.port)
        _, port = await self.engine(handler)
        return up, handler, await self.connect(port)

    async def raw_upstream(self, script: Script) -> RawUpstream:
        up = await RawUpstream(script).start()
        self.raws.append(up)
        return up

    async def aclose(self) -> None:
        for c in self.clients:
            await c.close()
        for eng in self.engines:
            await eng.shutdown(0.5)
        for up in self.raws:
            await up.stop()
        for srv in self.servers:
            await srv.close()


def idle_checked(conn: ClientConn) -> bool:
    """The idle check after the last response has run: no llhttp parser, no queue of its own.

    Why not the parser alone: a connection whose heads were all read by
    engine/fast_head.py never made one.
    """
    return conn.parser is None and conn._queue is _NO_QUEUE
