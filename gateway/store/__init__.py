"""Where accepted weight and guard changes persist, and how every process hears of them.

Why an interface: README "Admin API" promises every accepted change to be persisted
before the response, to survive a restart and to reach every worker and
replica. The file store does it for one host (atomic rename + polling), the
memory store for demos and tests; a Consul KV store (CAS on ModifyIndex,
blocking-query watch) slots in beside them with the same three calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from gateway.config import ConsulConfig, StateConfig
from gateway.errors import ConfigError
from gateway.store.doc import (
    EMPTY,
    GUARD_FIELDS,
    ServiceState,
    StateDoc,
    decode,
    encode,
)

__all__ = [
    "EMPTY",
    "GUARD_FIELDS",
    "ServiceState",
    "StateDoc",
    "StateStore",
    "decode",
    "encode",
    "open_store",
]


class StateStore(Protocol):
    """The contract every store keeps; the control plane talks only to this."""

    def load(self) -> StateDoc:
        """The last valid document (EMPTY when none was written); StateError when corrupt."""
        ...

    async def write(self, doc: StateDoc, expected_version: int) -> StateDoc:
        """Persist `doc` durably iff the stored version is still `expected_version` (CAS).

        Returns the document as stored (version = expected_version + 1);
        raises errors.Conflict when someone else wrote first.
        """
        ...

    def watch(self) -> AsyncIterator[StateDoc]:
        """Every valid document written after `load()`, by any process, in order."""
        ...

    async def close(self) -> None: ...


def open_store(cfg: StateConfig, consul: ConsulConfig | None = None) -> StateStore:
    """The store named by `state.store`; call `open()` on it when it has one.

    README "Config walkthrough".
    """
    if cfg.store == "file":
        from gateway.store.file import FileStore

        return FileStore(cfg.path, poll_interval=cfg.poll_interval)
    if cfg.store == "memory":
        from gateway.store.memory import MemoryStore

        return MemoryStore()
    if cfg.store == "consul":
        from gateway.store.consul import ConsulStore

        return ConsulStore(consul or ConsulConfig())
    raise ConfigError([("state.store", f"unknown store {cfg.store!r}; use file, consul or memory")])
