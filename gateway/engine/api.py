"""The narrow interface between the forwarding engine and the gateway's policy.

Why: the engine (bytes, sockets, HTTP/1.1 framing) can be replaced for speed
without touching routing, headers, metrics or tracing. The engine parses a
request head, asks a `Handler` what to do with it, and reports back once the
exchange is over. Nothing here imports asyncio or aiohttp.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Protocol

from gateway.errors import (
    ERR_CLIENT,
    ERR_CONNECT,
    ERR_LIMIT,
    ERR_PROTOCOL,
    ERR_RESET,
    ERR_TIMEOUT,
    ERR_TLS,
    UpstreamErrorKind,
)
from gateway.headers import parse_field_lines

if TYPE_CHECKING:
    import socket
    import ssl

    from gateway.tls_config import UpstreamTLS

# The error kinds (the closed type and its status table: gateway/errors.py) are
# re-exported for the engine's callers.
__all__ = [
    "ERR_CLIENT",
    "ERR_CONNECT",
    "ERR_LIMIT",
    "ERR_PROTOCOL",
    "ERR_RESET",
    "ERR_TIMEOUT",
    "ERR_TLS",
    "Engine",
    "Forward",
    "Handler",
    "Headers",
    "Limits",
    "RequestHead",
    "Respond",
    "Retry",
    "UpstreamErrorKind",
    "body_min_bytes",
]

Headers = list[tuple[bytes, bytes]]


# The per-request records below are plain slotted classes, not dataclasses: a
# dataclass __init__ is generated at run time and stays interpreted even in the
# compiled (mypyc) build, which costs ~0.3 µs per record per request.


class RequestHead:
    """A parsed, framing-validated request head as the client sent it."""

    __slots__ = ("method", "target", "headers", "client_ip", "http_version", "scheme", "fields")

    def __init__(
        self,
        method: bytes,
        target: bytes,  # raw request-target, e.g. b"/a/b?x=1"
        headers: Headers,  # in order, original case, hop-by-hop still present
        client_ip: str,
        http_version: str = "1.1",
        scheme: str = "http",
        # The same fields as the client's own CRLF-terminated field lines, when the
        # engine has them whole (policy forwards them as one block if it keeps
        # every field unchanged); None: policy renders `headers`.
        fields: bytes | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.client_ip = client_ip
        self.http_version = http_version
        self.scheme = scheme
        self.fields = fields

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r}, {self.target!r}, {self.client_ip!r})"


class Respond:
    """Answer locally (health, 404, 503, 400) without contacting an upstream."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes, headers: Headers | None = None) -> None:
        self.status = status
        self.body = body
        self.headers: Headers = [] if headers is None else headers  # engine adds framing

    def __repr__(self) -> str:
        return f"Respond({self.status}, {self.body[:80]!r})"


# The defaults of upstream.max_connections and upstream.queue_timeout
# (docs/configuration.md#upstream-connection-limits): a deliberate copy of
# gateway/upstream_config.py's, which the engine may not import (tests/test_engine_api.py
# checks that they agree).
MAX_CONNECTIONS: Final = 1024
QUEUE_TIMEOUT: Final = 1.0


def body_min_bytes(min_rate: float, window: float) -> float:
    """Bytes a request body must bring in each `window` s (timeouts.body_min_rate), at least one.

    Both engines answer 408 below it (docs/configuration.md#timeouts): a trickle is as
    stalled as silence.
    """
    return max(1.0, min_rate * window)


class Limits:
    """Per service: (max open connections per endpoint, seconds a request may wait for one).

    Read only when a new upstream connection is needed; `set` swaps the values
    on a config reload (docs/configuration.md#upstream-connection-limits).
    """

    __slots__ = ("default", "per_service")

    def __init__(
        self,
        default: tuple[int, float] = (MAX_CONNECTIONS, QUEUE_TIMEOUT),
        per_service: dict[str, tuple[int, float]] | None = None,
    ) -> None:
        self.default = default
        self.per_service: dict[str, tuple[int, float]] = per_service or {}

    def set(self, default: tuple[int, float], per_service: dict[str, tuple[int, float]]) -> None:
        self.default = default
        self.per_service = per_service

    def get(self, service: str) -> tuple[int, float]:
        return self.per_service.get(service, self.default)


class Retry(Protocol):
    """Policy's side of failover: move a `Forward` to another endpoint after a failed attempt."""

    def again(self, fwd: Forward, kind: UpstreamErrorKind) -> bool:
        """True when `fwd.host`/`fwd.port` now name another endpoint to try; False: answer."""
        ...


