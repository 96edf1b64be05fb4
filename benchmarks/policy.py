"""The policy path alone, in-process: `handle` + `on_done` + the per-iteration flush.

Why: the loopback benchmark's figures move ±10 % with the machine's state
(benchmarks/README.md "Method, and why"), more than most single changes to the per-request policy.
This times the real `Gateway` objects' handler over 1,000 distinct request heads (random user ids,
propagation on, nothing sampled,
metrics and guard on), best of N rounds, with no sockets — stable to a few percent.

    python -m benchmarks.policy                 # the build on sys.path (pure unless compiled)
    python -m benchmarks.policy --build compiled  # compile a copy first, as the harness does
    python -m benchmarks.policy --segments      # also with 10 user segments incl. a 1M-id list
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
from typing import Any


def segments_case(user_file: Path, members: Sequence[str]) -> list[dict[str, object]]:
    """10 user segments (README "Segments") of every kind, one a 1,000,000-id user list.

    The list holds `members` (1 in 10 benchmark users) plus filler ids; nothing else
    matches the benchmark's requests, so most requests test all 10 and fall through.
    """
    filler = (f"member-{i}\n" for i in range(1_000_000 - len(members)))
    user_file.write_text("".join(m + "\n" for m in members) + "".join(filler))
    return [
        {"name": "staff", "match": {"header": {"X-Employee": "true"}}, "release": "gray"},
        {"name": "beta-cookie", "match": {"cookie": {"beta": {"in": ["1", "yes"]}}},
         "release": "gray"},
        {"name": "ab", "match": {"query": {"ab": "new"}}, "release": "gray"},
        {"name": "search", "match": {"path": {"prefix": "/search"}, "method": ["GET"]},
         "weights": {"stable": 80, "gray": 20}},
        {"name": "north", "match": {"header": {"X-Region": {"regex": "cn-north-[0-9]+"}}},
         "weights": {"stable": 50, "gray": 50}, "sticky_by": {"header": "X-Org-ID"}},
        {"name": "office", "match": {"cidrs": ["10.1.0.0/16", "192.168.0.0/16"]},
         "release": "gray"},
        {"name": "night", "match": {"time": {"from": "22:00", "to": "06:00", "tz": "UTC"},
         "header": {"X-Night": {"present": True}}}, "release": "gray"},
        {"name": "vip", "match": {"users": ["vip-1", "vip-2", "vip-3"]}, "release": "stable"},
        {"name": "mobile", "match": {"header": {"User-Agent": {"prefix": "MyApp/"}}},
         "weights": {"stable": 90, "gray": 10}},
        {"name": "beta", "match": {"users": {"file": str(user_file)}}, "release": "gray"},
    ]  # fmt: skip


def _setup(heads_n: int, segments: bool) -> tuple[Any, list[Any], Any]:
    """(handler, request heads, telemetry) of a real `Gateway` with the bench service."""
    import random

    from gateway import config as C
    from gateway.app import Gateway
    from gateway.engine.api import RequestHead
    from gateway.telemetry import Telemetry, TelemetryConfig

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
    rng = random.Random(7)
    users = [str(rng.random()) for _ in range(heads_n)]
    heads = [
        RequestHead(
            b"GET", b"/1k", [(b"Host", b"127.0.0.1:8080"), (b"X-User-ID", u.encode())], "127.0.0.1"
        )
        for u in users
    ]
    with tempfile.TemporaryDirectory(prefix="gwpolicy-") as tmp:
        if segments:
            svc: dict[str, object] = doc["services"]["bench"]  # type: ignore[index]
            svc["segments"] = segments_case(Path(tmp) / "beta.txt", users[::10])
        cfg = C.build(doc, env={})
    telemetry = Telemetry(TelemetryConfig.from_env({}))
    h = Gateway(cfg, telemetry=telemetry).handler
    h.defer = lambda fn: None  # flushed by hand, as the loop does once per iteration
    return h, heads, telemetry


def _handle_only(h: Any, heads: list[Any]) -> float:
    t0 = time.perf_counter()
    for head in heads:
        h.handle(head)
    return (time.perf_counter() - t0) / len(heads) * 1e6


def measure(rounds: int = 20, heads_n: int = 1000, per_flush: int = 50) -> dict[str, float]:
    """µs per request for handle alone and for handle + on_done with a flush every `per_flush`."""
    from gateway.engine.api import Forward
    from gateway.version import compiled

    h, heads, telemetry = _setup(heads_n, segments=False)

    def full() -> float:
        t0 = time.perf_counter()
        for i, head in enumerate(heads):
            fwd = h.handle(head)
            assert isinstance(fwd, Forward)
            fwd.done(200, None)  # as the fast engine reports an exchange's end
            if i % per_flush == per_flush - 1:
                h.flush()
        h.flush()
        return (time.perf_counter() - t0) / len(heads) * 1e6

    result = {
        "handle_on_done_flush_us": min(full() for _ in range(rounds)),
        "handle_us": min(_handle_only(h, heads) for _ in range(rounds)),
        "compiled": float(compiled()),
    }
    telemetry.shutdown()
    return result


def measure_segments(rounds: int = 20, heads_n: int = 1000) -> dict[str, float]:
    """µs per `handle` without segments and with `segments_case`'s 10, rounds interleaved.

    Why interleaved (A B A B …) in one process: the machine drifts by more than the
    difference being measured; best of N of each, taken side by side, does not.
    """
    plain, heads, t1 = _setup(heads_n, segments=False)
    segmented, _, t2 = _setup(heads_n, segments=True)
    none_us, seg_us = [], []
    for _ in range(rounds):
        none_us.append(_handle_only(plain, heads))
        seg_us.append(_handle_only(segmented, heads))
    t1.shutdown()
    t2.shutdown()
    return {"none_us": min(none_us), "segments_us": min(seg_us)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.policy", description=__doc__.split("\n")[0]
    )
    p.add_argument("--build", choices=("installed", "compiled"), default="installed")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument(
        "--segments", action="store_true", help="also time 10 segments incl. a 1M-id user list"
    )
    args = p.parse_args(argv)
    if args.build == "compiled" and os.environ.get("_GW_POLICY_CHILD") != "1":
        from benchmarks.build import compile_tree

        with tempfile.TemporaryDirectory(prefix="gwpolicy-") as tmp:
            src = compile_tree(Path(tmp), log=lambda m: print(m, file=sys.stderr))
            env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{Path(__file__).parent.parent}"}
            env["_GW_POLICY_CHILD"] = "1"
            cmd = [sys.executable, "-m", "benchmarks.policy", "--rounds", str(args.rounds)]
            cmd += ["--segments"] if args.segments else []
            return subprocess.run(cmd, env=env, cwd=tmp, check=False).returncode
    r = measure(rounds=args.rounds)
    build = "compiled" if r["compiled"] else "pure-Python"
    print(
        f"{build} build, best of {args.rounds}: handle {r['handle_us']:.2f} µs/request, "
        f"handle + on_done + flush per 50 {r['handle_on_done_flush_us']:.2f} µs/request"
    )
    if args.segments:
        g = measure_segments(rounds=args.rounds)
        print(
            f"{build} build, handle interleaved: no segments {g['none_us']:.2f} µs/request, "
            f"10 segments incl. a 1M-id list {g['segments_us']:.2f} µs/request "
            f"({g['segments_us'] - g['none_us']:+.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
