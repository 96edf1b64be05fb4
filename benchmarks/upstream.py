"""A fast built-in upstream for machines without nginx.

A raw asyncio Protocol (uvloop when present) answering ``/1k`` and ``/100k``
with fixed keep-alive responses and ``/__status`` in nginx's stub_status
format, so the harness counts requests per release the same way either way.

    python -m benchmarks.upstream --port 9001
    python -m benchmarks.upstream --port 9001 --tls-cert cert.pem --tls-key key.pem  # HTTPS
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
from dataclasses import dataclass
from email.utils import formatdate
from typing import cast

from benchmarks.nginxconf import BODY_SIZES, STATUS_PATH, body

_MAX_HEAD = 64 * 1024


@dataclass
class Stats:
    accepts: int = 0
    active: int = 0
    requests: int = 0

    def stub_status(self) -> bytes:
        return (
            f"Active connections: {self.active} \nserver accepts handled requests\n"
            f" {self.accepts} {self.accepts} {self.requests} \n"
            f"Reading: 0 Writing: 1 Waiting: {max(self.active - 1, 0)} \n"
        ).encode()


# The fields nginx sends with a static file (`server_tokens off`, benchmarks/nginxconf.py):
# a forwarder's work per response grows with the fields it relays, so the built-in
# upstream sends the same eight as the nginx upstream pair of the wrk runs.
_STARTED = formatdate(usegmt=True)
_NGINX_FIELDS = (
    f"Server: nginx\r\nDate: {_STARTED}\r\n",
    f"Last-Modified: {_STARTED}\r\nConnection: keep-alive\r\n"
    'ETag: "6564e0a1-400"\r\nAccept-Ranges: bytes\r\n',
)


def _response(status: str, payload: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\n{_NGINX_FIELDS[0]}Content-Type: application/octet-stream\r\n"
        f"Content-Length: {len(payload)}\r\n{_NGINX_FIELDS[1]}\r\n"
    )
    return head.encode() + payload


RESPONSES = {path.encode(): _response("200 OK", body(size)) for path, size in BODY_SIZES.items()}
NOT_FOUND = _response("404 Not Found", b"not found\n")


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


class FixedResponder(asyncio.Protocol):
    """HTTP/1.1 keep-alive server of precomputed responses; pipelining-safe."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self.transport = cast(asyncio.Transport, transport)
        self.stats.accepts += 1
        self.stats.active += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.active -= 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        out = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self.transport.close()
                break
            head = self.buf[:end]
            try:
                total = end + 4 + _content_length(head)
            except ValueError:
                self.transport.close()
                return
            if len(self.buf) < total:
                break
            self.buf = self.buf[total:]
            self.stats.requests += 1
            parts = head.split(b" ", 2)
            path = parts[1] if len(parts) > 1 else b""
            if path == STATUS_PATH.encode():
                out.append(_response("200 OK", self.stats.stub_status()))
            else:
                out.append(RESPONSES.get(path, NOT_FOUND))
            if b"\r\nconnection: close" in head.lower():
                self.transport.write(b"".join(out))
                self.transport.close()
                return
        if out:
            self.transport.write(b"".join(out))


async def serve(port: int, ctx: ssl.SSLContext | None = None) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(
        lambda: FixedResponder(stats), "127.0.0.1", port, backlog=4096, reuse_address=True, ssl=ctx
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    args = parser.parse_args()
    ctx = None
    if args.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, ctx))
    else:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(serve(args.port, ctx))


if __name__ == "__main__":
    main()
