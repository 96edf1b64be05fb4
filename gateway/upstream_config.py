"""`upstream:` (top level and per service): how many connections one upstream endpoint may get.

Why a cap with a bounded wait: a slow upstream holds every connection it is
given, and without a cap each new client request opens another socket until
file descriptors (ours or the upstream's) run out. Like nginx's `max_conns`
with `queue ... timeout=` and Envoy's `max_connections` circuit breaker, a
request that finds the endpoint at its cap waits up to `queue_timeout` for a
connection to come free, then gets 503 JSON (README.md "Upstream connection
limits", docs/configuration.md#upstream-connection-limits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from gateway.config_syntax import key_path

if TYPE_CHECKING:
    from gateway.config import Config

DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_QUEUE_TIMEOUT: Final = 1.0
MAX_CONNECTIONS_CEILING: Final = 1_000_000
FIELDS: Final = frozenset({"max_connections", "queue_timeout"})

AddError = Callable[[str, str], None]
Duration = Callable[[object], "float | None"]


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """Per endpoint: open connections at most (idle + busy + connecting), and the wait for one."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT  # seconds; 0 = answer 503 at once


def parse_upstream_limits(
    v: object, path: str, add: AddError, base: UpstreamLimits, duration: Duration
) -> UpstreamLimits:
    """`{max_connections: N, queue_timeout: 1s}`; a field left out keeps `base`'s value."""
    if v is None:
        return base
    if not isinstance(v, Mapping):
        add(path, f"must be a mapping with {', '.join(sorted(FIELDS))}, not {v!r}")
        return base
    for k in v:
        if k not in FIELDS:
            add(key_path(path, k), f"unknown field (allowed: {', '.join(sorted(FIELDS))})")
    cap = base.max_connections
    if "max_connections" in v:
        n = v["max_connections"]
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CONNECTIONS_CEILING:
            add(
                key_path(path, "max_connections"),
                f"must be an integer between 1 and {MAX_CONNECTIONS_CEILING}, not {n!r}",
            )
        else:
            cap = n
    wait = base.queue_timeout
    if "queue_timeout" in v:
        d = duration(v["queue_timeout"])
        if d is None:
            add(
                key_path(path, "queue_timeout"),
                "must be a duration such as 1s or 250ms (0: no wait)",
            )
        else:
            wait = d
    return UpstreamLimits(cap, wait)


def engine_limits(config: Config) -> tuple[tuple[int, float], dict[str, tuple[int, float]]]:
    """What `engine.api.Limits` holds: the top-level pair and each service's."""
    d = config.upstream
    per = {
        n: (s.upstream.max_connections, s.upstream.queue_timeout)
        for n, s in config.services.items()
    }
    return (d.max_connections, d.queue_timeout), per
