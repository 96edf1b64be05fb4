"""RSS per idle pooled upstream connection, plain and TLS (benchmarks/README.md "TLS").

Why: the pool's `https://` connections moved from the event loop's TLS
transport to the engine's own TLS layer (gateway/engine/tls_conn.py), and a
pooled connection is held for `upstream_idle` after each burst. This starts
the built-in upstream pair twice (plain, and HTTPS with the scenario's
certificate), then per mode a gateway (plain HTTP listener, `verify: false`
to the HTTPS pair) and ``--conns`` client connections that each send one
request at the same moment, so the pool opens about as many upstream
connections; the answers read, the clients stay connected and the pooled
connections idle. It prints the gateway's VmRSS growth per pooled connection
(counted by the upstreams) for each mode and the difference, what TLS costs a
pooled connection. Run it once per build:

    python -m benchmarks.tlsupidle --python /path/to/venv/bin/python --conns 500

Only 127.0.0.1; the servers run in their own process groups and are stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import ssl
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks import tlsbench
from benchmarks.procs import ProcessSet, free_port, raise_nofile
from benchmarks.servers import gateway_config, gateway_env
from benchmarks.tlscount import _ready, _start_upstreams, https_upstreams
from benchmarks.tlsidle import SETTLE_SECONDS, WARM, close_all, vm_rss_kib


async def _burst(port: int, n: int) -> list[asyncio.StreamWriter]:
    """`n` client connections, each sending one request at once; left open once answered."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]

    async def one(i: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"GET /1k HTTP/1.1\r\nHost: x\r\nX-User-ID: %d\r\n\r\n" % i)
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"the gateway answered {head[:40]!r}")
        i = head.lower().find(b"content-length:")
        await r.readexactly(int(head[i + 15 : head.index(b"\r\n", i)]))

    await asyncio.gather(*(one(i, r, w) for i, (r, w) in enumerate(conns)))
    return [w for _, w in conns]


async def _upstream_conns(ports: dict[str, int], tls: bool) -> int:
    """Connections open at the upstream pair, from their stub_status page."""
    total = 0
    ctx = None
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    for p in ports.values():
        r, w = await asyncio.open_connection("127.0.0.1", p, ssl=ctx)
        w.write(b"GET /__status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = (await r.read()).decode()
        w.close()
        m = re.search(r"Active connections: (\d+)", text)
        assert m is not None, text
        total += int(m.group(1)) - 1  # not this one
    return total


async def _measure(
    port: int, pid: int, ups: dict[str, int], tls: bool, n: int, settle: float, warm_n: int
) -> tuple[int, int]:
    """(VmRSS growth in KiB, pooled upstream connections) over a burst of `n`."""
    warm = await _burst(port, warm_n)
    await asyncio.sleep(settle)  # a measurement's wait: the idle state settles
    before, pooled_before = vm_rss_kib(pid), await _upstream_conns(ups, tls)
    held = await _burst(port, n)
    await asyncio.sleep(settle)
    after, pooled = vm_rss_kib(pid), await _upstream_conns(ups, tls)
    await close_all(warm + held)
    return after - before, pooled - pooled_before


def measure_mode(
    procs: ProcessSet,
    tmp: Path,
    python: str,
    tls: bool,
    conns: int,
    settle: float = SETTLE_SECONDS,
    warm: int = WARM,
) -> tuple[int, int]:
    """One mode's upstream pair and gateway: (VmRSS growth in KiB, pooled connections)."""
    ups = _start_upstreams(procs, tlsbench.certificates(tmp) if tls else None)
    port = free_port()
    work = tmp / ("https" if tls else "http")
    work.mkdir()
    doc = yaml.safe_load(
        gateway_config(
            port=port, admin_port=free_port(), state_path=work / "state.json", upstreams=ups
        )
    )
    # A burst of TLS handshakes on a loaded box can outlast the default connect timeout.
    doc["timeouts"] = {"connect": "60s"}
    if tls:
        https_upstreams(doc)
    (work / "gateway.yaml").write_text(yaml.safe_dump(doc))
    argv = [python, "-m", "gateway", "run", "-c", str(work / "gateway.yaml")]
    proc = procs.start(f"gateway-{work.name}", argv, env=gateway_env("prop"), cwd=work)
    try:
        _ready(port, False, proc)
        return asyncio.run(_measure(port, proc.popen.pid, ups, tls, conns, settle, warm))
    finally:
        procs.stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the gateway's interpreter")
    parser.add_argument("--conns", type=int, default=500)
    args = parser.parse_args()
    raise_nofile(4 * args.conns + 1024)
    tmp = Path(tempfile.mkdtemp(prefix="gateway-tlsupidle-"))
    per: dict[bool, float] = {}
    with ProcessSet(tmp) as procs:
        for tls in (False, True):
            grew, pooled = measure_mode(procs, tmp, args.python, tls, args.conns)
            per[tls] = grew / max(pooled, 1)
            print(
                f"{'https' if tls else 'http':5s} upstreams: VmRSS +{grew} KiB over {args.conns} "
                f"clients and {pooled} pooled upstream connections: {per[tls]:.1f} KiB per pair"
            )
    print(
        f"TLS costs a pooled upstream connection {per[True] - per[False]:.1f} KiB ({args.python})"
    )


if __name__ == "__main__":
    main()
