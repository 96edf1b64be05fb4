"""The servers under test: the upstream pair, the nginx and HAProxy references, the gateway.

Each is started once per configuration and kept for the whole run (idle ones
cost nothing), except where a scenario asks for a fresh one (idle RSS).
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import resource
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks import haproxyconf, nginxconf
from benchmarks.procs import Proc, ProcessSet, free_port, http_get, pinned, wait_http
from benchmarks.tools import nginx_has_stub_status

REPO = Path(__file__).resolve().parents[1]
WEIGHTS: dict[str, float] = {"stable": 95, "gray": 5}

# The `rollout_on` scenario: analysis configured and a rollout running, to show the
# data path pays nothing for them. The Prometheus address is a free port nobody
# listens on, so every evaluation is inconclusive (refused at once) and the runner
# still stores its result in the state document every second; inconclusive_limit
# is high enough that the rollout never pauses during a run. The plan holds gray at
# 5 % (`pause: null` waits for promote), the split of every other scenario.
ROLLOUT_CONFIG: dict[str, Any] = {
    "rollout": {"min_first_pause": "0s", "min_pause": "0s"},
    "analysis": {
        "prometheus": {"address": "", "timeout": "1s"},
        "metrics": [
            {
                "name": "kpi",
                "query": 'sum(rate(http_requests_total{release="{{release}}"}[1m]))',
                "min": 0,
                "interval": "1s",
                "initial_delay": "0s",
                "inconclusive_limit": 1000,
                "min_requests": 0,
            }
        ],
    },
}
ROLLOUT_PLAN = {"release": "gray", "steps": [{"weight": WEIGHTS["gray"], "pause": None}]}
SERVICE = "bench"

# README "Tracing & metrics": the gateway reads the standard OTEL_* variables.
TRACING_ENV: dict[str, dict[str, str]] = {
    "off": {"OTEL_TRACES_EXPORTER": "none", "OTEL_SDK_DISABLED": "true"},
    "prop": {"OTEL_TRACES_SAMPLER": "always_off", "OTEL_TRACES_EXPORTER": "none"},
    # Every request sampled and exported over OTLP/HTTP to a local sink that only
    # answers 200: the gateway pays for spans, batching and encoding, as in production.
    "sampled": {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_TRACES_EXPORTER": "otlp"},
}
_SINK: list[int] = []


def otlp_sink_port() -> int:
    """Start (once) a thread HTTP server that accepts OTLP/HTTP exports and drops them."""
    if not _SINK:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Sink(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        _SINK.append(int(srv.server_address[1]))
    return _SINK[0]


@dataclass
class Server:
    """A running target: where to send load and which process group does the work."""

    label: str
    port: int
    proc: Proc
    admin_port: int | None = None
    scheme: str = "http"  # https: the TLS scenario (benchmarks/tlsbench.py)


@dataclass(frozen=True)
class CpuLayout:
    """taskset CPU lists for ``--pin``: the forwarder on one core, the rest on the other."""

    forwarder: str | None = None
    forwarder_multi: str | None = None
    clients: str | None = None

    @classmethod
    def for_machine(cls, pin: bool) -> CpuLayout:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2 or shutil.which("taskset") is None:
            return cls()
        return cls(str(cpus[0]), ",".join(map(str, cpus)), ",".join(map(str, cpus[1:])))

    def for_workers(self, workers: int) -> str | None:
        return self.forwarder if workers <= 1 else self.forwarder_multi


def gateway_config(
    *,
    port: int,
    admin_port: int,
    state_path: Path,
    upstreams: Mapping[str, int],
    weights: Mapping[str, float] = WEIGHTS,
    workers: int = 1,
    rollout: bool = False,
    segments_file: Path | None = None,
) -> str:
    """The benchmark's gateway config: one service, every Host, a weighted pair.

    Shape: README "Config walkthrough".
    """
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "workers": workers,
        "state": {"store": "file", "path": str(state_path)},
        "services": {
            SERVICE: {
                "releases": {
                    name: {"weight": weights[name], "upstreams": [f"http://127.0.0.1:{up}"]}
                    for name, up in upstreams.items()
                }
            }
        },
    }
    if segments_file is not None:
        from benchmarks.policy import segments_case

        svc: dict[str, Any] = config["services"][SERVICE]  # type: ignore[index]
        svc["segments"] = segments_case(segments_file, [])
    if rollout:
        extra = copy.deepcopy(ROLLOUT_CONFIG)
        extra["analysis"]["prometheus"]["address"] = f"http://127.0.0.1:{free_port()}"
        config.update(extra)
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def start_rollout(admin_port: int, timeout: float = 10.0) -> None:
    """POST the `rollout_on` plan; RuntimeError naming the answer when it is not accepted."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=timeout)
    try:
        body = json.dumps(ROLLOUT_PLAN)
        conn.request("POST", f"/admin/services/{SERVICE}/rollout", body=body)
        resp = conn.getresponse()
        answer = resp.read()
        if resp.status // 100 != 2:
            raise RuntimeError(f"rollout not started: {resp.status} {answer[:500]!r}")
        state = json.loads(answer).get("rollout", {}).get("state")
        if state != "Progressing":
            raise RuntimeError(f"rollout not Progressing after start: {answer[:500]!r}")
    finally:
        conn.close()


