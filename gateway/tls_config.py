"""Parsing `tls:` (the HTTPS data listener), `upstream_tls:` and Consul's TLS variables.

Why apart from gateway/config.py: the TLS settings are one concept with their
own file checks. The contexts are built here, once per config load, so a bad
certificate or key refuses `gateway check`, the start and a reload alike,
naming the field and the file (README "TLS"; docs/configuration.md).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from gateway.config_syntax import key_path
from gateway.tls import TLSFileError, client_context, server_context

if TYPE_CHECKING:
    from gateway.config import ReleaseConfig, ServiceConfig

AddError = Callable[[str, str], None]

LISTENER_KEYS: Final = frozenset({"cert", "key", "client_ca"})
UPSTREAM_KEYS: Final = frozenset({"ca", "cert", "key", "verify", "server_name"})
# Consul CLI's variables (Consul docs, "Commands: Environment variables").
CONSUL_ENV: Final = (
    "CONSUL_HTTP_SSL",
    "CONSUL_CACERT",
    "CONSUL_CLIENT_CERT",
    "CONSUL_CLIENT_KEY",
    "CONSUL_HTTP_SSL_VERIFY",
)


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    """`tls:` — the data listener speaks HTTPS with this certificate."""

    cert: str
    key: str | None = None
    client_ca: str | None = None  # set: clients must present a certificate it signed
    # Built from the files at load time; a reload loads them again (new connections only).
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """`upstream_tls:` for a release (its service's, field by field under its own)."""

    ca: str | None = None  # None: the system's CAs
    cert: str | None = None  # a client certificate, for upstreams that demand mTLS
    key: str | None = None
    verify: bool = True
    server_name: str | None = None  # SNI and the name checked; None: the upstream's host
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


def _file(m: Mapping[str, Any], key: str, path: str, add: AddError, base: Path) -> str | None:
    v = m.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        add(f"{path}.{key}", f"must be a file path, not {v!r}")
        return None
    p = Path(v)
    return str(p if p.is_absolute() else base / p)


def _unknown(m: Mapping[str, Any], allowed: frozenset[str], path: str, add: AddError) -> None:
    for k in m:
        if k not in allowed:
            add(f"{path}.{k}", f"unknown field (expected one of: {', '.join(sorted(allowed))})")


def parse_listener_tls(v: object, add: AddError, base: Path) -> ListenerTLS | None:
    """`tls: {cert, key, client_ca}` -> ListenerTLS with its context, or None (plain HTTP)."""
    if v is None:
        return None
    if not isinstance(v, Mapping):
        add("tls", f"must be a mapping {{cert, key, client_ca}} or null, not {v!r}")
        return None
    _unknown(v, LISTENER_KEYS, "tls", add)
    errs: list[tuple[str, str]] = []

    def note(p: str, msg: str) -> None:
        errs.append((p, msg))

    cert = _file(v, "cert", "tls", note, base)
    key = _file(v, "key", "tls", note, base)
    client_ca = _file(v, "client_ca", "tls", note, base)
    if "cert" not in v or v["cert"] is None:
        note("tls.cert", "is required (a PEM certificate chain file)")
    for p, msg in errs:
        add(p, msg)
    if errs or cert is None:
        return None
    try:
        ctx = server_context(cert, key, client_ca, prefix="tls")
    except TLSFileError as e:
        add(e.field, e.message)
        return None
    return ListenerTLS(cert, key, client_ca, ctx)


def _upstream_fields(v: object, path: str, add: AddError, base: Path) -> dict[str, Any] | None:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        add(path, f"must be a mapping {{ca, cert, key, verify, server_name}}, not {v!r}")
        return None
    _unknown(v, UPSTREAM_KEYS, path, add)
    out: dict[str, Any] = {}
    ok = True

    def bad(p: str, msg: str) -> None:
        nonlocal ok
        ok = False
        add(p, msg)

    for k in ("ca", "cert", "key"):
        if k in v:
            out[k] = _file(v, k, path, bad, base)
    if "verify" in v:
        if not isinstance(v["verify"], bool):
            bad(f"{path}.verify", f"must be true or false, not {v['verify']!r}")
        else:
            out["verify"] = v["verify"]
    if "server_name" in v:
        sn = v["server_name"]
        if sn is not None and (not isinstance(sn, str) or not sn or any(c in sn for c in " /:")):
            bad(f"{path}.server_name", f"must be a host name or null, not {sn!r}")
        else:
            out["server_name"] = sn
    return out if ok else None


class ContextCache:
    """One context per distinct `upstream_tls` within a load: releases that agree share it."""

    def __init__(self) -> None:
        self.built: dict[UpstreamTLS, UpstreamTLS] = {}

    def get(self, want: UpstreamTLS, path: str, add: AddError) -> UpstreamTLS | None:
        have = self.built.get(want)
        if have is not None:
            return have
        if want.key is not None and want.cert is None:
            add(f"{path}.key", "needs `cert` (the client certificate it belongs to)")
            return None
        try:
            ctx = client_context(
                ca=want.ca, cert=want.cert, key=want.key, verify=want.verify, prefix=path
            )
        except TLSFileError as e:
            add(e.field, e.message)
            return None
        done = replace(want, context=ctx)
        self.built[want] = done
        return done


def with_upstream_tls(
    svc: ServiceConfig,
    raw: Mapping[str, Any],
    path: str,
    add: AddError,
    base: Path,
    cache: ContextCache,
) -> ServiceConfig:
    """Give every release of `svc` its effective `upstream_tls` (release fields over service's).

    A release gets one when either level sets it, or when it may reach an
    https:// endpoint (a static one, or any from Consul): then the system's CAs.
    """
    svc_fields = _upstream_fields(raw.get("upstream_tls"), f"{path}.upstream_tls", add, base)
    if svc_fields is None:
        return svc
    rm = raw.get("releases")
    releases: dict[str, ReleaseConfig] = {}
    for name, r in svc.releases.items():
        rraw = rm.get(name) if isinstance(rm, Mapping) else None
        rpath = key_path(f"{path}.releases", name) + ".upstream_tls"
        own = _upstream_fields(
            rraw.get("upstream_tls") if isinstance(rraw, Mapping) else None, rpath, add, base
        )
        if own is None:
            releases[name] = r
            continue
        merged = {**svc_fields, **own}
        needed = merged or r.consul is not None or any(e.tls for e in r.upstreams)
        if not needed:
            releases[name] = r
            continue
        where = rpath if own else f"{path}.upstream_tls"
        tls = cache.get(UpstreamTLS(**merged), where, add)
        releases[name] = replace(r, upstream_tls=tls) if tls is not None else r
    svc_tls = UpstreamTLS(**svc_fields) if svc_fields else None
    return replace(svc, releases=releases, upstream_tls=svc_tls)


def _env_bool(env: Mapping[str, str], name: str, add: AddError) -> bool | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    v = raw.strip().lower()
    if v in ("1", "t", "true", "yes", "on"):
        return True
    if v in ("0", "f", "false", "no", "off"):
        return False
    add(name, f"(environment) must be true or false, not {raw!r}")
    return None


def consul_tls(
    address: str, env: Mapping[str, str], add: AddError
) -> tuple[str, ssl.SSLContext | None]:
    """Consul's address and client context from the Consul CLI's TLS variables.

    `CONSUL_HTTP_SSL=true` turns an http:// address into https://; CONSUL_CACERT,
    CONSUL_CLIENT_CERT / CONSUL_CLIENT_KEY (mTLS) and CONSUL_HTTP_SSL_VERIFY=false
    shape the context (Consul docs, "Commands: Environment variables").
    None: no variable set, aiohttp's defaults (the system's CAs) apply.
    """
    use = _env_bool(env, "CONSUL_HTTP_SSL", add)
    verify = _env_bool(env, "CONSUL_HTTP_SSL_VERIFY", add)
    if use and address.startswith("http://"):
        address = "https://" + address[len("http://") :]
    ca = env.get("CONSUL_CACERT") or None
    cert = env.get("CONSUL_CLIENT_CERT") or None
    key = env.get("CONSUL_CLIENT_KEY") or None
    if ca is None and cert is None and key is None and verify is None:
        return address, None
    if key is not None and cert is None:
        add("CONSUL_CLIENT_KEY", "(environment) needs CONSUL_CLIENT_CERT as well")
        return address, None
    names = {"ca": "CONSUL_CACERT", "cert": "CONSUL_CLIENT_CERT", "key": "CONSUL_CLIENT_KEY"}
    try:
        ctx = client_context(
            ca=ca, cert=cert, key=key, verify=verify is not False, prefix="consul", alpn=False
        )
    except TLSFileError as e:
        var = names.get(e.field.rpartition(".")[2], e.field)
        add(var, f"(environment) {e.message}")
        return address, None
    return address, ctx
