"""The TLS scenario's servers: nginx and the gateway terminating HTTPS with one certificate.

Both forwarders get the same certificate and key (made here with trustme, a
throwaway CA, never written outside the run's temp dir), TLS 1.2+ and ALPN
http/1.1, and forward plain HTTP to the same upstream pair: the figure is the
cost of the TLS hop on top of the split (README "TLS"; benchmarks/README.md).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
from pathlib import Path

from benchmarks import nginxconf
from benchmarks.procs import Proc, StartupError, free_port, pinned
from benchmarks.servers import WEIGHTS, Fleet, Server, gateway_argv, gateway_config, gateway_env


def certificates(tmp: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 (written once per run) -> (cert, key)."""
    cert, key = tmp / "tls" / "cert.pem", tmp / "tls" / "key.pem"
    if not cert.exists():
        try:
            import trustme
        except ImportError as exc:  # a test extra: pip install -e '.[test]'
            raise RuntimeError("the TLS scenario needs trustme (pip install trustme)") from exc
        cert.parent.mkdir(parents=True, exist_ok=True)
        leaf = trustme.CA().issue_cert("127.0.0.1", "localhost")
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


def nginx_tls_conf(conf: str, port: int, cert: Path, key: str | Path) -> str:
    """The reference config with its listener terminating TLS (nginx's ssl module)."""
    plain = f"listen 127.0.0.1:{port} backlog=4096;"
    if plain not in conf:
        raise ValueError("the nginx reference config has no listener to turn into TLS")
    tls = (
        f"listen 127.0.0.1:{port} ssl backlog=4096;\n"
        f"        ssl_certificate {cert};\n"
        f"        ssl_certificate_key {key};\n"
        "        ssl_protocols TLSv1.2 TLSv1.3;\n"
        "        ssl_session_cache shared:SSL:10m;"
    )
    return conf.replace(plain, tls)


def wait_https(port: int, path: str, *, proc: Proc, deadline_s: float = 20.0) -> None:
    """Poll ``GET path`` over TLS (certificate not checked: only readiness) until 200."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartupError(f"{proc.name} exited before it was ready\n{proc.log_tail()}")
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=1.0, context=ctx)
        try:
            conn.request("GET", path)
            status = conn.getresponse().status
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        finally:
            conn.close()
        time.sleep(0.1)
    raise StartupError(f"{proc.name}: no 200 on https://127.0.0.1:{port}{path} (last: {last})")


def negotiated(port: int) -> tuple[str, str]:
    """(protocol, cipher suite) a client with OpenSSL's defaults gets from the server on `port`.

    The load generator (wrk) offers OpenSSL's default protocols, suites and
    groups and no ALPN; so does this probe. Both forwarders must come out the
    same, or the scenario compares two different ciphers, not two forwarders.
    """
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            cipher = tls.cipher()
            return tls.version() or "", cipher[0] if cipher else ""


def nginx_ref(fleet: Fleet, workers: int = 1) -> Server:
    key: tuple[object, ...] = ("nginx-tls", workers)
    if key in fleet._servers:
        return fleet._servers[key]
    if not fleet.nginx:
        raise RuntimeError("nginx is not installed")
    cert, pkey = certificates(fleet.tmp)
    ups = {name: s.port for name, s in fleet.upstreams().items()}
    port = free_port()
    prefix = fleet.tmp / f"nginx-tls-w{workers}"
    conf = nginxconf.reference_conf(
        prefix, port, ups, WEIGHTS, workers=workers, user=fleet.user, nofile=fleet.nofile
    )
    nginxconf.prepare_prefix(prefix, nginx_tls_conf(conf, port, cert, pkey))
    argv = pinned(nginxconf.nginx_argv(fleet.nginx, prefix), fleet.layout.for_workers(workers))
    proc = fleet.procs.start(prefix.name, argv, cwd=prefix)
    wait_https(port, "/1k", proc=proc, deadline_s=10)
    server = Server("nginx", port, proc, scheme="https")
    fleet._servers[key] = server
    return server


def gateway(fleet: Fleet, workers: int = 1, tracing: str = "prop") -> Server:
    key: tuple[object, ...] = ("gateway-tls", workers, tracing)
    if key in fleet._servers:
        return fleet._servers[key]
    cert, pkey = certificates(fleet.tmp)
    ups = {name: s.port for name, s in fleet.upstreams().items()}
    port, admin_port = free_port(), free_port()
    workdir = fleet.tmp / f"gateway-tls-w{workers}-{tracing}"
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "gateway.yaml"
    text = gateway_config(
        port=port,
        admin_port=admin_port,
        state_path=workdir / "state.json",
        upstreams=ups,
        workers=workers,
    )
    config.write_text(text + f"tls: {{cert: '{cert}', key: '{pkey}'}}\n")
    argv = pinned(gateway_argv(config, workers, fleet.python), fleet.layout.for_workers(workers))
    env = gateway_env(tracing, pythonpath=fleet.pythonpath)
    proc = fleet.procs.start(workdir.name, argv, env=env, cwd=workdir)
    try:
        wait_https(port, "/healthz", proc=proc, deadline_s=20)
    except BaseException:
        fleet.procs.stop(proc)
        raise
    server = Server("gateway", port, proc, admin_port, scheme="https")
    fleet._servers[key] = server
    return server