def gateway_env(
    tracing: str, base: Mapping[str, str] | None = None, pythonpath: Path | None = None
) -> dict[str, str]:
    """The environment minus anything that would redirect the gateway, plus the tracing mode.

    `pythonpath` puts a build of the package (benchmarks.build) ahead of the installed one.
    """
    env = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if not k.startswith("OTEL_") and k not in ("GATEWAY_CONFIG", "GATEWAY_ENV", "PYTHONPATH")
    }
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env.update(TRACING_ENV[tracing])
    if tracing == "sampled":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{otlp_sink_port()}"
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    return env


def gateway_argv(config: Path, workers: int, python: str | None = None) -> list[str]:
    """``python -m gateway run`` with `python`; by default this venv's ``bin/gateway run``."""
    if python is not None:
        return [python, "-m", "gateway", "run", "-c", str(config), "--workers", str(workers)]
    for script in (Path(sys.prefix) / "bin" / "gateway", REPO / ".venv" / "bin" / "gateway"):
        if script.is_file():
            return [str(script), "run", "-c", str(config), "--workers", str(workers)]
    return [sys.executable, "-m", "gateway", "run", "-c", str(config), "--workers", str(workers)]


_METRIC = re.compile(r"^http_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def requests_by_release(metrics_text: str, service: str = SERVICE) -> dict[str, float]:
    """Sum ``http_requests_total{service=...}`` over codes, per release.

    Names: README "Tracing & metrics".
    """
    out: dict[str, float] = {}
    for m in _METRIC.finditer(metrics_text):
        labels = dict(_LABEL.findall(m.group("labels")))
        if labels.get("service") == service and "release" in labels:
            out[labels["release"]] = out.get(labels["release"], 0.0) + float(m.group("value"))
    return out


def parse_stub_status(text: str) -> int:
    """The ``requests`` figure of nginx's stub_status page."""
    m = re.search(r"server accepts handled requests\s*\n\s*\d+\s+\d+\s+(\d+)", text)
    if not m:
        raise ValueError(f"not a stub_status page: {text[:200]!r}")
    return int(m.group(1))


class Fleet:
    """Starts and remembers the servers of one benchmark session."""

    def __init__(
        self,
        procs: ProcessSet,
        tmp: Path,
        tools: Mapping[str, str | None],
        layout: CpuLayout,
        *,
        builtin_upstream: bool = False,
        pythonpath: Path | None = None,
        python: str | None = None,
    ) -> None:
        self.procs = procs
        self.pythonpath = pythonpath
        self.python = python
        self.builtin_upstream = builtin_upstream or not tools.get("nginx")
        self.tmp = tmp
        self.nginx = tools.get("nginx")
        self.haproxy = tools.get("haproxy")
        self.layout = layout
        self.user = "root" if os.geteuid() == 0 else None
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._servers: dict[tuple[object, ...], Server] = {}
        self._stub_status = False
        self._nginx_stub = bool(self.nginx) and nginx_has_stub_status(str(self.nginx))

    # -- upstream pair -------------------------------------------------------
    def upstreams(self) -> dict[str, Server]:
        """``stable`` and ``gray`` fixed-body servers (nginx, else the built-in one)."""
        return {name: self._upstream(name) for name in WEIGHTS}

    def _upstream(self, release: str) -> Server:
        key: tuple[object, ...] = ("upstream", release)
        if key in self._servers:
            return self._servers[key]
        port = free_port()
        name = f"upstream-{release}"
        if self.nginx and not self.builtin_upstream:
            prefix = self.tmp / name
            www = self.tmp / "www"
            nginxconf.write_bodies(www)
            self._stub_status = self._nginx_stub
            conf = nginxconf.upstream_conf(
                prefix, port, www, user=self.user, stub_status=self._stub_status, nofile=self.nofile
            )
            nginxconf.prepare_prefix(prefix, conf)
            argv = nginxconf.nginx_argv(self.nginx, prefix)
        else:
            self._stub_status = True
            argv = [sys.executable, "-m", "benchmarks.upstream", "--port", str(port)]
        proc = self.procs.start(name, pinned(argv, self.layout.clients), cwd=REPO)
        wait_http(port, "/1k", proc=proc, deadline_s=10)
        server = Server(name, port, proc)
        self._servers[key] = server
        return server

    def upstream_counts(self) -> dict[str, int] | None:
        """Requests served so far per release, from each upstream's stub_status."""
        if not self._stub_status:
            return None
        counts = {}
        for name, server in self.upstreams().items():
            _, text = http_get(server.port, nginxconf.STATUS_PATH)
            counts[name] = parse_stub_status(text.decode())
        return counts

    # -- forwarders ------------------------------------------------------------
    def nginx_ref(self, workers: int = 1, *, fresh: bool = False) -> Server:
        key: tuple[object, ...] = ("nginx", workers)
        if key in self._servers and not fresh:
            return self._servers[key]
        if not self.nginx:
            raise RuntimeError("nginx is not installed")
        ups = {name: s.port for name, s in self.upstreams().items()}
        port = free_port()
        name = f"nginx-ref-w{workers}" + ("-fresh" if fresh else "")
        prefix = self.tmp / name
        conf = nginxconf.reference_conf(
            prefix, port, ups, WEIGHTS, workers=workers, user=self.user, nofile=self.nofile
        )
        nginxconf.prepare_prefix(prefix, conf)
        argv = pinned(nginxconf.nginx_argv(self.nginx, prefix), self.layout.for_workers(workers))
        proc = self.procs.start(name, argv, cwd=prefix)
        wait_http(port, "/1k", proc=proc, deadline_s=10)
        server = Server("nginx", port, proc)
        if not fresh:
            self._servers[key] = server
        return server

    def haproxy_ref(self, workers: int = 1, *, fresh: bool = False) -> Server:
        """HAProxy doing the same split (benchmarks.haproxyconf), one thread per nginx worker."""
        key: tuple[object, ...] = ("haproxy", workers)
        if key in self._servers and not fresh:
            return self._servers[key]
        if not self.haproxy:
            raise RuntimeError("haproxy is not installed")
        ups = {name: s.port for name, s in self.upstreams().items()}
        port = free_port()
        name = f"haproxy-ref-w{workers}" + ("-fresh" if fresh else "")
        prefix = self.tmp / name
        conf = haproxyconf.reference_conf(
            prefix, port, ups, WEIGHTS, threads=workers, nofile=self.nofile
        )
        haproxyconf.prepare_prefix(prefix, conf)
        argv = haproxyconf.haproxy_argv(self.haproxy, prefix)
        proc = self.procs.start(name, pinned(argv, self.layout.for_workers(workers)), cwd=prefix)
        wait_http(port, "/1k", proc=proc, deadline_s=10)
        server = Server("haproxy", port, proc)
        if not fresh:
            self._servers[key] = server
        return server

    def gateway(
        self,
        workers: int = 1,
        tracing: str = "prop",
        *,
        fresh: bool = False,
        rollout: bool = False,
        segments: bool = False,
    ) -> Server:
        key: tuple[object, ...] = ("gateway", workers, tracing, rollout, segments)
        if key in self._servers and not fresh:
            return self._servers[key]
        ups = {name: s.port for name, s in self.upstreams().items()}
        port, admin_port = free_port(), free_port()
        name = f"gateway-w{workers}-{tracing}" + ("-rollout" if rollout else "")
        name += "-segments" if segments else ""
        name += "-fresh" if fresh else ""
        workdir = self.tmp / name
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "gateway.yaml"
        config.write_text(
            gateway_config(
                port=port,
                admin_port=admin_port,
                state_path=workdir / "state.json",
                upstreams=ups,
                workers=workers,
                rollout=rollout,
                segments_file=workdir / "beta-users.txt" if segments else None,
            )
        )
        argv = pinned(gateway_argv(config, workers, self.python), self.layout.for_workers(workers))
        proc = self.procs.start(
            name, argv, env=gateway_env(tracing, pythonpath=self.pythonpath), cwd=workdir
        )
        try:
            wait_http(port, "/healthz", proc=proc, deadline_s=20)
            if rollout:
                start_rollout(admin_port)
        except BaseException:
            self.procs.stop(proc)
            raise
        server = Server("gateway", port, proc, admin_port)
        if not fresh:
            self._servers[key] = server
        return server

    def direct(self) -> Server:
        stable = self._upstream("stable")
        return Server("direct", stable.port, stable.proc)

    def scrape_requests(self, server: Server) -> dict[str, float] | None:
        """The gateway's request counters per release, or None when unreadable."""
        if server.admin_port is None:
            return None
        try:
            status, text = http_get(server.admin_port, "/metrics", timeout=5)
        except OSError:
            return None
        return requests_by_release(text.decode()) if status == 200 else None

    def release(self, server: Server) -> None:
        """Stop a fresh (uncached) server."""
        self.procs.stop(server.proc)
