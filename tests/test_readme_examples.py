"""Every README code block that talks to a running gateway works pasted against `gateway demo`.

A newcomer follows the README line by line: starts `gateway demo`, pastes a block,
reads the answer. This test does the same with real `curl` and a real `bash`: a
fresh demo (a subprocess on free ports), each block run as written but for the
ports, and each command's answer checked against what the README says it is.
Each `curl` answer is tagged with its HTTP status by a `curl` shell function
around the real one, so a block runs unchanged (shell variables included).

A block that talks to the gateway must have an entry in EXPECTED (or in
NEEDS_MORE_THAN_THE_DEMO, with the reason): a new README example fails here until
someone states what it answers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.programs import need

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
TALKS_TO_GATEWAY = re.compile(
    r"(localhost|127\.0\.0\.1):(8080|9901)|^gateway (audit|weights)", re.M
)
MARK = "@@status="

Check = Callable[[int, str], None]


def _json(body: str) -> Any:
    return json.loads(body)


def ok_json(pred: Callable[[Any], bool], status: int = 200) -> Check:
    def check(code: int, body: str) -> None:
        assert code == status, body
        assert pred(_json(body)), body

    return check


def served_by(release: str | None) -> Check:
    def check(code: int, body: str) -> None:
        assert code == 200, body
        got = _json(body)["release"]
        assert got == release if release else got in ("stable", "gray"), body

    return check


def head_names_release(code: int, body: str) -> None:
    assert code == 200
    m = re.search(r"^X-Release-Stage: (\w+)", body, re.M | re.I)
    assert m and m.group(1) in ("stable", "gray"), body
    assert re.search(r"^X-Request-ID: \S+", body, re.M | re.I), body


def weights(**want: float) -> Check:
    return ok_json(lambda b: all(b["weights"][r] == w for r, w in want.items()))


def error(status: int) -> Check:
    return ok_json(lambda b: bool(b["error"]) and "field" in b, status)


# Keyed by a line that identifies the block; one check per `curl` answer, in order.
EXPECTED: dict[str, list[Check]] = {
    # "Trying the demo"
    "curl -s -H 'X-Release-Stage: gray' http://127.0.0.1:8080/hello": [
        served_by("gray"),  # header override -> gray
        served_by("gray"),  # cookie override -> gray
        served_by(None),  # sticky: a release (the same every time: checked below)
        head_names_release,  # no key: the head names the release
        ok_json(lambda b: [s["service"] for s in b["services"]] == ["user-api"]),
    ],
    # "Admin API"
    "curl -s localhost:9901/admin/services/user-api              #": [
        ok_json(lambda b: b["service"] == "user-api" and b["state_version"] >= 0),
        weights(stable=90, gray=10),  # the PUT without If-Match
        weights(stable=90, gray=20),  # the PUT with the ETag read just before
        ok_json(lambda b: b["percent"]["gray"] == 5 and b["percent"]["stable"] == 95),
        ok_json(lambda b: b["reason"] == "hash" and b["release"] in ("stable", "gray")),
        ok_json(lambda b: 0 <= b["moved_share"] <= 1 and b["sample"] == 100_000),
        weights(stable=90, gray=10),  # DELETE: back to the demo's config weights
        error(400),  # reload: the demo's config is not a file (the README says so)
        ok_json(lambda b: b["openapi"].startswith("3.")),
    ],
    # "Segments": set live, read back, forget (If-Match optional, as for weights)
    "curl -s -X PUT localhost:9901/admin/services/user-api/segments -d": [
        ok_json(lambda b: True),
        ok_json(lambda b: b["source"] == "live" and len(b["segments"]) == 2),
        ok_json(lambda b: True),
    ],
    # "Guard and rollouts"
    "curl -s -X POST localhost:9901/admin/services/user-api/rollout -d": [
        ok_json(lambda b: b["rollout"]["state"] == "Progressing"),
        ok_json(lambda b: b["rollout"]["state"] == "Paused"),
        ok_json(lambda b: b["rollout"]["step"] == 1 and b["percent"]["gray"] == 5),  # promote
        error(409),  # confirm: only after a guard rollback (the README says so)
        error(409),  # retry: likewise
    ],
    # "Audit"
    "gateway audit user-api --since": [
        # the changes the blocks above made, by `anonymous` (a loopback admin without tokens)
        ok_json(lambda b: b["count"] >= 4 and b["records"][0]["actor"] == "anonymous"),
        ok_json(lambda b: b["count"] >= 4 and b["records"][0]["service"] == "user-api"),
    ],
}
NEEDS_MORE_THAN_THE_DEMO = {
    "explain?header=X-Employee:true": "the `segments:` of the YAML above it, which the demo lacks",
    "curl --cacert cert.pem https://localhost:8080/": "the `tls:` listener and certificate of "
    "the YAML above it (tests/test_tls_process.py serves HTTPS from such a config)",
    "preview?segment=north": "the segment `north` in force (the block above sets it live, "
    "then forgets it again); tests/test_segments_live.py previews by segment",
    "kubectl create secret generic gray-gateway-admin": "a Kubernetes cluster "
    "(tests/test_k8s_manifests.py validates the manifests it applies)",
    "admin/services/payments/rollout": "a `payments` service analysed by a real Prometheus "
    "(tests/test_analysis_e2e.py tests that scenario against one)",
}


def gateway_blocks() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    return [b for b in blocks if TALKS_TO_GATEWAY.search(b)]


def _key(block: str) -> str | None:
    keys = [k for k in (*EXPECTED, *NEEDS_MORE_THAN_THE_DEMO) if k in block]
    assert len(keys) <= 1, f"two EXPECTED keys match one README block: {keys}"
    return keys[0] if keys else None


def test_every_gateway_block_has_expectations() -> None:
    blocks = gateway_blocks()
    assert len(blocks) >= 4
    unknown = [b for b in blocks if _key(b) is None]
    assert not unknown, (
        "README blocks that talk to a gateway with no entry in EXPECTED in "
        "tests/test_readme_examples.py (say what each command answers):\n\n" + "\n".join(unknown)
    )
    stale = [k for k in EXPECTED if not any(k in b for b in blocks)]
    assert not stale, f"EXPECTED keys that match no README block any more: {stale}"


@pytest.fixture(scope="module")
def demo() -> Iterator[tuple[int, int]]:
    """A fresh `gateway demo` on free ports: (data port, admin port)."""
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
        lines = []
        for line in proc.stdout:  # ends when the demo prints its last line, or exits
            lines.append(line)
            if "Ctrl-C" in line:
                break
        assert proc.poll() is None, "".join(lines)
        yield port, admin
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        if proc.stdout is not None:
            proc.stdout.close()


def run_block(block: str, port: int, admin: int) -> list[tuple[int, str]]:
    """Run a README block in bash as pasted (ports changed); (status, body) per curl answer."""
    curl = need("curl", "the README's examples are curl lines")
    script = re.sub(r"(127\.0\.0\.1|localhost):8080", rf"\g<1>:{port}", block)
    script = re.sub(r"(127\.0\.0\.1|localhost):9901", rf"\g<1>:{admin}", script)
    prelude = f"curl() {{ {curl} --max-time 20 -w '\\n{MARK}%{{http_code}}\\n' \"$@\"; }}\nset -e\n"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "GATEWAY_ADMIN_URL": f"http://127.0.0.1:{admin}",
        "TOKEN": "",
    }
    env.pop("GATEWAY_ADMIN_TOKEN", None)
    out = subprocess.run(
        ["bash", "-c", prelude + script],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, f"{script}\nstdout: {out.stdout}\nstderr: {out.stderr}"
    answers: list[tuple[int, str]] = []
    rest = out.stdout
    while MARK in rest:
        body, _, rest = rest.partition(MARK)
        code, _, rest = rest.partition("\n")
        answers.append((int(code), body.strip()))
    if rest.strip():  # a command that is not curl (`gateway audit`): one JSON record per line
        records = [json.loads(ln) for ln in rest.strip().splitlines()]
        answers.append((200, json.dumps({"count": len(records), "records": records})))
    return answers


def _blocks_in_readme_order() -> list[str]:
    return [b for b in gateway_blocks() if _key(b) in EXPECTED]


def test_readme_blocks_answer_as_documented(demo: tuple[int, int]) -> None:
    port, admin = demo
    for block in _blocks_in_readme_order():
        checks = EXPECTED[_key(block) or ""]
        answers = run_block(block, port, admin)
        assert len(answers) == len(checks), (
            f"the README block answered {len(answers)} times, EXPECTED has {len(checks)} "
            f"checks:\n{block}\n{answers}"
        )
        for (code, body), check in zip(answers, checks, strict=True):
            check(code, body)


def test_the_sticky_example_is_sticky(demo: tuple[int, int]) -> None:
    block = next(b for b in gateway_blocks() if "X-User-ID: alice" in b)
    line = next(ln for ln in block.splitlines() if "X-User-ID: alice" in ln)
    seen = {_json(body)["release"] for _ in range(5) for _, body in run_block(line, *demo)}
    assert len(seen) == 1


def test_the_demo_stops_cleanly_on_ctrl_c() -> None:
    """The README says Ctrl-C stops it: SIGINT, exit 0, within the drain."""
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", str(port), "--admin-port", str(admin)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    started = time.monotonic()
    for line in proc.stdout:
        if "Ctrl-C" in line:
            break
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    proc.stdout.close()
    assert time.monotonic() - started < 60
