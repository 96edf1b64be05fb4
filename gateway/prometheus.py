"""A small Prometheus HTTP API client for instant queries (README "Progressive delivery").

Why no last-known-good here (unlike discovery): an analysis that cannot
read Prometheus must say *inconclusive* — an old value would let a step
advance on data that no longer describes the release. Every failure
(connection, timeout, non-JSON, a non-success status) comes back as a
`Reading` without a value and the reason.

API: https://prometheus.io/docs/prometheus/latest/querying/api/#instant-queries
(`POST /api/v1/query` with a form body, so long queries fit).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import aiohttp

from gateway.analysis import Reading, read_response
from gateway.analysis_config import PrometheusConfig

_MAX_BODY = 1 << 20  # an instant query for one series is tiny; refuse a runaway answer


class PrometheusClient:
    """Instant queries against one Prometheus; the session is opened lazily, closed by `close`."""

    def __init__(
        self,
        config: PrometheusConfig,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
    ) -> None:
        self.config = config
        self._factory = session_factory or (lambda: aiohttp.ClientSession(trust_env=False))
        self._session: aiohttp.ClientSession | None = None

    async def query(self, promql: str) -> Reading:
        if self._session is None or self._session.closed:
            self._session = self._factory()
        url = f"{self.config.address}/api/v1/query"
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        try:
            async with self._session.post(url, data={"query": promql}, timeout=timeout) as resp:
                raw = b""
                while chunk := await resp.content.read(_MAX_BODY + 1 - len(raw)):
                    raw += chunk
                    if len(raw) > _MAX_BODY:
                        return Reading(None, "the answer is larger than 1 MiB")
                try:
                    body = json.loads(raw)
                except ValueError:
                    return Reading(None, f"HTTP {resp.status}: not a JSON answer")
                reading = read_response(body)
                if reading.value is None and resp.status >= 300 and reading.why is not None:
                    return Reading(None, f"HTTP {resp.status}: {reading.why}")
                return reading
        except TimeoutError:
            return Reading(None, f"timed out after {self.config.timeout:g}s")
        except (aiohttp.ClientError, OSError) as e:
            return Reading(None, f"unreachable: {e or type(e).__name__}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
