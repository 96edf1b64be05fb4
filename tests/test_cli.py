"""The command line: every option has help, `run --port/--admin-port`, the startup log.

The process tests start `python -m gateway run` on free ports, as an operator would.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import build_parser
from tests.conftest import GatewayProcess, free_port, wait_http, write_config

CONFIG = {
    "state": {"store": "memory"},
    "admin": {"token_env": None},
    "drain_timeout": "2s",
    "services": {
        "user-api": {"releases": {"stable": {"weight": 1, "upstreams": ["http://127.0.0.1:9"]}}}
    },
}


# --------------------------------------------------------------------------- --help


def _commands(
    parser: argparse.ArgumentParser, name: str = "gateway"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _commands(p, f"{name} {sub}")


def _undocumented() -> list[str]:
    out = []
    for name, parser in _commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._SubParsersAction):
                described = {a.dest for a in action._choices_actions if a.help}
                out += [f"{name} {sub}" for sub in action.choices if sub not in described]
                continue
            if not action.help:
                what = "/".join(action.option_strings) or action.metavar or action.dest
                out.append(f"{name}: {what}")
    return out


def test_every_command_and_option_has_help() -> None:
    missing = _undocumented()
    assert not missing, "give these a help= text:\n" + "\n".join(missing)


def test_the_walk_sees_every_command() -> None:
    names = {n for n, _ in _commands(build_parser())}
    assert {"gateway run", "gateway check", "gateway demo", "gateway weights"} <= names


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["demo", "--help"], "--admin-port"),
        (["run", "--help"], "--admin-port"),
        (["run", "--help"], "--log-level"),
    ],
    ids=["demo", "run-admin-port", "run-log-level"],
)
def test_help_lists_the_option(
    argv: list[str], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 0
    assert text in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["run", "--port", "70000"], ["run", "--admin-port", "-1"], ["demo", "--port", "x"]],
    ids=["port-too-big", "negative", "not-a-number"],
)
def test_a_bad_port_is_refused_by_the_parser(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2


# --------------------------------------------------------------------------- run --port


def _start(tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    cfg = write_config(
        tmp,
        {
            **CONFIG,
            # ports the overrides replace: nothing may listen there
            "listen": f"127.0.0.1:{free_port()}",
            "admin": {"listen": f"127.0.0.1:{free_port()}", "token_env": None},
        },
    )
    log = tmp / "gateway.log"
    with log.open("wb") as lf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(cfg), *extra],
            stdout=lf,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
            cwd=tmp,
        )
    return proc, log


def _wait_log(
    log: Path, pattern: str, proc: subprocess.Popen[bytes], deadline_s: float = 30
) -> str:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        text = log.read_text(errors="replace")
        if re.search(pattern, text):
            return text
        assert proc.poll() is None, text
        time.sleep(0.05)  # polling a log file with a deadline
    raise TimeoutError(f"{pattern!r} not in {log.read_text(errors='replace')}")


@pytest.fixture
def overridden(tmp_path: Path) -> Iterator[GatewayProcess]:
    port, admin = free_port(), free_port()
    proc, log = _start(tmp_path, "--port", str(port), "--admin-port", str(admin))
    gp = GatewayProcess(proc, port, admin, log)
    try:
        wait_http(f"{gp.url}/healthz", proc=proc)
        wait_http(f"{gp.admin}/healthz", proc=proc)
        yield gp
    finally:
        assert gp.stop() == 0


def test_run_serves_on_the_command_line_ports(overridden: GatewayProcess) -> None:
    text = _wait_log(overridden.log, r"admin API on", overridden.proc)
    assert f"listening on 127.0.0.1:{overridden.port} (engine fast)" in text
    assert f"admin API on http://127.0.0.1:{overridden.admin_port}" in text


def test_a_reload_keeps_the_command_line_ports_without_a_warning(
    overridden: GatewayProcess,
) -> None:
    overridden.proc.send_signal(signal.SIGHUP)
    text = _wait_log(overridden.log, r"reload: .* applied", overridden.proc)
    assert "takes effect on restart" not in text
    wait_http(f"{overridden.url}/healthz", proc=overridden.proc)


def test_workers_log_real_addresses(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    proc, log = _start(tmp_path, "--workers", "2", "--port", str(port), "--admin-port", str(admin))
    gp = GatewayProcess(proc, port, admin, log)
    try:
        wait_http(f"{gp.url}/healthz", proc=proc)
        wait_http(f"{gp.admin}/healthz", proc=proc)
        pattern = rf"(?s)(listening on 127\.0\.0\.1:{port}.*){{2}}"
        text = _wait_log(log, pattern, proc)
        assert f"admin API on http://127.0.0.1:{admin}" in text
        assert ":None" not in text
    finally:
        assert gp.stop() == 0


def test_admin_port_on_the_data_port_is_refused(tmp_path: Path) -> None:
    port = free_port()
    proc, log = _start(tmp_path, "--port", str(port), "--admin-port", str(port))
    assert proc.wait(60) == 2
    assert "--admin-port" in log.read_text()


# --------------------------------------------------------------------------- heap


def test_serving_freezes_the_start_up_heap_and_collects_young_objects_less_often() -> None:
    """What start-up made is left out of collections; requests in flight are not promoted.

    Why: at 1,000 client connections full collections walking the start-up heap and
    young collections every 700 allocations cost ~8-14 µs per request
    (benchmarks/README.md "Idle connections").
    """
    from gateway.cli import GC_YOUNG_THRESHOLD, _settle_heap

    before = gc.get_threshold()
    assert before[0] < GC_YOUNG_THRESHOLD
    try:
        _settle_heap()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
