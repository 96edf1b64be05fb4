"""`gateway rollout …` and `gateway preview` (README "Rollouts"): the real CLI as a
subprocess against a running gateway process, as a CI pipeline would call it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import GatewayProcess, run_gateway_process
from tests.loadclient import ThreadedUpstreams


def _doc(up: ThreadedUpstreams) -> dict[str, Any]:
    return {
        "state": {"store": "file", "path": "var/gateway-state.json"},
        "drain_timeout": "2s",
        "services": {
            "svc": {
                "releases": {
                    "stable": {"weight": 100, "upstreams": [up.url("stable")]},
                    "gray": {"weight": 0, "upstreams": [up.url("gray")]},
                }
            }
        },
    }


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "GATEWAY_"))}


def _cli(gw: GatewayProcess, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--admin", gw.admin],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=cwd,
        env=_env(),
    )


def _watch(gw: GatewayProcess, timeout: str, cwd: Path) -> subprocess.Popen[str]:
    """`rollout status --watch`, started; returns once it printed the state it first saw."""
    p = subprocess.Popen(
        [sys.executable, "-m", "gateway", "rollout", "status", "svc", "--watch"]
        + ["--timeout", timeout, "--admin", gw.admin],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=_env(),
    )
    assert p.stdout is not None
    first = p.stdout.readline()  # the watcher is polling before the test acts
    assert first.startswith("svc: gray "), first
    return p


def _finish(p: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = p.communicate(timeout=90)
    assert "Traceback" not in err, err
    return p.returncode, out


def test_watch_exits_0_on_promotion_1_on_rollback_2_on_timeout(tmp_path: Path) -> None:
    with ThreadedUpstreams(["stable", "gray"]) as up, run_gateway_process(tmp_path, _doc(up)) as gw:
        r = _cli(
            gw, "rollout", "start", "svc", "--release", "gray", "--traffic", "10%", cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "svc: gray Progressing step 1/1 weight 10%"
        # Timeout: nothing moves a manual step by itself.
        p = _watch(gw, "1s", tmp_path)
        rc, out = _finish(p)
        assert rc == 2 and "timed out after 1s" in out
        # Promotion: the watcher prints the change and exits 0.
        p = _watch(gw, "60s", tmp_path)
        r = _cli(gw, "rollout", "promote", "svc", cwd=tmp_path)
        assert r.returncode == 0 and "Promoted" in r.stdout, r.stderr
        rc, out = _finish(p)
        assert rc == 0, out
        assert out.splitlines()[-1] == "svc: gray Promoted step 1/1 weight 100%"
        # A new rollout, aborted: exit 1.
        r = _cli(
            gw, "rollout", "start", "svc", "--release", "gray", "--traffic", "20", cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
        p = _watch(gw, "60s", tmp_path)
        r = _cli(gw, "rollout", "abort", "svc", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        rc, out = _finish(p)
        assert rc == 1 and out.splitlines()[-1].startswith("svc: gray RolledBack"), out
        r = _cli(gw, "rollout", "retry", "svc", cwd=tmp_path)
        assert r.returncode == 0 and "Progressing" in r.stdout, r.stderr
        for verb in ("pause", "resume"):
            r = _cli(gw, "rollout", verb, "svc", cwd=tmp_path)
            assert r.returncode == 0, r.stderr
        r = _cli(gw, "rollout", "promote", "svc", "--full", cwd=tmp_path)
        assert r.returncode == 0 and "Promoted" in r.stdout
        r = _cli(gw, "rollout", "confirm", "svc", cwd=tmp_path)  # nothing to confirm: 409
        assert r.returncode == 1 and "HTTP 409" in r.stderr and "state" in r.stderr
        r = _cli(gw, "rollout", "status", "svc", cwd=tmp_path)
        assert r.returncode == 0 and json.loads(r.stdout)["rollout"]["state"] == "Promoted"


def test_start_from_a_plan_file_preview_and_bad_input(tmp_path: Path) -> None:
    short = tmp_path / "short.yaml"
    short.write_text("steps:\n  - {weight: 5, pause: 1m}\n  - {weight: 100, pause: 0}\n")
    good = tmp_path / "plan.yaml"
    good.write_text("- {weight: 5, pause: 5m}\n- {weight: 50, pause: 15m}\n- {weight: 100}\n")
    with ThreadedUpstreams(["stable", "gray"]) as up, run_gateway_process(tmp_path, _doc(up)) as gw:
        r = _cli(gw, "preview", "svc", "--traffic", "15%", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        pv = json.loads(r.stdout)
        assert pv["weights"] == {"stable": 85, "gray": 15}
        assert abs(pv["moved_share"] - 0.15) < 0.01 and set(pv["moves"]) == {"stable->gray"}
        for args, code, phrase in [
            (["preview", "svc", "--traffic", "lots"], 2, "--traffic"),
            (["preview", "svc", "--traffic", "150%"], 2, "between 0% and 100%"),
            (["preview", "svc", "--traffic", "5", "--release", "stable"], 2, "--release"),
            (["preview", "nope", "--traffic", "5"], 1, "HTTP 404"),
            (["rollout", "start", "svc", "--release", "gray"], 2, "--plan FILE or --traffic"),
            (["rollout", "start", "svc", "--traffic", "5%"], 2, "--release"),
            (["rollout", "start", "svc", "--release", "gray", "--plan", "none.yaml"], 2, "read"),
            (
                ["rollout", "start", "svc", "--release", "gray", "--plan", str(short)],
                1,
                "steps[0].pause",
            ),
            (["rollout", "status", "svc", "--watch", "--timeout", "soon"], 2, "--timeout"),
            (["rollout", "pause", "svc"], 1, "HTTP 409"),
        ]:
            r = _cli(gw, *args, cwd=tmp_path)
            assert r.returncode == code and phrase in r.stderr, (args, r.returncode, r.stderr)
            assert "Traceback" not in r.stderr
        r = _cli(
            gw, "rollout", "start", "svc", "--release", "gray", "--plan", str(good), cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "svc: gray Progressing step 1/3 weight 5%"


def test_with_two_workers_the_master_counts_their_requests_and_promotes(tmp_path: Path) -> None:
    """The driver runs in the master; `min_requests` counts what every worker served."""
    import urllib.request

    with ThreadedUpstreams(["stable", "gray"]) as up:
        doc = _doc(up)
        doc["services"]["svc"]["guard"] = {"min_requests": 6}
        doc["rollout"] = {"min_first_pause": "1s", "min_pause": "1s"}
        with run_gateway_process(tmp_path, doc, workers=2) as gw:
            plan = tmp_path / "plan.yaml"
            plan.write_text("- {weight: 10, pause: 1s}\n- {weight: 100, pause: 0}\n")
            r = _cli(
                gw,
                "rollout",
                "start",
                "svc",
                "--release",
                "gray",
                "--plan",
                str(plan),
                cwd=tmp_path,
            )
            assert r.returncode == 0, r.stderr
            p = _watch(gw, "90s", tmp_path)
            # 5 requests: not enough, whichever worker served them ...
            for _ in range(5):
                req = urllib.request.Request(gw.url + "/", headers={"X-Release-Stage": "gray"})
                with urllib.request.urlopen(req, timeout=10) as resp:
                    assert resp.headers["X-Release-Stage"] == "gray"
            deadline = time.monotonic() + 30
            while (
                "waiting for traffic"
                not in _cli(gw, "rollout", "status", "svc", cwd=tmp_path).stdout
            ):
                assert time.monotonic() < deadline, "the step did not wait for traffic"
                time.sleep(0.2)  # poll interval of the condition
            assert p.poll() is None  # still watching: not promoted
            # ... a 6th and the step advances; the final step needs its own 6, then promotes.
            deadline = time.monotonic() + 60
            while p.poll() is None:
                assert time.monotonic() < deadline, "not promoted"
                req = urllib.request.Request(gw.url + "/", headers={"X-Release-Stage": "gray"})
                with urllib.request.urlopen(req, timeout=10):
                    pass
                time.sleep(0.1)  # a trickle of traffic, not a synchronisation
            rc, out = _finish(p)
            assert rc == 0, out
            assert out.splitlines()[-1] == "svc: gray Promoted step 2/2 weight 100%"
