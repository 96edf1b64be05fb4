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
and upstream protocol callbacks plus the deferred metrics flush).

``--configs plain,rollout_on,segments_on`` repeats that, with the same requests
over the same connections, for the gateway of the benchmark's ``rollout_on``
scenario (a rollout running, analysis evaluating every second) and of its
``segments_on`` scenario (10 segments, one a 1,000,000-id list), and prints the
three side by side. Timer-driven work (guard ticks, the analysis runner, the
rollout driver, state-document reloads) runs once per wall-clock second
whatever the request rate, so valgrind's ~50x slowdown inflates its share of a
request: each config also counts an idle window of ``--idle`` seconds (no
requests) after the load, and the timer work is reported as instructions per
second and added to the data path spread over ``--rate`` real requests per
second. The implied change of the c50 throughput ratio assumes that on the
CPU-bound box throughput scales inversely with the forwarder's CPU per
request, of which only the user-space share ``--user-share`` scales with the
instructions counted here (the system calls are the same for every config:
same requests, same connections); ``--user-share 1`` gives the upper bound.

    python -m benchmarks.callgrind --python /path/to/venv/bin/python --requests 5000
    python -m benchmarks.callgrind --python /path/to/venv/bin/python \
        --configs plain,rollout_on,segments_on --ratio 0.68 --rate 28000 --user-share 0.35

Only 127.0.0.1; every process is stopped by its process group on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from benchmarks.procs import free_port
from benchmarks.servers import gateway_config, gateway_env, start_rollout

# The gateway configs measured: the benchmark's plain one and two of its scenarios'.
CONFIGS = ("plain", "rollout_on", "segments_on")

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
    "headers___upstream_fields",
    "ClientConn___on_headers_complete",
    "fast_head___read_head",  # the request head read without llhttp (the usual case)
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


@dataclass(frozen=True)
class Counts:
    """What one config's run counted: a loaded window and an idle one."""

    config: str
    requests: int
    load_s: float  # wall seconds of the counted load window
    load_ir: int  # Ir of the whole process in it
    idle_s: float  # wall seconds of the idle window that follows (no requests)
    idle_ir: int  # Ir in it: timer-driven work only
    inclusive: dict[str, int] = field(default_factory=dict)  # DATA_PATH + PARTS, load window

    @property
    def timer_per_s(self) -> float:
        """Timer-driven Ir per wall second (from the idle window)."""
        return self.idle_ir / self.idle_s if self.idle_s > 0 else 0.0

    def per_request(self, rate: float) -> dict[str, float]:
        """Ir per request; "work" is the data path plus timer work spread over `rate` req/s."""
        n = self.requests
        res = {
            "total": self.load_ir / n,
            "data_path": sum(self.inclusive.get(k, 0) for k in DATA_PATH) / n,
        }
        for k in PARTS:
            res[k] = self.inclusive.get(k, 0) / n
        res["timer_per_s"] = self.timer_per_s
        res["timer_at_rate"] = self.timer_per_s / rate
        res["work"] = res["data_path"] + res["timer_at_rate"]
        return res


def ratio_change(ratio: float, plain: float, variant: float, user_share: float = 1.0) -> float:
    """How much the c50 throughput ratio drops when per-request Ir goes `plain` -> `variant`.

    Throughput on the CPU-bound box is taken as inversely proportional to the
    forwarder's CPU per request; `user_share` of that CPU is user space, which
    scales with the instructions counted, the rest (system calls, the same for
    both) does not. With `user_share` 1 this is ``ratio * (1 - plain / variant)``.
    """
    cpu = 1.0 + user_share * (variant / plain - 1.0)
    return ratio * (1.0 - 1.0 / cpu)


async def _load(port: int, n: int, conns: int, reqs: list[bytes]) -> None:
    left = [n]
    bad: list[bytes] = []

    async def one() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left[0] > 0:
                left[0] -= 1
                w.write(reqs[left[0] % len(reqs)])
                head = await r.readuntil(b"\r\n\r\n")
                if head[9:12] != b"200":
                    bad.append(head[:12])
                i = head.lower().find(b"content-length:")
                await r.readexactly(int(head[i + 15 : head.index(b"\r\n", i)]))
        finally:
            w.close()

    async with asyncio.timeout(3600):
        await asyncio.gather(*(one() for _ in range(conns)))
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} requests failed, e.g. {bad[0]!r}")


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


def _rollout_state(admin: int) -> str:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{admin}/admin/services/bench", timeout=60
    ) as resp:
        return str((yaml.safe_load(resp.read()).get("rollout") or {}).get("state"))


