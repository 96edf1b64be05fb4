"""Checks of a valid config against the machine it is about to run on.

Why apart from `config.build()`: these depend on the host, not on the file —
whether a listen port is free, whether the admin listener is reachable off-host
without a token — so `gateway check` and the start of `gateway run` ask them,
while building a config (tests, reloads) does not.
"""

from __future__ import annotations

import errno
import socket

from gateway.config import Config, HostPort
from gateway.control import check_admin_exposure
from gateway.errors import ConfigError


def bind_problem(addr: HostPort) -> str | None:
    """Why `addr` cannot be listened on now, or None.

    The probe binds without SO_REUSEPORT: the data listener sets it so that
    workers share a port, which would also let a second gateway bind silently
    beside a running one and split its traffic.
    """
    if addr.port == 0:
        return None
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr.host, addr.port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return (
                f"{str(addr)!r} is already in use by another process (if that is this "
                f"gateway running, check the file with `gateway check --no-bind`)"
            )
        if e.errno == errno.EADDRNOTAVAIL:
            return f"{str(addr)!r}: {addr.host!r} is not an address of this machine"
        if e.errno == errno.EACCES:
            return f"{str(addr)!r}: permission denied (ports below 1024 need privileges)"
        return f"{str(addr)!r} cannot be listened on: {e.strerror or e}"
    return None


def problems(
    cfg: Config, *, admin: bool = True, data: bool = True, bind: bool = True
) -> list[tuple[str, str]]:
    """Every (field, message) that would stop `gateway run` from starting with `cfg`."""
    found: list[tuple[str, str]] = []
    if admin:
        try:
            check_admin_exposure(cfg)
        except ConfigError as e:
            found.extend(e.errors)
    if bind:
        if data and (why := bind_problem(cfg.listen)) is not None:
            found.append(("listen", why))
        if admin and (why := bind_problem(cfg.admin.listen)) is not None:
            found.append(("admin.listen", why))
    return found
