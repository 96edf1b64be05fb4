"""The benchmark harness: its pure parts on canned text, its configs checked by nginx -t and
haproxy -c, and one short end-to-end run (direct, nginx, HAProxy, gateway)."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks import (
    build,
    haproxyconf,
    idle,
    load,
    measure,
    nginxconf,
    procs,
    report,
    run,
    scenarios,
    servers,
    tools,
)
from benchmarks.upstream import FixedResponder, Stats
from gateway import config as config_mod
from tests.programs import need

WRK_TEXT = """\
Running 3s test @ http://127.0.0.1:18080/1k
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   686.53us  242.44us   9.20ms   90.87%
    Req/Sec    73.22k     3.01k   77.57k    80.00%
  Latency Distribution
     50%  650.00us
     75%  729.00us
     90%  840.00us
     99%    1.56ms
  218561 requests in 3.00s, 254.54MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 12
Requests/sec:  72830.45
Transfer/sec:     84.82MB
"""

WRK_JSON_LINE = (
    'WRK_JSON {"requests": 218561, "duration_us": 3000000, "bytes": 1, "connect": 0, '
    '"read": 0, "write": 0, "status": 3, "timeout": 0, "p50_us": 651.0, "p90_us": 841.0, '
    '"p99_us": 1562.5, "max_us": 9200.0, "mean_us": 686.5}\n'
)

HEY_TEXT = """\

Summary:
  Total:\t3.0021 secs
  Slowest:\t0.0123 secs
  Fastest:\t0.0001 secs
  Average:\t0.0004 secs
  Requests/sec:\t4996.1234

  Total data:\t15360000 bytes
  Size/request:\t1024 bytes

Response time histogram:
  0.000 [1]\t|
  0.001 [14000]\t|■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■■

Latency distribution:
  10%% in 0.0002 secs
  50%% in 0.0003 secs
  90%% in 0.0005 secs
  99%% in 0.0011 secs

Status code distribution:
  [200]\t14980 responses
  [502]\t3 responses

Error distribution:
  [2]\tGet "http://127.0.0.1:18080/1k": dial tcp 127.0.0.1:18080: connect: refused
