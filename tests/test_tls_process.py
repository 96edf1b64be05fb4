"""TLS through the gateway process: bad files refused (exit 2), SIGHUP rotation, --workers.

README "TLS". Certificates come from trustme in each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as C
from gateway.errors import ConfigError
from tests.conftest import free_port
from tests.engine_helpers import RawClient
from tests.tls_helpers import PKI, cert_serial, serial_of


def base_doc(pki: PKI, **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token_env": None},
        "state": {"store": "memory"},
        "tls": {"cert": str(pki.server.cert), "key": str(pki.server.key)},
        "services": {"svc": {"releases": {"stable": {"weight": 1, "upstreams": ["127.0.0.1:9"]}}}},
    }
    doc.update(top)
    return doc


def _svc_tls(where: str, ut: dict[str, Any]) -> dict[str, Any]:
    rel: dict[str, Any] = {"weight": 1, "upstreams": ["https://127.0.0.1:9"]}
    svc: dict[str, Any] = {"releases": {"stable": rel}}
    (rel if where == "release" else svc)["upstream_tls"] = ut
    return {"svc": svc}


# (id, how to spoil the doc given the PKI and a scratch dir, env, field, phrase naming the file)
BAD: list[tuple[str, Any, dict[str, str], str, str]] = [
    ("cert-missing-file", lambda p, d: {"tls": {"cert": f"{d}/nope.pem"}}, {}, "tls.cert",
     "cannot read {d}/nope.pem"),
    ("cert-is-a-directory", lambda p, d: {"tls": {"cert": str(d)}}, {}, "tls.cert",
     "cannot read {d}"),
    ("cert-not-pem", lambda p, d: {"tls": {"cert": str(p.ca_pem.parent / "garbage.txt")}}, {},
     "tls.cert", "garbage.txt holds no PEM certificate"),
    ("key-missing-file", lambda p, d: {"tls": {"cert": str(p.server.cert),
                                               "key": f"{d}/gone.pem"}}, {},
     "tls.key", "cannot read {d}/gone.pem"),
    ("key-mismatched", lambda p, d: {"tls": {"cert": str(p.server.cert),
                                             "key": str(p.client.key)}}, {},
     "tls.key", "ca-client-key.pem is not the private key of the certificate in"),
    ("cert-required", lambda p, d: {"tls": {"key": str(p.server.key)}}, {}, "tls.cert",
     "is required"),
    ("tls-unknown-field", lambda p, d: {"tls": {"cert": str(p.server.cert),
                                                "key": str(p.server.key), "ca": "x"}}, {},
     "tls.ca", "unknown field"),
    ("client-ca-not-pem", lambda p, d: {"tls": {"cert": str(p.server.cert),
                                                "key": str(p.server.key),
                                                "client_ca": str(p.server.key)}}, {},
     "tls.client_ca", "ca-server-key.pem holds no PEM CA certificate"),
    ("upstream-ca-missing", lambda p, d: {"services": _svc_tls("service", {"ca": f"{d}/x.pem"})},
     {}, "services.svc.upstream_tls.ca", "cannot read {d}/x.pem"),
    ("upstream-verify-not-bool", lambda p, d: {"services": _svc_tls("service", {"verify": "no"})},
     {}, "services.svc.upstream_tls.verify", "must be true or false"),
    ("upstream-key-without-cert",
     lambda p, d: {"services": _svc_tls("release", {"key": str(p.client.key)})}, {},
     "services.svc.releases.stable.upstream_tls.key", "needs `cert`"),
    ("upstream-release-cert-mismatched",
     lambda p, d: {"services": _svc_tls("release", {"cert": str(p.client.cert),
                                                    "key": str(p.server.key)})}, {},
     "services.svc.releases.stable.upstream_tls.key",
     "ca-server-key.pem is not the private key of the certificate in"),
    ("upstream-server-name", lambda p, d: {"services": _svc_tls("service",
                                                                {"server_name": "a b"})}, {},
     "services.svc.upstream_tls.server_name", "must be a host name"),
    ("upstream-unknown-field", lambda p, d: {"services": _svc_tls("service", {"sni": "x"})}, {},
     "services.svc.upstream_tls.sni", "unknown field"),
    ("consul-cacert-missing", lambda p, d: {}, {"CONSUL_CACERT": "/nonexistent/ca.pem"},
     "CONSUL_CACERT", "cannot read /nonexistent/ca.pem"),
    ("consul-http-ssl-not-bool", lambda p, d: {}, {"CONSUL_HTTP_SSL": "maybe"},
     "CONSUL_HTTP_SSL", "must be true or false"),
    ("consul-key-without-cert", lambda p, d: {}, {"CONSUL_CLIENT_KEY": "/k.pem"},
     "CONSUL_CLIENT_KEY", "needs CONSUL_CLIENT_CERT"),
]  # fmt: skip


@pytest.mark.parametrize(("spoil", "env", "field", "phrase"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])  # fmt: skip
def test_bad_tls_input_is_refused_naming_the_field_and_the_file(
    pki: PKI, tmp_path: Path, spoil: Any, env: dict[str, str], field: str, phrase: str
) -> None:
    (pki.ca_pem.parent / "garbage.txt").write_text("not a certificate\n")
    doc = base_doc(pki, **spoil(pki, tmp_path))
    with pytest.raises(ConfigError) as e:
        C.build(doc, env=env)
    want = phrase.format(d=tmp_path)
    assert any(f == field and want in m for f, m in e.value.errors), e.value.errors


def test_good_tls_config_builds_contexts_once_per_distinct_upstream_tls(pki: PKI) -> None:
    ut = {"ca": str(pki.ca_pem)}
    doc = base_doc(
        pki,
        services={
            "a": {
                "upstream_tls": ut,
                "match": {"path_prefix": "/a"},
                "releases": {
                    "stable": {"weight": 1, "upstreams": ["https://127.0.0.1:9"]},
                    "gray": {"weight": 1, "upstreams": ["https://127.0.0.1:10"]},
                },
            },
            "b": {
                "match": {"path_prefix": "/b"},
                "releases": {"stable": {"weight": 1, "upstreams": ["http://127.0.0.1:11"]}},
            },
        },
    )
    cfg = C.build(doc, env={})
    a = cfg.services["a"].releases
    assert a["stable"].upstream_tls is a["gray"].upstream_tls  # one context, shared
    assert a["stable"].upstreams[0].tls and a["stable"].upstreams[0].port == 9
    b = cfg.services["b"].releases["stable"]
    assert b.upstream_tls is None and not b.upstreams[0].tls
    https_default = C.build(
        base_doc(pki, services=_svc_tls("service", {})) | {"tls": None}, env={}
    ).services["svc"]
    assert https_default.releases["stable"].upstreams[0].port == 9
    assert C.parse_endpoint("https://upstream.test").port == 443  # type: ignore[union-attr]


def _gateway(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "GATEWAY_"))},
    )


@pytest.mark.parametrize("verb", ["check", "run"])
def test_check_and_run_exit_2_naming_a_mismatched_key(pki: PKI, tmp_path: Path, verb: str) -> None:
    doc = base_doc(pki, tls={"cert": str(pki.server.cert), "key": str(pki.client.key)})
    f = tmp_path / "gateway.yaml"
    f.write_text(yaml.safe_dump(doc))
    r = _gateway(verb, "-c", str(f), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "  tls.key: " in r.stderr and str(pki.client.key) in r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- the process


class Proc:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin: int, log: Path) -> None:
        self.proc, self.port, self.admin, self.log = proc, port, admin, log


def _wait(url: str, ctx: ssl.SSLContext | None, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                if r.status == 200:
                    return
        time.sleep(0.05)
    raise TimeoutError(url)


@contextlib.contextmanager
def tls_gateway(tmp: Path, pki: PKI, doc: dict[str, Any], workers: int = 1) -> Iterator[Proc]:
    port, admin = free_port(), free_port()
    doc = {**doc, "listen": f"127.0.0.1:{port}"}
    doc["admin"] = {"listen": f"127.0.0.1:{admin}", "token_env": None}
    cfg = tmp / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    log = tmp / "gateway.log"
    with log.open("wb") as lf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(cfg), "--workers", str(workers)],
            stdout=lf,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            env={k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "GATEWAY_"))},
        )
    p = Proc(proc, port, admin, log)
    try:
        _wait(f"http://127.0.0.1:{admin}/healthz", None, proc)
        _wait(f"https://127.0.0.1:{port}/healthz", pki.client_ctx(), proc)
        yield p
    except BaseException:
        print(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


async def _open(port: int, ctx: ssl.SSLContext) -> RawClient:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    return RawClient(r, w)


async def _served(c: RawClient) -> int:
    await c.send(GET)
    assert (await c.response()).status == 200
    return serial_of(c.writer.get_extra_info("ssl_object"))


@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
async def test_sighup_rotates_the_certificate_while_a_keepalive_connection_keeps_working(
    pki: PKI, tmp_path: Path, workers: int
) -> None:
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live-key.pem"
    live_cert.write_bytes(pki.server.cert.read_bytes())
    live_key.write_bytes(pki.server.key.read_bytes())
    doc = base_doc(pki, tls={"cert": str(live_cert), "key": str(live_key)})
    ctx = pki.client_ctx()
    with tls_gateway(tmp_path, pki, doc, workers=workers) as gw:
        kept = await _open(gw.port, ctx)
        old = cert_serial(pki.server.cert)
        assert await _served(kept) == old
        rotated = pki.issue("rotated")
        live_cert.write_bytes(rotated.cert.read_bytes())
        live_key.write_bytes(rotated.key.read_bytes())
        gw.proc.send_signal(signal.SIGHUP)
        new = cert_serial(rotated.cert)
        end = time.monotonic() + 60
        in_a_row = 0  # every worker reloads: several new connections in a row see it
        while in_a_row < 4 * workers:
            fresh = await _open(gw.port, ctx)
            got = await _served(fresh)
            await fresh.close()
            in_a_row = in_a_row + 1 if got == new else 0
            assert got in (old, new) and time.monotonic() < end, "rotation never completed"
            if got != new:
                await asyncio.sleep(0.05)
        assert await _served(kept) == old  # the open connection carries on
        assert await _served(kept) == old
        await kept.close()
    assert "reload: tls: new connections use" in gw.log.read_text()


async def test_workers_serve_https(pki: PKI, tmp_path: Path) -> None:
    with tls_gateway(tmp_path, pki, base_doc(pki), workers=2) as gw:
        for _ in range(6):
            c = await _open(gw.port, pki.client_ctx())
            assert await _served(c) == cert_serial(pki.server.cert)
            await c.close()
        # Each worker logs its data address once it serves (the master logs only the
        # admin one); the second worker may still be starting: poll with a deadline.
        end = time.monotonic() + 60
        while (out := gw.log.read_text()).count("listening on") < 2:
            assert time.monotonic() < end, out
            await asyncio.sleep(0.05)


def test_check_accepts_https_upstreams_and_upstream_tls(pki: PKI, tmp_path: Path) -> None:
    ut = {"ca": str(pki.ca_pem), "cert": str(pki.client.cert), "key": str(pki.client.key)}
    doc = base_doc(pki, services=_svc_tls("release", ut))
    f = tmp_path / "gateway.yaml"
    f.write_text(yaml.safe_dump(doc))
    r = _gateway("check", "--no-bind", "-c", str(f), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_relative_tls_paths_are_read_next_to_the_config_file(pki: PKI, tmp_path: Path) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "certs").mkdir(parents=True)
    for src, name in ((pki.server.cert, "cert.pem"), (pki.server.key, "key.pem")):
        (conf_dir / "certs" / name).write_bytes(src.read_bytes())
    doc = base_doc(pki, tls={"cert": "certs/cert.pem", "key": "certs/key.pem"})
    f = conf_dir / "gateway.yaml"
    f.write_text(yaml.safe_dump(doc))
    cfg = C.load(str(f), env={})
    assert cfg.tls is not None and cfg.tls.cert == str(conf_dir / "certs" / "cert.pem")
    assert cfg.tls.context is not None