class Forward:
    """Send the request to one upstream endpoint.

    `headers` is the complete end-to-end header list for the upstream request,
    already rewritten by policy (hop-by-hop and framing headers removed,
    X-Forwarded-*, Via, X-Release-Stage, traceparent... added). The engine adds
    only framing (Content-Length / Transfer-Encoding: chunked), Host is kept as
    given in `headers`, and Connection/Upgrade for an upgrade.

    Policy may give the same fields already rendered as field lines (`fields`,
    with `headers` None): the engine writes them as they are, and `headers`
    parses them on first read (the aiohttp engine, tests). Setting `headers`
    replaces both. `response_fields` is the same for `response_headers`.
    """

    __slots__ = (
        "host",
        "port",
        "_headers",
        "fields",
        "_response_headers",
        "response_fields",
        "service",
        "release",
        "connect_timeout",
        "read_timeout",
        "_on_done",
        "target",
        "total_timeout",
        "retry",
        "tls",
        "detail",
    )

    def __init__(
        self,
        host: str,
        port: int,
        headers: Headers | None,
        # Appended to the client response (X-Release-Stage, ...); None: `response_fields`.
        response_headers: Headers | None,
        service: str,
        release: str,
        connect_timeout: float,
        read_timeout: float,
        # Called exactly once when the exchange ends: (status sent to client or 0,
        # error kind or None). Policy uses it for metrics, guard, balancer counts.
        # None: a subclass does that work in its own `done` (handler.py does).
        on_done: Callable[[int, UpstreamErrorKind | None], None] | None,
        target: bytes | None = None,  # override request-target; None = as received
        # Seconds for the whole exchange, every attempt included (timeouts.total); 0 = none.
        total_timeout: float = 0.0,
        # Asked after an attempt that may be repeated failed (README "Failover"); None = never.
        retry: Retry | None = None,
        # https:// endpoint: the client context and SNI (README "TLS"); None = plain HTTP.
        tls: UpstreamTLS | None = None,
        # `headers` as CRLF-terminated field lines (when `headers` is None).
        fields: bytes | None = None,
        # `response_headers` as CRLF-terminated field lines (when that is None).
        response_fields: bytes | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._headers = headers
        self.fields = fields
        self._response_headers = response_headers
        self.response_fields = response_fields
        self.service = service
        self.release = release
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._on_done = on_done
        self.target = target
        self.total_timeout = total_timeout
        self.retry = retry
        self.tls = tls
        # What the engine learnt about a failure, for the error body (the TLS error).
        self.detail: str | None = None

    def done(self, status: int, error: UpstreamErrorKind | None) -> None:
        """The exchange ended (exactly once): `on_done(status, error)`.

        Why a method: the fast engine calls it natively, and a policy subclass
        overrides it, so one object per request is both the Forward and what
        accounts for its end (no second object, no call through Python's protocol).
        """
        f = self._on_done
        if f is not None:
            f(status, error)

    @property
    def on_done(self) -> Callable[[int, UpstreamErrorKind | None], None]:
        """The callable the exchange's end is reported to: the one given, else `done`."""
        f = self._on_done
        return self.done if f is None else f

    @on_done.setter
    def on_done(self, value: Callable[[int, UpstreamErrorKind | None], None]) -> None:
        self._on_done = value

    @property
    def headers(self) -> Headers:
        h = self._headers
        if h is None:
            h = self._headers = parse_field_lines(self.fields or b"")
        return h

    @headers.setter
    def headers(self, value: Headers) -> None:
        self._headers = value
        self.fields = None

    @property
    def response_headers(self) -> Headers:
        h = self._response_headers
        if h is None:
            h = self._response_headers = parse_field_lines(self.response_fields or b"")
        return h

    @response_headers.setter
    def response_headers(self, value: Headers) -> None:
        self._response_headers = value
        self.response_fields = None

    def __repr__(self) -> str:
        return f"Forward({self.host!r}, {self.port}, {self.service!r}, {self.release!r})"


class Handler(Protocol):
    """Policy side: decides per request; must not block."""

    def handle(self, head: RequestHead) -> Forward | Respond: ...

    def error_body(self, status: int, kind: UpstreamErrorKind, fwd: Forward) -> Respond: ...


class Engine(Protocol):
    """What the process (gateway/app.py) drives; both engines implement it.

    `FastEngine` (engine/fast.py) and `AiohttpEngine` (engine/aio.py) are
    checked against it by mypy where app.py's `make_engine` returns either.
    """

    @property
    def upstream_limits(self) -> Limits:
        """The connection caps per service; app.py calls `set` on a reload."""
        ...

    @property
    def in_flight(self) -> int:
        """Requests read and not yet fully answered (what a graceful stop waits for)."""
        ...

    def serve(self, sock: socket.socket) -> Awaitable[None]:
        """Start serving on a bound, listening socket; done once accepting."""
        ...

    def set_tls(self, ctx: ssl.SSLContext) -> None:
        """New listener certificate (reload): connections accepted from now on use `ctx`."""
        ...

    def shutdown(self, drain_timeout: float) -> Awaitable[None]:
        """Stop accepting, let in-flight exchanges finish for up to `drain_timeout` s, close."""
        ...
