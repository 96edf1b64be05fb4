"""Idle keep-alive connections: what one more idle client costs a server in RSS.

The client runs as its own process (``python -m benchmarks.idle``) so its
10,000 sockets count against its own descriptor limit, not the harness's. It
opens the connections, sends one request on each and reads the answer (so each
is a real keep-alive connection the server has handled), prints ``READY``,
holds them until told to close (or a deadline), then closes everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from benchmarks.procs import Proc, raise_nofile

REQUEST = "GET /1k HTTP/1.1\r\nHost: bench\r\nX-User-ID: idle-{i}\r\n\r\n"
# RSS is read this long after the last connection got its answer, for every server:
# the connections are then idle as keep-alive connections mostly are (the gateway
# parks a connection idle for `timeouts.idle_park`, 0.5 s by default, outside its event
# loop; nginx and HAProxy keep nothing per connection that depends on how long it idled).
IDLE_S = 3.0


async def _one(i: int, port: int, sem: asyncio.Semaphore) -> asyncio.StreamWriter | None:
    async with sem:
        try:
            async with asyncio.timeout(10.0):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(REQUEST.format(i=i).encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                return writer
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            return None


async def hold(port: int, count: int, concurrency: int, hold_s: float) -> None:
    raise_nofile(count + 1024)
    sem = asyncio.Semaphore(concurrency)
    started = time.monotonic()
    results = await asyncio.gather(*(_one(i, port, sem) for i in range(count)))
    writers = [w for w in results if w is not None]
    print(f"READY {len(writers)} {count - len(writers)} {time.monotonic() - started:.3f}")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(hold_s):
            await loop.run_in_executor(None, sys.stdin.readline)
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class IdleResult:
    conns: int
    failed: int
    open_s: float
    rss_before_kib: int
    rss_after_kib: int

    @property
    def kib_per_conn(self) -> float | None:
        if not self.conns:
            return None
        return (self.rss_after_kib - self.rss_before_kib) / self.conns


def measure_idle(
    server: Proc, port: int, *, count: int, log_dir: Path, deadline_s: float = 90.0
) -> IdleResult:
    """Open ``count`` idle connections to ``port`` and read the server group's RSS delta."""
    before = server.rss_kib()
    argv = [sys.executable, "-m", "benchmarks.idle", "--port", str(port), "--count", str(count),
            "--hold", str(deadline_s)]  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    with (log_dir / "idle-client.log").open("ab") as err:
        client = subprocess.Popen(
            argv, cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
            start_new_session=True,
        )  # fmt: skip
    try:
        assert client.stdout is not None and client.stdin is not None
        line = _readline(client.stdout, deadline_s)
        if not line.startswith("READY"):
            raise RuntimeError(f"idle client did not get ready: {line!r} (see idle-client.log)")
        _, ok, failed, open_s = line.split()
        time.sleep(IDLE_S)  # every connection idle this long (and the allocator settled)
        after = server.rss_kib()
        client.stdin.write(b"close\n")
        client.stdin.flush()
        client.wait(30)
        return IdleResult(int(ok), int(failed), float(open_s), before, after)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(5)


def _readline(stream: IO[bytes], timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return ""
        return stream.readline().decode().strip()
    finally:
        sel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="hold idle keep-alive connections")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--hold", type=float, default=90.0, help="close after this many s")
    args = parser.parse_args()
    asyncio.run(hold(args.port, args.count, args.concurrency, args.hold))


if __name__ == "__main__":
    main()
