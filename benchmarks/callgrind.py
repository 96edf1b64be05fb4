"""Instructions per request of the gateway process, counted by valgrind's callgrind.

Why: on a shared 2-core box throughput and CPU time move 20-25 % between two
runs of the same build (benchmarks/README.md "What runs"), while an
instruction count is the same whatever else the machine does: a repeatable A/B
measure of per-request work. The gateway runs under
``valgrind --tool=callgrind`` with instrumentation off; after a warm-up the
harness switches it on (``callgrind_control -i on``), sends exactly
``--requests`` keep-alive requests over ``--conns`` connections with a random
``X-User-ID`` each (the benchmark's config and two upstreams), dumps the counts
and prints them per request: the whole process, and the data path (the client
and upstream protocol callbacks plus the deferred metrics flush) apart from
timer-driven work, which valgrind's slowness inflates.

    python -m benchmarks.callgrind --python /path/to/venv/bin/python --requests 5000

Only 127.0.0.1; every process is stopped by its process group on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import yaml

from benchmarks.procs import free_port
from benchmarks.servers import gateway_config, gateway_env

# Inclusive counts summed as "the data path" (mypyc names: CPyDef_<module>___<Class>___<method>).
DATA_PATH = (
    "ClientConn___data_received",
    "Upstream___data_received",
    "ProxyHandler___flush",
)
# Shown apart, to see where the data path goes.
PARTS = (
    "ProxyHandler___handle",
    "fast_wire___request_head",
    "headers___scan",
    "headers___upstream_headers",
    "ClientConn___on_headers_complete",
    "Upstream___on_headers_complete",
    "Upstream___attach",
    "Upstream____complete",
)


def inclusive(annotate_output: str, names: Iterable[str]) -> dict[str, int]:
    """Inclusive Ir per function name from ``callgrind_annotate --inclusive=yes`` output."""
    want = set(names)
    out: dict[str, int] = {}
    for line in annotate_output.splitlines():
        if "CPyDef_" not in line:
            continue
        for name in want:
            if f"{name} [" in line and name not in out:
                m = re.match(r"\s*([\d,]+)\s", line)
                if m:
                    out[name] = int(m.group(1).replace(",", ""))
    return out


def totals(callgrind_out: str) -> int:
    """The ``totals:`` line of a callgrind output file."""
    for line in callgrind_out.splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise ValueError("no totals: line")


async def _load(port: int, n: int, conns: int, reqs: list[bytes]) -> None:
    left = [n]

    async def one() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left[0] > 0:
                left[0] -= 1
                w.write(reqs[left[0] % len(reqs)])
                head = await r.readuntil(b"\r\n\r\n")
                i = head.lower().find(b"content-length:")
                await r.readexactly(int(head[i + 15 : head.index(b"\r\n", i)]))
        finally:
            w.close()

    async with asyncio.timeout(3600):
        await asyncio.gather(*(one() for _ in range(conns)))


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def measure(python: str, requests: int, conns: int, workdir: Path) -> dict[str, float]:
    """Ir per request: "total", "data_path" and each of PARTS."""
    ups = {"stable": free_port(), "gray": free_port()}
    procs: list[subprocess.Popen[bytes]] = []
    repo = Path(__file__).resolve().parents[1]
    try:
        for p in ups.values():
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.upstream", "--port", str(p)],
                    cwd=repo,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
            )
        port, admin = free_port(), free_port()
        doc = yaml.safe_load(
            gateway_config(
                port=port, admin_port=admin, state_path=workdir / "state.json", upstreams=ups
            )
        )
        for svc in doc["services"].values():
            # Valgrind runs ~50x slower: keep the latency guard from rolling gray back.
            svc["guard"] = {"latency_p95_ms": 10**7, "latency_p95_delta_ms": 10**7}
        (workdir / "gateway.yaml").write_text(yaml.safe_dump(doc))
        out = workdir / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out}", python, "-m", "gateway", "run",
                "-c", str(workdir / "gateway.yaml")]  # fmt: skip
        with (workdir / "gateway.log").open("wb") as log:
            gw = subprocess.Popen(
                argv, cwd=workdir, env=gateway_env("prop"), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        procs.append(gw)
        end = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
                break
            except OSError as e:
                if time.monotonic() > end or gw.poll() is not None:
                    raise RuntimeError(f"no gateway: see {workdir}/gateway.log") from e
                time.sleep(0.5)
        rng = random.Random(1)
        reqs = [
            b"GET /1k HTTP/1.1\r\nHost: bench\r\nX-User-ID: u%d\r\n\r\n" % rng.randrange(10**9)
            for _ in range(5000)
        ]
        asyncio.run(_load(port, max(500, requests // 10), conns, reqs))  # warm-up
        subprocess.run(
            ["callgrind_control", "-i", "on", str(gw.pid)], check=True, capture_output=True
        )
        asyncio.run(_load(port, requests, conns, reqs))
        subprocess.run(["callgrind_control", "-d", str(gw.pid)], check=True, capture_output=True)
    finally:
        _stop(procs)
    dump = next(p for p in sorted(workdir.glob("callgrind.out.*")))
    ann = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(dump)], capture_output=True, text=True
    ).stdout
    inc = inclusive(ann, DATA_PATH + PARTS)
    res = {"total": totals(dump.read_text(errors="replace")) / requests}
    res["data_path"] = sum(inc.get(n, 0) for n in DATA_PATH) / requests
    for n in PARTS:
        res[n] = inc.get(n, 0) / requests
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the gateway's interpreter")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (callgrind files)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind (Debian package valgrind)")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-callgrind-"))
    try:
        res = measure(args.python, args.requests, args.conns, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"interpreter: {args.python}; requests: {args.requests}; connections: {args.conns}")
    for k, v in res.items():
        print(f"{k:40s} {v:10.0f} Ir/request")
    if args.keep:
        print(f"callgrind files: {workdir}")


if __name__ == "__main__":
    main()
