"""A small pipelining HTTP/1.1 client and fixed-answer upstreams for split tests.

Why not aiohttp here: the split acceptance needs ~100,000 requests per check;
pipelined keep-alive requests over raw sockets keep the test side cheap so the
gateway (a separate process) is what is exercised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial

import httptools


class _Resp:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.status = 0


async def _conn_worker(
    host: str,
    port: int,
    items: Sequence[tuple[str, bytes]],
    out: dict[str, tuple[int, str, str]],
    batch: int,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    done: list[_Resp] = []
    cur = _Resp()

    class P:
        def on_header(self, name: bytes, value: bytes) -> None:
            cur.headers[name.lower()] = value

        def on_headers_complete(self) -> None:
            cur.status = parser.get_status_code()

        def on_body(self, body: bytes) -> None:
            cur.body += body

        def on_message_complete(self) -> None:
            nonlocal cur
            done.append(cur)
            cur = _Resp()

    parser = httptools.HttpResponseParser(P())
    try:
        for i in range(0, len(items), batch):
            chunk = items[i : i + batch]
            writer.write(b"".join(req for _, req in chunk))
            await writer.drain()
            done.clear()
            while len(done) < len(chunk):
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("gateway closed the connection")
                parser.feed_data(data)
            for (key, _), r in zip(chunk, done, strict=True):
                stage = r.headers.get(b"x-release-stage", b"").decode()
                out[key] = (r.status, stage, bytes(r.body).decode("latin-1"))
    finally:
        writer.close()
        await writer.wait_closed()


def build_request(path: str, headers: dict[str, str], host: str = "gw.test") -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def releases_for_users(
    port: int,
    users: Sequence[str],
    *,
    header: str = "X-User-ID",
    conns: int = 16,
    batch: int = 64,
    host: str = "127.0.0.1",
) -> dict[str, tuple[int, str, str]]:
    """user -> (status, X-Release-Stage, body) for one GET per user, sticky key in `header`."""
    items = [(u, build_request("/", {header: u})) for u in users]
    out: dict[str, tuple[int, str, str]] = {}
    per = (len(items) + conns - 1) // conns
    await asyncio.gather(
        *(
            _conn_worker(host, port, items[i * per : (i + 1) * per], out, batch)
            for i in range(conns)
            if items[i * per : (i + 1) * per]
        )
    )
    return out


def _field(head: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (lower case) in a response head, or None."""
    i = head.lower().find(b"\r\n" + name + b":")
    if i < 0:
        return None
    start = i + len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


class _Pipeline(asyncio.Protocol):
    """Pipelined GETs on one keep-alive connection, at most `window` outstanding.

    Parses only what the split tests read: the status, X-Release-Stage and a
    Content-Length body (what FixedUpstream sends), with bytes.find, no callbacks.
    """

    def __init__(self, reqs: Sequence[bytes], window: int) -> None:
        self.reqs, self.window = reqs, window
        self.got: list[tuple[int, str, str]] = []
        self.sent = 0
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[list[tuple[int, str, str]]] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._fill()

    def _fill(self) -> None:
        end = min(len(self.reqs), len(self.got) + self.window)
        if end - self.sent >= self.window // 2 or end == len(self.reqs) > self.sent:
            assert self.transport is not None
            self.transport.write(b"".join(self.reqs[self.sent : end]))
            self.sent = end

    def data_received(self, data: bytes) -> None:
        buf, pos = self.buf + data, 0
        while (end := buf.find(b"\r\n\r\n", pos)) >= 0:
            head = buf[pos:end]
            length = _field(head, b"content-length")
            if length is None:
                self._fail(ConnectionError(f"no Content-Length: {head!r}"))
                return
            body_end = end + 4 + int(length)
            if len(buf) < body_end:
                break
            stage = (_field(head, b"x-release-stage") or b"").decode("latin-1")
            body = buf[end + 4 : body_end].decode("latin-1")
            self.got.append((int(head[9:12]), stage, body))
            pos = body_end
        self.buf = buf[pos:]
        if len(self.got) == len(self.reqs):
            assert self.transport is not None
            self.transport.close()
            if not self.done.done():
                self.done.set_result(self.got)
        else:
            self._fill()

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"closed after {len(self.got)} of {len(self.reqs)}: {exc}"))


async def stages_for_keys(
    port: int,
    keys: Sequence[str],
    *,
    header: str = "X-User-ID",
    conns: int = 16,
    window: int = 128,
    host: str = "127.0.0.1",
) -> list[tuple[int, str, str]]:
    """(status, X-Release-Stage, body) for one GET per key, in the order of `keys`.

    Each connection takes a contiguous slice of `keys`, so a key listed twice far
    apart is asked on two connections (with `--workers N`, usually two processes).
    """
    loop = asyncio.get_running_loop()
    reqs = [build_request("/", {header: k}) for k in keys]
    per = (len(reqs) + conns - 1) // conns
    slices = [reqs[i : i + per] for i in range(0, len(reqs), per)]
    protos: list[_Pipeline] = []
    for part in slices:
        _, proto = await loop.create_connection(partial(_Pipeline, part, window), host, port)
        protos.append(proto)
    got = await asyncio.gather(*(p.done for p in protos))
    return [r for part in got for r in part]


class FixedUpstream(asyncio.Protocol):
    """Answers every request with its release name; keep-alive; no parsing beyond CRLFCRLF."""

    def __init__(self, release: str) -> None:
        body = release.encode()
        self.resp = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4 :]
            assert self.transport is not None
            self.transport.write(self.resp * n)


async def start_fixed_upstream(release: str) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FixedUpstream(release), "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


class ThreadedUpstreams:
    """Fixed-answer upstreams on a private event loop thread (for sync process tests)."""

    def __init__(self, releases: Sequence[str]) -> None:
        import threading

        self.releases = list(releases)
        self.ports: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            for r in self.releases:
                srv, port = await start_fixed_upstream(r)
                self._servers.append(srv)
                self.ports[r] = port
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

        async def close() -> None:
            for s in self._servers:
                s.close()
                await s.wait_closed()

        self._loop.run_until_complete(close())
        self._loop.close()

    def __enter__(self) -> ThreadedUpstreams:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("upstreams did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def url(self, release: str) -> str:
        return f"http://127.0.0.1:{self.ports[release]}"
