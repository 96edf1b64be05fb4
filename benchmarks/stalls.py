"""Where the paced tail comes from: the client, the forwarder and the cores, traced together.

Why: at a paced 5k req/s the gateway's p99 is milliseconds above nginx's while
its p50 is not (benchmarks/README.md "The paced tail"). A p99 like that is
either a few long stretches of work in the forwarder's loop (periodic work, a
backlog served in one go, a collection) or time something waits for a core.
This runs the forwarders alternately (nginx, the gateway, nginx, …) under the
`rate5k` scenario's paced wrk probe and, for a window of each run, records with
``perf record``:

- the syscalls of wrk's thread and of the forwarder's serving thread (the
  gateway's process, nginx's one worker), so every request's latency as the
  client saw it (its ``write`` to the first ``read`` of the answer on that
  socket) and every loop iteration of the forwarder (from an ``epoll_wait``
  return to the next call) are known to the microsecond;
- every context switch on the machine, so for any moment it is known what ran
  on each core: the forwarder, the client, the upstreams, another process, or
  nothing.

It prints, per forwarder and run: the client's percentiles from the trace (to
compare with wrk's own), the forwarder's iterations (wall time, the part on a
core, events per wait), its waits for a core, and for the slowest 1 % of
requests what the cores were doing while they waited and whether they came in
clusters (a stall) or spread out (queueing). The figures are the kernel's, so
a busy box shows up as other processes on the cores, not as the forwarder's
work. Run it with the compiled install:

    python -m benchmarks.stalls --python /tmp/venv/bin/python --repeats 2 --duration 8

Only 127.0.0.1; needs perf with tracepoint access (root, or
``kernel.perf_event_paranoid`` -1); the servers run in their own process
groups and are stopped on exit, wrk and perf end by themselves.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import load
from benchmarks.procs import ProcessSet, group_pids, raise_nofile
from benchmarks.servers import CpuLayout, Fleet, Server
from benchmarks.tools import ensure_tools


@dataclass(frozen=True)
class Calls:
    """The syscall numbers the analysis needs, per architecture (first argument: the fd)."""

    reads: tuple[int, ...]  # read, readv, recvfrom, recvmsg
    writes: tuple[int, ...]  # write, writev, sendto, sendmsg
    waits: tuple[int, ...]  # epoll_wait, epoll_pwait, epoll_pwait2


CALLS = {
    "x86_64": Calls(reads=(0, 19, 45, 47), writes=(1, 20, 44, 46), waits=(232, 281, 441)),
    "aarch64": Calls(reads=(63, 65, 207, 212), writes=(64, 66, 206, 211), waits=(22, 441)),
}

# Who ran on a core, by what the trace knows of the pid.
FORWARDER, CLIENT, UPSTREAMS, OTHER, IDLE = "forwarder", "client", "upstreams", "other", "idle"
KINDS = (FORWARDER, CLIENT, UPSTREAMS, OTHER, IDLE)
SLOW_SHARE = 0.01  # the slowest 1 %: what a p99 is made of
SAMPLE_NS = 100_000  # a cpu-clock sample every 100 µs of a core's time
CLUSTER_GAP_NS = 1_000_000  # slow requests closer than this belong to one episode
SLOW_FACTOR = 5.0  # an iteration, or a canary chunk, this many times its usual time is slow

_LINE = re.compile(
    r"^\s*(?P<tid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<s>\d+)\.(?P<ns>\d{9}):\s+(?P<event>[\w:-]+):\s*(?P<rest>.*)$"
)
_ENTER = re.compile(r"NR (\d+) \(([0-9a-f]+)")
_EXIT = re.compile(r"NR (\d+) = (-?\d+)")
_SWITCH = re.compile(
    r"prev_comm=(.*) prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=.* next_pid=(\d+)"
)
_WAKE = re.compile(r" pid=(\d+)")


@dataclass
class Iteration:
    """One turn of the forwarder's loop: from a wait's return to the next wait's call."""

    start_ns: int
    end_ns: int
    events: int
    off_cpu_ns: int = 0

    @property
    def wall_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def on_cpu_ns(self) -> int:
        return self.wall_ns - self.off_cpu_ns


