"""TLS contexts: the HTTPS data listener, upstreams over https://, and Consul over TLS.

Why one module: every context the gateway builds starts from the `ssl` module's
modern defaults (`ssl.create_default_context`: TLS 1.2 or later, no
compression, certificate and host name checks on the client side), offers only
ALPN `http/1.1` (RFC 7301; the engines speak HTTP/1.1 only), and reports a bad
file by name, so `gateway check`, the start and a reload refuse it the same way
(README "TLS").
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from gateway import files

ALPN = ["http/1.1"]

# How a certificate or key problem is reported: (config field, message naming the file).
AddError = Callable[[str, str], None]


class TLSFileError(ValueError):
    """A certificate, key or CA file that cannot be used; `field` names the setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _read(path: str, field: str) -> str:
    try:
        return files.read_bytes(path).decode("ascii", errors="replace")
    except OSError as e:
        raise TLSFileError(field, f"cannot read {path}: {e.strerror or e}") from None


def _check_pem(path: str, field: str, marker: str, what: str) -> None:
    if marker not in _read(path, field):
        raise TLSFileError(field, f"{path} holds no PEM {what} ('-----BEGIN ...{marker}')")


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str | None, prefix: str) -> None:
    """Load a certificate chain and its key, naming whichever file is at fault."""
    cf, kf = f"{prefix}.cert", f"{prefix}.key"
    _check_pem(cert, cf, "CERTIFICATE-----", "certificate")
    if key is not None:
        _check_pem(key, kf, "PRIVATE KEY-----", "private key")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        if key is None:
            raise TLSFileError(cf, f"{cert}: {e.reason or e} (a key in the same file?)") from None
        raise TLSFileError(
            kf, f"{key} is not the private key of the certificate in {cert} ({e.reason or e})"
        ) from None


def _load_ca(ctx: ssl.SSLContext, ca: str, field: str) -> None:
    _check_pem(ca, field, "CERTIFICATE-----", "CA certificate")
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise TLSFileError(field, f"{ca}: not a usable CA bundle ({e.reason or e})") from None


class DirectSSLObject(ssl.SSLObject):
    """An `ssl.SSLObject` whose `read`, `write` and `pending` are the C methods themselves.

    Why: the engine's TLS layer (gateway/engine/tls_conn.py: the listener and
    the pool's upstream connections) and the event loop's TLS transport (active
    health checks, Consul) call these for every TLS record,
    and the stdlib's versions are Python functions that only forward to the C
    object: an interpreter frame per call, three per proxied request. Bound on
    the instance, the C methods serve those calls directly (measured with
    callgrind: about 1,300 fewer instructions per request on the HTTPS
    listener, benchmarks/README.md "TLS").
    The transports call them as `read(n)`, `read(n, buffer)`, `write(data)`
    and `pending()`, which the C methods take as they are; only `read()` with
    no length (the stdlib's default of 1024) would not, and no transport does.
    Where the stdlib's object has no `_sslobj` (another Python), nothing is
    bound and the stdlib's methods serve.
    """

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectSSLObject:
        obj: DirectSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        raw = vars(obj).get("_sslobj")
        if raw is not None:
            vars(obj).update(read=raw.read, write=raw.write, pending=raw.pending)
        return obj


def server_context(
    cert: str, key: str | None, client_ca: str | None, *, prefix: str = "tls"
) -> ssl.SSLContext:
    """The data listener's context; `client_ca` set: clients must show a certificate it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    ctx.sslobject_class = DirectSSLObject
    _load_chain(ctx, cert, key, prefix)
    if client_ca is not None:
        _load_ca(ctx, client_ca, f"{prefix}.client_ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    verify: bool = True,
    prefix: str = "upstream_tls",
    alpn: bool = True,
) -> ssl.SSLContext:
    """A client context: the system CAs unless `ca`, a client certificate for mTLS if `cert`."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.sslobject_class = DirectSSLObject
    if alpn:
        ctx.set_alpn_protocols(ALPN)
    if ca is not None:
        _load_ca(ctx, ca, f"{prefix}.ca")
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        _load_chain(ctx, cert, key, prefix)
    return ctx


def describe(exc: BaseException) -> str:
    """A TLS failure as one line for a 502 body or a log: what failed and why.

    Why not str(exc): an `SSLCertVerificationError` prints its errno and the
    OpenSSL source line; `verify_message` is the part that names the fault.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or "unknown reason"
        return f"certificate verify failed: {why}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.strerror or exc).replace("_", " ").lower()
    return str(exc) or type(exc).__name__


def is_tls_error(exc: BaseException) -> bool:
    """True when a connection failed in the TLS handshake (not at the TCP level)."""
    return isinstance(exc, ssl.SSLError | ssl.CertificateError)
