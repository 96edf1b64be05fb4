"""Shared fixtures: real upstream servers and a real gateway on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

# free_port: the run's port claims, one implementation for the tests and the benchmarks.
from benchmarks.procs import PORT_CLAIMS_ENV, free_port
from gateway import config as C
from gateway.app import Gateway
from gateway.demo import demo_upstream, serve_app
from tests import parallel
from tests.engine_helpers import Env
from tests.tls_helpers import PKI, make_pki

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """The run's port claims: made by the first process, inherited by workers and children."""
    if PORT_CLAIMS_ENV in os.environ:
        return
    claims = tempfile.mkdtemp(prefix="gray-gateway-ports-")
    os.environ[PORT_CLAIMS_ENV] = claims

    def cleanup() -> None:
        os.environ.pop(PORT_CLAIMS_ENV, None)
        shutil.rmtree(claims, ignore_errors=True)

    config.add_cleanup(cleanup)


# --------------------------------------------------------------------------- parallel workers


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns -n into workers
def pytest_cmdline_main(config: pytest.Config) -> None:
    """The whole suite runs in parallel workers (tests/parallel.py); chosen files in-process."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    n = parallel.workers_for(
        whole_suite=config.args_source is pytest.Config.ArgsSource.TESTPATHS,
        numprocesses=config.option.numprocesses,
        dist=config.option.dist,
        usepdb=config.option.usepdb,
    )
    if n is not None:
        config.option.numprocesses = n
        config.option.dist = "loadfile"
        config.option.loadscopereorder = False  # xdist would sort files by test count


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    """A test CA and the certificates signed by it (tests/tls_helpers.py), made for each test."""
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def started() -> AsyncIterator[list[Gateway]]:
    """The in-process gateways a test starts (it appends them), stopped after the test."""
    gws: list[Gateway] = []
    yield gws
    for gw in gws:
        await gw.stop(1.0)


# Lines a test leaves for the end of the run (tests/test_container.py's wall time). A worker's
# output is not shown, so a worker hands them to the controller in xdist's `workeroutput`,
# which the controller prints in the terminal summary.
_SUMMARY_LINES = pytest.StashKey[list[str]]()


def summary_line(config: pytest.Config, line: str) -> None:
    """Print `line` in the run's terminal summary, from the controller or a worker."""
    out = getattr(config, "workeroutput", None)
    if out is not None:
        out.setdefault("summary_lines", []).append(line)
    else:
        config.stash.setdefault(_SUMMARY_LINES, []).append(line)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: a worker has finished
def pytest_testnodedown(node: Any, error: object) -> None:
    lines = getattr(node, "workeroutput", {}).get("summary_lines", [])
    node.config.stash.setdefault(_SUMMARY_LINES, []).extend(lines)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for line in config.stash.get(_SUMMARY_LINES, []):
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):  # in a worker: the order files are handed out in
        items.sort(key=lambda item: parallel.file_rank(item.path.name))


# The demo's upstream: names its release and echoes the headers it received.
echo_app = demo_upstream


class Upstream:
    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self.runner = runner
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


async def start_app(app: web.Application) -> Upstream:
    runner, port = await serve_app(app)
    return Upstream(runner, port)


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    """Factory: `await upstreams("gray")` or `await upstreams(app=custom_app)`."""
    started: list[Upstream] = []

    async def make(release: str = "stable", app: web.Application | None = None) -> Upstream:
        u = await start_app(app if app is not None else echo_app(release))
        started.append(u)
        return u

    yield make
    for u in started:
        await u.runner.cleanup()


def gateway_config(services: dict[str, Any], **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token_env": None},
        "state": {"store": "memory"},
        "drain_timeout": "5s",
        "services": services,
    }
    doc.update(top)
    return doc


def gateway_check(cfg: Path) -> subprocess.CompletedProcess[str]:
    """`gateway check --no-bind CFG` as an operator runs it: its own process, its output kept."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--no-bind", str(cfg)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
    )


def two_releases(
    stable_url: str, gray_url: str, stable: float = 95, gray: float = 5
) -> dict[str, Any]:
    return {
        "svc": {
            "releases": {
                "stable": {"weight": stable, "upstreams": [stable_url]},
                "gray": {"weight": gray, "upstreams": [gray_url]},
            }
        }
    }


@pytest.fixture
async def gateway() -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """Factory: `await gateway(config_dict)` -> a started in-process Gateway."""
    started: list[Gateway] = []

    async def make(doc: dict[str, Any], **kw: Any) -> Gateway:
        cfg = C.build(doc, env={})
        gw = Gateway(cfg, **kw)
        await gw.start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        await gw.stop(1.0)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


# --------------------------------------------------------------------------- subprocess gateway


class GatewayProcess:
    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, admin_port: int, log: Path
    ) -> None:
        self.proc = proc
        self.port = port
        self.admin_port = admin_port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        self.admin = f"http://127.0.0.1:{admin_port}"

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def write_config(tmp: Path, doc: dict[str, Any]) -> Path:
    p = tmp / "gateway.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


# Readiness deadline for a gateway process: generous, as another test worker may be compiling
# on the other core (a `--workers 2` gateway took over 20 s to listen on a loaded 2-core box).
READY_S = 60.0


def wait_http(
    url: str, deadline_s: float = READY_S, proc: subprocess.Popen[bytes] | None = None
) -> None:
    import urllib.request

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


@contextlib.contextmanager
def run_gateway_process(
    tmp: Path,
    doc: dict[str, Any],
    *,
    workers: int = 1,
    env: dict[str, str] | None = None,
    ready_s: float = READY_S,
) -> Iterator[GatewayProcess]:
    port, admin_port = free_port(), free_port()
    doc = dict(doc)
    doc["listen"] = f"127.0.0.1:{port}"
    doc["admin"] = {**doc.get("admin", {}), "listen": f"127.0.0.1:{admin_port}"}
    doc["admin"].setdefault("token_env", None)
    cfg = write_config(tmp, doc)
    log = tmp / "gateway.log"
    e = dict(os.environ)
    e.update(env or {})
    with log.open("wb") as lf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(cfg), "--workers", str(workers)],
            stdout=lf,
            stderr=subprocess.STDOUT,
            env=e,
            cwd=tmp,
        )
    gp = GatewayProcess(proc, port, admin_port, log)
    try:
        wait_http(f"{gp.url}/healthz", ready_s, proc=proc)
        wait_http(f"{gp.admin}/healthz", ready_s, proc=proc)
        yield gp
    except BaseException:
        print(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        gp.stop()


async def fetch_release(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> str:
    async with session.get(url, headers=headers) as r:
        assert r.status == 200, await r.text()
        return r.headers["X-Release-Stage"]


async def gather_limited(coros: list[Awaitable[Any]], limit: int = 64) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[Any]) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    """The fast engine's test bench (tests/engine_helpers.py), closed after the test."""
    e = Env()
    yield e
    await e.aclose()


@pytest.fixture(params=["fast", "aiohttp"])
def engine(request: pytest.FixtureRequest) -> str:
    """Each end-to-end test that takes `engine` runs on both forwarding engines."""
    name: str = request.param
    if name == "fast":
        pytest.importorskip("gateway.engine.fast")
    return name