@dataclass
class Request:
    """One request's moments (ns): sent by the client, read by the forwarder, answered by
    the forwarder, read by the client; 0 where the trace could not tell."""

    sent: int
    read: int = 0
    answered: int = 0
    done: int = 0

    @property
    def latency_ns(self) -> int:
        return self.done - self.sent


@dataclass
class Trace:
    """What the client, the forwarder and the cores did in one traced window."""

    forwarder: int
    iterations: list[Iteration] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    wake_delays_ns: list[int] = field(default_factory=list)
    preempt_waits_ns: list[int] = field(default_factory=list)
    # per core: (start, end, kind) of what ran there, in time order
    cores: dict[int, list[tuple[int, int, str]]] = field(default_factory=dict)
    samples: list[tuple[int, str]] = field(default_factory=list)  # the forwarder's (ns, symbol)
    other_comms: Counter[str] = field(default_factory=Counter)  # ns on a core, by command
    window_ns: int = 0

    def on_core_ns(self, kind: str) -> int:
        return sum(e - s for spans in self.cores.values() for s, e, k in spans if k == kind)


def parse(
    lines: Iterable[str],
    forwarder: int,
    client: set[int],
    upstreams: set[int],
    calls: Calls,
    links: Mapping[int, int] | None = None,
) -> Trace:
    """Requests, loop iterations and core occupancy from ``perf script`` lines.

    `links` maps a client socket's fd to the forwarder's fd of the same connection;
    with it each request's moments inside the forwarder are known too.
    """
    links = links or {}
    trace = Trace(forwarder)
    kind_of = {forwarder: FORWARDER, 0: IDLE}
    kind_of.update({t: CLIENT for t in client})
    kind_of.update({t: UPSTREAMS for t in upstreams})
    running: dict[int, tuple[int, str]] = {}  # core -> (since, kind)
    cores: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
    last_enter: dict[int, tuple[int, int]] = {}  # tid -> (nr, first argument)
    open_: dict[int, Request] = {}  # client fd -> its unanswered request
    # forwarder fd -> the connection's latest request: wrk keeps one request in flight per
    # connection, so a new one replaces a request the forwarder's calls were never matched to
    inside: dict[int, Request] = {}
    it_start: int | None = None
    it_events = 0
    it_off = 0
    off_at: int | None = None
    off_runnable = False
    woken_at: int | None = None
    first: int | None = None
    last = 0
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        ts = int(m["s"]) * 1_000_000_000 + int(m["ns"])
        if first is None:
            first = ts
        last = ts
        event, rest, tid = m["event"], m["rest"], int(m["tid"])
        if event == "sched:sched_switch":
            sw = _SWITCH.search(rest)
            if sw is None:
                continue
            prev, state, nxt, core = int(sw[2]), sw[3], int(sw[4]), int(m["cpu"])
            since, kind = running.get(core, (first, kind_of.get(prev, OTHER)))
            cores[core].append((since, ts, kind))
            if kind == OTHER:
                trace.other_comms[sw[1]] += ts - since
            running[core] = (ts, kind_of.get(nxt, OTHER))
            if prev == forwarder:
                off_at, off_runnable = ts, state.startswith("R")
            if nxt == forwarder:
                if off_at is not None:
                    if off_runnable:
                        trace.preempt_waits_ns.append(ts - off_at)
                    if it_start is not None:
                        it_off += ts - off_at
                if woken_at is not None:
                    trace.wake_delays_ns.append(ts - woken_at)
                off_at = woken_at = None
        elif event == "cpu-clock":
            if tid == forwarder:
                trace.samples.append((ts, rest.split()[-1] if rest else "?"))
        elif event == "sched:sched_wakeup":
            wk = _WAKE.search(rest)
            if wk is not None and int(wk[1]) == forwarder and woken_at is None:
                woken_at = ts
        elif event == "raw_syscalls:sys_enter":
            en = _ENTER.match(rest)
            if en is None:
                continue
            nr, fd = int(en[1]), int(en[2], 16)
            last_enter[tid] = (nr, fd)
            if tid == forwarder:
                if nr in calls.waits and it_start is not None:
                    trace.iterations.append(Iteration(it_start, ts, it_events, it_off))
                    it_start = None
                elif nr in calls.writes:
                    req = inside.get(fd)
                    if req is not None and req.read and not req.answered:
                        req.answered = ts
            elif tid in client and nr in calls.writes and fd not in open_:
                open_[fd] = Request(ts)
                if fd in links:
                    inside[links[fd]] = open_[fd]
        elif event == "raw_syscalls:sys_exit":
            ex = _EXIT.match(rest)
            if ex is None:
                continue
            nr, ret = int(ex[1]), int(ex[2])
            if tid == forwarder and nr in calls.waits:  # the window may open inside a wait
                it_start, it_events, it_off = ts, max(ret, 0), 0
                continue
            enter = last_enter.get(tid)
            if enter is None or enter[0] != nr:
                continue
            if tid == forwarder:
                req = inside.get(enter[1])
                if nr in calls.reads and ret > 0 and req is not None and not req.read:
                    req.read = ts
            elif tid in client and nr in calls.reads and ret > 0 and enter[1] in open_:
                req = open_.pop(enter[1])
                req.done = ts
                if not req.sent <= req.read <= req.answered <= ts:
                    req.read = req.answered = 0  # out of order across cores: legs unknown
                trace.requests.append(req)
    for core, (since, kind) in running.items():
        cores[core].append((since, last, kind))
    trace.cores = dict(cores)
    trace.window_ns = last - (first or 0)
    return trace