def measure(
    python: str, requests: int, conns: int, workdir: Path, config: str = "plain", idle_s: float = 20
) -> Counts:
    """Count one gateway config: `requests` requests, then `idle_s` seconds of no requests."""
    workdir.mkdir(parents=True, exist_ok=True)
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
                port=port,
                admin_port=admin,
                state_path=workdir / "state.json",
                upstreams=ups,
                rollout=config == "rollout_on",
                segments_file=workdir / "beta-users.txt" if config == "segments_on" else None,
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
        end = time.monotonic() + 900
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
                break
            except OSError as e:
                if time.monotonic() > end or gw.poll() is not None:
                    raise RuntimeError(f"no gateway: see {workdir}/gateway.log") from e
                time.sleep(0.5)
        if config == "rollout_on":
            start_rollout(admin, timeout=120)
        rng = random.Random(1)
        reqs = [
            b"GET /1k HTTP/1.1\r\nHost: bench\r\nX-User-ID: u%d\r\n\r\n" % rng.randrange(10**9)
            for _ in range(5000)
        ]
        asyncio.run(_load(port, max(500, requests // 10), conns, reqs))  # warm-up
        ctl = ["callgrind_control"]
        subprocess.run([*ctl, "-i", "on", str(gw.pid)], check=True, capture_output=True)
        t0 = time.monotonic()
        asyncio.run(_load(port, requests, conns, reqs))
        subprocess.run([*ctl, "-d", str(gw.pid)], check=True, capture_output=True)
        t1 = time.monotonic()
        time.sleep(idle_s)  # the idle window: only timers run
        subprocess.run([*ctl, "-d", str(gw.pid)], check=True, capture_output=True)
        t2 = time.monotonic()
        if config == "rollout_on" and (state := _rollout_state(admin)) != "Progressing":
            raise RuntimeError(f"the rollout left Progressing during the count: {state}")
    finally:
        _stop(procs)
    # A dump zeroes the counters: part 1 is the load window, part 2 the idle one.
    dumps = sorted(workdir.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
    load, idle = dumps[0], dumps[1]
    ann = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", str(load)], capture_output=True, text=True
    ).stdout
    return Counts(
        config=config,
        requests=requests,
        # Each window ends when its dump returns (only timers run after the last answer).
        load_s=t1 - t0,
        load_ir=totals(load.read_text(errors="replace")),
        idle_s=t2 - t1,
        idle_ir=totals(idle.read_text(errors="replace")),
        inclusive=inclusive(ann, DATA_PATH + PARTS),
    )


ROWS = (
    ("total", "whole process, as counted (timer work inflated)"),
    ("data_path", "data path"),
    *((k, f"  {k}") for k in PARTS),
    ("timer_at_rate", "timer work at --rate req/s"),
    ("work", "data path + timer work at --rate"),
)


def table(counts: Sequence[Counts], rate: float, ratio: float, user_share: float) -> list[str]:
    """The side-by-side report: Ir per request per config, then the changes against the first."""
    per = [c.per_request(rate) for c in counts]
    names = [c.config for c in counts]
    w = 46
    lines = [f"{'Ir per request':{w}s}" + "".join(f"{n:>14s}" for n in names)]
    for key, label in ROWS:
        lines.append(f"{label:{w}s}" + "".join(f"{p[key]:14,.0f}" for p in per))
    lines.append(
        f"{'timer work, Ir per second':{w}s}" + "".join(f"{p['timer_per_s']:14,.0f}" for p in per)
    )
    lines.append(f"{'load window, s (requests/s under valgrind)':{w}s}" + "".join(
        f"{c.load_s:7.0f} ({c.requests / c.load_s:3.0f})" for c in counts
    ))  # fmt: skip
    base = per[0]
    for key, label in (("data_path", "data path"), ("work", "data path + timers")):
        lines.append(
            f"{label + ' vs ' + names[0]:{w}s}"
            + "".join(f"{(p[key] / base[key] - 1) * 100:+13.2f}%" for p in per)
        )
    for u in sorted({1.0, user_share}, reverse=True):
        lines.append(
            f"{f'c50 ratio {ratio:.2f} drops by (user share {u:.2f})':{w}s}"
            + "".join(f"{ratio_change(ratio, base['work'], p['work'], u):14.4f}" for p in per)
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the gateway's interpreter")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument(
        "--configs",
        default="plain",
        help=f"comma-separated, the first is the baseline; from {', '.join(CONFIGS)}",
    )
    parser.add_argument("--idle", type=float, default=20.0, help="idle window, seconds")
    parser.add_argument(
        "--rate", type=float, default=28000.0, help="real req/s that timer work is spread over"
    )
    parser.add_argument("--ratio", type=float, default=0.8, help="the c50 ratio to nginx")
    parser.add_argument(
        "--user-share",
        type=float,
        default=1.0,
        help="user / (user + sys) of the gateway's CPU at c50 (benchmarks.run's results.json)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (callgrind files)")
    parser.add_argument("--save", type=Path, help="also write the counts to this JSON file")
    parser.add_argument(
        "--load", type=Path, help="print the table from a --save file instead of measuring"
    )
    args = parser.parse_args()
    counts: list[Counts] = []
    if args.load is not None:
        counts = [Counts(**c) for c in json.loads(args.load.read_text())["counts"]]
        print("\n".join(table(counts, args.rate, args.ratio, args.user_share)))
        return
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs or any(c not in CONFIGS for c in configs):
        parser.error(f"--configs: choose from {', '.join(CONFIGS)}")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind (Debian package valgrind)")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-callgrind-"))
    try:
        for config in configs:
            print(f"== {config}", flush=True)
            counts.append(
                measure(args.python, args.requests, args.conns, workdir / config, config, args.idle)
            )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.save is not None:
        doc = {"python": args.python, "conns": args.conns, "counts": [asdict(c) for c in counts]}
        args.save.write_text(json.dumps(doc, indent=1))
    print(
        f"interpreter: {args.python}; requests: {args.requests}; connections: {args.conns}; "
        f"idle window: {args.idle:.0f} s; --rate {args.rate:.0f} req/s"
    )
    print("\n".join(table(counts, args.rate, args.ratio, args.user_share)))
    if args.keep:
        print(f"callgrind files: {workdir}")


if __name__ == "__main__":
    main()
