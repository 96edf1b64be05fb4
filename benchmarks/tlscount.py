"""What HTTPS costs each forwarder per request, in instructions counted by callgrind.

Why: the TLS scenario's req/s ratio (benchmarks/README.md, `tls_c50_1k`) moves
by ×1.5 between repeats on a shared 2-core box, while an instruction count does
not; and a count can be split by function. Each of the four targets (the gateway
and the nginx reference, plain HTTP and HTTPS with the scenario's certificate)
runs under ``valgrind --tool=callgrind`` with counting off; the harness opens
``--conns`` keep-alive connections (the handshakes are not counted), sends a
warm-up, switches counting on, sends exactly ``--requests`` requests with a
random ``X-User-ID`` each, dumps, and prints per request:

- ``total``: the whole process;
- ``data path``: for the gateway libuv's read callback (``uv__read``: TLS, the
  engine and the policy for every socket event, not timers, which valgrind's
  slowness inflates); for nginx the same as total;
- ``openssl``: ``SSL_read``/``SSL_write`` (nginx) or ``SSL_read_ex``/``SSL_write_ex``
  (CPython's ``_ssl``, under the engine's TLS layer): the record layer and the
  cipher, work both forwarders must do;
- ``handshake``: ``SSL_do_handshake`` inside the counted window (none on the
  client side, whose connections are open before; upstream connections the
  pool opens when its idle ones are busy);
- ``tls glue``: the data path's growth from plain to HTTPS minus ``openssl``
  and ``handshake``: what the forwarder's own TLS plumbing costs (nginx's
  ``ngx_ssl_recv``/``ngx_ssl_send_chain``; for the gateway
  gateway/engine/tls_conn.py, its memory BIOs and CPython's ``_ssl`` wrappers).

    python -m benchmarks.tlscount --python /path/to/venv/bin/python --requests 3000

``--upstream-tls`` measures the other side instead: the gateway alone, over
plain HTTP from the client, to the upstream pair over plain HTTP and over
HTTPS (the same upstreams with the scenario's certificate, ``verify: false``,
handshakes not counted); "https adds" is then what TLS to upstreams costs.

Only 127.0.0.1; every process runs in its own process group (benchmarks/procs.py) and is
stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from benchmarks import build, nginxconf, tlsbench
from benchmarks.procs import Proc, ProcessSet, free_port
from benchmarks.servers import WEIGHTS, gateway_config, gateway_env

REPO = Path(__file__).resolve().parents[1]
TARGETS = (("gateway", False), ("gateway", True), ("nginx", False), ("nginx", True))
OPENSSL = ("SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex")
# Handshakes inside the counted window (a connection the pool opens when its idle
# ones are busy): neither per-request work nor glue, so taken out of the glue.
HANDSHAKE = "SSL_do_handshake"
DATA_PATH = {"gateway": "uv__read"}


def inclusive(annotate_output: str, names: Iterable[str]) -> dict[str, int]:
    """Inclusive Ir per function from ``callgrind_annotate --inclusive=yes`` (first row of each).

    A row reads ``1,234 (5.6%)  file:function [object]``; recursion rows (``function'2``)
    are other names and are not matched.
    """
    want = set(names)
    out: dict[str, int] = {}
    for line in annotate_output.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*?)(?: \[.*\])?$", line)
        if m is None:
            continue
        fn = m.group(2).rsplit(":", 1)[-1]
        if fn in want and fn not in out:
            out[fn] = int(m.group(1).replace(",", ""))
    return out


def totals(annotate_output: str) -> int:
    m = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", annotate_output)
    if m is None:
        raise ValueError("no PROGRAM TOTALS line")
    return int(m.group(1).replace(",", ""))


def valgrind_nginx_conf(conf: str) -> str:
    """A reference config to run under valgrind: one process, in the foreground."""
    if "master_process" in conf or "daemon" in conf:
        raise ValueError("the config already sets master_process or daemon")
    return conf.replace(
        "worker_processes 1;", "worker_processes 1;\nmaster_process off;\ndaemon off;"
    )


def split(plain: dict[str, float], tls: dict[str, float]) -> dict[str, float]:
    """The HTTPS row's share of the data path: openssl, handshakes, the rest (the glue)."""
    grew = tls["data path"] - plain["data path"]
    shake = tls.get("handshake", 0.0)
    return {
        "tls added": grew,
        "openssl": tls["openssl"],
        "handshake": shake,
        "tls glue": grew - tls["openssl"] - shake,
    }


async def _load(
    port: int, tls: bool, conns: int, warm: int, n: int, between: Callable[[str], None]
) -> None:
    ctx: ssl.SSLContext | None = None
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    rng = random.Random(1)
    reqs = [
        b"GET /1k HTTP/1.1\r\nHost: bench\r\nX-User-ID: u%d\r\n\r\n" % rng.randrange(10**9)
        for _ in range(5000)
    ]
    streams = [await asyncio.open_connection("127.0.0.1", port, ssl=ctx) for _ in range(conns)]

    async def phase(count: int) -> None:
        left = [count]

        async def one(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while left[0] > 0:
                left[0] -= 1
                w.write(reqs[left[0] % len(reqs)])
                head = await r.readuntil(b"\r\n\r\n")
                i = head.lower().find(b"content-length:")
                await r.readexactly(int(head[i + 15 : head.index(b"\r\n", i)]))

        await asyncio.gather(*(one(r, w) for r, w in streams))

    async with asyncio.timeout(3600):
        await phase(warm)
        between("on")
        await phase(n)
        between("dump")
    for _, w in streams:
        w.close()


def https_upstreams(doc: dict[str, Any]) -> None:
    """Point a gateway config's releases at the HTTPS upstream pair (certificate not checked)."""
    for svc in doc["services"].values():
        svc["upstream_tls"] = {"verify": False}
        for rel in svc["releases"].values():
            rel["upstreams"] = [u.replace("http://", "https://") for u in rel["upstreams"]]


def _start_upstreams(procs: ProcessSet, tls: tuple[Path, Path] | None = None) -> dict[str, int]:
    ups = {"stable": free_port(), "gray": free_port()}
    for name, p in ups.items():
        argv = [sys.executable, "-m", "benchmarks.upstream", "--port", str(p)]
        if tls is not None:
            argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        procs.start(f"upstream-{name}{'-tls' if tls else ''}", argv, cwd=REPO)
    return ups


def _ready(port: int, tls: bool, proc: Proc) -> None:
    end = time.monotonic() + 600
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited before it was ready\n{proc.log_tail()}")
        try:
            if tls:
                tlsbench.negotiated(port)
            else:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def measure(
    target: str,
    tls: bool,
    ups: dict[str, int],
    workdir: Path,
    procs: ProcessSet,
    *,
    python: str,
    pythonpath: Path | None,
    requests: int,
    conns: int,
    upstream_tls: bool = False,
) -> dict[str, float]:
    """Ir per request of one target: total, data path, openssl."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = tlsbench.certificates(workdir.parent)
    port = free_port()
    out = workdir / "callgrind.out"
    vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    env = None
    if target == "gateway":
        doc = yaml.safe_load(
            gateway_config(
                port=port, admin_port=free_port(), state_path=workdir / "state.json", upstreams=ups
            )
        )
        for svc in doc["services"].values():
            # Valgrind runs ~50x slower: keep the latency guard from rolling gray back.
            svc["guard"] = {"latency_p95_ms": 10**7, "latency_p95_delta_ms": 10**7}
        if tls:
            doc["tls"] = {"cert": str(cert), "key": str(key)}
        if upstream_tls:
            https_upstreams(doc)
        (workdir / "gateway.yaml").write_text(yaml.safe_dump(doc))
        argv = [*vg, python, "-m", "gateway", "run", "-c", str(workdir / "gateway.yaml")]
        env = gateway_env("prop", pythonpath=pythonpath)
    else:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = nginxconf.reference_conf(workdir, port, ups, WEIGHTS, nofile=4096)
        if tls:
            conf = tlsbench.nginx_tls_conf(conf, port, cert, key)
        nginxconf.prepare_prefix(workdir, valgrind_nginx_conf(conf))
        argv = [*vg, nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf")]
    proc = procs.start(workdir.name, argv, env=env, cwd=workdir)
    try:
        _ready(port, tls, proc)

        def between(what: str) -> None:
            cmd = ["callgrind_control", "-i", "on"] if what == "on" else ["callgrind_control", "-d"]
            subprocess.run([*cmd, str(proc.pid)], check=True, capture_output=True, timeout=600)

        asyncio.run(_load(port, tls, conns, max(500, requests // 10), requests, between))
    finally:
        procs.stop(proc)
    dump = next(p for p in sorted(workdir.glob("callgrind.out.*")))
    ann = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", "--auto=no", str(dump)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    data = DATA_PATH.get(target)
    inc = inclusive(ann, [*OPENSSL, HANDSHAKE, *([data] if data else [])])
    total = totals(ann) / requests
    return {
        "total": total,
        "data path": inc.get(data, 0) / requests if data else total,
        "openssl": sum(inc.get(n, 0) for n in OPENSSL) / requests,
        "handshake": inc.get(HANDSHAKE, 0) / requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the gateway's interpreter")
    parser.add_argument("--build", choices=("auto", "compiled", "pure"), default="auto")
    parser.add_argument(
        "--pythonpath", type=Path, help="a compiled tree already built (benchmarks.build): no build"
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (callgrind files)")
    parser.add_argument(
        "--upstream-tls", action="store_true", help="the gateway to plain vs HTTPS upstreams"
    )
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate", "nginx")[
        : 3 if args.upstream_tls else 4
    ]:
        if shutil.which(tool) is None and not (
            tool == "nginx" and Path("/usr/sbin/nginx").exists()
        ):
            sys.exit(f"needs {tool} (Debian packages valgrind, nginx-light)")
    tmp = Path(tempfile.mkdtemp(prefix="gateway-tlscount-"))
    procs = ProcessSet(tmp)
    rows: dict[tuple[str, bool], dict[str, float]] = {}
    try:
        if args.pythonpath is not None:
            made = build.Build("given", args.pythonpath.resolve())
        else:
            made = build.prepare(args.build, tmp, log=print, python=args.python)
        ups = _start_upstreams(procs)
        # --upstream-tls: the "https" row is the gateway to HTTPS upstreams, its client plain.
        tls_ups = _start_upstreams(procs, tlsbench.certificates(tmp)) if args.upstream_tls else {}
        for target, tls in TARGETS[:2] if args.upstream_tls else TARGETS:
            name = f"{target}-{'https' if tls else 'http'}"
            print(f"== {name} under callgrind ...", flush=True)
            up_tls = tls and args.upstream_tls
            rows[(target, tls)] = measure(
                target, tls and not up_tls, tls_ups if up_tls else ups, tmp / name, procs,
                python=args.python, pythonpath=made.pythonpath, requests=args.requests,
                conns=args.conns, upstream_tls=up_tls,
            )  # fmt: skip
    finally:
        procs.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ngateway: {made.kind} build, {args.python}; {args.requests} requests "
          f"over {args.conns} keep-alive connections; Ir per request")  # fmt: skip
    print(f"{'target':16s} {'total':>9s} {'data path':>10s} {'openssl':>9s}")
    for (target, tls), r in rows.items():
        name = f"{target} {'https' if tls else 'http'}"
        print(f"{name:16s} {r['total']:9.0f} {r['data path']:10.0f} {r['openssl']:9.0f}")
    print(f"\n{'https adds':16s} {'total':>9s} {'openssl':>9s} {'handshake':>9s} {'tls glue':>9s}")
    for target in ("gateway",) if args.upstream_tls else ("gateway", "nginx"):
        s = split(rows[(target, False)], rows[(target, True)])
        print(
            f"{target:16s} {s['tls added']:9.0f} {s['openssl']:9.0f} {s['handshake']:9.0f} "
            f"{s['tls glue']:9.0f}"
        )
    if args.keep:
        print(f"callgrind files: {tmp}")


if __name__ == "__main__":
    main()
