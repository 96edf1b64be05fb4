"""RSS per idle HTTPS keep-alive connection to the gateway (benchmarks/README.md "TLS").

Why: the engine's TLS layer (gateway/engine/tls_conn.py) replaced the event
loop's TLS transport, whose per-connection read buffer and extra objects made
an idle HTTPS connection cost more than twice a plain one. This starts the
upstream pair and the TLS scenario's gateway (benchmarks/tlsbench.py), opens
``--conns`` connections, sends one request on each and reads the answer,
waits until the engine has dropped idle parsers, and prints the gateway's
VmRSS growth per connection. Run it once per build to compare them:

    python -m benchmarks.tlsidle --python /path/to/venv/bin/python --conns 1000

Only 127.0.0.1; the servers run in their own process groups and are stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import tlsbench
from benchmarks.procs import ProcessSet, raise_nofile
from benchmarks.servers import CpuLayout, Fleet
from benchmarks.tools import find_tool

WARM = 20  # connections opened and answered before the baseline is read
# An idle connection drops its parser after 1 s (engine/fast_client.py
# PARSER_IDLE_SECONDS): the reading waits past that, with margin.
SETTLE_SECONDS = 2.5


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def open_idle(port: int, n: int) -> list[asyncio.StreamWriter]:
    """`n` HTTPS connections, each with one request answered and then left open."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only the cost of holding them is measured
    held = []
    for i in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        w.write(b"GET /1k HTTP/1.1\r\nHost: x\r\nX-User-ID: %d\r\n\r\n" % i)
        head = await r.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await r.readexactly(length)
        held.append(w)
    return held


async def measure(
    port: int, pid: int, conns: int, settle: float = SETTLE_SECONDS
) -> tuple[int, int]:
    """The gateway's VmRSS in KiB before and after `conns` idle connections are opened."""
    warm = await open_idle(port, WARM)
    before = vm_rss_kib(pid)
    held = await open_idle(port, conns)
    await asyncio.sleep(settle)  # the engine's idle state settles (a measurement's wait)
    after = vm_rss_kib(pid)
    await close_all(warm + held)
    return before, after


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the gateway's interpreter")
    parser.add_argument("--conns", type=int, default=1000)
    args = parser.parse_args()
    raise_nofile(args.conns + 1024)
    tmp = Path(tempfile.mkdtemp(prefix="gateway-tlsidle-"))
    with ProcessSet(tmp) as procs:
        fleet = Fleet(procs, tmp, {"nginx": find_tool("nginx")}, CpuLayout(), python=args.python)
        server = tlsbench.gateway(fleet)
        t0 = time.monotonic()
        before, after = asyncio.run(measure(server.port, server.proc.popen.pid, args.conns))
        print(
            f"gateway ({args.python}): VmRSS {before} -> {after} KiB over {args.conns} idle "
            f"HTTPS connections: {(after - before) / args.conns:.1f} KiB per connection "
            f"({time.monotonic() - t0:.0f} s)"
        )


if __name__ == "__main__":
    main()
