"""The file store: one JSON document on local disk, shared by every worker on the host.

Why temp file + fsync + rename + fsync(dir): a reader (another worker, the
next start) sees the old document or the new one, never a torn one, and an
accepted change survives a power cut (README "Admin API"). Why polling stat() every
`state.poll_interval`: it is portable, costs one syscall per worker per tick
and keeps propagation to every worker well under a second (README "Admin API").
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import AsyncGenerator
from dataclasses import replace
from pathlib import Path

from gateway.errors import Conflict, StateError
from gateway.store.doc import EMPTY, StateDoc, decode, encode

log = logging.getLogger("gateway.store")

_Sig = tuple[int, int, int]


class FileStore:
    """A StateStore on a local file; CAS across processes via flock on a sidecar lock file."""

    def __init__(self, path: str | os.PathLike[str], *, poll_interval: float = 0.25) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.poll_interval = max(0.01, poll_interval)
        self._last: StateDoc = EMPTY
        self._sig: _Sig | None = None
        self._rejected: _Sig | None = None  # the file version last refused (logged once)

    def __repr__(self) -> str:
        return f"FileStore({str(self.path)!r})"

    def _stat(self) -> _Sig | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> StateDoc:
        try:
            return self._read_present()
        except FileNotFoundError:
            return EMPTY

    def _read_present(self) -> StateDoc:
        """The file's document; FileNotFoundError when absent, StateError when unusable."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StateError(
                f"{self.path}: cannot read state file: {e.strerror or e}", "state"
            ) from e
        return decode(data, str(self.path))

    async def open(self) -> None:
        """Check before serving that the state directory takes writes (exit 2 otherwise).

        Why at start: a read-only or missing-and-uncreatable directory would
        otherwise be noticed only by the first admin write or guard rollback.
        """
        await asyncio.to_thread(self._check_writable)

    def _check_writable(self) -> None:
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".probe", dir=parent)
            os.close(fd)
            os.unlink(probe)
            with open(self.lock_path, "a+b"):
                pass
        except OSError as e:
            raise StateError(
                f"state.path: the state directory {str(parent)!r} is not writable "
                f"({e.strerror or e}); fix its permissions or choose another state.path",
                "state.path",
            ) from e

    def load(self) -> StateDoc:
        sig = self._stat()
        if sig is None and self._last.version > 0:
            # Removed at run time: the last applied state still holds, and the
            # next write recreates the file from it.
            return self._last
        doc = self._read()
        self._last, self._sig = doc, sig
        return doc

    async def write(self, doc: StateDoc, expected_version: int) -> StateDoc:
        return await asyncio.to_thread(self._write_locked, doc, expected_version)

    def _write_locked(self, doc: StateDoc, expected_version: int) -> StateDoc:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.lock_path, "a+b")  # noqa: SIM115 - closed below
        except OSError as e:
            raise StateError(f"{self.path}: cannot write state: {e.strerror or e}", "state") from e
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = self._read_present().version
            except FileNotFoundError:
                # Removed at run time: recreate it from the last applied state plus
                # this change, so admin writes and the guard's rollback keep working.
                current = self._last.version
                if current > 0:
                    log.warning(
                        "%s: state file missing; recreating it at version %d",
                        self.path,
                        expected_version + 1,
                    )
            except StateError as e:
                # Replacing a corrupt file with the last good state plus this
                # change is what the operator is asking for by writing.
                current = self._last.version
                log.error("%s; replacing it with version %d", e.message, expected_version + 1)
            if current != expected_version:
                raise Conflict(
                    f"state changed: version is {current}, expected {expected_version}", "If-Match"
                )
            new = replace(doc, version=expected_version + 1)
            try:
                self._replace(encode(new))
            except OSError as e:
                raise StateError(
                    f"{self.path}: cannot write state file: {e.strerror or e}; nothing changed",
                    "state",
                ) from e
            if new.version > self._last.version:
                self._last = new
            return new

    def _replace(self, data: bytes) -> None:
        parent = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def watch(self) -> AsyncGenerator[StateDoc, None]:
        seen = self._last.version
        sig = self._sig
        while True:
            await asyncio.sleep(self.poll_interval)
            new_sig = self._stat()
            if new_sig == sig:
                continue
            sig = new_sig
            if new_sig is None:
                log.warning(
                    "%s: state file removed; keeping state version %d "
                    "(the next change recreates it)",
                    self.path,
                    seen,
                )
                continue
            try:
                doc = self._read()
            except StateError as e:
                # One line per version of the file, even when the watch restarts.
                if new_sig != self._rejected:
                    self._rejected = new_sig
                    log.error("%s; not applied, keeping state version %d", e.message, seen)
                continue
            if doc.version > seen:
                seen = doc.version
                if doc.version > self._last.version:
                    self._last = doc
                yield doc
            elif doc.version < seen:
                log.warning(
                    "%s: version %d is older than the applied %d; ignored",
                    self.path,
                    doc.version,
                    seen,
                )

    async def close(self) -> None:
        return None
