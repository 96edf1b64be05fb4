"""benchmarks/stalls.py: reading perf's trace of the client, the forwarder and the cores; the
socket links from /proc; the canary; the queue model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.stalls import (
    CALLS,
    CLIENT,
    FORWARDER,
    IDLE,
    OTHER,
    Request,
    episodes,
    links,
    occupancy,
    parse,
    phases,
    queue_latencies,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]
X86 = CALLS["x86_64"]
GW, WRK, UP = 100, 200, 300  # forwarder, client and upstream thread ids
CLIENT_FD, GW_FD, UP_FD = 7, 40, 41


def line(tid: int, cpu: int, us: int, event: str, rest: str) -> str:
    """One line as ``perf script --ns -F tid,cpu,time,event,trace,ip,sym`` prints it."""
    ns = us * 1000
    return (
        f" {tid:>6} [{cpu:03d}] {ns // 10**9}.{ns % 10**9:09d}: {event:>22}: {rest} "
        "ffffffff81415e9c syscall_exit_work"
    )


def enter(tid: int, us: int, nr: int, fd: int = 3, cpu: int = 0) -> str:
    return line(tid, cpu, us, "raw_syscalls:sys_enter", f"NR {nr} ({fd:x}, 7ffd6b573bc0, 400, 0)")


def exit_(tid: int, us: int, nr: int, ret: int, cpu: int = 0) -> str:
    return line(tid, cpu, us, "raw_syscalls:sys_exit", f"NR {nr} = {ret}")


def switch(cpu: int, us: int, prev: int, state: str, nxt: int) -> str:
    return line(
        prev,
        cpu,
        us,
        "sched:sched_switch",
        f"prev_comm=p{prev} prev_pid={prev} prev_prio=120 prev_state={state} ==> "
        f"next_comm=n{nxt} next_pid={nxt} next_prio=120",
    )


def wakeup(us: int, pid: int) -> str:
    return line(0, 0, us, "sched:sched_wakeup", f"comm=python pid={pid} prio=120 target_cpu=000")


# One request through the forwarder: wrk writes at 10 µs; the gateway wakes (epoll returns
# one event at 30), reads it (40), writes upstream (50), waits; the upstream's answer wakes
# it (epoll at 200), it reads (210) and writes to the client (220); wrk reads it at 260.
# The gateway is preempted from 52 to 60 inside its first iteration.
ONE_REQUEST = [
    switch(0, 0, 0, "S", WRK),
    enter(WRK, 10, X86.writes[0], CLIENT_FD),
    exit_(WRK, 12, X86.writes[0], 65),
    wakeup(20, GW),
    switch(1, 25, 0, "S", GW),
    exit_(GW, 30, 281, 1, cpu=1),
    enter(GW, 40, X86.reads[0], GW_FD, cpu=1),
    exit_(GW, 41, X86.reads[0], 65, cpu=1),
    enter(GW, 50, X86.writes[0], UP_FD, cpu=1),
    exit_(GW, 51, X86.writes[0], 351, cpu=1),
    switch(1, 52, GW, "R+", UP),
    switch(1, 60, UP, "S", GW),
    enter(GW, 70, 281, cpu=1),
    switch(1, 71, GW, "S", 0),
    switch(0, 100, WRK, "S", 0),
    wakeup(190, GW),
    switch(1, 195, 0, "S", GW),
    exit_(GW, 200, 281, 1, cpu=1),
    enter(GW, 205, X86.reads[0], UP_FD, cpu=1),
    exit_(GW, 210, X86.reads[0], 1249, cpu=1),
    enter(GW, 220, X86.writes[0], GW_FD, cpu=1),
    exit_(GW, 222, X86.writes[0], 1298, cpu=1),
    enter(GW, 230, 281, cpu=1),
    switch(1, 231, GW, "S", 0),
    switch(0, 250, 0, "S", WRK),
    enter(WRK, 255, X86.reads[0], CLIENT_FD),
    exit_(WRK, 260, X86.reads[0], 1298),
    switch(0, 270, WRK, "S", 0),
]


def test_a_request_is_followed_through_the_forwarder() -> None:
    trace = parse(ONE_REQUEST, GW, {WRK}, {UP}, X86, {CLIENT_FD: GW_FD})
    assert trace.requests == [Request(sent=10_000, read=41_000, answered=220_000, done=260_000)]
    assert phases(trace.requests) == {
        "to the forwarder": 31.0,
        "inside": 179.0,
        "back to the client": 40.0,
    }


def test_loop_iterations_count_events_and_the_time_off_the_core() -> None:
    trace = parse(ONE_REQUEST, GW, {WRK}, {UP}, X86, {CLIENT_FD: GW_FD})
    first, second = trace.iterations
    assert (first.start_ns, first.end_ns, first.events) == (30_000, 70_000, 1)
    assert (first.off_cpu_ns, first.on_cpu_ns) == (8_000, 32_000)  # preempted 52-60
    assert (second.wall_ns, second.off_cpu_ns) == (30_000, 0)
    assert trace.preempt_waits_ns == [8_000]
    assert trace.wake_delays_ns == [5_000, 5_000]  # woken at 20 and 190, ran at 25 and 195


def test_without_links_the_client_still_times_each_request() -> None:
    trace = parse(ONE_REQUEST, GW, {WRK}, {UP}, X86)
    assert trace.requests == [Request(sent=10_000, done=260_000)]
    assert phases(trace.requests) == {}  # no leg seen inside


def test_what_ran_on_each_core() -> None:
    trace = parse(ONE_REQUEST, GW, {WRK}, {UP}, X86, {CLIENT_FD: GW_FD})
    core1 = trace.cores[1]
    assert core1[0] == (0, 25_000, IDLE)  # before the first switch: what switched out
    assert (25_000, 52_000, FORWARDER) in core1
    assert (52_000, 60_000, "upstreams") in core1
    assert trace.on_core_ns(FORWARDER) == (52 - 25 + 71 - 60 + 231 - 195) * 1000
    assert trace.on_core_ns(CLIENT) == (100 - 0 + 270 - 250) * 1000


@pytest.mark.parametrize(
    ("start_us", "end_us", "want"),
    [
        (0, 25, {IDLE: 25_000, CLIENT: 25_000}),
        (50, 60, {FORWARDER: 2_000, "upstreams": 8_000, CLIENT: 10_000}),
        (240, 280, {IDLE: 10_000 + 30_000, CLIENT: 20_000}),  # the trace ends at 270
    ],
    ids=["both-cores-at-the-start", "a-preemption", "the-client-reads"],
)
def test_occupancy_of_a_window(start_us: int, end_us: int, want: dict[str, int]) -> None:
    trace = parse(ONE_REQUEST, GW, {WRK}, {UP}, X86, {CLIENT_FD: GW_FD})
    got = occupancy(trace.cores, start_us * 1000, end_us * 1000)
    assert {k: v for k, v in got.items() if v} == want


def test_other_processes_are_named() -> None:
    lines = [switch(0, 0, 0, "S", 999), switch(0, 40, 999, "R", GW), switch(0, 50, GW, "S", 0)]
    trace = parse(lines, GW, set(), set(), X86)
    assert trace.cores[0][1] == (0, 40_000, OTHER)
    assert trace.other_comms == {"p999": 40_000}


@pytest.mark.parametrize(
    ("spans_us", "sizes"),
    [
        ([(0, 100), (50, 900), (1500, 1600)], [3]),  # each starts within 1 ms of the last end
        ([(0, 100), (5000, 5100), (5200, 5300)], [1, 2]),
        ([(3000, 3100), (0, 100)], [1, 1]),  # taken in the order they were sent
        ([], []),
    ],
    ids=["one-episode", "two-episodes", "out-of-order", "none"],
)
def test_slow_requests_group_into_episodes(
    spans_us: list[tuple[int, int]], sizes: list[int]
) -> None:
    slow = [Request(sent=s * 1000, done=e * 1000) for s, e in spans_us]
    assert [len(g) for g in episodes(slow)] == sizes


@pytest.mark.parametrize(
    ("arrivals_us", "service_us", "slowdown", "want_us"),
    [
        ([0, 5000], 30, [1.0], [30, 30]),  # an idle server: the service time
        ([0, 0, 0], 30, [1.0], [30, 60, 90]),  # a burst queues
        ([0], 30, [2.0], [60]),  # a core at half speed
        ([900], 200, [1.0, 10.0], [100 + 1000]),  # 100 µs of work at speed, 100 at a tenth
    ],
    ids=["idle", "burst", "half-speed", "into-a-slow-millisecond"],
)
def test_queue_model(
    arrivals_us: list[int], service_us: float, slowdown: list[float], want_us: list[int]
) -> None:
    got = queue_latencies([a * 1000 for a in arrivals_us], service_us * 1000, slowdown, 1_000_000)
    assert [round(x / 1000) for x in got] == want_us


def test_links_pair_the_client_fd_with_the_servers_fd_of_the_same_connection() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [listener.accept()[0] for _ in clients]
        try:
            by_port = {s.getpeername()[1]: s.fileno() for s in accepted}
            want = {c.fileno(): by_port[c.getsockname()[1]] for c in clients}
            assert links(os.getpid(), os.getpid(), port) == want
        finally:
            for s in clients + accepted:
                s.close()


def test_the_canary_reports_each_chunk_against_the_best() -> None:
    cpu = min(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.stalls", "--canary-cpu", str(cpu), "--duration", "0.3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    ratios = json.loads(out.stdout)
    assert len(ratios) > 20
    assert min(ratios) > 0
    assert sorted(ratios)[len(ratios) // 100] == pytest.approx(1.0, abs=0.01)


def paced_trace(stall_at_us: int | None) -> list[str]:
    """200 requests 1 ms apart on one connection, each answered in 100 µs by a forwarder on
    core 1 that reads and answers in one iteration (about 10 µs per event); with
    `stall_at_us`, the core runs the forwarder's iteration there 50x slower."""
    lines = [switch(0, 0, 0, "S", WRK), switch(1, 0, 0, "S", GW)]
    busy_until = 0
    for i in range(200):
        t = 1000 * i + 10
        lines += [enter(WRK, t, X86.writes[0], CLIENT_FD), exit_(WRK, t + 1, X86.writes[0], 65)]
        start = max(t + 5, busy_until)
        cost = 500 if stall_at_us is not None and start <= stall_at_us < start + 1000 else 10
        lines += [
            exit_(GW, start, 281, 4, cpu=1),
            enter(GW, start + 1, X86.reads[0], GW_FD, cpu=1),
            exit_(GW, start + 2, X86.reads[0], 65, cpu=1),
            enter(GW, start + 4 * cost, X86.writes[0], GW_FD, cpu=1),
            exit_(GW, start + 4 * cost + 1, X86.writes[0], 1298, cpu=1),
            enter(GW, start + 4 * cost + 2, 281, cpu=1),
        ]
        busy_until = start + 4 * cost + 3
        done = max(t + 100, busy_until + 5)
        lines += [enter(WRK, done - 1, X86.reads[0], CLIENT_FD)]
        lines += [exit_(WRK, done, X86.reads[0], 1298)]
    return sorted(lines, key=lambda ln: float(ln.split()[2].rstrip(":")))


