"""One exception tree for the gateway and the single mapping to HTTP status.

Why: every error a user can cause must name what to fix, and
status codes are decided in exactly one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, Literal


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status = 500

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, str]:
        body = {"error": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class ConfigError(GatewayError):
    """A config file with one or more mistakes; `errors` lists (path, message)."""

    status = 400

    def __init__(self, errors: Sequence[tuple[str, str]], source: str = "<memory>") -> None:
        self.errors = list(errors)
        self.source = source
        first = self.errors[0] if self.errors else ("(root)", "invalid")
        super().__init__(f"{first[0]}: {first[1]}", first[0])

    def lines(self) -> list[str]:
        return [f"{path}: {msg}" for path, msg in self.errors]


class BadRequest(GatewayError):
    """Client input that cannot be accepted (malformed JSON, wrong types, bad values)."""

    status = 400


class Unauthorized(GatewayError):
    status = 401


class Forbidden(GatewayError):
    """A valid token whose role does not allow this request (a `read` token writing)."""

    status = 403


class NotFound(GatewayError):
    status = 404


class Conflict(GatewayError):
    """A stale If-Match: someone else changed the state first."""

    status = 409


class StateError(GatewayError):
    """The state store is unreadable or corrupt; nothing from it was applied.

    503 to an admin caller: the request was fine and nothing changed; the
    store cannot take it now (RFC 9110 §15.6.4).
    """

    status = 503


class Unavailable(GatewayError):
    """A dependency cannot answer now (the audit trail in Consul); 503, try again later."""

    status = 503


# How an exchange with an upstream failed: a closed set, reported to `Forward.on_done`
# (gateway/engine/api.py) and used as the `kind` label of gateway_upstream_errors_total
# (gateway/metrics.py), so the strings themselves are part of the metrics contract.
UpstreamErrorKind = Literal[
    "connect", "reset", "timeout", "protocol", "client_abort", "limit", "tls"
]

ERR_CONNECT: Final = "connect"  # refused / unreachable
ERR_RESET: Final = "reset"  # upstream closed or reset mid-exchange
ERR_TIMEOUT: Final = "timeout"  # connect/read timeout, or timeouts.total
ERR_PROTOCOL: Final = "protocol"  # upstream sent an unparsable response
ERR_CLIENT: Final = "client_abort"  # client went away; nothing to answer
ERR_LIMIT: Final = "limit"  # the endpoint stayed at upstream.max_connections
ERR_TLS: Final = "tls"  # the upstream's TLS handshake failed (certificate...)

# The status answered for each kind (RFC 9110 §15.6.3 502, §15.6.4 503, §15.6.5 504)
# and what the error body says; client_abort has neither: nobody is left to answer.
STATUS_BY_UPSTREAM_ERROR: Final[Mapping[UpstreamErrorKind, int]] = {
    ERR_CONNECT: 502,
    ERR_RESET: 502,
    ERR_PROTOCOL: 502,
    ERR_TLS: 502,
    ERR_TIMEOUT: 504,
    ERR_LIMIT: 503,  # upstream.max_connections reached for longer than upstream.queue_timeout
}
MESSAGE_BY_UPSTREAM_ERROR: Final[Mapping[UpstreamErrorKind, str]] = {
    ERR_CONNECT: "upstream refused or unreachable",
    ERR_RESET: "upstream closed the connection",
    ERR_TIMEOUT: "upstream timed out",
    ERR_PROTOCOL: "upstream sent an invalid response",
    ERR_LIMIT: "upstream connection limit",
    ERR_TLS: "upstream TLS error",
}


def upstream_status(kind: UpstreamErrorKind) -> int:
    """Upstream failure kind -> status sent to the client (RFC 9110 §15.6.3, §15.6.5)."""
    return STATUS_BY_UPSTREAM_ERROR.get(kind, 502)


def upstream_message(kind: UpstreamErrorKind) -> str:
    """Upstream failure kind -> the `error` text of the answer's JSON body."""
    return MESSAGE_BY_UPSTREAM_ERROR.get(kind, "upstream failed")
