"""Failover policy: when a failed upstream attempt may go to another endpoint.

Why a budget besides the per-service `retries` count: a per-request limit
alone lets a dead release multiply its load by `retries + 1`; Envoy's retry
budget (``retry_budget``: ``budget_percent`` 20 %, ``min_retry_concurrency``
3) caps retries in flight to a share of the requests in flight, so failover
helps when a few endpoints die and stops when most do. A retry after a
refused connection takes no token: no upstream did any work for the failed
attempt, so moving on adds no load (it stays bounded by `retries` and passive
health). Pure: counts are plain integers the handler keeps.
"""

from __future__ import annotations

from typing import Final

from gateway.errors import ERR_CONNECT, ERR_RESET, ERR_TIMEOUT

DEFAULT_RETRIES: Final = 2
MAX_RETRIES: Final = 10
BUDGET_RATIO: Final = 0.2  # retries in flight <= 20 % of requests in flight (Envoy default)
BUDGET_MIN: Final = 3  # ... but always allow this many concurrent retries

# Reasons a retry is counted under (gateway_upstream_retries_total{reason}): the
# failure kind of the attempt that failed (gateway/errors.py's closed set).
RETRY_REASONS: Final = frozenset({ERR_CONNECT, ERR_RESET, ERR_TIMEOUT})


class RetryBudget:
    """Retries in flight for one (service, release), bounded by its requests in flight."""

    __slots__ = ("active", "ratio", "minimum")

    def __init__(self, ratio: float = BUDGET_RATIO, minimum: int = BUDGET_MIN) -> None:
        self.active = 0
        self.ratio = ratio
        self.minimum = minimum

    def __repr__(self) -> str:
        return f"RetryBudget(active={self.active}, ratio={self.ratio}, min={self.minimum})"

    def limit(self, in_flight: int) -> int:
        """How many retries may be in flight while `in_flight` requests are."""
        return max(self.minimum, int(in_flight * self.ratio))

    def admit(self, in_flight: int) -> bool:
        """Take one retry token if the budget allows; `release` gives it back."""
        if self.active >= self.limit(in_flight):
            return False
        self.active += 1
        return True

    def release(self) -> None:
        if self.active > 0:
            self.active -= 1


def may_retry(kind: str, attempts: int, retries: int, left: float | None) -> bool:
    """Whether an attempt that failed with `kind` may be followed by another.

    `attempts` counts retries already made, `retries` is the service's limit,
    `left` the seconds before `timeouts.total` (None: no deadline). The engine
    has already checked what only it knows: whether the request can be sent
    again (nothing sent, or an idempotent request kept whole, RFC 9110 §9.2.2).
    """
    if kind not in RETRY_REASONS or attempts >= retries:
        return False
    return left is None or left > 0.0
