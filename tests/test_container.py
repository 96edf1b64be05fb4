"""The Dockerfile, built and run for real with podman (README "Container").

No image registry is reachable here, so the Dockerfile's base images (build arguments
BUILD_IMAGE and RUN_IMAGE) are local stand-ins: Debian minbase root file systems made
with debootstrap from the host's own apt mirror and imported with `podman import`. They
are kept as `localhost/gray-gateway-standin-*` images (the tag names the recipe) and
reused by later runs; the gateway image and its container are named per run and
removed at the end. The container runs on podman's bridge network: the test's aiohttp
upstreams listen on the bridge's host address, the gateway listens on 8080 inside the
container as the image's HEALTHCHECK expects, and the test talks to the container's
address. Every podman call has a timeout. Where podman cannot run the tests skip with
the reason; under CI=true they fail (tests/programs.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import os
import re
import resource
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml
from aiohttp import web

from tests.conftest import summary_line
from tests.programs import in_ci, need

ROOT = Path(__file__).resolve().parent.parent
VERSION = "container-test-" + uuid.uuid4().hex[:8]
RUN_ID = uuid.uuid4().hex[:8]
IMAGE = f"localhost/gray-gateway-test:{RUN_ID}"
CONTAINER = f"gray-gateway-test-{RUN_ID}"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # pip inside the build trusts the host's
RUN_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
# The builder compiles the per-request modules with mypyc (setup.py COMPILED); its stand-in
# is the run stand-in plus these, installed by apt in a container and committed.
BUILD_PACKAGES = ("build-essential", "python3-dev")
# Trimmed from a stand-in's root before import: nothing in a build or a run reads them.
TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "var/cache/apt/archives",
    "var/lib/apt/lists",
)
DRAIN_TIMEOUT = 20  # the container config's drain_timeout, seconds

# Cold (no cached stand-ins) on a busy 2-core box the first test waits ~14 min for the fixture.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _ulimits() -> list[str]:
    """Explicit limits no higher than the host's hard ones: runc cannot raise them here."""
    out = []
    for flag, which, cap in (
        ("nofile", resource.RLIMIT_NOFILE, 65536),
        ("nproc", resource.RLIMIT_NPROC, 4096),
    ):
        hard = resource.getrlimit(which)[1]
        n = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
        out += ["--ulimit", f"{flag}={n}:{n}"]
    return out


@dataclass
class Podman:
    """`podman --runtime runc`, every call bounded, with the time spent per phase."""

    exe: str
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [self.exe, "--runtime", "runc", *args]
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv[:6])} ...: exit {done.returncode}\n"
                f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        return done

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - start


def _unavailable(message: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{message}; CI=true: .ci/run installs podman, runc and debootstrap")
    pytest.skip(message)


def _apt_source() -> tuple[str, str]:
    """(mirror URL, suite) of the host's Debian: debootstrap fetches from where apt does."""
    release = Path("/etc/os-release")
    codename = None
    if release.exists():
        m = re.search(r"^VERSION_CODENAME=\"?(\w+)", release.read_text(), re.M)
        codename = m.group(1) if m else None
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for stanza in path.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(\S+)", stanza, re.M)
            if uris and suites and "security" not in uris.group(1):
                return uris.group(1), codename or suites.group(1)
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\w+)\s", sources.read_text(), re.M)
        if m and "security" not in m.group(1):
            return m.group(1), codename or m.group(2)
    _unavailable("no Debian apt source on this host to debootstrap the stand-in images from")


def _standin_tags(suite: str) -> dict[str, str]:
    """Tags that name their recipe, so a changed recipe makes new stand-ins."""
    run = hashlib.sha256(json.dumps([suite, RUN_PACKAGES, TRIM]).encode()).hexdigest()[:10]
    build = hashlib.sha256(json.dumps([run, BUILD_PACKAGES]).encode()).hexdigest()[:10]
    prefix = "localhost/gray-gateway-standin"
    return {"run": f"{prefix}-run:{suite}-{run}", "build": f"{prefix}-build:{suite}-{build}"}


def _debootstrap(exe: str, mirror: str, suite: str, target: Path) -> None:
    argv = [
        exe,
        "--variant=minbase",
        f"--include={','.join(RUN_PACKAGES)}",
        suite,
        str(target),
        mirror,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        log = target / "debootstrap" / "debootstrap.log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise AssertionError(
            f"debootstrap: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}{tail}"
        )
    for rel in TRIM:
        shutil.rmtree(target / rel, ignore_errors=True)


