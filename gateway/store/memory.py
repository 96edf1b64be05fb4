"""The memory store: no persistence, for `gateway demo` and tests.

`state.store`: README "Config walkthrough".

Why keep CAS and watch here too: the control plane runs the same code path
whichever store is configured, so tests on this store exercise it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import replace

from gateway.errors import Conflict
from gateway.store.doc import EMPTY, StateDoc


class MemoryStore:
    """A StateStore held in this process only; changes are lost on restart."""

    def __init__(self, doc: StateDoc = EMPTY) -> None:
        self._doc = doc
        self._loaded = doc.version
        self._changed: asyncio.Event | None = None

    def load(self) -> StateDoc:
        self._loaded = self._doc.version
        return self._doc

    async def write(self, doc: StateDoc, expected_version: int) -> StateDoc:
        if self._doc.version != expected_version:
            raise Conflict(
                f"state changed: version is {self._doc.version}, expected {expected_version}",
                "If-Match",
            )
        self._doc = replace(doc, version=expected_version + 1)
        ev, self._changed = self._changed, None
        if ev is not None:
            ev.set()
        return self._doc

    async def watch(self) -> AsyncGenerator[StateDoc, None]:
        seen = self._loaded
        while True:
            if self._doc.version > seen:
                seen = self._doc.version
                yield self._doc
                continue
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    async def close(self) -> None:
        return None