"""


def test_modules_import_and_scenarios_are_complete() -> None:
    expected = {"c50_1k", "c50_100k", "c1000_1k", "rate5k", "trace_off", "trace_prop"}
    expected |= {"trace_sampled", "workers2", "idle10k", "tls_c50_1k", "rollout_on", "segments_on"}
    assert set(scenarios.SCENARIOS) == expected
    assert set(scenarios.QUICK) <= expected
    assert all(callable(f) for f in (run.main, measure.Runner, idle.measure_idle))


def test_wrk_text_is_parsed() -> None:
    r = load.parse_wrk(WRK_TEXT)
    assert r.requests == 218561
    assert r.duration_s == pytest.approx(3.0)
    assert r.rps == pytest.approx(72830.45)
    assert (r.p50_ms, r.p90_ms, r.p99_ms) == pytest.approx((0.65, 0.84, 1.56))
    assert r.errors == 15


def test_wrk_json_line_wins_over_text() -> None:
    r = load.parse_wrk(WRK_TEXT + WRK_JSON_LINE)
    assert r.p99_ms == pytest.approx(1.5625)
    assert r.rps == pytest.approx(218561 / 3.0)
    assert r.errors == 3


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("650.00us", 0.00065), ("1.56ms", 0.00156), ("3.00s", 3.0), ("1.00m", 60.0)],
    ids=["us", "ms", "s", "m"],
)
def test_wrk_units(text: str, seconds: float) -> None:
    assert load._seconds(text) == pytest.approx(seconds)


def test_wrk_garbage_is_an_error_quoting_it() -> None:
    with pytest.raises(load.ParseError, match="unable to connect"):
        load.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_hey_text_is_parsed() -> None:
    r = load.parse_hey(HEY_TEXT)
    assert r.rps == pytest.approx(4996.1234)
    assert r.requests == 14983
    assert (r.p50_ms, r.p90_ms, r.p99_ms) == pytest.approx((0.3, 0.5, 1.1))
    assert r.errors == 5  # 3 × 502 + 2 dial errors


def test_wrk_script_sets_a_user_id_and_reports_json() -> None:
    script = load.wrk_script(pool=10)
    assert 'wrk.headers["X-User-ID"]' in script
    assert "for k = 1, 10 do" in script
    assert "i = i % n + 1" in script
    assert '"p99_us": %.1f' in script.replace('\\"', '"')
    argv = load.wrk_argv("wrk", "http://127.0.0.1:1/1k", conns=50, duration_s=3, script="s.lua")
    assert argv[:5] == ["wrk", "-t1", "-c50", "-d3s", "--latency"]
    hey = load.hey_argv("hey", "http://127.0.0.1:1/1k", duration_s=3)
    assert hey[:7] == ["hey", "-z", "3s", "-c", "20", "-q", "250"]
    assert "delay" not in script


def test_paced_script_spreads_the_rate_over_its_connections(tmp_path: Path) -> None:
    """100 connections at 5k/s: each waits an exponential gap of mean 20 ms (less a response)."""
    script = load.wrk_script(pool=10, rate=5000, conns=100)
    assert 'wrk.headers["X-User-ID"]' in script  # still random users
    assert "local mean_ms = 19.500" in script and "-math.log(1 - math.random()) * mean_ms" in script
    paced = scenarios.Probe("paced", 100)
    assert (paced.label, paced.tool, paced.metric) == ("wrk paced 5k/s", "wrk", "p99_ms")
    assert paced in scenarios.SCENARIOS["rate5k"].probes
    runner = measure.Runner(None, {"wrk": "wrk"}, servers.CpuLayout(), tmp_path)  # type: ignore[arg-type]
    argv = runner._tool_argv(scenarios.Probe("paced", 40), "http://127.0.0.1:1/1k", 3)
    assert "-c40" in argv  # the script's gap follows the probe's own connection count
    assert "local mean_ms = 7.500" in Path(argv[argv.index("-s") + 1]).read_text()


def test_reference_nginx_config(tmp_path: Path) -> None:
    conf = nginxconf.reference_conf(
        tmp_path, 18081, {"stable": 9001, "gray": 9002}, {"stable": 95, "gray": 5}
    )
    assert 'split_clients "${http_x_user_id}" $pool {' in conf
    assert "95% stable;" in conf and "* gray;" in conf
    assert conf.count("keepalive 64;") == 2
    assert "server 127.0.0.1:9001;" in conf and "server 127.0.0.1:9002;" in conf
    assert "proxy_pass http://$pool;" in conf
    assert "proxy_http_version 1.1;" in conf
    assert 'proxy_set_header Connection "";' in conf
    assert "worker_processes 1;" in conf and "access_log off;" in conf
    assert "listen 127.0.0.1:18081" in conf
    assert str(tmp_path / "tmp") in conf  # temp paths under its own prefix
    two = nginxconf.reference_conf(
        tmp_path, 1, {"stable": 1, "gray": 2}, {"stable": 1, "gray": 1}, workers=2
    )
    assert "worker_processes 2;" in two
    argv = nginxconf.nginx_argv("/usr/sbin/nginx", tmp_path)
    assert argv[-2:] == ["-g", "daemon off;"]


@pytest.mark.parametrize(
    ("weights", "lines"),
    [
        ({"stable": 95, "gray": 5}, ["95% stable;", "* gray;"]),
        ({"stable": 9, "gray": 1}, ["90% stable;", "* gray;"]),
        ({"a": 1, "b": 1, "c": 1}, ["33.33% a;", "33.33% b;", "* c;"]),
        ({"stable": 100, "gray": 0}, ["* stable;"]),
    ],
    ids=["95-5", "normalized", "three", "zero-dropped"],
)
def test_split_clients_percentages(weights: dict[str, float], lines: list[str]) -> None:
    block = nginxconf.split_clients_block(weights)
    body = [ln.strip() for ln in block.splitlines()[1:-1]]
    assert body == lines


def test_split_clients_rejects_no_positive_weight() -> None:
    with pytest.raises(ValueError, match="weights"):
        nginxconf.split_clients_block({"stable": 0, "gray": 0})


def test_generated_configs_pass_nginx_t(tmp_path: Path) -> None:
    nginx = need("nginx", "nginx -t checks the generated configs")
    www = tmp_path / "www"
    nginxconf.write_bodies(www)
    user = "root" if os.geteuid() == 0 else None
    for name, conf in {
        "up": nginxconf.upstream_conf(tmp_path / "up", 18090, www, user=user, nofile=1024),
        "ref": nginxconf.reference_conf(
            tmp_path / "ref", 18091, {"stable": 18090, "gray": 18092}, servers.WEIGHTS,
            user=user, nofile=1024,
        ),
    }.items():  # fmt: skip
        prefix = tmp_path / name
        nginxconf.prepare_prefix(prefix, conf)
        argv = nginxconf.nginx_argv(nginx, prefix)[:-2] + ["-t", "-q"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr


def test_reference_haproxy_config(tmp_path: Path) -> None:
    conf = haproxyconf.reference_conf(
        tmp_path, 18081, {"stable": 9001, "gray": 9002}, {"stable": 95, "gray": 5}
    )
    assert "http-request set-var(txn.bucket) req.hdr(x-user-id),xxh32,mod(10000)" in conf
    assert "use_backend gray if { var(txn.bucket) -m int ge 9500 }" in conf
    assert "default_backend stable" in conf  # no X-User-ID, no bucket: the first release
    assert conf.count("http-reuse always") == 2 and "option http-keep-alive" in conf
    assert "server stable1 127.0.0.1:9001" in conf and "server gray1 127.0.0.1:9002" in conf
    assert "nbthread 1" in conf and "bind 127.0.0.1:18081 backlog 4096" in conf
    assert not [ln for ln in conf.splitlines() if ln.split()[:1] == ["log"]]  # no logging
    two = haproxyconf.reference_conf(
        tmp_path, 1, {"stable": 1, "gray": 2}, servers.WEIGHTS, threads=2
    )
    assert "nbthread 2" in two
    argv = haproxyconf.haproxy_argv("/usr/sbin/haproxy", tmp_path)
    assert argv == ["/usr/sbin/haproxy", "-db", "-f", str(tmp_path / "haproxy.cfg")]


@pytest.mark.parametrize(
    ("weights", "starts"),
    [
        ({"stable": 95, "gray": 5}, [("stable", 0), ("gray", 9500)]),
        ({"stable": 9, "gray": 1}, [("stable", 0), ("gray", 9000)]),
        ({"a": 1, "b": 1, "c": 1}, [("a", 0), ("b", 3333), ("c", 6667)]),
        ({"stable": 100, "gray": 0}, [("stable", 0)]),
    ],
    ids=["95-5", "normalized", "three", "zero-dropped"],
)
def test_haproxy_bucket_ranges(weights: dict[str, float], starts: list[tuple[str, int]]) -> None:
    assert haproxyconf.bucket_starts(weights) == starts
    conf = haproxyconf.reference_conf(Path("/x"), 1, {n: 2 for n in weights}, weights)
    rules = [ln.split()[1] for ln in conf.splitlines() if ln.strip().startswith("use_backend")]
    assert rules == [name for name, _ in starts[1:]][::-1]  # highest range first


def test_haproxy_rejects_no_positive_weight() -> None:
    with pytest.raises(ValueError, match="weights"):
        haproxyconf.bucket_starts({"stable": 0, "gray": 0})


def test_generated_haproxy_config_passes_haproxy_c(tmp_path: Path) -> None:
    haproxy = need("haproxy", "haproxy -c checks the generated config")
    conf = haproxyconf.reference_conf(
        tmp_path, 18091, {"stable": 18090, "gray": 18092}, servers.WEIGHTS
    )
    haproxyconf.prepare_prefix(tmp_path, conf)
    argv = haproxyconf.haproxy_argv(haproxy, tmp_path)
    out = subprocess.run([*argv, "-c", "-q"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stdout + out.stderr


def test_gateway_config_matches_spec_shape(tmp_path: Path) -> None:
    text = servers.gateway_config(
        port=18080,
        admin_port=19901,
        state_path=tmp_path / "state.json",
        upstreams={"stable": 9001, "gray": 9002},
    )
    cfg = yaml.safe_load(text)
    assert cfg["listen"] == "127.0.0.1:18080"
    assert cfg["admin"] == {"listen": "127.0.0.1:19901"}
    assert cfg["state"] == {"store": "file", "path": str(tmp_path / "state.json")}
    releases = cfg["services"]["bench"]["releases"]
    assert releases["stable"] == {"weight": 95, "upstreams": ["http://127.0.0.1:9001"]}
    assert releases["gray"] == {"weight": 5, "upstreams": ["http://127.0.0.1:9002"]}


def test_rollout_on_config_is_a_valid_gateway_config_and_leaves_the_template_alone(
    tmp_path: Path,
) -> None:
    before = json.dumps(servers.ROLLOUT_CONFIG, sort_keys=True)
    texts = [
        servers.gateway_config(
            port=18080,
            admin_port=19901,
            state_path=tmp_path / "state.json",
            upstreams={"stable": 9001, "gray": 9002},
            rollout=True,
        )
        for _ in range(2)
    ]
    assert json.dumps(servers.ROLLOUT_CONFIG, sort_keys=True) == before
    path = tmp_path / "gateway.yaml"
    path.write_text(texts[0])
    cfg = config_mod.load(str(path))
    assert [m.name for m in cfg.analysis.metrics_for("bench")] == ["kpi"]
    assert cfg.rollout.min_first_pause == 0
    plan = servers.ROLLOUT_PLAN
    assert plan["steps"] == [{"weight": servers.WEIGHTS["gray"], "pause": None}]


def test_segments_on_config_carries_the_ten_segments_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        servers.gateway_config(
            port=18080,
            admin_port=19901,
            state_path=tmp_path / "state.json",
            upstreams={"stable": 9001, "gray": 9002},
            segments_file=tmp_path / "beta.txt",
        )
    )
    cfg = config_mod.load(str(path))
    names = [s["name"] for s in yaml.safe_load(path.read_text())["services"]["bench"]["segments"]]
    assert len(names) == 10 and "beta" in names
    assert cfg.services["bench"].segments is not None
    assert (tmp_path / "beta.txt").read_text().count("\n") == 1_000_000


@pytest.mark.parametrize(
    ("mode", "expect"),
    [
        ("off", {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "none"}),
        ("prop", {"OTEL_TRACES_SAMPLER": "always_off", "OTEL_TRACES_EXPORTER": "none"}),
    ],
    ids=["off", "prop"],
)
def test_tracing_env(mode: str, expect: dict[str, str]) -> None:
    base = {"PATH": "/bin", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "GATEWAY_ENV": "prod"}
    assert servers.gateway_env(mode, base) == {"PATH": "/bin", **expect}


def test_sampled_mode_exports_to_a_local_sink_that_accepts() -> None:
    import urllib.request

    env = servers.gateway_env("sampled", {"PATH": "/bin", "GATEWAY_ENV": "prod"})
    assert env["OTEL_TRACES_SAMPLER"] == "always_on" and env["OTEL_TRACES_EXPORTER"] == "otlp"
    endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint.startswith("http://127.0.0.1:") and "GATEWAY_ENV" not in env
    req = urllib.request.Request(f"{endpoint}/v1/traces", data=b"\x0a\x00", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


def test_metrics_and_stub_status_parsers() -> None:
    metrics = """\