def percentile(values: Sequence[int], q: float) -> float:
    """The q-th percentile (nearest rank) in microseconds; 0 for no values."""
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q / 100))] / 1000 if s else 0.0


def occupancy(
    cores: Mapping[int, list[tuple[int, int, str]]], start: int, end: int
) -> Counter[str]:
    """Nanoseconds each kind ran on any core within [start, end)."""
    out: Counter[str] = Counter()
    for spans in cores.values():
        i = max(bisect.bisect_right(spans, (start, start, "")) - 1, 0)
        while i < len(spans) and spans[i][0] < end:
            s, e, kind = spans[i]
            overlap = min(e, end) - max(s, start)
            if overlap > 0:
                out[kind] += overlap
            i += 1
    return out


def episodes(slow: Sequence[Request], gap_ns: int = CLUSTER_GAP_NS) -> list[list[Request]]:
    """Slow requests grouped into episodes: overlapping, or closer than `gap_ns`."""
    groups: list[list[Request]] = []
    end = -(10**30)
    for req in sorted(slow, key=lambda r: r.sent):
        if req.sent > end + gap_ns:
            groups.append([])
        groups[-1].append(req)
        end = max(end, req.done)
    return groups


PHASES = ("to the forwarder", "inside", "back to the client")


def phases(reqs: Sequence[Request], q: float | None = None) -> dict[str, float]:
    """µs of each leg, over the requests whose every moment the trace saw: the mean, or
    with `q` that percentile of each leg."""
    seen = [r for r in reqs if r.read and r.answered]
    if not seen:
        return {}
    legs = (
        [r.read - r.sent for r in seen],
        [r.answered - r.read for r in seen],
        [r.done - r.answered for r in seen],
    )
    return {
        name: round(sum(leg) / len(leg) / 1000 if q is None else percentile(leg, q), 1)
        for name, leg in zip(PHASES, legs, strict=True)
    }


