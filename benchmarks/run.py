"""Benchmark the gateway against nginx, HAProxy and a direct hop: one command.

    python -m benchmarks.run [--quick] [--scenarios a,b] [--repeats N] [--duration S]
                             [--pin] [--out DIR]

Method (benchmarks/README.md "Method, and why"): every target of a scenario group is run once per
repeat, in turn (A B C A B C …), so the machine's drift hits all of them
alike; the table shows medians and ratios from this run only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import report
from benchmarks.build import gateway_python_missing, prepare
from benchmarks.measure import Record, Runner
from benchmarks.procs import ProcessSet, StartupError, raise_nofile
from benchmarks.scenarios import QUICK, SCENARIOS, Probe, Scenario, select
from benchmarks.servers import REPO, CpuLayout, Fleet, Server
from benchmarks.tools import (
    describe_python,
    ensure_tools,
    machine_info,
    python_build,
    unoptimized_note,
)

Cell = tuple[Scenario, Probe, str]
# What a broken target or tool can raise during one run; anything else is a harness bug.
RUN_ERRORS = (OSError, RuntimeError, ValueError, subprocess.SubprocessError)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Gateway vs nginx vs HAProxy vs direct on loopback: throughput, latency, "
        "CPU, memory.",
        epilog=f"scenarios: {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"1 repeat, 3 s runs, {' and '.join(QUICK)} only"
    )
    parser.add_argument("--scenarios", help="comma-separated scenario names (default: all)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per run (default 10; quick 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per target")
    parser.add_argument("--pin", action="store_true", help="pin processes to cores with taskset")
    parser.add_argument("--out", type=Path, help="output dir (default benchmarks/results/<time>)")
    parser.add_argument(
        "--upstream",
        choices=("auto", "nginx", "builtin"),
        default="auto",
        help="fixed-body upstream pair: nginx when installed (auto), or the built-in asyncio one",
    )
    parser.add_argument(
        "--build",
        choices=("auto", "compiled", "pure"),
        default="auto",
        help="gateway build: compiled with mypyc as the Dockerfile ships it (auto: when a C "
        "compiler and mypy are here, else the package installed for --python, whichever "
        "build that is), or the pure-Python package",
    )
    parser.add_argument(
        "--python",
        type=Path,
        help="interpreter that builds and runs the gateway under test, from a venv with the "
        "gateway installed (default: this one). The container's python:3.12 is a PGO+LTO "
        "build: use such an interpreter for figures that represent it",
    )
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.repeats < 1 or args.duration <= 0:
        parser.error("--repeats must be >= 1 and --duration > 0")
    return args


def say(msg: str) -> None:
    print(msg, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def plan(scenarios: list[Scenario]) -> dict[str, list[Cell]]:
    """Cells per interleaving group, in the order they run within one repeat."""
    groups: dict[str, list[Cell]] = {}
    for s in scenarios:
        groups.setdefault(s.group_key, []).extend((s, p, t) for p in s.probes for t in s.targets)
    return groups


def _describe(rec: Record) -> str:
    if not rec["ok"]:
        return f"FAILED: {rec['error']}"
    if rec.get("kib_per_conn") is not None:
        return (
            f"{rec['conns']} conns, RSS {rec['rss_before_kib'] / 1024:.1f} -> "
            f"{rec['rss_after_kib'] / 1024:.1f} MiB = {rec['kib_per_conn']:.2f} KiB/conn"
        )
    parts = [f"{rec['rps']:,.0f} req/s"]
    for key in ("p50_ms", "p99_ms"):
        if rec.get(key) is not None:
            parts.append(f"{key[:3]} {rec[key]:.3f} ms")
    if rec.get("cpu_fwd_us_per_req") is not None:
        parts.append(f"fwd {rec['cpu_fwd_us_per_req']:.1f} µs/req")
    share = rec.get("gray_share_metrics", rec.get("gray_share_upstream"))
    if share is not None:
        parts.append(f"gray {share * 100:.1f}%")
    for key in ("error", "metrics_error", "warning"):
        if rec.get(key):
            parts.append(f"[{rec[key]}]")
    return "  ".join(parts)


class Session:
    """One benchmark invocation: runs the plan, collects records and notes."""

    def __init__(self, runner: Runner, args: argparse.Namespace, tools: dict[str, str | None]):
        self.runner = runner
        self.args = args
        self.tools = tools
        self.runs: list[Record] = []
        self.notes: list[str] = []
        self.broken: dict[tuple[object, ...], str] = {}

    def _key(self, scenario: Scenario, target: str) -> tuple[object, ...]:
        tracing = scenario.tracing if target == "gateway" else None
        return (
            target,
            scenario.workers,
            tracing,
            scenario.tls,
            scenario.rollout,
            scenario.segments,
        )

    def _usable(self, cell: Cell) -> str | None:
        scenario, probe, target = cell
        if probe.tool and not self.tools.get(probe.tool):
            return f"{probe.tool} is not installed"
        if target in ("nginx", "haproxy") and not self.tools.get(target):
            return f"{target} is not installed"
        return self.broken.get(self._key(scenario, target))

    def _server(self, scenario: Scenario, target: str) -> Server | None:
        key = self._key(scenario, target)
        if key in self.broken:
            return None
        try:
            return self.runner.server(scenario, target)
        except (StartupError, RuntimeError, OSError) as exc:
            self.broken[key] = f"{target} did not start"
            say(f"!! {target} ({scenario.name}) could not be started; its runs are skipped:\n{exc}")
            self.notes.append(f"{target} ({scenario.name}) did not start: {str(exc)[:2000]}")
            return None

    def execute(self, scenarios: list[Scenario]) -> None:
        groups = plan(scenarios)
        for cells in groups.values():
            for cell in cells:
                why = self._usable(cell)
                if why:
                    self.notes.append(f"skipped {cell[0].name}/{cell[1].label}/{cell[2]}: {why}")
        total = sum(len(c) for c in groups.values()) * self.args.repeats
        est = total * (self.args.duration + 1.5) + len(groups) * 6
        say(
            f"== {total} runs of {self.args.duration:g}s in {len(groups)} group(s), "
            f"{self.args.repeats} repeat(s); about {est / 60:.1f} min"
        )
        ups = self.runner.fleet.upstreams()  # shared by every target: failing here ends the run
        say("== upstreams: " + ", ".join(f"{n} 127.0.0.1:{s.port}" for n, s in ups.items()))
        done = 0
        for name, cells in groups.items():
            say(f"== group {name}: warming up")
            self._warm(cells)
            for rep in range(1, self.args.repeats + 1):
                for cell in cells:
                    done += 1
                    scenario, probe, target = cell
                    tag = (
                        f"[{done:>{len(str(total))}}/{total}] {scenario.name} · {probe.label} · "
                        f"{target} · repeat {rep}/{self.args.repeats}"
                    )
                    why = self._usable(cell)
                    if why:
                        say(f"{tag}: skipped ({why})")
                        self.runs.append({**self._base(cell, rep), "ok": False, "error": why})
                        continue
                    say(f"{tag} ...")
                    rec = self._run(cell, rep)
                    say(f"    {_describe(rec)}")
                    if rec.get("warning"):
                        self.notes.append(f"{tag}: {rec['warning']}")

    def _warm(self, cells: list[Cell]) -> None:
        seen: set[tuple[int, str]] = set()
        for scenario, probe, target in cells:
            if scenario.fresh or self._usable((scenario, probe, target)):
                continue
            server = self._server(scenario, target)
            if server is None or (id(server.proc), probe.path) in seen:
                continue
            seen.add((id(server.proc), probe.path))
            try:
                self.runner.warm_up(probe, server, self.args.warmup)
            except RUN_ERRORS as exc:
                self.broken[self._key(scenario, target)] = f"{target} failed its warm-up"
                say(
                    f"!! {target} ({scenario.name}) failed its warm-up; its runs are skipped: {exc}"
                )
                self.notes.append(f"{target} ({scenario.name}) failed its warm-up: {exc}")

    def _base(self, cell: Cell, rep: int) -> Record:
        scenario, probe, target = cell
        return {
            "scenario": scenario.name,
            "group": scenario.group_key,
            "probe": probe.label,
            "metric": probe.metric,
            "target": target,
            "repeat": rep,
            "started_at": dt.datetime.now().isoformat(timespec="seconds"),
            "requested_duration_s": self.args.duration,
        }

    def _run(self, cell: Cell, rep: int) -> Record:
        scenario, probe, target = cell
        base = self._base(cell, rep)
        server = self._server(scenario, target)
        if server is None:
            rec: Record = {**base, "ok": False, "error": self.broken[self._key(scenario, target)]}
        else:
            try:
                if scenario.fresh:
                    self.runner.warm_up(probe, server, self.args.warmup)
                rec = {**base, **self.runner.run(scenario, probe, server, self.args.duration)}
            except RUN_ERRORS as exc:
                rec = {**base, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            finally:
                if scenario.fresh:
                    self.runner.fleet.release(server)
        self.runs.append(rec)
        return rec


def _default_out() -> Path:
    return REPO / "benchmarks" / "results" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _save_logs(tmp: Path, out: Path, limit: int = 200_000) -> None:
    dest = out / "logs"
    for log in tmp.rglob("*.log"):
        if log.stat().st_size == 0:
            continue
        dest.mkdir(parents=True, exist_ok=True)
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - limit))
            name = "-".join(log.relative_to(tmp).parts)
            (dest / name).write_bytes(f.read())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.scenarios.split(",") if args.scenarios else (list(QUICK) if args.quick else None)
    try:
        scenarios = select([n.strip() for n in names if n.strip()] if names else None)
    except ValueError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out or _default_out()
    started = dt.datetime.now().isoformat(timespec="seconds")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    nofile = raise_nofile(65536)
    needed = sorted({p.tool for s in scenarios for p in s.probes if p.tool} | {"nginx"})
    needed += sorted({t for s in scenarios for t in s.targets if t == "haproxy"})
    tools = ensure_tools(needed, install=not args.no_install, log=say)
    if args.upstream == "nginx" and not tools.get("nginx"):
        say("benchmarks: --upstream nginx, but nginx is missing: using the built-in upstream")
    layout = CpuLayout.for_machine(args.pin)
    if args.pin and layout.forwarder is None:
        say("benchmarks: --pin ignored (needs 2+ CPUs and taskset)")
    machine = machine_info(tools, REPO)
    gateway_python = str(args.python.absolute()) if args.python else sys.executable
    why = gateway_python_missing(gateway_python)
    if why is not None:
        print(f"benchmarks: --python {gateway_python}: {why}", file=sys.stderr)
        return 2
    machine["gateway_python"] = python_info = python_build(gateway_python)
    machine["nofile_limit"] = nofile
    machine["pin"] = vars(layout)
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-"))
    interrupted = False
    session: Session | None = None
    t0 = time.monotonic()
    try:
        try:
            build = prepare(args.build, tmp, say, gateway_python)
        except RuntimeError as exc:
            print(f"benchmarks: {exc}", file=sys.stderr)
            return 2
        machine["gateway_build"] = build.kind
        say(f"== gateway build: {build.kind}; interpreter: {describe_python(python_info)}")
        with ProcessSet(tmp) as procs:
            fleet = Fleet(
                procs,
                tmp,
                tools,
                layout,
                builtin_upstream=args.upstream == "builtin",
                pythonpath=build.pythonpath,
                python=gateway_python if args.python else None,
            )
            session = Session(Runner(fleet, tools, layout, tmp), args, tools)
            if build.note:
                session.notes.append(build.note)
            slow_python = unoptimized_note(python_info)
            if slow_python:
                say(f"!! {slow_python}")
                session.notes.append(slow_python)
            try:
                session.execute(scenarios)
            except KeyboardInterrupt:
                interrupted = True
                say("\n!! interrupted: stopping every server, writing what was measured")
            except StartupError as exc:
                say(f"!! the upstream pair did not start, nothing can be measured:\n{exc}")
                session.notes.append(f"upstreams did not start: {exc}")
    finally:
        out.mkdir(parents=True, exist_ok=True)
        _save_logs(tmp, out)
        if args.keep_tmp:
            say(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    runs = session.runs if session else []
    rows = report.medians(runs)
    payload: dict[str, Any] = {
        "schema": 1,
        "started_at": started,
        "finished_at": dt.datetime.now().isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - t0, 1),
        "interrupted": interrupted,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine,
        "scenarios": {
            s.name: {
                "summary": s.summary,
                "group": s.group_key,
                "targets": list(s.targets),
                "probes": [p.label for p in s.probes],
                "workers": s.workers,
                "tracing": s.tracing,
            }
            for s in scenarios
        },
        "medians": rows,
        "runs": runs,
        "notes": session.notes if session else [],
    }
    report.write_json(out / "results.json", payload)
    table = report.format_table(rows) if rows else "(no runs)"
    table = (
        f"gateway build: {machine.get('gateway_build', '?')}; "
        f"interpreter: {describe_python(python_info)}\n\n{table}"
    )
    (out / "table.txt").write_text(table + "\n\n" + report.LEGEND + "\n")
    chart = report.write_chart(out / "chart.png", rows) if rows else False
    say("\n" + table + "\n\n" + report.LEGEND)
    for note in payload["notes"]:
        say(f"note: {note.splitlines()[0]}")
    say(f"\nresults: {out / 'results.json'}")
    if chart:
        say(f"chart:   {out / 'chart.png'}")
    elif rows:
        say("chart:   not drawn (install matplotlib: .venv/bin/pip install matplotlib)")
    if interrupted:
        return 130
    return 0 if any(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