# HELP http_requests_total Requests
# TYPE http_requests_total counter
http_requests_total{service="bench",release="stable",code="200"} 950.0
http_requests_total{service="bench",release="stable",code="502"} 2.0
http_requests_total{service="bench",release="gray",code="200"} 48.0
http_requests_total{service="other",release="gray",code="200"} 7.0
http_requests_created{service="bench",release="gray",code="200"} 1.7e9
"""
    assert servers.requests_by_release(metrics) == {"stable": 952.0, "gray": 48.0}
    stub = "Active connections: 2 \nserver accepts handled requests\n 7 7 1234 \nReading: 0 \n"
    assert servers.parse_stub_status(stub) == 1234
    assert (
        servers.parse_stub_status(Stats(accepts=3, active=1, requests=9).stub_status().decode())
        == 9
    )


class _FakeTransport:
    def __init__(self) -> None:
        self.out = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True


def test_builtin_upstream_answers_pipelined_requests_fed_in_pieces() -> None:
    stats = Stats()
    proto = FixedResponder(stats)
    transport = _FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    reqs = b"GET /1k HTTP/1.1\r\nHost: x\r\n\r\nPOST /100k HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
    proto.data_received(reqs[:20])
    assert transport.out == b""
    proto.data_received(reqs[20:])
    assert transport.out.count(b"HTTP/1.1 200 OK") == 2
    assert b"Content-Length: 1024\r\n" in transport.out
    assert b"Content-Length: 102400\r\n" in transport.out
    assert stats.requests == 2 and not transport.closed
    proto.data_received(b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert transport.out.endswith(b"not found\n") and transport.closed


def _run(scenario: str, target: str, rep: int, **fig: Any) -> dict[str, Any]:
    return {"scenario": scenario, "group": "c50_1k", "probe": "wrk c50", "metric": "rps",
            "target": target, "repeat": rep, "ok": True, **fig}  # fmt: skip


def test_medians_and_ratios_on_canned_numbers() -> None:
    runs = [
        _run("c50_1k", "direct", 1, rps=150_000.0, p99_ms=0.5),
        _run("c50_1k", "nginx", 1, rps=70_000.0, p99_ms=1.5, cpu_fwd_us_per_req=12.0),
        _run("c50_1k", "gateway", 1, rps=50_000.0, p99_ms=2.0, cpu_fwd_us_per_req=18.0),
        _run("c50_1k", "direct", 2, rps=160_000.0, p99_ms=0.4),
        _run("c50_1k", "nginx", 2, rps=80_000.0, p99_ms=1.3, cpu_fwd_us_per_req=14.0),
        _run("c50_1k", "gateway", 2, rps=60_000.0, p99_ms=2.2, cpu_fwd_us_per_req=16.0),
        _run("c50_1k", "gateway", 3, ok=False, error="boom", rps=1.0),
        _run("trace_sampled", "gateway", 1, rps=37_500.0, cpu_fwd_us_per_req=30.0),
    ]
    rows = {(r["scenario"], r["target"]): r for r in report.medians(runs)}
    gw = rows[("c50_1k", "gateway")]
    assert gw["n"] == 2  # the failed run is not in the median
    assert gw["rps"] == pytest.approx(55_000)
    assert gw["vs_nginx"] == pytest.approx(55_000 / 75_000)
    assert gw["vs_direct"] == pytest.approx(55_000 / 155_000)
    assert gw["cpu_vs_nginx"] == pytest.approx(17 / 13)
    assert rows[("c50_1k", "nginx")]["vs_nginx"] == pytest.approx(1.0)
    # trace_* have no nginx of their own: the reference comes from their interleaved group
    assert rows[("trace_sampled", "gateway")]["vs_nginx"] == pytest.approx(0.5)
    table = report.format_table(list(rows.values()))
    assert "55,000" in table and "0.73" in table and "0.35" in table
    assert table.splitlines()[0].split()[:3] == ["scenario", "probe", "target"]


def test_latency_rows_compare_latency() -> None:
    def lat(target: str, p99: float) -> dict[str, Any]:
        return {"scenario": "rate5k", "group": "rate5k", "probe": "hey 5k/s", "metric": "p99_ms",
                "target": target, "ok": True, "rps": 5000.0, "p99_ms": p99}  # fmt: skip

    rows = report.medians([lat("direct", 0.5), lat("nginx", 1.0), lat("gateway", 3.0)])
    gw = next(r for r in rows if r["target"] == "gateway")
    assert gw["vs_nginx"] == pytest.approx(3.0) and gw["vs_direct"] == pytest.approx(6.0)


def test_plan_interleaves_trace_scenarios_with_c50() -> None:
    groups = run.plan(scenarios.select(["trace_sampled", "c50_1k", "rate5k"]))
    assert list(groups) == ["c50_1k", "rate5k"]
    cells = [(s.name, t) for s, _, t in groups["c50_1k"]]
    assert cells == [("c50_1k", "direct"), ("c50_1k", "nginx"), ("c50_1k", "haproxy"),
                     ("c50_1k", "gateway"), ("trace_sampled", "gateway")]  # fmt: skip
    assert len(groups["rate5k"]) == 12  # three probes × four targets
    with pytest.raises(ValueError, match="choose from"):
        scenarios.select(["nope"])


def test_cli_defaults() -> None:
    quick = run.parse_args(["--quick"])
    assert (quick.repeats, quick.duration) == (1, 3.0)
    full = run.parse_args([])
    assert (full.repeats, full.duration, full.pin, full.build) == (3, 10.0, False, "auto")
    assert full.python is None and run.parse_args(["--python", "/p"]).python == Path("/p")


def test_gateway_env_puts_the_chosen_build_first(tmp_path: Path) -> None:
    base = {"PATH": "/bin", "PYTHONPATH": "/somewhere/else"}
    assert "PYTHONPATH" not in servers.gateway_env("off", base)  # the installed package
    env = servers.gateway_env("off", base, pythonpath=tmp_path)
    assert env["PYTHONPATH"] == str(tmp_path)


def test_build_choice_pure_and_a_clear_error_without_a_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert build.prepare("pure", tmp_path) == build.Build("pure", None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    assert build.missing_for_compiled() == "no C compiler (apt-get install gcc)"
    with pytest.raises(RuntimeError, match="--build compiled: no C compiler"):
        build.prepare("compiled", tmp_path, log=lambda _: None)
    notes: list[str] = []
    auto = build.prepare("auto", tmp_path, log=notes.append)
    assert auto.kind == "pure" and auto.pythonpath is None
    assert notes == [f"!! {auto.note}"] and "no C compiler" in auto.note


def test_without_a_compiler_the_note_names_the_installed_build_it_measures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An interpreter whose installed gateway is the compiled build (as after `pip install .`
    # into a venv without mypy): the fallback must say so, not "pure-Python".
    fake = tmp_path / "site" / "gateway"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "version.py").write_text("def compiled() -> bool:\n    return True\n")
    python = tmp_path / "compiled-python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{tmp_path / "site"}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    assert build.installed_build(str(python)) == "compiled"
    assert build.installed_build(sys.executable) == "pure"  # this venv: the editable checkout
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    notes: list[str] = []
    auto = build.prepare("auto", tmp_path, log=notes.append, python=str(python))
    assert (auto.kind, auto.pythonpath) == ("compiled", None)
    assert "no C compiler" in auto.note and auto.note.endswith("which is the compiled build")
    assert "pure" not in auto.note and notes == [f"!! {auto.note}"]
    pure = build.prepare("pure", tmp_path, python=str(python))  # a pure copy in front of it
    assert pure.kind == "pure" and pure.pythonpath is not None
    assert not list(pure.pythonpath.rglob("*.so"))
    assert (pure.pythonpath / "gateway" / "version.py").is_file()


def test_the_interpreter_is_described_and_a_non_pgo_build_is_flagged() -> None:
    info = tools.python_build(sys.executable)
    assert info["version"] == platform.python_version()
    assert info["real_executable"] == os.path.realpath(sys.executable)
    line = tools.describe_python(info)
    assert line.startswith(f"{platform.python_implementation()} {platform.python_version()} (")
    note = tools.unoptimized_note(info)
    assert (note is None) == bool(info["optimized"])
    slow = {**info, "pgo": False, "package": None, "optimized": False}
    assert "without --enable-optimizations" in tools.describe_python(slow)
    assert "--python" in (tools.unoptimized_note(slow) or "")
    pgo = {**info, "pgo": True, "lto": True, "package": None, "optimized": True}
    assert "--enable-optimizations --with-lto" in tools.describe_python(pgo)
    assert tools.unoptimized_note(pgo) is None


def test_the_gateway_interpreter_must_have_the_gateway_installed(tmp_path: Path) -> None:
    assert build.gateway_python_missing(sys.executable) is None  # this venv has it
    bare = tmp_path / "bare-python"  # a real interpreter that sees no site-packages
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    bare.chmod(0o755)
    why = build.gateway_python_missing(str(bare))
    assert why is not None and "not installed" in why and "-m venv DIR" in why
    assert "cannot run it" in (build.gateway_python_missing(str(tmp_path / "none")) or "")
    argv = servers.gateway_argv(tmp_path / "g.yaml", 2, python=str(bare))
    assert argv == [str(bare), "-m", "gateway", "run", "-c", str(tmp_path / "g.yaml")] + [
        "--workers",
        "2",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--python", str(bare), "--no-install"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and f"--python {bare}: the gateway is not installed" in done.stderr


def test_group_cpu_reads_this_process() -> None:
    assert procs.group_cpu(os.getpgid(0)).total > 0
    assert procs.group_rss_kib(os.getpgid(0)) > 0


IDLEMEM_ARGS = ("--count", "40", "--settle", "0", "--park-after", "0")


def test_idle_memory_probe_counts_each_connection_it_holds() -> None:
    """benchmarks/idlemem.py: a real engine, real idle connections, one ClientConn each."""
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        # Parking off: each idle connection stays a transport with its ClientConn.
        [sys.executable, str(repo / "benchmarks" / "idlemem.py"), *IDLEMEM_ARGS],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "connections held: 40, as transports: 40, parked: 0" in done.stdout
    assert re.search(r"B/conn held now, \d+ at the peak", done.stdout), done.stdout
    conn = re.search(r"fast_client\.ClientConn +1\.00 +(\d+)", done.stdout)
    assert conn is not None and int(conn.group(1)) > 0, done.stdout


def test_policy_microbenchmark_runs_the_real_handler() -> None:
    from benchmarks import policy

    r = policy.measure(rounds=1, heads_n=100, per_flush=10)
    assert r["handle_us"] > 0 and r["handle_on_done_flush_us"] > 0  # figures, not a speed check
    assert r["compiled"] in (0.0, 1.0)


@pytest.mark.slow
def test_the_benchmark_command_runs_end_to_end(tmp_path: Path) -> None:
    """One 1 s run per target (direct, nginx, HAProxy, gateway): ratio table, JSON (and PNG)."""
    for program in ("wrk", "nginx", "haproxy"):
        need(program, "the end-to-end benchmark run")
    out = tmp_path / "out"
    argv = ["--scenarios", "c50_1k", "--repeats", "1", "--duration", "1", "--warmup", "0.2"]
    argv += ["--build", "pure", "--no-install", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *argv],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ratio of" in done.stdout and "gateway build: pure; interpreter: CPython" in done.stdout
    payload = json.loads((out / "results.json").read_text())
    rows = {r["target"]: r for r in payload["medians"]}
    assert rows["gateway"]["rps"] > 0 and rows["direct"]["rps"] > 0
    assert rows["gateway"]["vs_direct"] == pytest.approx(
        rows["gateway"]["rps"] / rows["direct"]["rps"]
    )
    assert rows["gateway"]["vs_nginx"] is not None and rows["nginx"]["rps"] > 0
    assert rows["gateway"]["vs_haproxy"] == pytest.approx(
        rows["gateway"]["rps"] / rows["haproxy"]["rps"]
    )
    assert rows["gateway"]["cpu_vs_haproxy"] is not None
    assert 0.02 < rows["haproxy"]["gray_share_upstream"] < 0.08  # HAProxy's 95/5, at the upstreams
    assert 0.03 < rows["gateway"]["gray_share_metrics"] < 0.07  # the 95/5 split, measured
    assert (out / "table.txt").is_file()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "chart.png").stat().st_size > 0
