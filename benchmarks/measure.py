"""One measured run: load a target with a probe and read the servers' CPU around it."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks import load
from benchmarks.idle import measure_idle
from benchmarks.procs import CpuTimes, http_get, pinned
from benchmarks.scenarios import Probe, Scenario
from benchmarks.servers import CpuLayout, Fleet, Server

Record = dict[str, Any]


class Runner:
    """Runs probes against the fleet's servers; every tool call has a deadline."""

    def __init__(
        self,
        fleet: Fleet,
        tools: Mapping[str, str | None],
        layout: CpuLayout,
        workdir: Path,
    ) -> None:
        self.fleet = fleet
        self.tools = tools
        self.layout = layout
        self.workdir = workdir
        self.script = workdir / "random-user.lua"
        self.script.write_text(load.wrk_script())
        self._last_metrics: dict[int, dict[str, float] | None] = {}

    def server(self, scenario: Scenario, target: str) -> Server:
        if scenario.tls:
            from benchmarks import tlsbench

            if target == "nginx":
                return tlsbench.nginx_ref(self.fleet, scenario.workers)
            if target == "gateway":
                return tlsbench.gateway(self.fleet, scenario.workers, scenario.tracing)
            raise RuntimeError(f"{target} has no TLS configuration in this benchmark")
        if target == "direct":
            return self.fleet.direct()
        if target == "nginx":
            return self.fleet.nginx_ref(scenario.workers, fresh=scenario.fresh)
        if target == "haproxy":
            return self.fleet.haproxy_ref(scenario.workers, fresh=scenario.fresh)
        return self.fleet.gateway(
            scenario.workers,
            scenario.tracing,
            fresh=scenario.fresh,
            rollout=scenario.rollout,
            segments=scenario.segments,
        )

    def _tool_argv(self, probe: Probe, url: str, duration_s: float) -> list[str]:
        if probe.kind == "hey":
            return load.hey_argv(str(self.tools["hey"]), url, duration_s=duration_s)
        conns = 1 if probe.kind == "c1" else probe.conns
        script = self._paced_script(conns) if probe.kind == "paced" else self.script
        return load.wrk_argv(
            str(self.tools["wrk"]), url, conns=conns, duration_s=duration_s, script=str(script)
        )

    def _paced_script(self, conns: int) -> Path:
        """The script that spreads PACED_RATE over this probe's connections."""
        path = self.workdir / f"random-user-paced-c{conns}.lua"
        if not path.exists():
            path.write_text(load.wrk_script(rate=load.PACED_RATE, conns=conns))
        return path

    def _drive(self, probe: Probe, server: Server, duration_s: float) -> tuple[str, int]:
        url = f"{server.scheme}://127.0.0.1:{server.port}{probe.path}"
        argv = pinned(self._tool_argv(probe, url, duration_s), self.layout.clients)
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + 30, cwd=self.workdir
        )
        return proc.stdout + proc.stderr, proc.returncode

    def warm_up(self, probe: Probe, server: Server, seconds: float = 1.0) -> None:
        """Fill pools and caches before anything is measured; then take the metrics baseline."""
        if self.tools.get("wrk"):
            warm = Probe("wrk", min(max(probe.conns, 1), 100), probe.path)
            self._drive(warm, server, seconds)
        else:
            for _ in range(200):
                http_get(server.port, probe.path, headers={"X-User-ID": "warm"})
        self._last_metrics[id(server)] = self.fleet.scrape_requests(server)

    def run(self, scenario: Scenario, probe: Probe, server: Server, duration_s: float) -> Record:
        """Measure once; returns the raw record (``ok`` False with ``error`` on failure)."""
        rec: Record = {"ok": True, "error": None}
        if probe.kind == "idle":
            idle = measure_idle(server.proc, server.port, count=probe.conns, log_dir=self.workdir)
            rec.update(
                conns=idle.conns,
                failed=idle.failed,
                open_s=idle.open_s,
                rss_before_kib=idle.rss_before_kib,
                rss_after_kib=idle.rss_after_kib,
                kib_per_conn=idle.kib_per_conn,
            )
            if idle.failed:
                rec["error"] = f"{idle.failed} of {probe.conns} connections failed"
            return rec

        forwarder = server.label != "direct"
        ups = self.fleet.upstreams()
        fwd0 = server.proc.cpu() if forwarder else None
        ups0 = sum((s.proc.cpu() for s in ups.values()), CpuTimes())
        counts0 = self.fleet.upstream_counts()
        output, code = self._drive(probe, server, duration_s)
        fwd1 = server.proc.cpu() if forwarder else None
        ups1 = sum((s.proc.cpu() for s in ups.values()), CpuTimes())
        counts1 = self.fleet.upstream_counts()
        rec["raw_output"] = output[-4000:]
        try:
            result = (load.parse_hey if probe.kind == "hey" else load.parse_wrk)(output)
        except load.ParseError as exc:
            return {**rec, "ok": False, "error": f"{probe.tool} exit {code}: {exc}"}
        rec.update(result.as_dict())
        n = result.requests or 1
        if fwd0 is not None and fwd1 is not None:
            d = fwd1 - fwd0
            rec.update(
                cpu_fwd_user_s=d.user,
                cpu_fwd_sys_s=d.sys,
                cpu_fwd_us_per_req=d.total * 1e6 / n,
            )
        d_ups = ups1 - ups0
        rec.update(cpu_ups_us_per_req=d_ups.total * 1e6 / n)
        if counts0 and counts1:
            delta = {k: counts1[k] - counts0[k] for k in counts1}
            total = sum(delta.values())
            rec["upstream_requests"] = delta
            rec["gray_share_upstream"] = delta.get("gray", 0) / total if total else None
        if server.admin_port is not None:
            rec.update(self._metrics_delta(server, result.requests))
        if result.errors:
            rec["error"] = f"{result.errors} failed requests of {result.requests}"
        rate = {"hey": load.HEY_RATE, "paced": load.PACED_RATE}.get(probe.kind)
        if rate is not None and result.rps < 0.9 * rate:
            rec["warning"] = (
                f"reached {result.rps:,.0f} of {rate:,} req/s: saturated, "
                "so its latency is not the latency at that rate"
            )
        if result.requests == 0 or result.errors > 0.01 * result.requests:
            # Fast failures (502s, resets) would pass for throughput: not a valid run.
            rec["ok"] = False
            rec["error"] = rec["error"] or "no request completed"
        return rec

    def _metrics_delta(self, server: Server, client_requests: int) -> Record:
        """The gateway's counters once per run: did they move, and what share went gray.

        Names: README "Tracing & metrics".
        """
        before = self._last_metrics.get(id(server))
        after = self.fleet.scrape_requests(server)
        self._last_metrics[id(server)] = after
        if after is None:
            return {"metrics_error": "could not read http_requests_total from /metrics"}
        delta = {k: v - (before or {}).get(k, 0.0) for k, v in after.items()}
        total = sum(delta.values())
        out: Record = {"metrics_requests": delta}
        out["gray_share_metrics"] = delta.get("gray", 0.0) / total if total else None
        if total < 0.5 * client_requests:
            out["metrics_error"] = (
                f"http_requests_total moved by {total:.0f}, the client counted {client_requests}"
            )
        return out
