"""The narrow interface between the forwarding engine and the gateway's policy.

Why: the engine (bytes, sockets, HTTP/1.1 framing) can be replaced for speed
without touching routing, headers, metrics or tracing. The engine parses a
request head, asks a `Handler` what to do with it, and reports back once the
exchange is over. Nothing here imports asyncio or aiohttp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class RequestHead:
    """A parsed, framing-validated request head as the client sent it."""

    method: bytes
    target: bytes  # raw request-target, e.g. b"/a/b?x=1"
    headers: Headers  # in order, original case, hop-by-hop still present
    client_ip: str
    http_version: str = "1.1"
    scheme: str = "http"


@dataclass(slots=True)
class Respond:
    """Answer locally (health, 404, 503, 400) without contacting an upstream."""

    status: int
    body: bytes
    headers: Headers = field(default_factory=list)  # Content-Type etc.; engine adds framing


# Error kinds reported to Forward.on_done; a closed set (metric label values).
ERR_CONNECT = "connect"  # refused / unreachable -> 502
ERR_RESET = "reset"  # upstream closed or reset mid-exchange -> 502
ERR_TIMEOUT = "timeout"  # connect/read timeout -> 504
ERR_PROTOCOL = "protocol"  # upstream sent an unparsable response -> 502
ERR_CLIENT = "client_abort"  # client went away; nothing to answer


@dataclass(slots=True)
class Forward:
    """Send the request to one upstream endpoint.

    `headers` is the complete end-to-end header list for the upstream request,
    already rewritten by policy (hop-by-hop and framing headers removed,
    X-Forwarded-*, Via, X-Release-Stage, traceparent... added). The engine adds
    only framing (Content-Length / Transfer-Encoding: chunked), Host is kept as
    given in `headers`, and Connection/Upgrade for an upgrade.
    """

    host: str
    port: int
    headers: Headers
    response_headers: Headers  # appended to the client response (X-Release-Stage, ...)
    service: str
    release: str
    connect_timeout: float
    read_timeout: float
    # Called exactly once when the exchange ends: (status sent to client or 0,
    # error kind or None). Policy uses it for metrics, guard, balancer counts.
    on_done: Callable[[int, str | None], None]
    target: bytes | None = None  # override request-target; None = as received


class Handler(Protocol):
    """Policy side: decides per request; must not block."""

    def handle(self, head: RequestHead) -> Forward | Respond: ...

    def error_body(self, status: int, kind: str, fwd: Forward) -> Respond: ...
