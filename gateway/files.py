"""Reading a file that a config or an admin request names: bounded, and never blocking.

Why not `Path.read_text`: a path may name a FIFO (opening it waits for a
writer, holding a worker thread or the event loop for good), a device such as
`/dev/zero` (reading never ends and memory grows until the process dies) or a
file far larger than any real list. Those are refused with an OSError whose
`strerror` says why, as a missing file is (docs/configuration.md: users,
tokens and TLS files).
"""

from __future__ import annotations

import errno
import os
import stat

# Largest file read: a million hashed user keys (65 bytes a line) is ~65 MB.
MAX_FILE_BYTES = 256 * 1024 * 1024


def read_text(path: str | os.PathLike[str], limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes.

    Raises OSError (with `strerror`) or UnicodeDecodeError, as `Path.read_text` does.
    """
    return read_bytes(path, limit).decode("utf-8")


def read_bytes(path: str | os.PathLike[str], limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; OSError (with `strerror`) if not."""
    # O_NONBLOCK: opening a FIFO does not wait for a writer (it changes nothing for
    # a regular file), so the fstat below gets to refuse it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)", str(path))
        data = f.read(limit + 1)  # the size fstat gave may have grown since
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", str(path))
    return data
