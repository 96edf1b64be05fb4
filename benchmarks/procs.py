"""Child processes: process groups, CPU and RSS from /proc, readiness polls.

Why process groups: the gateway (``--workers N``) and nginx (master + workers)
fork; CPU per request must count every process of the forwarder, and cleanup
must reach every one of them, so each server is started in its own session and
both are done per group.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartupError(RuntimeError):
    """A server did not become ready; the message carries its log tail."""


@dataclass(frozen=True)
class CpuTimes:
    """User and system CPU seconds."""

    user: float = 0.0
    sys: float = 0.0

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user - other.user, self.sys - other.sys)

    def __add__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user + other.user, self.sys + other.sys)

    @property
    def total(self) -> float:
        return self.user + self.sys


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def group_pids(pgid: int) -> list[int]:
    """Every live process whose process group is ``pgid``."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields is not None and int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def group_cpu(pgid: int) -> CpuTimes:
    """CPU used so far by a process group, reaped children included (proc(5) fields 14-17)."""
    user = system = 0
    for pid in group_pids(pgid):
        fields = _stat_fields(pid)
        if fields is not None:
            user += int(fields[11]) + int(fields[13])
            system += int(fields[12]) + int(fields[14])
    return CpuTimes(user / CLK_TCK, system / CLK_TCK)


def group_rss_kib(pgid: int) -> int:
    """Sum of VmRSS (KiB) over a process group."""
    total = 0
    for pid in group_pids(pgid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (children inherit it); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    try:
        new_hard = max(hard, want) if os.geteuid() == 0 else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, new_hard), new_hard))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# A directory shared by every process of one test run (the xdist workers, the benchmarks
# they start, a nested pytest): one file per port handed out, created with O_EXCL, so two
# processes never get the same one (tests/conftest.py makes it; unset outside a test run).
PORT_CLAIMS_ENV = "GRAY_GATEWAY_TEST_PORT_CLAIMS"
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that neither this process nor the test run handed out.

    Why not just bind port 0 and close: the kernel may give the same port to the next
    bind once the first socket is closed, so ``port, admin = free_port(), free_port()``
    could collide, and so could two test workers; each port is remembered here and, in a
    test run, claimed in the run's shared directory.
    """
    claims = os.environ.get(PORT_CLAIMS_ENV)
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port in _HANDED_OUT:
            continue
        _HANDED_OUT.add(port)
        if claims is None or _claim(Path(claims), port):
            return port
    raise RuntimeError("no fresh free port after 1000 tries")


def _claim(claims: Path, port: int) -> bool:
    try:
        os.close(os.open(claims / str(port), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def pinned(argv: Sequence[str], cpus: str | None) -> list[str]:
    """Prefix ``taskset -c CPUS`` when pinning; taskset execs, so the pid stays the same."""
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


def http_get(
    port: int, path: str, *, timeout: float = 2.0, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Proc:
    """A server started in its own session; stopping it signals the whole group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self.stop_signal = stop_signal
        self._log: IO[bytes] = open(self.log_path, "wb")  # closed in stop()
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> CpuTimes:
        return group_cpu(self.pid)

    def rss_kib(self) -> int:
        return group_rss_kib(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """Signal the group, wait, then SIGKILL whatever of the group is left."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        # Workers orphaned by a dead leader keep the group id: reap them too.
        deadline = time.monotonic() + timeout
        while group_pids(self.pid) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            time.sleep(0.05)
        self._log.close()


class ProcessSet:
    """Every server of a benchmark session; ``close()`` stops them newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[Proc] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Proc:
        proc = Proc(name, argv, log_dir=self.log_dir, env=env, cwd=cwd, stop_signal=stop_signal)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        while self._procs:
            proc = self._procs.pop()
            with contextlib.suppress(Exception):
                proc.stop()

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_http(
    port: int,
    path: str,
    *,
    proc: Proc,
    deadline_s: float = 20.0,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Poll ``GET path`` until it answers 200; raise StartupError with the server's log."""
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartupError(
                f"{proc.name} exited with code {proc.popen.returncode} before it was ready\n"
                f"  command: {' '.join(proc.argv)}\n--- {proc.log_path} ---\n{proc.log_tail()}"
            )
        try:
            status, _ = http_get(port, path, timeout=1.0, headers=headers)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise StartupError(
        f"{proc.name} did not answer 200 on 127.0.0.1:{port}{path} within {deadline_s:.0f}s "
        f"(last: {last})\n  command: {' '.join(proc.argv)}\n"
        f"--- {proc.log_path} ---\n{proc.log_tail()}"
    )