def test_a_stall_makes_one_episode_of_slow_requests_and_slow_iterations() -> None:
    calm = summarize(parse(paced_trace(None), GW, {WRK}, {UP}, X86, {CLIENT_FD: GW_FD}))
    assert (calm.slow_iterations, calm.per_event_p50_us) == (0, 10.5)  # 42 µs, 4 events
    assert calm.p99_us == 100.0

    stalled = summarize(parse(paced_trace(100_000), GW, {WRK}, {UP}, X86, {CLIENT_FD: GW_FD}))
    assert stalled.slow_iterations == 1  # the one iteration at 50x
    assert stalled.slow_episodes == 1  # the two slowest requests overlap the stall
    assert stalled.slow_phases["inside"] > 1000 > stalled.all_phases["inside"]  # 2 ms of work


def test_a_read_stamped_before_its_write_does_not_shift_the_next_request() -> None:
    def one(sent: int, read: int) -> list[str]:
        return [
            enter(WRK, sent, X86.writes[0], CLIENT_FD),
            enter(GW, read - 1, X86.reads[0], GW_FD, cpu=1),
            exit_(GW, read, X86.reads[0], 65, cpu=1),
            enter(GW, sent + 40, X86.writes[0], GW_FD, cpu=1),
            enter(WRK, sent + 49, X86.reads[0], CLIENT_FD),
            exit_(WRK, sent + 50, X86.reads[0], 1298),
        ]

    # The first read is stamped 1 µs before the write it answers (the two cores' clocks).
    lines = sorted(one(10, 9) + one(1000, 1010), key=lambda ln: float(ln.split()[2][:-1]))
    trace = parse(lines, GW, {WRK}, {UP}, X86, {CLIENT_FD: GW_FD})
    assert trace.requests == [
        Request(sent=10_000, done=60_000),  # legs unknown
        Request(sent=1_000_000, read=1_010_000, answered=1_040_000, done=1_050_000),
    ]