def _standins(podman: Podman, tmp: Path) -> dict[str, str]:
    """The stand-in images' tags, made where the cache lacks them."""
    mirror, suite = _apt_source()
    tags = _standin_tags(suite)
    if podman("image", "exists", tags["run"], check=False).returncode != 0:
        debootstrap = need("debootstrap", "makes the Debian stand-ins for the python:3.12 images")
        with podman.phase("debootstrap run stand-in"):
            _debootstrap(debootstrap, mirror, suite, tmp / "run")
        with podman.phase("import run stand-in"):
            archive = tmp / "run.tar"
            subprocess.run(
                ["tar", "-C", str(tmp / "run"), "-cf", str(archive), "."], check=True, timeout=300
            )
            shutil.rmtree(tmp / "run")
            podman(
                "import",
                "--change",
                "ENV PIP_BREAK_SYSTEM_PACKAGES=1",
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                str(archive),
                tags["run"],
                timeout=300,
            )
            archive.unlink()
    if podman("image", "exists", tags["build"], check=False).returncode != 0:
        name = f"gray-gateway-standin-{RUN_ID}"
        trim = " ".join(f"/{rel}" for rel in TRIM)
        script = (
            "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            f"--no-install-recommends {' '.join(BUILD_PACKAGES)} && rm -rf {trim}"
        )
        with podman.phase("build stand-in (apt in a container)"):
            try:
                podman(
                    "run",
                    "--name",
                    name,
                    "--network",
                    "host",
                    *_ulimits(),
                    tags["run"],
                    "sh",
                    "-c",
                    script,
                    timeout=600,
                )
                podman("commit", "--change", 'CMD ["/bin/sh"]', name, tags["build"], timeout=300)
            finally:
                podman("rm", "--force", name, check=False, timeout=60)
    return tags


