"""Guard rules, hold times, alert bodies and the new config fields — pure, in tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway import config as C
from gateway import rollout as R
from gateway.alerts import render, targets_for
from gateway.audit import diff, parse_time
from gateway.config import AlertTarget, GuardConfig, GuardRule
from gateway.errors import ConfigError, Conflict
from gateway.guard import WindowStats
from gateway.rules import Holds, breached, evaluate, first_due, measure, pauses_clear, rules_of
from gateway.store.doc import ServiceState


def _rule(metric: str, threshold: float, action: str = "rollback") -> Any:
    cfg = GuardConfig(min_endpoints=0, rules=(GuardRule(metric, threshold, action),))
    return rules_of(cfg)[-1]


@pytest.mark.parametrize(
    ("metric", "threshold", "stats", "baseline", "healthy", "value", "is_breached"),
    [
        ("error_rate", 0.05, WindowStats(100, 10, 5.0), None, 3, 0.1, True),
        ("error_rate", 0.1, WindowStats(100, 10, 5.0), None, 3, 0.1, False),  # strict
        ("error_rate", 0.05, WindowStats(99, 99, 5.0), None, 3, None, False),  # too few
        ("latency_p99_ms", 800, WindowStats(100, 0, 10.0, 900.0), None, 3, 900.0, True),
        ("latency_p95_ms", 800, WindowStats(100, 0, 700.0, 900.0), None, 3, 700.0, False),
        (
            "latency_p95_delta_ms",
            100,
            WindowStats(100, 0, 400.0),
            WindowStats(100, 0, 250.0),
            3,
            150.0,
            True,
        ),
        ("latency_p95_delta_ms", 100, WindowStats(100, 0, 400.0), None, 3, None, False),
        ("healthy_endpoints", 2, WindowStats(0, 0, None), None, 1, 1.0, True),
        ("healthy_endpoints", 2, WindowStats(0, 0, None), None, 2, 2.0, False),
    ],
    ids=[
        "rate-over",
        "rate-at",
        "too-few-requests",
        "p99-over",
        "p95-under",
        "delta-over",
        "delta-no-baseline",
        "endpoints-below",
        "endpoints-at",
    ],
)
def test_measure_and_breach(
    metric: str,
    threshold: float,
    stats: WindowStats,
    baseline: WindowStats | None,
    healthy: int,
    value: float | None,
    is_breached: bool,
) -> None:
    rule = _rule(metric, threshold)
    got = measure(rule, stats, baseline, healthy, 100)
    assert got == value
    assert breached(rule, got) is is_breached


def test_flat_fields_and_min_endpoints_are_rollback_rules() -> None:
    cfg = GuardConfig(
        error_rate=0.02,
        min_endpoints=2,
        hold=10,
        window=60,
        rules=(GuardRule("latency_p99_ms", 800, "pause", window=5, hold=3),),
    )
    got = [(r.key, r.metric, r.threshold, r.action, r.window, r.hold) for r in rules_of(cfg)]
    assert got == [
        ("error_rate", "error_rate", 0.02, "rollback", 60, 10),
        ("latency_p95_ms", "latency_p95_ms", 800, "rollback", 60, 10),
        ("latency_p95_delta_ms", "latency_p95_delta_ms", 200, "rollback", 60, 10),
        ("min_endpoints", "healthy_endpoints", 2, "rollback", 60, 10),
        ("rules[0]", "latency_p99_ms", 800, "pause", 5, 3),
    ]


@pytest.mark.parametrize(
    ("pattern", "due_at"),
    [
        # seconds 0..14, True = the window breaches at that evaluation
        ([True] * 3 + [False] * 12, None),  # a 3 s burst never lasts the 10 s `for`
        ([True] * 15, 10),  # continuous: due once it has held 10 s
        ([True] * 6 + [False] + [True] * 8, None),  # one clear second restarts the clock
        ([False] * 2 + [True] * 13, 12),
    ],
    ids=["burst", "continuous", "interrupted", "late-start"],
)
def test_for_needs_a_continuous_breach(pattern: list[bool], due_at: int | None) -> None:
    rule = rules_of(GuardConfig(error_rate=0.05, hold=10, min_endpoints=0))[0]
    holds = Holds()
    first = None
    for t, bad in enumerate(pattern):
        stats = WindowStats(100, 10 if bad else 0, 5.0)
        (v, *_) = evaluate(
            "svc",
            "gray",
            (rule,),
            lambda w, s=stats: s,
            lambda w, s=stats: s,
            3,
            10,
            holds,
            float(t),
        )
        if v.due and first is None:
            first = t
    assert first == due_at


def test_pause_rules_clear_after_holding_again() -> None:
    cfg = GuardConfig(min_endpoints=0, hold=2, rules=(GuardRule("latency_p99_ms", 800, "pause"),))
    rs = rules_of(cfg)
    holds = Holds()

    def at(t: float, p99: float) -> list[Any]:
        s = WindowStats(100, 0, 10.0, p99)
        return evaluate("svc", "gray", rs, lambda w: s, lambda w: s, 3, 10, holds, t)

    assert first_due(at(0, 900), "pause") is None
    assert first_due(at(2, 900), "pause") is not None
    assert not pauses_clear(at(3, 100))  # back, but not yet for `for`
    assert not pauses_clear(at(4, 100))
    assert pauses_clear(at(5, 100))


@pytest.mark.parametrize(
    ("move", "start", "end"),
    [
        (lambda r: R.confirm(r, 5.0), R.CIRCUIT_BREAK, R.ROLLED_BACK),
        (lambda r: R.retry(r, 5.0), R.CIRCUIT_BREAK, R.PROGRESSING),
        (lambda r: R.retry(r, 5.0), R.ROLLED_BACK, R.PROGRESSING),
        (lambda r: R.tick(r, 100.0), R.CIRCUIT_BREAK, R.ROLLED_BACK),
        (lambda r: R.tick(r, 99.0), R.CIRCUIT_BREAK, R.CIRCUIT_BREAK),
    ],
    ids=["confirm", "retry-cb", "retry-rolled-back", "confirm-timeout", "before-timeout"],
)
def test_circuit_break_moves(move: Any, start: str, end: str) -> None:
    plan = R.parse_plan("gray", [{"weight": 5, "pause": "1h"}, {"weight": 50, "pause": "1h"}])
    r = R.start(plan, 0.0)
    r = R.tick(r, 3600.0)  # at step 2
    r = R.circuit_break(r, "error_rate", 40.0, 60.0)
    if start == R.ROLLED_BACK:
        r = R.confirm(r, 41.0)
    assert r.state == start
    out = move(r)
    assert out.state == end
    if end == R.PROGRESSING:
        assert (out.step, out.weight, out.reason, out.confirm_by) == (0, 5, None, None)


def test_guard_pause_is_lifted_only_by_the_guard_or_resume() -> None:
    r = R.start(R.parse_plan("gray", [{"weight": 5, "pause": "1h"}]), 0.0)
    p = R.guard_pause(r, 10.0, "guard: latency_p99_ms 900 > 800 for 3s")
    assert (p.state, p.paused_by) == (R.PAUSED, "guard")
    assert R.guard_resume(p, 20.0).state == R.PROGRESSING
    manual = R.pause(r, 10.0)
    with pytest.raises(Conflict):
        R.guard_resume(manual, 20.0)
    assert R.Rollout.from_json(p.to_json()) == p


# Slack: https://api.slack.com/messaging/webhooks ("text", plus optional Block Kit "blocks").
# DingTalk custom robot: https://open.dingtalk.com/document/orgapp/custom-robot-access
#   {"msgtype": "markdown", "markdown": {"title": ..., "text": ...}}
# WeCom group robot: https://developer.work.weixin.qq.com/document/path/91770
#   {"msgtype": "markdown", "markdown": {"content": ...}}
ALERT = {
    "alert": "GrayReleaseRolledBack",
    "service": "svc",
    "release": "gray",
    "reason": "healthy_endpoints",
    "value": 1.0,
    "threshold": 2,
    "action": {"kind": "rollback", "weight": 0, "rollout_state": "CircuitBreak"},
    "state_version": 7,
}


@pytest.mark.parametrize(
    ("fmt", "check"),
    [
        ("json", lambda b: b == ALERT),
        (
            "slack",
            lambda b: (
                set(b) == {"text", "blocks"}
                and isinstance(b["text"], str)
                and all(blk["type"] in ("header", "section") for blk in b["blocks"])
            ),
        ),
        (
            "dingtalk",
            lambda b: b["msgtype"] == "markdown" and set(b["markdown"]) == {"title", "text"},
        ),
        ("wecom", lambda b: b["msgtype"] == "markdown" and set(b["markdown"]) == {"content"}),
    ],
    ids=["json", "slack", "dingtalk", "wecom"],
)
def test_alert_bodies_follow_each_services_documented_shape(fmt: str, check: Any) -> None:
    body = render(fmt, ALERT)
    assert check(body)
    if fmt != "json":
        assert "healthy_endpoints" in str(body) and "svc/gray" in str(body)


def test_alert_webhook_stays_a_json_target_and_targets_are_not_repeated() -> None:
    top = (AlertTarget("http://a/x", "slack"),)
    got = targets_for(top, (AlertTarget("http://a/x", "slack"),), "http://b/hook")
    assert got == (AlertTarget("http://a/x", "slack"), AlertTarget("http://b/hook", "json"))


def test_audit_diff_keeps_only_changed_fields() -> None:
    before = ServiceState({"stable": 95, "gray": 5}, {"error_rate": 0.01})
    after = ServiceState({"stable": 100, "gray": 0}, {"error_rate": 0.01})
    assert diff(before, after) == (
        {"weights": {"stable": 95, "gray": 5}},
        {"weights": {"stable": 100, "gray": 0}},
    )
    assert diff(None, after)[0] == {}


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("1700000000", 1700000000.0),
        ("10m", 1000.0 - 600),
        ("2023-11-14T22:13:20Z", 1700000000.0),
        ("2023-11-14T22:13:20", 1700000000.0),
        ("yesterday", None),
        ("", None),
    ],
    ids=["epoch", "ago", "rfc3339", "naive-utc", "words", "empty"],
)
def test_since_parsing(text: str, want: float | None) -> None:
    assert parse_time(text, 1000.0) == want


# --------------------------------------------------------------------------- config


def _cfg(guard: Any = None, **top: Any) -> dict[str, Any]:
    svc: dict[str, Any] = {
        "releases": {
            "stable": {"weight": 90, "upstreams": ["http://127.0.0.1:1"]},
            "gray": {"weight": 10, "upstreams": ["http://127.0.0.1:2"]},
        }
    }
    if guard is not None:
        svc["guard"] = guard
    return {"services": {"svc": svc}, **top}


def test_new_guard_fields_parse() -> None:
    cfg = C.build(
        _cfg(
            {
                "for": "10s",
                "rules": [
                    {"metric": "latency_p99_ms", "above": 800, "window": "60s", "action": "pause"},
                    {"metric": "healthy_endpoints", "below": 3, "for": "5s"},
                ],
                "alerts": [{"url": "http://127.0.0.1:9/a", "format": "wecom"}],
            },
            alerts=[{"url": "https://hooks.example/x", "format": "slack"}],
            rollout={"confirm_timeout": "5m"},
        ),
        env={},
    )
    g = cfg.services["svc"].guard
    assert g.hold == 10
    assert g.rules == (
        GuardRule("latency_p99_ms", 800, "pause", 60, None),
        GuardRule("healthy_endpoints", 3, "rollback", None, 5),
    )
    assert g.alerts == (AlertTarget("http://127.0.0.1:9/a", "wecom"),)
    assert cfg.alerts == (AlertTarget("https://hooks.example/x", "slack"),)
    assert cfg.rollout.confirm_timeout == 300
    assert C.build(_cfg(), env={}).services["svc"].guard.hold == 30  # default `for`


@pytest.mark.parametrize(
    ("guard", "top", "field"),
    [
        ({"for": "soon"}, {}, "services.svc.guard.for"),
        ({"for": -1}, {}, "services.svc.guard.for"),
        ({"rules": {"metric": "error_rate"}}, {}, "services.svc.guard.rules"),
        ({"rules": ["x"]}, {}, "services.svc.guard.rules[0]"),
        ({"rules": [{"metric": "cpu", "above": 1}]}, {}, "services.svc.guard.rules[0].metric"),
        ({"rules": [{"metric": "error_rate"}]}, {}, "services.svc.guard.rules[0].above"),
        (
            {"rules": [{"metric": "error_rate", "above": 2}]},
            {},
            "services.svc.guard.rules[0].above",
        ),
        (
            {"rules": [{"metric": "error_rate", "above": "1%"}]},
            {},
            "services.svc.guard.rules[0].above",
        ),
        (
            {"rules": [{"metric": "error_rate", "above": True}]},
            {},
            "services.svc.guard.rules[0].above",
        ),
        (
            {"rules": [{"metric": "healthy_endpoints", "above": 2}]},
            {},
            "services.svc.guard.rules[0].above",
        ),
        (
            {"rules": [{"metric": "latency_p99_ms", "above": 1, "action": "page"}]},
            {},
            "services.svc.guard.rules[0].action",
        ),
        (
            {"rules": [{"metric": "latency_p99_ms", "above": 1, "window": "0s"}]},
            {},
            "services.svc.guard.rules[0].window",
        ),
        (
            {"rules": [{"metric": "latency_p99_ms", "above": 1, "for": "x"}]},
            {},
            "services.svc.guard.rules[0].for",
        ),
        (
            {"rules": [{"metric": "latency_p99_ms", "above": 1, "when": 1}]},
            {},
            "services.svc.guard.rules[0].when",
        ),
        ({"alerts": "http://x"}, {}, "services.svc.guard.alerts"),
        ({"alerts": [{"url": "ftp://x"}]}, {}, "services.svc.guard.alerts[0].url"),
        ({"alerts": [{"url": "http://x:99999/"}]}, {}, "services.svc.guard.alerts[0].url"),
        (
            {"alerts": [{"url": "http://x/", "format": "teams"}]},
            {},
            "services.svc.guard.alerts[0].format",
        ),
        ({"alerts": [{"url": "http://x/", "to": 1}]}, {}, "services.svc.guard.alerts[0].to"),
        (None, {"alerts": [{"format": "json"}]}, "alerts[0].url"),
        (None, {"rollout": {"confirm_timeout": "0s"}}, "rollout.confirm_timeout"),
        (None, {"rollout": {"confirm_timeout": "later"}}, "rollout.confirm_timeout"),
        (None, {"rollout": {"pace": 1}}, "rollout.pace"),
        (None, {"admin": {"tokens_file": 5}}, "admin.tokens_file"),
        (None, {"admin": {"tokens_file": "/nonexistent/tokens"}}, "admin.tokens_file"),
    ],
    ids=[
        "for-word",
        "for-negative",
        "rules-not-list",
        "rule-not-mapping",
        "rule-metric",
        "rule-no-above",
        "rule-rate-over-1",
        "rule-above-string",
        "rule-above-bool",
        "endpoints-above",
        "rule-action",
        "rule-window-zero",
        "rule-for",
        "rule-unknown-key",
        "alerts-not-list",
        "alert-scheme",
        "alert-port",
        "alert-format",
        "alert-unknown-key",
        "top-alert-no-url",
        "confirm-timeout-zero",
        "confirm-timeout-word",
        "rollout-unknown",
        "tokens-file-type",
        "tokens-file-missing",
    ],
)
def test_bad_new_config_names_the_field(guard: Any, top: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        C.build(_cfg(guard, **top), env={})
    assert field in [p for p, _ in e.value.errors], e.value.errors


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "lists no tokens"),
        ("# only a comment\n", "lists no tokens"),
        ("alice\n", "line 1"),
        ("alice s1 write extra\n", "line 1"),
        ("alice s1 admin\n", "role 'admin'"),
        ("al ice s1\n", "line 1"),
        ("b@d s1\n", "name 'b@d'"),
        ("alice s1\nalice s2\n", "listed twice"),
        ("alice s1\nbob s1 read\n", "also another name's token"),
        ("admin s1\n", "taken by the token_env token"),
    ],
    ids=[
        "empty",
        "comments-only",
        "no-token",
        "extra-field",
        "bad-role",
        "too-many",
        "bad-name",
        "dup-name",
        "dup-token",
        "admin-taken",
    ],
)
def test_bad_tokens_file_names_admin_tokens_file(tmp_path: Path, text: str, problem: str) -> None:
    f = tmp_path / "tokens"
    f.write_text(text)
    doc = _cfg(admin={"tokens_file": str(f), "token_env": "TOK"})
    with pytest.raises(ConfigError) as e:
        C.build(doc, env={"TOK": "envsecret"})
    msgs = [m for p, m in e.value.errors if p == "admin.tokens_file"]
    assert msgs and any(problem in m for m in msgs), e.value.errors


def test_tokens_file_parses_names_and_roles(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# name token role\nrelease-bot s3cret write\n\nviewer r3ad read\nops 0ps\n")
    cfg = C.build(_cfg(admin={"tokens_file": str(f)}), env={})
    assert [(t.name, t.role) for t in cfg.admin.tokens] == [
        ("release-bot", "write"),
        ("viewer", "read"),
        ("ops", "write"),
    ]


def test_a_tokens_file_counts_as_a_token_for_an_exposed_admin(tmp_path: Path) -> None:
    from gateway.control import check_admin_exposure

    f = tmp_path / "tokens"
    f.write_text("ops s3cret\n")
    exposed = {"listen": "0.0.0.0:0", "token_env": None}
    check_admin_exposure(C.build(_cfg(admin={**exposed, "tokens_file": str(f)}), env={}))
    with pytest.raises(ConfigError) as e:
        check_admin_exposure(C.build(_cfg(admin=exposed), env={}))
    assert e.value.field == "admin.listen"


def test_gateway_check_exits_2_naming_a_bad_tokens_file(tmp_path: Path, capsys: Any) -> None:
    import yaml

    from gateway import cli

    (tmp_path / "tokens").write_text("ops s3cret root\n")
    doc = _cfg(admin={"tokens_file": str(tmp_path / "tokens")}, rollout={"confirm_timeout": "x"})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "admin.tokens_file" in err and "role 'root'" in err
    assert "rollout.confirm_timeout" in err