@dataclass
class Summary:
    """The figures one traced run is reported by (times in µs)."""

    requests: int
    p50_us: float
    p99_us: float
    iterations: int
    iteration_p99_us: float
    iteration_max_us: float
    on_cpu_p99_us: float
    on_cpu_max_us: float
    events_max: int
    wake_p99_us: float
    preempted: int
    preempt_p99_us: float
    forwarder_cpu_us_per_request: float
    slow_requests: int
    slow_episodes: int
    biggest_episode: int
    # per kind: the share of the slow requests' time each ran on the cores (2 cores: up to 2)
    slow_occupancy: dict[str, float]
    all_occupancy: dict[str, float]
    slow_phases: dict[str, float]
    all_phases: dict[str, float]
    # the forwarder's sampled symbols: in its longest 1 % of iterations (on a core), and overall
    long_symbols: list[tuple[str, float]]
    all_symbols: list[tuple[str, float]]
    # the other processes by command, in cores (1.0 = one core for the whole window)
    others: list[tuple[str, float]]
    # on a core per event, in iterations of >= 4 events: the median, and how many
    # iterations took more than SLOW_FACTOR times it (the core ran slow, or a long job)
    per_event_p50_us: float = 0.0
    slow_iterations: int = 0


def symbols(samples: Sequence[tuple[int, str]], spans: Sequence[tuple[int, int]]) -> Counter[str]:
    """Symbols of the samples that fall inside any of the (sorted) spans."""
    out: Counter[str] = Counter()
    starts = [s for s, _ in spans]
    for ts, sym in samples:
        i = bisect.bisect_right(starts, ts) - 1
        if i >= 0 and ts < spans[i][1]:
            out[sym] += 1
    return out


def top(counts: Counter[str], n: int = 8) -> list[tuple[str, float]]:
    total = sum(counts.values()) or 1
    return [(sym, round(c / total, 3)) for sym, c in counts.most_common(n)]