class Upstreams:
    """Two aiohttp upstreams (stable, gray) on one loop thread, bound to `host`."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.ports: dict[str, int] = {}
        self.slow_arrived = threading.Event()
        self.loop = asyncio.new_event_loop()
        self._release = asyncio.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _app(self, release: str) -> web.Application:
        async def hello(request: web.Request) -> web.Response:
            return web.json_response({"release": release})

        async def slow(request: web.Request) -> web.Response:
            self.slow_arrived.set()
            await self._release.wait()
            return web.json_response({"release": release, "slow": True})

        app = web.Application()
        app.router.add_get("/slow", slow)
        app.router.add_get("/{tail:.*}", hello)
        return app

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        runners = []
        try:
            for release in ("stable", "gray"):
                runner = web.AppRunner(self._app(release), access_log=None)
                self.loop.run_until_complete(runner.setup())
                site = web.TCPSite(runner, self.host, 0)
                self.loop.run_until_complete(site.start())
                server = site._server
                assert server is not None and server.sockets
                self.ports[release] = server.sockets[0].getsockname()[1]
                runners.append(runner)
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        for runner in runners:
            self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def release_slow(self) -> None:
        self.loop.call_soon_threadsafe(self._release.set)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._release.set)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)


@dataclass
class Running:
    podman: Podman
    address: str  # the container's address on the bridge
    upstreams: Upstreams

    def get(
        self, path: str, headers: dict[str, str] | None = None, timeout: float = 30
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.address, 8080, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()


def _poll(what: str, check: Callable[[], bool], deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {deadline:.0f}s: {what}")


def _answers(run: Running) -> bool:
    try:
        return run.get("/healthz", timeout=2)[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    exe = need("podman", "builds and runs the Dockerfile")
    need("runc", "the OCI runtime podman uses here")
    if os.geteuid() != 0:
        _unavailable("podman's bridge network and debootstrap need root here")
    podman = Podman(exe)
    tmp = tmp_path_factory.mktemp("container")
    started = time.monotonic()
    upstreams: Upstreams | None = None
    try:
        tags = _standins(podman, tmp)
        with podman.phase("first container (bridge up)"):
            probe = podman("run", "--rm", *_ulimits(), tags["run"], "true", check=False)
            if probe.returncode != 0:
                _unavailable(f"podman cannot run a container here: {probe.stderr.strip()[-500:]}")
        gateway_ip = _bridge_gateway(podman)
        upstreams = Upstreams(gateway_ip)
        upstreams.start()
        build = [
            "build",
            "--format",
            "docker",
            "--layers=false",
            "--network",
            "host",
            *_ulimits(),
            "-v",
            f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
            "--build-arg",
            f"BUILD_IMAGE={tags['build']}",
            "--build-arg",
            f"RUN_IMAGE={tags['run']}",
            "--build-arg",
            f"VERSION={VERSION}",
            "-t",
            IMAGE,
            str(ROOT),
        ]
        if not CA_BUNDLE.exists():
            build.remove("-v")
            build.remove(f"{CA_BUNDLE}:{CA_BUNDLE}:ro")
        with podman.phase("podman build"):
            podman(*build, timeout=900)
        config = tmp / "gateway.yaml"
        config.write_text(yaml.safe_dump(_config(gateway_ip, upstreams.ports)))
        config.chmod(0o644)
        with podman.phase("start until /healthz"):
            podman(
                "run",
                "-d",
                "--name",
                CONTAINER,
                *_ulimits(),
                "-v",
                f"{config}:/etc/gateway/gateway.yaml:ro",
                IMAGE,
            )
            address = podman(
                "inspect", "--format", "{{.NetworkSettings.IPAddress}}", CONTAINER
            ).stdout.strip()
            run = Running(podman, address, upstreams)
            _poll("the container answers /healthz", lambda: _answers(run))
        yield run
    finally:
        podman("rm", "--force", "--time", "5", CONTAINER, check=False, timeout=60)
        podman("rmi", "--force", IMAGE, check=False, timeout=120)
        if upstreams is not None:
            upstreams.stop()
        total = time.monotonic() - started
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in podman.timings.items())
        summary_line(request.config, f"tests/test_container.py: wall time {total:.1f}s ({parts})")


def _bridge_gateway(podman: Podman) -> str:
    """The host's address on podman's default bridge: what a container reaches the host at."""
    info = json.loads(podman("network", "inspect", "podman").stdout)
    subnets = info[0].get("subnets") or []
    if not subnets or not subnets[0].get("gateway"):
        _unavailable("podman's default network has no bridge gateway address")
    return str(subnets[0]["gateway"])


def _config(host: str, ports: dict[str, int]) -> dict[str, Any]:
    return {
        "listen": "0.0.0.0:8080",  # the image's EXPOSE and HEALTHCHECK port
        "admin": {"listen": "127.0.0.1:9901"},
        "drain_timeout": f"{DRAIN_TIMEOUT}s",
        "services": {
            "user-api": {
                "match": {"path_prefix": "/"},
                "releases": {
                    r: {"weight": 50, "upstreams": [f"http://{host}:{ports[r]}"]}
                    for r in ("stable", "gray")
                },
            }
        },
    }


def test_healthz_reports_the_build_arg_version(running: Running) -> None:
    status, headers, body = running.get("/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert headers["X-App-Version"] == VERSION


def test_the_gateway_runs_as_a_non_root_user(running: Running) -> None:
    uid = running.podman("exec", CONTAINER, "id", "-u").stdout.strip()
    assert uid == "10001"
    # PID 1 is the gateway itself (exec-form ENTRYPOINT), so it gets podman stop's SIGTERM.
    status = running.podman("exec", CONTAINER, "cat", "/proc/1/status").stdout
    assert re.search(r"^Uid:\s+10001\s", status, re.M), status
    assert "gateway" in running.podman("exec", CONTAINER, "cat", "/proc/1/cmdline").stdout


def test_the_compiled_build_serves(running: Running) -> None:
    version = running.podman("exec", CONTAINER, "gateway", "--version").stdout
    assert version.strip() == f"gateway {VERSION} (compiled build: mypyc)"
    logs = running.podman("logs", CONTAINER)
    assert "compiled build: mypyc" in logs.stdout + logs.stderr


def test_a_split_through_the_container_reaches_both_releases(running: Running) -> None:
    seen: dict[str, str] = {}
    for i in range(200):
        status, _, body = running.get("/users", headers={"X-User-ID": f"user-{i}"})
        assert status == 200, body
        seen.setdefault(json.loads(body)["release"], f"user-{i}")
        if len(seen) == 2:
            break
    assert set(seen) == {"stable", "gray"}
    for release, user in seen.items():  # sticky: the same user, the same release
        _, _, body = running.get("/users", headers={"X-User-ID": user})
        assert json.loads(body)["release"] == release


def test_the_healthcheck_command_passes(running: Running) -> None:
    inspect = running.podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}", IMAGE)
    check = json.loads(inspect.stdout)
    assert check and check["Test"][0] == "CMD-SHELL" and "/healthz" in check["Test"][1]
    done = running.podman("healthcheck", "run", CONTAINER, check=False, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unhealthy" not in done.stdout


def test_podman_stop_drains_in_flight_requests_and_exits_0(running: Running) -> None:
    """Runs last in this file: it stops the container."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(running.get, "/slow", {"X-User-ID": "drain"}, 90)
        assert running.upstreams.slow_arrived.wait(60), "the slow request never reached an upstream"
        stop = pool.submit(
            running.podman,
            "stop",
            "--time",
            str(DRAIN_TIMEOUT + 30),
            CONTAINER,
            timeout=DRAIN_TIMEOUT + 60,
        )

        def draining() -> bool:
            logs = running.podman("logs", CONTAINER, check=False)
            return "draining (up to" in logs.stdout + logs.stderr

        _poll("the gateway logs that it drains", draining)
        running.upstreams.release_slow()
        status, _, body = slow.result(timeout=60)
        assert status == 200 and json.loads(body)["slow"] is True
        stop.result(timeout=DRAIN_TIMEOUT + 60)
    state = running.podman(
        "inspect", "--format", "{{.State.ExitCode}} {{.State.Status}}", CONTAINER
    ).stdout.split()
    assert state == ["0", "exited"]
