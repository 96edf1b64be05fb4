"""The benchmark's TLS scenario: nginx and the gateway serve HTTPS with one certificate."""

from __future__ import annotations

import asyncio
import http.client
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import nginxconf, scenarios, servers, tlsbench, tlscount, tlsidle, tlsupidle
from benchmarks.procs import ProcessSet
from benchmarks.servers import CpuLayout, Fleet
from tests.programs import need

pytest.importorskip("trustme")


def test_tls_scenario_is_c50_keepalive_1k_against_nginx() -> None:
    s = scenarios.SCENARIOS["tls_c50_1k"]
    assert s.tls and s.targets == ("nginx", "gateway")
    assert s.probes == (scenarios.Probe("wrk", 50, "/1k"),)


def test_tls_reference_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = need("nginx", "nginx -t checks the TLS reference config")
    cert, key = tlsbench.certificates(tmp_path)
    prefix = tmp_path / "ref"
    conf = nginxconf.reference_conf(
        prefix, 18093, {"stable": 18090, "gray": 18092}, servers.WEIGHTS, nofile=1024
    )
    tls = tlsbench.nginx_tls_conf(conf, 18093, cert, key)
    assert "listen 127.0.0.1:18093 ssl backlog=4096;" in tls and f"ssl_certificate {cert};" in tls
    nginxconf.prepare_prefix(prefix, tls)
    argv = nginxconf.nginx_argv(nginx, prefix)[:-2] + ["-t", "-q"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr


def _served(port: int) -> tuple[int, bytes, bytes]:
    """(status, body, the certificate it served) over HTTPS, certificate not checked."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
    try:
        conn.request("GET", "/1k", headers={"X-User-ID": "u1"})
        resp = conn.getresponse()
        body = resp.read()
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        return resp.status, body, der or b""
    finally:
        conn.close()


def test_nginx_and_the_gateway_serve_the_split_over_tls_with_one_certificate(
    tmp_path: Path,
) -> None:
    nginx = need("nginx", "the TLS scenario's reference")
    with ProcessSet(tmp_path) as procs:
        fleet = Fleet(procs, tmp_path, {"nginx": nginx}, CpuLayout(), builtin_upstream=True)
        ref = tlsbench.nginx_ref(fleet)
        gw = tlsbench.gateway(fleet)
        assert ref.scheme == gw.scheme == "https"
        a, b = _served(ref.port), _served(gw.port)
        assert a[0] == b[0] == 200 and a[1] == b[1] and len(a[1]) == 1024
        assert a[2] == b[2] != b""  # the same certificate on both
        # ... and the same protocol and cipher suite for a client with wrk's defaults
        # (OpenSSL's; here TLS 1.3 with TLS_AES_256_GCM_SHA384 on both).
        got = tlsbench.negotiated(gw.port)
        assert got == tlsbench.negotiated(ref.port) and got[0] == "TLSv1.3"


def test_tlsidle_holds_answered_https_connections_and_reads_the_gateways_rss(
    tmp_path: Path,
) -> None:
    with ProcessSet(tmp_path) as procs:
        fleet = Fleet(procs, tmp_path, {}, CpuLayout(), builtin_upstream=True)
        gw = tlsbench.gateway(fleet)

        async def hold() -> list[bool]:
            held = await tlsidle.open_idle(gw.port, 5)  # each answered with its 1 KiB
            try:
                return [w.is_closing() for w in held]
            finally:
                await tlsidle.close_all(held)

        assert asyncio.run(hold()) == [False] * 5  # still open once answered
        before, after = asyncio.run(tlsidle.measure(gw.port, gw.proc.popen.pid, 5, settle=0))
        assert before > 1000 and after > 1000  # KiB: a Python process's resident set at least


def test_tlsupidle_pools_https_upstream_connections_and_counts_them_at_the_upstreams(
    tmp_path: Path,
) -> None:
    with ProcessSet(tmp_path) as procs:
        grew, pooled = tlsupidle.measure_mode(
            procs, tmp_path, sys.executable, True, 5, settle=0, warm=1
        )
    # Every request was answered 200 over HTTPS to the upstreams (measure_mode raises
    # otherwise); the upstreams' status pages were read before and after the burst.
    assert 0 <= pooled <= 5
    assert isinstance(grew, int)


ANNOTATE = """\
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
9,000,000 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                 file:function
--------------------------------------------------------------------------------
6,000,000 (66.67%)  /project/build/libuv-x86_64/src/unix/stream.c:uv__read [/x/loop.so]
1,800,000 (20.00%)  ???:SSL_write_ex [/usr/lib/x86_64-linux-gnu/libssl.so.3]
  900,000 (10.00%)  ???:SSL_read_ex [/usr/lib/x86_64-linux-gnu/libssl.so.3]
  300,000 ( 3.33%)  ???:SSL_read_ex'2 [/usr/lib/x86_64-linux-gnu/libssl.so.3]
"""


def test_tlscount_reads_inclusive_counts_and_totals_from_callgrind_annotate() -> None:
    got = tlscount.inclusive(ANNOTATE, ["uv__read", "SSL_read_ex", "SSL_write_ex", "SSL_read"])
    assert got == {"uv__read": 6_000_000, "SSL_write_ex": 1_800_000, "SSL_read_ex": 900_000}
    assert tlscount.totals(ANNOTATE) == 9_000_000
    with pytest.raises(ValueError):
        tlscount.totals("no totals here")


@pytest.mark.parametrize(
    ("plain", "tls", "want"),
    [
        (100.0, (130.0, 18.0, 0.0), (30.0, 18.0, 12.0)),
        (24.0, (45.0, 18.0, 0.0), (21.0, 18.0, 3.0)),
        (100.0, (137.0, 18.0, 7.0), (37.0, 18.0, 12.0)),
    ],
    ids=["gateway-like", "nginx-like", "handshakes-in-the-window-are-no-glue"],
)
def test_tlscount_splits_what_https_adds_into_openssl_and_glue(
    plain: float, tls: tuple[float, float, float], want: tuple[float, float, float]
) -> None:
    row = {"data path": tls[0], "openssl": tls[1], "handshake": tls[2]}
    s = tlscount.split({"data path": plain}, row)
    assert (s["tls added"], s["openssl"], s["tls glue"]) == want


def test_tlscount_nginx_config_is_one_foreground_process_and_passes_nginx_t(
    tmp_path: Path,
) -> None:
    nginx = need("nginx", "nginx -t checks the config tlscount runs under valgrind")
    cert, key = tlsbench.certificates(tmp_path)
    prefix = tmp_path / "vg"
    conf = nginxconf.reference_conf(
        prefix, 18095, {"stable": 18090, "gray": 18092}, servers.WEIGHTS, nofile=1024
    )
    conf = tlscount.valgrind_nginx_conf(tlsbench.nginx_tls_conf(conf, 18095, cert, key))
    assert "master_process off;" in conf and "daemon off;" in conf
    with pytest.raises(ValueError):
        tlscount.valgrind_nginx_conf(conf)  # only once
    nginxconf.prepare_prefix(prefix, conf)
    argv = [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-t", "-q"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
