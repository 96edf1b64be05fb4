"""Audit and named tokens across real processes: `gateway run --workers 2`.

A guard rollback decided in a worker, a SIGHUP reload and an admin reload each
appear once in `GET /admin/audit` with the right actor.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, run_gateway_process, write_config
from tests.loadclient import ThreadedUpstreams

WRITE, READ = "d3ploy-s3cret", "v1ew-only"


def _call(
    base: str, method: str, path: str, token: str | None = None, body: object = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def _poll(cond: Callable[[], Any], within: float = 30.0) -> Any:
    end = time.monotonic() + within
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("condition not met before the deadline")


@pytest.mark.slow
def test_guard_reload_and_admin_actions_audited_once_across_workers(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"deployer {WRITE} write\nviewer {READ} read\n")
    dead = f"http://127.0.0.1:{free_port()}"  # gray's only endpoint: connection refused
    with ThreadedUpstreams(["stable"]) as up:
        doc = {
            "admin": {"tokens_file": str(tokens)},
            "state": {"store": "file", "path": "var/gateway-state.json"},
            "drain_timeout": "2s",
            "services": {
                "svc": {
                    "releases": {
                        "stable": {"weight": 50, "upstreams": [up.url("stable")]},
                        "gray": {"weight": 50, "upstreams": [dead]},
                    },
                    "guard": {
                        "error_rate": 0.05,
                        "min_requests": 1,  # 3 refused connections eject the endpoint
                        "window": "30s",
                        "for": "0s",
                        "min_endpoints": 0,
                    },
                }
            },
        }
        with run_gateway_process(tmp_path, doc, workers=2) as gw:
            assert (
                _call(gw.admin, "PUT", "/admin/services/svc/weights", READ, {"gray": 1})[0] == 403
            )
            for i in range(100):
                req = urllib.request.Request(f"{gw.url}/", headers={"X-User-ID": f"u{i}"})
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        r.read()
                except urllib.error.HTTPError as e:
                    e.close()  # gray's 502s, until the guard rolls it back

            def gray_weight() -> bool:
                return bool(
                    _call(gw.admin, "GET", "/admin/services/svc", READ)[1]["weights"]["gray"] == 0
                )

            _poll(gray_weight)
            # A reload by signal (actor `reload`) and one through the API (the token's name).
            write_config(
                tmp_path,
                {
                    **doc,
                    "listen": f"127.0.0.1:{gw.port}",
                    "admin": {
                        **doc["admin"],
                        "listen": f"127.0.0.1:{gw.admin_port}",
                        "token_env": None,
                    },
                },
            )
            gw.proc.send_signal(signal.SIGHUP)
            _poll(lambda: any(r["action"] == "reload" for r in _audit(gw.admin)))
            assert _call(gw.admin, "POST", "/admin/reload", WRITE)[0] == 200
            recs = _poll(lambda: (r := _audit(gw.admin)) and len(r) >= 3 and r)
            log = gw.log.read_text()
    assert [(r["actor"], r["action"]) for r in recs] == [
        ("guard", "guard.rollback"),
        ("reload", "reload"),
        ("deployer", "reload"),
    ]
    assert "error_rate" in recs[0]["reason"] and recs[0]["after"]["weights"]["gray"] == 0
    assert recs[0]["after"]["rollout"]["state"] == "CircuitBreak"
    assert sum('"audit"' in line for line in log.splitlines()) == 3


def _audit(admin: str) -> list[dict[str, Any]]:
    status, doc = _call(admin, "GET", "/admin/audit", READ)
    assert status == 200
    records: list[dict[str, Any]] = doc["records"]
    return records
