"""What one idle keep-alive client connection holds inside the fast engine, by kind.

Runs the fast engine in this process (a handler that answers every request
locally, so no upstream connection is counted), has ``benchmarks.idle`` open
``--count`` keep-alive connections (one request each, then held), and prints
per connection: the RSS delta, what tracemalloc saw allocated (Python objects
and uvloop's libuv handles, which it allocates with ``PyMem_RawMalloc``), and
the garbage-collected objects that appeared, by type and ``sys.getsizeof``.

Run it with the interpreter of the build to measure, outside the repo so the
installed package (e.g. the compiled one) is imported, not the source tree::

    cd /tmp && /tmp/gw-c/bin/python /path/to/repo/benchmarks/idlemem.py --count 10000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _census() -> tuple[Counter[str], Counter[str]]:
    """Count and total getsizeof of the GC-tracked objects, by type name."""
    gc.collect()
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for o in gc.get_objects():
        t = type(o)
        name = f"{t.__module__}.{t.__qualname__}" if isinstance(t.__module__, str) else t.__name__
        count[name] += 1
        size[name] += sys.getsizeof(o)
    return count, size


async def _measure(count: int, settle: float, trace: bool, park_after: float) -> None:
    import uvloop  # noqa: F401  (the loop is installed by main)

    from gateway.engine.api import Respond
    from gateway.engine.fast import FastEngine
    from gateway.version import compiled

    class Local:
        def handle(self, head: object) -> Respond:
            return Respond(200, b"x" * 1024)

        def error_body(self, status: int, kind: object, fwd: object) -> Respond:
            return Respond(status, b"")

    engine = FastEngine(Local(), park_after=park_after)  # type: ignore[arg-type]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    port = sock.getsockname()[1]
    await engine.serve(sock)
    # Warm up: one connection's worth of first-time allocations (code objects, caches).
    await _one_request(port)
    await asyncio.sleep(0.2)
    if trace:
        tracemalloc.start(1)
    c0, s0 = _census()
    rss0 = _rss_kib()
    t0 = tracemalloc.get_traced_memory()[0] if trace else 0
    argv = [sys.executable, "-m", "benchmarks.idle", "--port", str(port), "--count", str(count),
            "--hold", "120"]  # fmt: skip
    client = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert client.stdout is not None and client.stdin is not None
    line = (await asyncio.wait_for(client.stdout.readline(), 120)).decode().split()
    opened = int(line[1])
    await asyncio.sleep(settle)
    rss1 = _rss_kib()
    t1, peak = tracemalloc.get_traced_memory() if trace else (0, 0)
    snap = tracemalloc.take_snapshot() if trace else None
    c1, s1 = _census()
    n = opened
    print(f"build: {'compiled' if compiled() else 'pure'}; connections held: {opened}, "
          f"as transports: {len(engine._clients)}, parked: {engine.parked}; "
          f"measured {settle:.1f} s after the last one opened")  # fmt: skip
    print(f"RSS        {(rss1 - rss0) * 1024 / n:8.0f} B/conn")
    if trace:
        print(f"tracemalloc{(t1 - t0) / n:8.0f} B/conn held now, {(peak - t0) / n:.0f} at the peak")
    if snap is not None:
        sizes = Counter(tr.size for tr in snap.traces if tr.size >= 64)
        common = ", ".join(f"{size} B x {k / n:.2f}" for size, k in sizes.most_common(8))
        print(f"most common block sizes held (per connection): {common}")
    print("GC-tracked objects that appeared, per connection (count, getsizeof bytes):")
    for name in sorted(c1, key=lambda k: s0[k] - s1[k]):
        dc, ds = c1[name] - c0[name], s1[name] - s0[name]
        if dc >= n // 2 or ds >= 8 * n:
            print(f"  {name:60s} {dc / n:6.2f} {ds / n:8.0f}")
    client.stdin.write(b"close\n")
    await client.stdin.drain()
    await asyncio.wait_for(client.wait(), 60)
    await engine.shutdown(1.0)


async def _one_request(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after READY")
    parser.add_argument(
        "--park-after", type=float, default=0.5, help="timeouts.idle_park (0: never park)"
    )
    parser.add_argument("--no-trace", action="store_true", help="RSS only, no tracemalloc")
    args = parser.parse_args()
    sys.path.append(str(REPO))  # after site-packages: the installed gateway is measured
    from benchmarks.procs import raise_nofile

    raise_nofile(args.count + 1024)
    import uvloop

    started = time.monotonic()
    uvloop.run(_measure(args.count, args.settle, not args.no_trace, args.park_after))
    print(f"({time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    main()
