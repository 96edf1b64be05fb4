"""One exception tree for the gateway and the single mapping to HTTP status.

Why: every error a user can cause must name what to fix, and
status codes are decided in exactly one place.
"""

from __future__ import annotations

from collections.abc import Sequence


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


STATUS_BY_UPSTREAM_ERROR = {
    "connect": 502,
    "reset": 502,
    "protocol": 502,
    "tls": 502,
    "timeout": 504,
    "limit": 503,  # upstream.max_connections reached for longer than upstream.queue_timeout
}


def upstream_status(kind: str) -> int:
    """Upstream failure kind -> status sent to the client (RFC 9110 §15.6.3, §15.6.5)."""
    return STATUS_BY_UPSTREAM_ERROR.get(kind, 502)
