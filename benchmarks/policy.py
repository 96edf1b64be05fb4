"""The policy path alone, in-process: `handle` + `on_done` + the per-iteration flush.

Why: the loopback benchmark's figures move ±10 % with the machine's state (PERF_NOTES), more
than most single changes to the per-request policy. This times the real `Gateway` objects'
handler over 1,000 distinct request heads (random user ids, propagation on, nothing sampled,
metrics and guard on), best of N rounds, with no sockets — stable to a few percent.

    python -m benchmarks.policy                 # the build on sys.path (pure unless compiled)
    python -m benchmarks.policy --build compiled  # compile a copy first, as the harness does
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def measure(rounds: int = 20, heads_n: int = 1000, per_flush: int = 50) -> dict[str, float]:
    """µs per request for handle alone and for handle + on_done with a flush every `per_flush`."""
    import random

    from gateway import config as C
    from gateway.app import Gateway
    from gateway.engine.api import Forward, RequestHead
    from gateway.telemetry import Telemetry, TelemetryConfig
    from gateway.version import compiled

    doc = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token_env": None},
        "state": {"store": "memory"},
        "services": {
            "bench": {
                "releases": {
                    "stable": {"weight": 95, "upstreams": ["http://127.0.0.1:9"]},
                    "gray": {"weight": 5, "upstreams": ["http://127.0.0.1:9"]},
                }
            }
        },
    }
    telemetry = Telemetry(TelemetryConfig.from_env({}))
    gw = Gateway(C.build(doc, env={}), telemetry=telemetry)
    h = gw.handler
    h.defer = lambda fn: None  # flushed by hand below, as the loop does once per iteration
    rng = random.Random(7)
    heads = [
        RequestHead(
            b"GET",
            b"/1k",
            [(b"Host", b"127.0.0.1:8080"), (b"X-User-ID", str(rng.random()).encode())],
            "127.0.0.1",
        )
        for _ in range(heads_n)
    ]

    def full() -> float:
        t0 = time.perf_counter()
        for i, head in enumerate(heads):
            fwd = h.handle(head)
            assert isinstance(fwd, Forward)
            fwd.on_done(200, None)
            if i % per_flush == per_flush - 1:
                h.flush()
        h.flush()
        return (time.perf_counter() - t0) / len(heads) * 1e6

    def handle_only() -> float:
        t0 = time.perf_counter()
        for head in heads:
            h.handle(head)
        return (time.perf_counter() - t0) / len(heads) * 1e6

    result = {
        "handle_on_done_flush_us": min(full() for _ in range(rounds)),
        "handle_us": min(handle_only() for _ in range(rounds)),
        "compiled": float(compiled()),
    }
    telemetry.shutdown()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.policy", description=__doc__.split("\n")[0]
    )
    p.add_argument("--build", choices=("installed", "compiled"), default="installed")
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args(argv)
    if args.build == "compiled" and os.environ.get("_GW_POLICY_CHILD") != "1":
        from benchmarks.build import compile_tree

        with tempfile.TemporaryDirectory(prefix="gwpolicy-") as tmp:
            src = compile_tree(Path(tmp), log=lambda m: print(m, file=sys.stderr))
            env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{Path(__file__).parent.parent}"}
            env["_GW_POLICY_CHILD"] = "1"
            cmd = [sys.executable, "-m", "benchmarks.policy", "--rounds", str(args.rounds)]
            return subprocess.run(cmd, env=env, cwd=tmp, check=False).returncode
    r = measure(rounds=args.rounds)
    build = "compiled" if r["compiled"] else "pure-Python"
    print(
        f"{build} build, best of {args.rounds}: handle {r['handle_us']:.2f} µs/request, "
        f"handle + on_done + flush per 50 {r['handle_on_done_flush_us']:.2f} µs/request"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