def summarize(trace: Trace) -> Summary:
    its = trace.iterations
    by_latency = sorted(trace.requests, key=lambda r: r.latency_ns)
    lat = [r.latency_ns for r in by_latency]
    slow = by_latency[len(by_latency) - max(int(len(by_latency) * SLOW_SHARE), 1) :]
    eps = episodes(slow)

    def share(reqs: Sequence[Request]) -> dict[str, float]:
        total: Counter[str] = Counter()
        span = 0
        for r in reqs:
            total += occupancy(trace.cores, r.sent, r.done)
            span += r.latency_ns
        return {k: round(total[k] / span, 3) if span else 0.0 for k in KINDS}

    sample = by_latency[:: max(len(by_latency) // 2000, 1)]
    n = len(lat) or 1
    longest = sorted(its, key=lambda i: i.on_cpu_ns)[len(its) - max(len(its) // 100, 1) :]
    long_spans = sorted((i.start_ns, i.end_ns) for i in longest)
    per_event = sorted(i.on_cpu_ns / i.events for i in its if i.events >= 4)
    return Summary(
        requests=len(lat),
        p50_us=percentile(lat, 50),
        p99_us=percentile(lat, 99),
        iterations=len(its),
        iteration_p99_us=percentile([i.wall_ns for i in its], 99),
        iteration_max_us=max((i.wall_ns for i in its), default=0) / 1000,
        on_cpu_p99_us=percentile([i.on_cpu_ns for i in its], 99),
        on_cpu_max_us=max((i.on_cpu_ns for i in its), default=0) / 1000,
        events_max=max((i.events for i in its), default=0),
        wake_p99_us=percentile(trace.wake_delays_ns, 99),
        preempted=len(trace.preempt_waits_ns),
        preempt_p99_us=percentile(trace.preempt_waits_ns, 99),
        forwarder_cpu_us_per_request=trace.on_core_ns(FORWARDER) / 1000 / n,
        slow_requests=len(slow),
        slow_episodes=len(eps),
        biggest_episode=max((len(g) for g in eps), default=0),
        slow_occupancy=share(slow),
        all_occupancy=share(sample),
        slow_phases=phases(slow),
        all_phases=phases(by_latency, 50),
        long_symbols=top(symbols(trace.samples, long_spans)),
        all_symbols=top(Counter(sym for _, sym in trace.samples)),
        others=[
            (comm, round(ns / trace.window_ns, 2) if trace.window_ns else 0.0)
            for comm, ns in trace.other_comms.most_common(5)
        ],
        per_event_p50_us=per_event[len(per_event) // 2] / 1000 if per_event else 0.0,
        slow_iterations=sum(
            1 for x in per_event if x > SLOW_FACTOR * per_event[len(per_event) // 2]
        ),
    )


def describe(label: str, wrk: load.LoadResult, s: Summary) -> str:
    def kinds(occ: Mapping[str, float]) -> str:
        return " ".join(f"{k} {occ[k]:.2f}" for k in KINDS)

    def syms(found: Sequence[tuple[str, float]]) -> str:
        return ", ".join(f"{sym} {share:.0%}" for sym, share in found) or "no samples"

    def legs(ph: Mapping[str, float]) -> str:
        return ", ".join(f"{k} {v:.0f}" for k, v in ph.items()) or "not traced"

    return "\n".join(
        [
            f"{label}: wrk {wrk.rps:,.0f} req/s p50 {wrk.p50_ms or 0:.3f} ms p99 "
            f"{wrk.p99_ms or 0:.3f} ms; traced {s.requests} requests p50 {s.p50_us:.0f} µs "
            f"p99 {s.p99_us:.0f} µs; forwarder {s.forwarder_cpu_us_per_request:.1f} µs "
            "on a core per request",
            f"  loop: {s.iterations} iterations, wall p99 {s.iteration_p99_us:.0f} max "
            f"{s.iteration_max_us:.0f} µs, on a core p99 {s.on_cpu_p99_us:.0f} max "
            f"{s.on_cpu_max_us:.0f} µs, up to {s.events_max} events per wait; "
            f"{s.per_event_p50_us:.0f} µs on a core per event (median), "
            f"{s.slow_iterations} iterations over {SLOW_FACTOR:g}x that",
            f"  waits for a core: wake-up p99 {s.wake_p99_us:.0f} µs; preempted "
            f"{s.preempted} times, p99 {s.preempt_p99_us:.0f} µs",
            f"  slowest 1 %: {s.slow_requests} requests in {s.slow_episodes} episode(s) "
            f"(largest {s.biggest_episode}); mean µs {legs(s.slow_phases)}",
            f"  all requests: median µs {legs(s.all_phases)}",
            f"  cores during the slowest 1 %: {kinds(s.slow_occupancy)}",
            f"  cores during all requests:    {kinds(s.all_occupancy)}",
            f"  forwarder's longest 1 % of iterations ran: {syms(s.long_symbols)}",
            f"  forwarder overall ran: {syms(s.all_symbols)}",
            "  other processes (cores): " + ", ".join(f"{c} {v:.2f}" for c, v in s.others),
        ]
    )


def socket_fds(pid: int) -> dict[int, int]:
    """fd -> socket inode of a process."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out[int(fd)] = int(target[8:-1])
    return out


def links(client_pid: int, forwarder_pid: int, port: int) -> dict[int, int]:
    """Client fd -> the forwarder's fd of the same connection to `port` (from /proc)."""
    ports: dict[int, tuple[int, int]] = {}  # inode -> (local port, remote port)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            text = Path(table).read_text()
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            f = line.split()  # sl local remote st queues timer retrnsmt uid timeout inode
            if len(f) > 9:
                ports[int(f[9])] = (
                    int(f[1].rsplit(":", 1)[1], 16),
                    int(f[2].rsplit(":", 1)[1], 16),
                )
    by_client_port = {}
    for fd, inode in socket_fds(forwarder_pid).items():
        local, remote = ports.get(inode, (0, 0))
        if local == port:
            by_client_port[remote] = fd
    out = {}
    for fd, inode in socket_fds(client_pid).items():
        local, remote = ports.get(inode, (0, 0))
        if remote == port and local in by_client_port:
            out[fd] = by_client_port[local]
    return out


def serving_tid(server: Server) -> int:
    """The thread that serves requests: the gateway's process, or nginx's one worker."""
    pids = group_pids(server.proc.pid)
    if server.label == "gateway" or len(pids) == 1:
        return server.proc.pid
    workers = [p for p in pids if p != server.proc.pid]
    if len(workers) != 1:
        raise RuntimeError(f"{server.label}: expected one worker process, found {workers}")
    return workers[0]


def threads(pid: int) -> set[int]:
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except OSError:
        return set()


def perf_argv(out: Path, seconds: float, forwarder: int, client: set[int]) -> list[str]:
    """Syscalls of the forwarder and the client, every switch, the forwarder's wake-ups."""
    traced = " || ".join(f"common_pid == {t}" for t in sorted({forwarder, *client}))
    return [
        "perf", "record", "-q", "-a", "-o", str(out),
        "-e", "raw_syscalls:sys_enter", "--filter", traced,
        "-e", "raw_syscalls:sys_exit", "--filter", traced,
        "-e", "sched:sched_switch",
        "-e", "sched:sched_wakeup", "--filter", f"pid == {forwarder}",
        "-e", "cpu-clock", "-c", str(SAMPLE_NS),
        "--", "sleep", f"{seconds:g}",
    ]  # fmt: skip


def perf_lines(data: Path) -> list[str]:
    proc = subprocess.run(
        ["perf", "script", "--ns", "-i", str(data), "-F", "tid,cpu,time,event,trace,ip,sym"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return proc.stdout.splitlines()


def traced_run(
    wrk: str, server: Server, script: Path, seconds: float, out: Path, upstreams: set[int]
) -> tuple[load.LoadResult, Trace]:
    """wrk paced for `seconds` + 2; the middle `seconds` traced."""
    url = f"http://127.0.0.1:{server.port}/1k"
    argv = load.wrk_argv(wrk, url, conns=100, duration_s=seconds + 2, script=str(script))
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 5
        while len(threads(client.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # wrk's connections open
        forwarder = serving_tid(server)
        wrk_tids = threads(client.pid)
        fds = links(client.pid, forwarder, server.port)
        subprocess.run(
            perf_argv(out, seconds, forwarder, wrk_tids),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=seconds + 60,
            check=True,
        )
        output, _ = client.communicate(timeout=seconds + 30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    meta = {"forwarder": forwarder, "client": sorted(wrk_tids), "upstreams": sorted(upstreams)}
    out.with_suffix(".json").write_text(json.dumps({**meta, "links": fds}))
    return load.parse_wrk(output), read_trace(out)


def read_trace(data: Path) -> Trace:
    """A recorded window read again, with the identities saved beside it (``--keep``)."""
    meta = json.loads(data.with_suffix(".json").read_text())
    return parse(
        perf_lines(data),
        meta["forwarder"],
        set(meta["client"]),
        set(meta["upstreams"]),
        calls(),
        {int(k): v for k, v in meta["links"].items()},
    )


CANARY_PERIOD_S = 0.001  # one chunk per millisecond: about 1.5 % of a core
FIFO_PRIORITY = 10


def _chunk() -> int:
    """A fixed piece of pure computation (~10-15 µs here): its time tracks the core's speed."""
    x = 0
    for i in range(300):
        x += i * i
    return x


def canary(cpu: int, seconds: float) -> list[float]:
    """How much slower than its best a fixed chunk ran, once a millisecond, on core `cpu`.

    Pinned, and SCHED_FIFO when allowed, so no other process takes the core during a
    chunk: a slow chunk is a slow core (the hypervisor, a busy sibling), not a wait.
    """
    os.sched_setaffinity(0, {cpu})
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY))
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter_ns()
        _chunk()
        times.append(time.perf_counter_ns() - t)
        time.sleep(CANARY_PERIOD_S)
    best = sorted(times)[len(times) // 100] if times else 1
    return [t / best for t in times]


@dataclass
class CanaryRun:
    """The canaries of every core, run beside one traced window."""

    procs: list[subprocess.Popen[str]]

    @classmethod
    def start(cls, seconds: float) -> CanaryRun:
        argv = [sys.executable, "-m", "benchmarks.stalls", "--duration", f"{seconds:g}"]
        return cls(
            [
                subprocess.Popen(
                    [*argv, "--canary-cpu", str(cpu)], stdout=subprocess.PIPE, text=True
                )
                for cpu in sorted(os.sched_getaffinity(0))
            ]
        )

    def finish(self, timeout: float) -> list[float]:
        out: list[float] = []
        for proc in self.procs:
            text, _ = proc.communicate(timeout=timeout)
            out.extend(json.loads(text or "[]"))
        return out


def queue_latencies(
    arrivals_ns: Sequence[int], service_ns: float, slowdown: Sequence[float], period_ns: int
) -> list[int]:
    """Latencies of one first-come-first-served server whose core's speed varies.

    Each request needs `service_ns` of the core at full speed; during period i (of
    `period_ns`, cycling) the core runs `slowdown[i]` times slower. A model of the
    forwarder alone: the upstream and the client are left out.
    """
    out = []
    t = 0.0
    n = len(slowdown)
    for arrival in arrivals_ns:
        t = max(t, float(arrival))
        work = service_ns
        while work > 0:
            period = int(t // period_ns)
            k = slowdown[period % n]
            left = (period + 1) * period_ns - t
            if work * k <= left:
                t += work * k
                work = 0.0
            else:
                work -= left / k
                t = float((period + 1) * period_ns)
        out.append(int(t) - arrival)
    return out


def poisson_arrivals(rate: float, seconds: float, rng: random.Random) -> list[int]:
    """Arrival times (ns) of a Poisson stream: what the paced probe approximates."""
    out = []
    t = 0.0
    while t < seconds:
        t += rng.expovariate(rate)
        out.append(int(t * 1e9))
    return out


def model_p99_ms(service_us: float, slowdown: Sequence[float], seconds: float = 60.0) -> float:
    """The model's p99 at the paced probe's rate for a forwarder needing `service_us`."""
    arrivals = poisson_arrivals(load.PACED_RATE, seconds, random.Random(14))
    lat = queue_latencies(arrivals, service_us * 1000, slowdown, int(CANARY_PERIOD_S * 1e9))
    return percentile(lat, 99) / 1000


def describe_canary(ratios: Sequence[float]) -> str:
    s = sorted(ratios)
    if not s:
        return "  canary: no chunks"
    q = [s[min(len(s) - 1, int(len(s) * p / 100))] for p in (50, 99, 99.9)]
    slow = sum(1 for r in s if r > SLOW_FACTOR)
    return (
        f"  canary (a fixed chunk on each core, vs its best): p50 {q[0]:.1f}x p99 {q[1]:.1f}x "
        f"p99.9 {q[2]:.1f}x max {s[-1]:.1f}x; over {SLOW_FACTOR:g}x: {slow} of {len(s)} "
        f"({slow / len(s):.2%})"
    )


def describe_model(cpu: Mapping[str, Sequence[float]], profile: Sequence[float]) -> str:
    """The model's p99 for each forwarder's CPU per request, on this session's canary profile."""
    if not profile:
        return "model: no canary profile"
    lines = ["model: one server, Poisson 5k req/s, the core's speed as the canaries measured it"]
    p99 = {}
    for label, values in cpu.items():
        us = sorted(values)[len(values) // 2]
        p99[label] = model_p99_ms(us, profile)
        lines.append(f"  {label}: {us:.1f} µs per request -> p99 {p99[label]:.2f} ms")
    if "nginx" in p99 and "gateway" in p99:
        us = sorted(cpu["nginx"])[len(cpu["nginx"]) // 2]
        while model_p99_ms(us + 1, profile) <= p99["nginx"] + 0.2:
            us += 1
        lines.append(f"  within nginx's p99 + 0.2 ms up to {us:.0f} µs per request")
    return "\n".join(lines)


def calls() -> Calls:
    found = CALLS.get(platform.machine())
    if found is None:
        raise RuntimeError(f"no syscall numbers for {platform.machine()}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stalls",
        description="Trace nginx and the gateway under the paced 5k req/s probe.",
    )
    parser.add_argument("--python", help="interpreter of a venv with the gateway installed")
    parser.add_argument("--repeats", type=int, default=2, help="runs per forwarder, interleaved")
    parser.add_argument("--duration", type=float, default=8.0, help="traced seconds per run")
    parser.add_argument("--targets", default="nginx,gateway", help="comma-separated, in order")
    parser.add_argument("--keep", type=Path, help="keep the perf data files in this directory")
    parser.add_argument(
        "--fifo",
        action="store_true",
        help="run the servers and wrk SCHED_FIFO, so other processes cannot take their cores",
    )
    parser.add_argument("--canary-cpu", type=int, help=argparse.SUPPRESS)  # one canary, as JSON
    args = parser.parse_args(argv)
    if args.canary_cpu is not None:
        print(json.dumps([round(r, 2) for r in canary(args.canary_cpu, args.duration)]))
        return 0
    calls()
    if shutil.which("perf") is None:
        parser.error("needs perf (Debian: linux-perf) with tracepoint access")
    if args.fifo:
        # Inherited by every child: the servers, wrk and perf.
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY))
        except PermissionError:
            parser.error("--fifo needs root (or CAP_SYS_NICE)")
    raise_nofile()
    tools = ensure_tools(["wrk", "nginx"], install=False)
    wrk = tools["wrk"]
    if not wrk or not tools["nginx"]:
        parser.error("needs wrk and nginx")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with tempfile.TemporaryDirectory(prefix="stalls-") as tmp_s:
        tmp = Path(tmp_s)
        keep = args.keep or tmp
        keep.mkdir(parents=True, exist_ok=True)
        script = tmp / "paced.lua"
        script.write_text(load.wrk_script(rate=load.PACED_RATE, conns=100))
        with ProcessSet(tmp) as procs:
            fleet = Fleet(procs, tmp, tools, CpuLayout(), python=args.python)
            ups = {p for s in fleet.upstreams().values() for p in group_pids(s.proc.pid)}
            servers = {
                t: fleet.gateway() if t == "gateway" else fleet.nginx_ref()
                for t in args.targets.split(",")
            }
            for srv in servers.values():  # warm: pools filled, code paths hot
                url = f"http://127.0.0.1:{srv.port}/1k"
                argv_w = load.wrk_argv(wrk, url, conns=100, duration_s=2, script=str(script))
                subprocess.run(argv_w, capture_output=True, timeout=60, check=False)
            cpu: dict[str, list[float]] = defaultdict(list)
            profile: list[float] = []
            for rep in range(1, args.repeats + 1):
                for label, srv in servers.items():
                    data = keep / f"{label}-{rep}.data"
                    canaries = CanaryRun.start(args.duration + 2)
                    result, trace = traced_run(wrk, srv, script, args.duration, data, ups)
                    summary = summarize(trace)
                    ratios = canaries.finish(60)
                    print(describe(f"{label} #{rep}", result, summary), flush=True)
                    print(describe_canary(ratios), flush=True)
                    cpu[label].append(summary.forwarder_cpu_us_per_request)
                    profile.extend(ratios)
            print(describe_model(cpu, profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
