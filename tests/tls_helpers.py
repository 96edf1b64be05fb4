"""Test certificates made with trustme (never committed) and TLS upstreams on 127.0.0.1."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

trustme = pytest.importorskip("trustme")


@dataclass
class Pair:
    cert: Path  # the certificate chain (leaf first)
    key: Path


@dataclass
class PKI:
    """A CA with a server pair for 127.0.0.1/localhost and a client pair."""

    ca: object  # trustme.CA
    ca_pem: Path
    server: Pair
    client: Pair
    dir: Path

    def issue(self, name: str, *identities: str) -> Pair:
        """Another pair from this CA (a rotated server certificate, another client)."""
        c = self.ca.issue_cert(*(identities or ("127.0.0.1", "localhost")))  # type: ignore[attr-defined]
        return write_pair(c, self.dir, name)

    def server_ctx(self, *, require_client: bool = False) -> ssl.SSLContext:
        """A context for an upstream or a Consul double served over TLS."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.server.cert, self.server.key)
        if require_client:
            ctx.load_verify_locations(cafile=self.ca_pem)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_ctx(self, *, with_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        if with_cert:
            ctx.load_cert_chain(self.client.cert, self.client.key)
        return ctx


def write_pair(leaf: object, d: Path, name: str) -> Pair:
    cert, key = d / f"{name}.pem", d / f"{name}-key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))  # type: ignore[attr-defined]
    key.write_bytes(leaf.private_key_pem.bytes())  # type: ignore[attr-defined]
    return Pair(cert, key)


def make_pki(d: Path, name: str = "ca") -> PKI:
    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name=f"gray-gateway test {name}")
    ca_pem = d / f"{name}.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    server = write_pair(ca.issue_cert("127.0.0.1", "localhost"), d, f"{name}-server")
    client = write_pair(ca.issue_cert("client.test"), d, f"{name}-client")
    return PKI(ca, ca_pem, server, client, d)


def serial_of(ssl_object: object) -> int:
    """The serial number of the certificate a TLS peer presented (tells two apart)."""
    from cryptography import x509

    der = ssl_object.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    return int(x509.load_der_x509_certificate(der).serial_number)


def cert_serial(path: Path) -> int:
    from cryptography import x509

    return int(x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number)


async def serve_tls(app: web.Application, ctx: ssl.SSLContext) -> tuple[web.AppRunner, int]:
    """An aiohttp app over HTTPS on an ephemeral 127.0.0.1 port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    server = site._server
    assert server is not None
    port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    return runner, port
