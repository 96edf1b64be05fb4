"""Soak: a long run with weight changes and endpoint churn that must stay flat.

    python -m benchmarks.soak --requests 1000000

Starts three built-in upstreams (benchmarks/upstream.py) and the gateway as a
process (`python -m gateway run`, file state store, admin listener), all on
127.0.0.1, then sends `--requests` GETs of /1k with a random X-User-ID from
`--concurrency` keep-alive connections. Meanwhile it changes the gray weight
through the admin API every `--weight-every` seconds and adds or removes the
second gray endpoint (config rewrite + POST /admin/reload) every
`--churn-every` seconds. At every tenth of the requests it records the
gateway's RSS, open file descriptors and established sockets to the upstreams,
and the p50/p99 latency of that tenth. Pass: no failed request, and RSS, FDs
and upstream sockets at 100 % within 10 % of their value at 10 % (after
warm-up). Writes a JSON report with `--out`; exit status 1 when it fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.procs import (
    ProcessSet,
    free_port,
    group_pids,
    group_rss_kib,
    raise_nofile,
    wait_http,
)

GROWTH_LIMIT = 0.10  # growth after warm-up that still counts as flat


@dataclass
class Sample:
    done: int  # requests finished when sampled
    seconds: float
    rss_kib: int
    fds: int
    upstream_sockets: int
    p50_ms: float
    p99_ms: float


@dataclass
class SoakResult:
    requests: int
    concurrency: int
    failed: int
    seconds: float
    weight_changes: int
    endpoint_changes: int
    samples: list[Sample] = field(default_factory=list)
    growth: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and all(g < GROWTH_LIMIT for g in self.growth.values())


def _socket_inodes(pids: list[int]) -> set[str]:
    out: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        out.add(target[8:-1])
    return out


def _fd_count(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            n += len(os.listdir(f"/proc/{pid}/fd"))
    return n


def upstream_sockets(pids: list[int], ports: set[int]) -> int:
    """Established TCP connections of `pids` whose remote port is one of `ports` (proc(5))."""
    inodes = _socket_inodes(pids)
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                # cols: sl local remote st ... inode (index 9); st 01 = ESTABLISHED
                if len(cols) > 9 and cols[3] == "01" and cols[9] in inodes:
                    if int(cols[2].rsplit(":", 1)[1], 16) in ports:
                        n += 1
    return n


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _config(port: int, admin: int, state: Path, gray: list[int], stable: int) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin}", "token_env": None},
        "state": {"store": "file", "path": str(state)},
        "drain_timeout": "2s",
        "services": {
            "bench": {
                "releases": {
                    "stable": {"weight": 95, "upstreams": [f"http://127.0.0.1:{stable}"]},
                    "gray": {"weight": 5, "upstreams": [f"http://127.0.0.1:{p}" for p in gray]},
                }
            }
        },
    }


class Soak:
    def __init__(
        self,
        requests: int,
        concurrency: int,
        weight_every: float,
        churn_every: float,
        python: str,
    ) -> None:
        self.requests = requests
        self.concurrency = concurrency
        self.weight_every = weight_every
        self.churn_every = churn_every
        self.python = python
        self.started = 0
        self.done = 0  # finished requests
        self.mark = requests  # the next sampling point
        self.reached = asyncio.Event()
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.latencies: list[float] = []
        self.weight_changes = 0
        self.endpoint_changes = 0

    async def run(self, tmp: Path) -> SoakResult:
        raise_nofile()
        ports = [free_port() for _ in range(3)]
        gw_port, admin_port = free_port(), free_port()
        cfg_path = tmp / "gateway.yaml"
        state = tmp / "state.json"
        stable, g1, g2 = ports
        with ProcessSet(tmp) as procs:
            for i, p in enumerate(ports):
                up = procs.start(
                    f"upstream{i}", [self.python, "-m", "benchmarks.upstream", "--port", str(p)]
                )
                wait_http(p, "/1k", proc=up)
            cfg_path.write_text(yaml.safe_dump(_config(gw_port, admin_port, state, [g1], stable)))
            gw = procs.start(
                "gateway", [self.python, "-m", "gateway", "run", "-c", str(cfg_path)], cwd=tmp
            )
            wait_http(gw_port, "/healthz", proc=gw)
            wait_http(admin_port, "/healthz", proc=gw)
            t0 = time.monotonic()
            samples: list[Sample] = []
            marks = [max(1, self.requests * k // 10) for k in range(1, 11)]
            stop = asyncio.Event()
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=self.concurrency, force_close=False),
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as s,
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as ctl,
            ):
                # The admin calls get their own session: the load holds every pooled connection.
                admin = f"http://127.0.0.1:{admin_port}"
                churn = asyncio.create_task(
                    self._churn(
                        ctl, admin, cfg_path, gw_port, admin_port, state, stable, g1, g2, stop
                    )
                )
                weights = asyncio.create_task(self._weights(ctl, admin, stop))
                workers = [
                    asyncio.create_task(
                        self._load(s, f"http://127.0.0.1:{gw_port}/1k", random.Random(i))
                    )
                    for i in range(self.concurrency)
                ]
                for mark in marks:
                    self.mark = mark
                    if self.done < mark:
                        await self.reached.wait()  # the worker that finishes `mark` sets it
                    self.reached.clear()
                    window, self.latencies = self.latencies, []
                    pids = group_pids(gw.pid)
                    samples.append(
                        Sample(
                            done=self.done,
                            seconds=round(time.monotonic() - t0, 2),
                            rss_kib=group_rss_kib(gw.pid),
                            fds=_fd_count(pids),
                            upstream_sockets=upstream_sockets(pids, set(ports)),
                            p50_ms=round(_percentile(window, 0.50) * 1000, 3),
                            p99_ms=round(_percentile(window, 0.99) * 1000, 3),
                        )
                    )
                await asyncio.gather(*workers)
                stop.set()
                await asyncio.gather(churn, weights)
            if not gw.alive():
                self.failed += 1
                self.errors["gateway exited"] = 1
        first, last = samples[0], samples[-1]
        growth = {
            k: (getattr(last, k) - getattr(first, k)) / max(1, getattr(first, k))
            for k in ("rss_kib", "fds", "upstream_sockets")
        }
        return SoakResult(
            requests=self.done,
            concurrency=self.concurrency,
            failed=self.failed,
            seconds=round(time.monotonic() - t0, 2),
            weight_changes=self.weight_changes,
            endpoint_changes=self.endpoint_changes,
            samples=samples,
            growth={k: round(v, 4) for k, v in growth.items()},
            errors=self.errors,
        )

    async def _load(self, s: aiohttp.ClientSession, url: str, rng: random.Random) -> None:
        while self.started < self.requests:
            self.started += 1
            start = time.perf_counter()
            try:
                async with s.get(url, headers={"X-User-ID": f"u{rng.randrange(1 << 30)}"}) as r:
                    await r.read()
                    ok = r.status == 200
                    kind = f"HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                ok, kind = False, type(e).__name__
            self.latencies.append(time.perf_counter() - start)
            self.done += 1
            if self.done >= self.mark:
                self.reached.set()
            if not ok:
                self.failed += 1
                self.errors[kind] = self.errors.get(kind, 0) + 1

    async def _weights(self, s: aiohttp.ClientSession, admin: str, stop: asyncio.Event) -> None:
        cycle = [20, 50, 1, 5]
        while not stop.is_set():  # a change at once, then one every `weight_every` s
            gray = cycle[self.weight_changes % len(cycle)]
            body = {"stable": 100 - gray, "gray": gray}
            async with s.put(f"{admin}/admin/services/bench/weights", json=body) as r:
                if r.status == 200:
                    self.weight_changes += 1
                else:
                    self.errors[f"weights HTTP {r.status}"] = 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.weight_every)

    async def _churn(
        self,
        s: aiohttp.ClientSession,
        admin: str,
        cfg_path: Path,
        gw_port: int,
        admin_port: int,
        state: Path,
        stable: int,
        g1: int,
        g2: int,
        stop: asyncio.Event,
    ) -> None:
        while not stop.is_set():  # a change at once, then one every `churn_every` s
            gray = [g1, g2] if self.endpoint_changes % 2 == 0 else [g1]
            doc = _config(gw_port, admin_port, state, gray, stable)
            await asyncio.to_thread(cfg_path.write_text, yaml.safe_dump(doc))
            async with s.post(f"{admin}/admin/reload") as r:
                if r.status == 200:
                    self.endpoint_changes += 1
                else:
                    self.errors[f"reload HTTP {r.status}"] = 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.churn_every)


def format_report(r: SoakResult) -> str:
    lines = [
        f"soak: {r.requests} requests, concurrency {r.concurrency}, {r.seconds:.0f} s, "
        f"{r.failed} failed, {r.weight_changes} weight changes, "
        f"{r.endpoint_changes} endpoint changes",
        "  done      t(s)   RSS(MiB)  FDs  upstream-sockets  p50(ms)  p99(ms)",
    ]
    for s in r.samples:
        lines.append(
            f"  {s.done:>8} {s.seconds:>7.1f} {s.rss_kib / 1024:>9.1f} {s.fds:>5} "
            f"{s.upstream_sockets:>17} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f}"
        )
    growth = ", ".join(f"{k} {v * 100:+.1f} %" for k, v in r.growth.items())
    lines.append(f"  growth 10 % -> 100 %: {growth}; {'PASS' if r.ok else 'FAIL'}")
    if r.errors:
        lines.append(f"  errors: {r.errors}")
    return "\n".join(lines)


def run_soak(
    requests: int,
    *,
    concurrency: int = 32,
    weight_every: float = 5.0,
    churn_every: float = 5.0,
    python: str = sys.executable,
) -> SoakResult:
    soak = Soak(requests, concurrency, weight_every, churn_every, python)
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp:
        return asyncio.run(soak.run(Path(tmp)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--weight-every", type=float, default=5.0, help="seconds between weight changes")
    p.add_argument(
        "--churn-every", type=float, default=5.0, help="seconds between endpoint changes"
    )
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the gateway")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    a = p.parse_args(argv)
    r = run_soak(
        a.requests,
        concurrency=a.concurrency,
        weight_every=a.weight_every,
        churn_every=a.churn_every,
        python=a.python,
    )
    print(format_report(r))
    if a.out is not None:
        a.out.write_text(json.dumps({**asdict(r), "ok": r.ok}, indent=2))
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
