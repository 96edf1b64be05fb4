"""The Consul KV store: one JSON document, CAS writes, blocking-query watch.

README "Consul KV state (several replicas)".

Why this shape (Consul docs: api-docs/kv.mdx, CAS on `ModifyIndex`, and
features/blocking.mdx): every replica reads one key; writers do read-modify-write with
`?cas=<ModifyIndex>` and treat `false` as "someone else wrote first"; every
replica runs a blocking GET loop and applies a newer, valid document; an
index going backwards resets the loop to 0; 404 means "config defaults". A
dead Consul keeps the last good document and the loop backs off.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import ssl
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import Any

import aiohttp

from gateway.config import ConsulConfig
from gateway.discovery.consul import go_duration, next_index
from gateway.discovery.pacing import Backoff
from gateway.errors import Conflict, StateError
from gateway.store.doc import EMPTY, StateDoc, decode, encode

log = logging.getLogger("gateway.store.consul")


def _default_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), trust_env=False)


class ConsulStore:
    """A StateStore kept under `<kv_prefix>/state` in Consul KV."""

    def __init__(
        self,
        cfg: ConsulConfig,
        *,
        session_factory: Callable[[], aiohttp.ClientSession] = _default_session,
        wait: float = 30.0,
        backoff: float = 0.5,
    ) -> None:
        self.key = f"{cfg.kv_prefix.strip('/')}/state"
        self.url = f"{cfg.address.rstrip('/')}/v1/kv/{self.key}"
        self.headers = {"X-Consul-Token": cfg.token} if cfg.token else {}
        # Consul over TLS (README "TLS"): the context from CONSUL_CACERT & co., else the defaults.
        self.ssl: ssl.SSLContext | bool = cfg.tls if cfg.tls is not None else True
        self.wait = wait
        self._backoff = Backoff(backoff, 30.0, random.Random())
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._doc = EMPTY
        self._modify = 0  # ModifyIndex of the stored key; 0 = absent (cas=0 creates)
        self._index = 0  # X-Consul-Index for the blocking loop
        self._changed = asyncio.Event()
        self._rejected = 0  # ModifyIndex of the invalid document last refused (logged once)
        self.source = f"consul:{self.key}"

    # ------------------------------------------------------------------ reading
    async def open(self) -> None:
        """Read the key once before serving; a corrupt document refuses to start."""
        self._session = self._session_factory()
        try:
            doc, modify, index = await self._get(index=0)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise StateError(
                f"state.store consul: cannot read {self.url}: {e}", "consul.address"
            ) from e
        if doc is not None:
            self._doc = doc
        self._modify, self._index = modify, index

    async def _get(self, index: int) -> tuple[StateDoc | None, int, int]:
        """(document or None when absent, ModifyIndex, X-Consul-Index); StateError if invalid."""
        raw, modify, idx = await self._get_raw(index)
        return (None if raw is None else decode(raw, self.source)), modify, idx

    async def _get_raw(self, index: int) -> tuple[bytes | None, int, int]:
        """(stored bytes or None when absent, ModifyIndex, X-Consul-Index)."""
        assert self._session is not None
        params: dict[str, str] = {}
        timeout = 10.0
        if index > 0:
            params = {"index": str(index), "wait": go_duration(self.wait)}
            # Consul docs, features/blocking.mdx: the server may add up to wait/16 of jitter.
            timeout = self.wait + self.wait / 16 + 5
        async with self._session.get(
            self.url,
            params=params,
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            ssl=self.ssl,
        ) as r:
            idx = int(r.headers.get("X-Consul-Index", "1") or 1)
            if r.status == 404:
                return None, 0, idx
            if r.status != 200:
                raise aiohttp.ClientResponseError(
                    r.request_info, (), status=r.status, message=(await r.text())[:200]
                )
            entries: Any = await r.json()
        entry = entries[0]
        raw = base64.b64decode(entry.get("Value") or b"")
        return raw, int(entry["ModifyIndex"]), idx

    def load(self) -> StateDoc:
        return self._doc

    # ------------------------------------------------------------------ writing
    async def write(self, doc: StateDoc, expected_version: int) -> StateDoc:
        if self._session is None:
            raise StateError("the Consul state store is not open", "state")
        if self._doc.version != expected_version:
            raise Conflict(
                f"state changed: version is {self._doc.version}, expected {expected_version}",
                "If-Match",
            )
        new = replace(doc, version=expected_version + 1)
        async with self._session.put(
            self.url,
            params={"cas": str(self._modify)},
            data=encode(new),
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=10),
            ssl=self.ssl,
        ) as r:
            text = (await r.text()).strip()
            if r.status != 200:
                raise StateError(f"Consul refused the write ({r.status}): {text[:200]}", "state")
        # The PUT answers only true/false; read back the ModifyIndex for the next CAS.
        raw, modify, index = await self._get_raw(index=0)
        self._take(raw, modify)
        self._index = max(self._index, next_index(0, index))
        if text != "true":
            raise Conflict("another replica changed the state first; retry", "If-Match")
        self._changed.set()
        return self._doc

    # ------------------------------------------------------------------ watching
    async def watch(self) -> AsyncGenerator[StateDoc, None]:
        seen = self._doc.version
        while True:
            if self._doc.version > seen:
                seen = self._doc.version
                yield self._doc
                continue
            poll = asyncio.ensure_future(self._poll())
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({poll, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (poll, changed):
                    if not t.done():
                        t.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await t
            self._changed.clear()

    async def _poll(self) -> None:
        """One blocking GET; updates the cache with a newer valid document."""
        try:
            raw, modify, index = await self._get_raw(index=self._index)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError) as e:
            log.warning(
                "Consul KV watch failed (%s); keeping state version %d", e, self._doc.version
            )
            self._index = 0
            await asyncio.sleep(self._backoff.next())
            return
        self._backoff.reset()
        self._index = next_index(self._index, index)  # went backwards: start over (§2)
        self._take(raw, modify)

    def _take(self, raw: bytes | None, modify: int) -> None:
        """Cache a newer valid document; remember where an invalid one sits.

        Why keep the invalid document's ModifyIndex: the next write replaces it
        with the last good state plus that change (CAS on that index), as the
        file store replaces a corrupt file; the blocking loop moves on to the
        next index, so an invalid document is logged once, not once per poll.
        """
        if raw is None:
            self._modify = 0  # deleted: the next write creates it again (cas=0)
            return
        try:
            doc = decode(raw, self.source)
        except StateError as e:
            if modify > self._modify:
                self._modify = modify
            if modify != self._rejected:
                self._rejected = modify
                log.error("%s; not applied, keeping state version %d", e.message, self._doc.version)
            return
        if doc.version >= self._doc.version:
            self._doc, self._modify = doc, modify

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
