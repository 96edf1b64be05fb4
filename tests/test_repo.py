"""The repository's promises to a newcomer: README commands and CI stay in sync."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def _sh_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", text, re.S)]


def test_readme_gives_demo_and_test_commands_near_the_top() -> None:
    blocks = _sh_blocks(README[:2500])
    assert any("gateway demo" in b and "pip install" in b for b in blocks)
    assert any("pytest" in b and "pip install" in b for b in blocks)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_cmd = next(b for b in _sh_blocks(README) if "pytest" in b and "pip install" in b)
    assert test_cmd in CI
    assert "set -euo pipefail" in CI  # a failing pytest (or exit 5: nothing collected) fails CI


# --------------------------------------------------------------------------- tests mirror gateway/

PKG = ROOT / "gateway"
# Modules with logic whose tests live under another name, and why. A new module needs
# tests/test_<module>.py (or tests/test_<package>_<module>.py), or a line here.
TESTED_ELSEWHERE = {
    "alerts": "tests/test_alerts_e2e.py: bodies as Slack, DingTalk, WeCom receive them",
    "app": "the whole process: tests/test_proxy_e2e.py, tests/test_process.py",
    "audit": "tests/test_audit_e2e.py, tests/test_audit_process.py, tests/test_audit_durable.py",
    "cli_admin": "tests/test_strategy.py drives the admin CLI against a real gateway",
    "config_syntax": "tests/test_config.py and tests/test_config_check.py, field by field",
    "demo": "tests/test_readme_examples.py and tests/test_process.py run `gateway demo`",
    "discovery/__init__": "tests/test_discovery_consul.py (merging, selectors)",
    "discovery/pacing": "tests/test_discovery_consul.py (the watch's token bucket)",
    "engine/aio": "the end-to-end suites run on both engines (conftest's `engine` fixture)",
    "engine/fast_client": "tests/test_engine_fast.py, tests/test_request_edges.py",
    "engine/fast_upstream": "tests/test_engine_fast.py, tests/test_failover.py",
    "engine/fast_wire": "tests/test_engine_fast.py, tests/test_fuzz_engine.py",
    "hooks": "tests/test_rollout.py, tests/test_rollout_gates_e2e.py (hooks against real servers)",
    "sampling": "tests/test_telemetry.py: every sampler against the SDK's, root shares",
    "rollout_driver": "tests/test_rollout_gates_e2e.py (the driver in a real gateway)",
    "trust": "tests/test_decide.py (the client address behind trusted proxies)",
    "live_segments": "tests/test_segments_live.py (PUT/GET/DELETE .../segments, stored lists)",
    "openapi": "tests/test_admin_openapi.py checks every answer against the document",
    "preflight": "tests/test_config_check.py (ports taken, state directory)",
    "preview": "tests/test_admin.py (explain, preview; being split: issue 13)",
    "prometheus": "tests/test_analysis_client.py (the Prometheus client against a real server)",
    "readiness": "tests/test_admin.py, tests/test_reliability_e2e.py (/readyz)",
    "rules": "tests/test_guard_rules.py, tests/test_guard_rules_e2e.py",
    "segments_config": "tests/test_segments.py (the DSL's errors, field by field)",
    "tls_config": "tests/test_tls.py, tests/test_tls_edges.py (each field refused by name)",
    "upstream_config": "tests/test_upstream_limits.py (each field refused by name)",
    "statedoc": "tests/test_state_integrity.py, tests/test_state_fuzz.py",
    "store/doc": "tests/test_store.py, tests/test_state_integrity.py",
    "store/file": "tests/test_store.py",
    "store/memory": "tests/test_store.py, tests/test_control.py",
    "version": "tests/test_install.py, tests/test_build_backend.py",
}
NO_LOGIC = {"__init__", "__main__", "engine/__init__", "store/__init__"}


def _modules() -> list[str]:
    return sorted(str(p.relative_to(PKG).with_suffix("")) for p in PKG.rglob("*.py"))


def _has_test_module(module: str) -> bool:
    names = {module.replace("/", "_"), module.rsplit("/", 1)[-1]}
    return any((ROOT / "tests" / f"test_{n}.py").exists() for n in names)


def test_every_module_with_logic_has_a_test_module() -> None:
    missing = [
        m
        for m in _modules()
        if m not in NO_LOGIC and m not in TESTED_ELSEWHERE and not _has_test_module(m)
    ]
    assert not missing, (
        "modules of gateway/ without tests/test_<module>.py: add one, or a line to "
        f"TESTED_ELSEWHERE in tests/test_repo.py naming where they are tested: {missing}"
    )


def test_the_allow_list_names_real_modules_without_their_own_test_module() -> None:
    modules = set(_modules())
    assert not (set(TESTED_ELSEWHERE) | NO_LOGIC) - modules, "a listed module no longer exists"
    covered = sorted(m for m in TESTED_ELSEWHERE if _has_test_module(m))
    assert not covered, f"these have their own test module now; drop them from the list: {covered}"
