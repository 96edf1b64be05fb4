"""TLS for the fast engine's connections, done over the plain TCP transport.

Why not the event loop's TLS transport (`connect_accepted_socket(ssl=...)`):
uvloop's `SSLProtocol` buffers every write in a backlog, checks flow control
on both sides after every read and write, reads each record with a 256 KiB
`SSLObject.read` (a large allocation shrunk to fit), and hands the
application an extra transport object in between; measured with callgrind,
that glue cost the gateway about 11k instructions per proxied request on top
of OpenSSL's own work, nearly four times nginx's (benchmarks/README.md "TLS").
Here one object is both the TCP transport's protocol and the application's
transport: bytes read go into the incoming memory BIO and come out decrypted
in one `data_received`; a response is encrypted with one `SSLObject.write`
and leaves with one transport write. Same session as before: the context's
protocols, ALPN and client-certificate checks are OpenSSL's, untouched.

The same layer speaks TLS to `https://` upstreams (`open_client`,
`server_side=False`): SNI and the checked name are `server_hostname`, the
context carries the CA, the verify choice and the client certificate for
mTLS (gateway/tls.py `client_context`); the pool's connection sees this
object as its transport once the handshake is done, as a client's does.

Closing sends close_notify (RFC 8446 §6.1) and half-closes TCP, then reads
and drops what the client still sends until its close_notify or FIN, at most
`CLOSE_SECONDS` (then the transport is closed once its buffer is sent): a close
that left unread bytes behind would become a reset that can destroy the
response in flight (RFC 9112 §9.6).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, Final, cast

log = logging.getLogger(__name__)

# A connection's lifecycle (`TLSConn.state`), in order.
T_HANDSHAKE: Final = 0  # before the handshake completes: no application yet
T_OPEN: Final = 1  # application data both ways
T_CLOSING: Final = 2  # our close_notify is sent: reading and dropping until the peer's
T_CLOSED: Final = 3  # the TCP transport is closed or aborted

# Plaintext asked of OpenSSL per read: one record's worth at most (RFC 8446 §5.1).
READ_SIZE: Final = 16384
# How long a closing connection waits for the client's close_notify or FIN.
CLOSE_SECONDS: Final = 2.0


class TLSConn:
    """One client connection's TLS session: the TCP transport's protocol and the app's transport.

    The application (the engine's `ClientConn`) is made by `app_factory` once
    the handshake is done and sees an `asyncio.Transport` by duck typing:
    `write`, `close`, `abort`, `pause_reading`, `resume_reading`,
    `get_extra_info` (`ssl_object`, `peercert`, `cipher` and the socket's
    names), `can_write_eof` (False: TLS has no half-close but close_notify).
    """

    __slots__ = (
        "loop",
        "context",
        "app_factory",
        "handshake_timeout",
        "on_open",
        "state",
        "raw",
        "app",
        "sslobj",
        "incoming",
        "outgoing",
        "_read",
        "_write",
        "_pending",
        "_feed",
        "_drain",
        "_send",
        "_recv",
        "_timer",
        "_peer_eof",
        "waiter",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        context: ssl.SSLContext,
        app_factory: Callable[[], asyncio.Protocol],
        handshake_timeout: float,
        on_open: Callable[[TLSConn, bool], None] | None = None,
        server_side: bool = True,
        server_hostname: str | None = None,
        waiter: asyncio.Future[asyncio.Protocol] | None = None,
    ) -> None:
        self.loop = loop
        self.context = context
        self.app_factory = app_factory
        self.handshake_timeout = handshake_timeout
        # Told (conn, True) when the handshake starts and (conn, False) when it ends
        # either way: the acceptor cuts unfinished handshakes when it closes.
        self.on_open = on_open
        self.state = T_HANDSHAKE
        self.raw: asyncio.Transport | None = None
        self.app: Any = None  # the application's protocol, after the handshake
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )
        # The client side (an upstream): told the application when the handshake is
        # done, or why it failed; the server side has none.
        self.waiter = waiter
        # Bound once: the C methods themselves with gateway.tls.DirectSSLObject.
        self._read: Callable[[int], bytes] = self.sslobj.read
        self._write: Callable[[bytes], int] = self.sslobj.write
        self._pending: Callable[[], int] = self.sslobj.pending
        # The per-request calls, bound once per connection (no method lookup per call).
        self._feed: Callable[[bytes], int] = self.incoming.write
        self._drain: Callable[[], bytes] = self.outgoing.read
        self._send: Callable[[bytes], object] = _drop  # the TCP transport's write
        self._recv: Callable[[bytes], object] = _drop  # the application's data_received
        self._timer: asyncio.TimerHandle | None = None
        self._peer_eof = False  # the client's FIN came and the application kept the connection

    def __repr__(self) -> str:
        state = ("handshake", "open", "closing", "closed")[self.state]
        return f"TLSConn({state}, app={self.app!r})"

    # -- the TCP transport's protocol ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = self.raw = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._send = raw.write
        self._timer = self.loop.call_later(self.handshake_timeout, self._handshake_expired)
        if self.on_open is not None:
            self.on_open(self, True)
        if self.waiter is not None:
            self._handshake()  # the client speaks first: the ClientHello goes out now

    def data_received(self, data: bytes) -> None:
        st = self.state
        self._feed(data)
        if st == T_OPEN:
            self._deliver(len(data))
        elif st == T_HANDSHAKE:
            self._handshake()
        elif st == T_CLOSING:
            self._shutdown()

    def eof_received(self) -> bool | None:
        if self.state == T_OPEN:
            # A FIN without close_notify: the client is gone, as over plain TCP
            # (a tunnel may keep the connection to send what the upstream still says).
            keep: bool | None = self.app.eof_received()
            self._peer_eof = bool(keep)
            return keep
        if self.state == T_HANDSHAKE:
            log.debug("fast engine: TLS handshake with a %s failed: EOF", self._peer())
            self._ended()
            self._refused(ConnectionResetError("the peer closed during the TLS handshake"))
        return None  # the TCP transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = T_CLOSED
        self._cancel_timer()
        self._ended()
        if self.waiter is not None:
            self._refused(exc or ConnectionResetError("connection lost during the TLS handshake"))
        # The bound methods would keep a cycle (application -> us -> its method):
        # dropped, a closed connection is freed at once, not by a full collection.
        self._recv = self._send = _drop
        app = self.app
        if app is not None:
            self.app = None
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # -- the application's transport ---------------------------------------------

    def write(self, data: bytes) -> None:
        if self.state != T_OPEN or not data:
            return
        try:
            n = self._write(data)
            while n < len(data):  # not with a memory BIO (it takes everything); kept safe
                data = data[n:]
                n = self._write(data)
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        self._send(self._drain())

    def writelines(self, list_of_data: list[bytes]) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close: close() sends close_notify")

    def close(self) -> None:
        st = self.state
        if st == T_OPEN:
            self.state = T_CLOSING
            self._cancel_timer()
            self._timer = self.loop.call_later(CLOSE_SECONDS, self._close_expired)
            raw = self.raw
            if raw is not None:
                raw.resume_reading()  # the peer's close_notify or FIN is to be read
            self._shutdown()
        elif st == T_HANDSHAKE:
            self.abort()

    def abort(self) -> None:
        if self.state == T_CLOSED:
            return
        self.state = T_CLOSED
        self._cancel_timer()
        raw = self.raw
        if raw is not None:
            raw.abort()

    def is_closing(self) -> bool:
        return self.state >= T_CLOSING

    def pause_reading(self) -> None:
        raw = self.raw
        if self.state == T_OPEN and raw is not None:
            raw.pause_reading()

    def resume_reading(self) -> None:
        raw = self.raw
        if self.state == T_OPEN and raw is not None:
            raw.resume_reading()

    def is_reading(self) -> bool:
        raw = self.raw
        return raw is not None and raw.is_reading()

    def get_write_buffer_size(self) -> int:
        raw = self.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self.raw is not None:
            self.raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.sslobj
        if name == "sslcontext":
            return self.context
        if name == "peercert":
            return self.sslobj.getpeercert()
        if name == "cipher":
            return self.sslobj.cipher()
        if name == "compression":
            return self.sslobj.compression()
        raw = self.raw
        return raw.get_extra_info(name, default) if raw is not None else default

    # -- inside ----------------------------------------------------------------

    def _flush(self) -> None:
        """Send what OpenSSL wrote into the outgoing BIO (handshake, alerts, tickets)."""
        raw = self.raw
        if self.outgoing.pending and raw is not None and not raw.is_closing():
            raw.write(self._drain())

    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError, ValueError) as exc:
            # No certificate for client_ca, plain HTTP to the HTTPS port, a scanner:
            # the client's problem. An upstream's certificate the context refuses:
            # the waiter's (a 502 naming it). Our alert goes out, then the connection closes.
            log.debug("fast engine: TLS handshake with a %s failed: %s", self._peer(), exc)
            self._flush()
            self.state = T_CLOSED
            self._cancel_timer()
            self._ended()
            self._refused(exc)
            raw = self.raw
            if raw is not None:
                raw.close()
            return
        self._flush()
        self._cancel_timer()
        self._ended()
        self.state = T_OPEN
        app = self.app = self.app_factory()
        self._recv = app.data_received
        app.connection_made(self)  # type: ignore[arg-type]
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(app)
        left = self.incoming.pending
        if self.state == T_OPEN and (left or self._pending()):
            self._deliver(left)  # the first request came with the client's Finished

    def _deliver(self, size: int) -> None:
        """Decrypt what the incoming BIO holds; the application gets it in one call.

        `size` is the first read's length: the ciphertext just fed, which is
        what the BIO holds unless part of a record was left in it (a hint only:
        a read that fills it asks OpenSSL for the rest, so no plaintext is left
        behind; it saves asking the BIO, a Python-level attribute read).
        """
        incoming = self.incoming
        read = self._read
        data = b""
        more: list[bytes] | None = None
        eof = False
        # Asked for no more than the ciphertext at hand (a record's plaintext is
        # shorter): a small request is read into a small object, not a large
        # allocation shrunk to fit. Only a read that filled what it asked for can
        # have left plaintext inside OpenSSL (SSL_pending, which drops the GIL).
        try:
            while True:
                if size > READ_SIZE:
                    size = READ_SIZE
                elif size < 1:
                    size = self._pending()
                    if size < 1:
                        break
                chunk = read(size)
                n = len(chunk)
                if n == 0:
                    eof = True  # close_notify
                    break
                if not data:
                    data = chunk
                elif more is None:
                    more = [data, chunk]
                else:
                    more.append(chunk)
                full = n == size
                size = incoming.pending
                if size < 1 and not full:
                    break
        except ssl.SSLWantReadError:
            pass  # the rest of a record is still on its way
        except ssl.SSLZeroReturnError:
            eof = True
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        if more is not None:
            data = b"".join(more)
        if self.outgoing.pending:
            self._flush()  # a TLS 1.3 KeyUpdate's answer (RFC 8446 §4.6.3)
        if data:
            self._recv(data)
        if eof and self.state == T_OPEN:
            if self.app is not None:
                self.app.eof_received()
            self.close()

    def _shutdown(self) -> None:
        """Send our close_notify (once) and drop data until the peer's (RFC 8446 §6.1)."""
        read = self._read
        try:
            while read(READ_SIZE):  # application data the client sent meanwhile: dropped
                pass
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            pass  # its close_notify (SSLZeroReturnError) or a broken session: unwrap says which
        try:
            self.sslobj.unwrap()
        except ssl.SSLWantReadError:
            self._flush()
            if self._peer_eof:
                self._end()  # the client has finished sending: nothing to wait for
                return
            raw = self.raw
            if raw is not None and raw.can_write_eof() and not raw.is_closing():
                raw.write_eof()  # a no-op after the first
            return
        except (ssl.SSLError, OSError, ValueError):
            pass  # a broken session: nothing more to say
        self._flush()
        self._end()

    def _end(self) -> None:
        self.state = T_CLOSED
        self._cancel_timer()
        raw = self.raw
        if raw is not None:
            raw.close()

    def _fatal(self, exc: Exception) -> None:
        log.debug("fast engine: TLS error on a client connection: %s", exc)
        self._flush()  # the alert, if any
        self._end()

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.state == T_HANDSHAKE:
            log.debug("fast engine: TLS handshake with a %s timed out", self._peer())
            self._refused(TimeoutError())
            self.abort()

    def _close_expired(self) -> None:
        # Closed, not aborted: what is still in the write buffer (a large response
        # to a slow client) is sent first, as a plain connection's linger ends.
        self._timer = None
        if self.state == T_CLOSING:
            self._end()

    def _cancel_timer(self) -> None:
        t = self._timer
        if t is not None:
            self._timer = None
            t.cancel()

    def _peer(self) -> str:
        return "client" if self.waiter is None else "upstream"

    def _refused(self, exc: BaseException) -> None:
        """The handshake failed: the client side's waiter raises why (the server side has none)."""
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_exception(exc)

    def _ended(self) -> None:
        """The handshake is over, done or failed: the acceptor forgets it."""
        cb = self.on_open
        if cb is not None:
            self.on_open = None
            cb(self, False)


async def open_client(
    loop: asyncio.AbstractEventLoop,
    app_factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    context: ssl.SSLContext,
    server_hostname: str,
    handshake_timeout: float,
) -> asyncio.Protocol:
    """Connect to an `https://` upstream over the engine's TLS layer; the application once shaken.

    Raises what the handshake raised (an `ssl.SSLCertVerificationError` for a
    refused certificate), `TimeoutError` past `handshake_timeout`, or the
    connect's `OSError`; a cancelled wait aborts the connection.
    """
    waiter: asyncio.Future[asyncio.Protocol] = loop.create_future()

    def made() -> asyncio.Protocol:
        conn = TLSConn(
            loop,
            context,
            app_factory,
            handshake_timeout,
            server_side=False,
            server_hostname=server_hostname,
            waiter=waiter,
        )
        return cast(asyncio.Protocol, conn)  # a protocol by duck typing, as for the acceptor

    raw, _ = await loop.create_connection(made, host, port)
    try:
        return await waiter
    except asyncio.CancelledError:
        raw.abort()  # the connect timeout or a shutdown, while shaking hands
        raise  # (a failed handshake has closed the connection itself, its alert sent)


def _drop(data: bytes) -> None:
    """What `_send` and `_recv` are before there is a transport or an application."""
