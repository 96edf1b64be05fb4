"""A real Prometheus server for tests, and a small exporter of a business counter.

Why real: analysis semantics hinge on what Prometheus answers (rates over a
window, empty vectors, NaN, an unreachable server), and the alert rules in
config/prometheus-alerts.yml only prove themselves against real series.
The server listens on 127.0.0.1 only, keeps its TSDB in a temp directory,
scrapes every second and is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.conftest import free_port, start_app
from tests.programs import need


class Prometheus:
    """One `prometheus` process; `start` waits for /-/ready, `stop` ends it by PID."""

    def __init__(
        self,
        tmp: Path,
        targets: Sequence[str],
        *,
        rule_files: Sequence[Path] = (),
        port: int | None = None,
    ) -> None:
        self.binary = need("prometheus", "Debian package prometheus; .ci/run installs it")
        self.tmp = tmp
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "prometheus.yml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(p) for p in rule_files],
                    "scrape_configs": [
                        {
                            "job_name": "test",
                            "scrape_interval": "1s",
                            "scrape_timeout": "900ms",
                            "static_configs": [{"targets": list(targets)}],
                        }
                    ],
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "prometheus.log"

    def _spawn(self) -> subprocess.Popen[bytes]:
        data = self.tmp / "tsdb"
        data.mkdir(exist_ok=True)
        with self.log.open("ab") as out:
            return subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.tmp,
            )

    async def start(self, within: float = 60.0) -> None:
        proc = self.proc = self._spawn()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        async with aiohttp.ClientSession() as s:
            while True:
                assert proc.poll() is None, f"prometheus exited: {self.log.read_text()}"
                try:
                    async with s.get(f"{self.url}/-/ready") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert loop.time() < deadline, f"prometheus not ready: {self.log.read_text()}"
                await asyncio.sleep(0.1)

    async def stop(self, wait: float = 30.0) -> None:
        """SIGTERM by PID; SIGKILL if it has not exited within `wait` seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, wait)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, wait)

    async def api(self, path: str, **params: str) -> Any:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{self.url}/api/v1/{path}", params=params) as r:
                body = await r.json()
        assert body.get("status") == "success", body
        return body["data"]


class PaymentsExporter:
    """`payments_total{release,status}`: every scrape adds 1,000 payments per release.

    The share with `status="ok"` is `ratio[release]`, which the test sets, so
    `rate(ok) / rate(all)` over any window after a change is exactly that ratio.
    """

    def __init__(self, ratio: dict[str, float]) -> None:
        self.ratio = dict(ratio)
        self.ok: dict[str, float] = dict.fromkeys(ratio, 0.0)
        self.failed: dict[str, float] = dict.fromkeys(ratio, 0.0)
        self.scrapes = 0
        self.port = 0

    def app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            self.scrapes += 1
            lines = ["# TYPE payments_total counter"]
            for rel, ratio in self.ratio.items():
                self.ok[rel] += 1000 * ratio
                self.failed[rel] += 1000 * (1 - ratio)
                lines.append(f'payments_total{{release="{rel}",status="ok"}} {self.ok[rel]}')
                lines.append(
                    f'payments_total{{release="{rel}",status="failed"}} {self.failed[rel]}'
                )
            return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app

    async def start(self) -> Any:
        up = await start_app(self.app())
        self.port = up.port
        return up
