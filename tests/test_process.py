"""The gateway as a process: big streams and RSS, graceful SIGTERM, demo, version."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import ROOT, free_port, run_gateway_process

MB = 1024 * 1024


@contextmanager
def threaded_app(app: web.Application) -> Iterator[str]:
    """Run an aiohttp app on its own loop thread; yields its base URL."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        holder["port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        yield f"http://127.0.0.1:{holder['port']}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)


def _rss_kb(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert m
    return int(m.group(1))


def _single(url: str, **top: Any) -> dict[str, Any]:
    return {
        "state": {"store": "memory"},
        "drain_timeout": "20s",
        "services": {"svc": {"releases": {"stable": {"weight": 1, "upstreams": [url]}}}},
        **top,
    }


def _stream_app() -> web.Application:
    async def sink(request: web.Request) -> web.Response:
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"bytes": n, "sha256": h.hexdigest()})

    async def source(request: web.Request) -> web.StreamResponse:
        size = int(request.query["mb"]) * MB
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        block = bytes(range(256)) * 256  # 64 KiB
        for _ in range(size // len(block)):
            await resp.write(block)
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=0)
    app.router.add_post("/upload", sink)
    app.router.add_get("/download", source)
    return app


@pytest.mark.slow
def test_100mb_upload_and_download_stream_with_small_rss(tmp_path: Path) -> None:
    with threaded_app(_stream_app()) as url, run_gateway_process(tmp_path, _single(url)) as gw:
        pid = gw.proc.pid

        async def run() -> None:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{gw.url}/healthz") as r:
                    await r.read()
                base = _rss_kb(pid, "VmRSS")

                async def gen() -> AsyncIterator[bytes]:
                    block = bytes(range(256)) * 256
                    for _ in range(100 * MB // len(block)):
                        yield block

                want = hashlib.sha256(bytes(range(256)) * 256 * (100 * MB // 65536)).hexdigest()
                async with s.post(f"{gw.url}/upload", data=gen()) as r:
                    assert r.status == 200
                    assert await r.json() == {"bytes": 100 * MB, "sha256": want}
                h = hashlib.sha256()
                n = 0
                async with s.get(f"{gw.url}/download?mb=100") as r:
                    assert r.status == 200
                    async for chunk in r.content.iter_chunked(1 << 16):
                        h.update(chunk)
                        n += len(chunk)
                assert n == 100 * MB and h.hexdigest() == want
                peak = _rss_kb(pid, "VmHWM")
                assert (peak - base) < 50 * 1024, f"RSS grew {(peak - base) / 1024:.1f} MB"

        asyncio.run(run())


def test_version_flag_and_healthz_header(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    version = out.stdout.strip().removeprefix("gateway ")
    assert version.startswith("0.1.0")
    baked = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GATEWAY_BUILD_VERSION": "v9.9.9-3-gabc"},
    )
    assert (
        baked.stdout.strip()
        == "gateway v9.9.9-3-gabc (pure-Python build: a source checkout or editable install)"
    )
    with run_gateway_process(
        tmp_path, _single("http://127.0.0.1:9"), env={"GATEWAY_BUILD_VERSION": "v9.9.9-3-gabc"}
    ) as gw:
        import urllib.request

        with urllib.request.urlopen(f"{gw.url}/healthz", timeout=5) as r:
            assert r.headers["X-App-Version"] == "v9.9.9-3-gabc"


@pytest.mark.skipif(shutil.which("curl") is None, reason="the demo prints curl lines")
def test_demo_curl_lines_do_what_they_say() -> None:
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", str(port), "--admin-port", str(admin)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "Ctrl-C" in line:
                break
        curls = [ln.strip() for ln in lines if ln.strip().startswith("curl ")]
        assert len(curls) == 5, lines

        def run(cmd: str) -> str:
            return subprocess.run(
                shlex.split(cmd), capture_output=True, text=True, timeout=10, check=True
            ).stdout

        header, cookie, sticky, anonymous, admin_line = curls
        for _ in range(10):
            assert json.loads(run(header))["release"] == "gray"
            assert json.loads(run(cookie))["release"] == "gray"
        assert len({json.loads(run(sticky))["release"] for _ in range(10)}) == 1
        seen = [re.search(r"X-Release-Stage: (\w+)", run(anonymous)) for _ in range(60)]
        assert all(m is not None for m in seen)
        assert {m.group(1) for m in seen if m} <= {"stable", "gray"}
        services = json.loads(run(admin_line))
        assert "user-api" in json.dumps(services)  # gateway/demo.py's DEMO_SERVICE
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        if proc.stdout is not None:
            proc.stdout.close()
