"""The `analysis:` config section: every field wrong in each way is refused, naming the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as C
from gateway.analysis_config import MetricSpec
from gateway.errors import ConfigError

UP = "http://127.0.0.1:9001"
OK_Q = 'sum(rate(payments_total{release="{{release}}",status="ok"}[{{interval}}]))'


def _doc(analysis: Any = None, service_analysis: Any = None) -> dict[str, Any]:
    svc: dict[str, Any] = {
        "releases": {
            "stable": {"weight": 1, "upstreams": [UP]},
            "gray": {"weight": 0, "upstreams": ["http://127.0.0.1:9002"]},
        }
    }
    if service_analysis is not None:
        svc["analysis"] = service_analysis
    d: dict[str, Any] = {"services": {"pay": svc}}
    if analysis is not None:
        d["analysis"] = analysis
    return d


def _metric(**kw: Any) -> dict[str, Any]:
    return {"name": "kpi", "query": OK_Q, "max": 1.0, **kw}


def _m(**kw: Any) -> dict[str, Any]:
    """Top-level analysis with one metric."""
    return {"metrics": [_metric(**kw)]}


# (id, analysis, service analysis, env, field, phrase)
CASES: list[tuple[str, Any, Any, dict[str, str], str, str]] = [
    ("analysis-not-a-mapping", [1], None, {}, "analysis", "mapping"),
    ("analysis-unknown-field", {"metric": []}, None, {}, "analysis.metric", "unknown field"),
    ("always-not-bool", {"always": "yes"}, None, {}, "analysis.always", "true or false"),
    (
        "address-not-url",
        {"prometheus": {"address": "prom:9090"}},
        None,
        {},
        "analysis.prometheus.address",
        "http://",
    ),
    (
        "address-bad-port",
        {"prometheus": {"address": "http://127.0.0.1:99999"}},
        None,
        {},
        "analysis.prometheus.address",
        "URL",
    ),
    (
        "address-number",
        {"prometheus": {"address": 9090}},
        None,
        {},
        "analysis.prometheus.address",
        "URL",
    ),
    ("env-address-bad", {}, None, {"PROMETHEUS_URL": "ftp://x"}, "PROMETHEUS_URL", "http://"),
    (
        "timeout-zero",
        {"prometheus": {"timeout": 0}},
        None,
        {},
        "analysis.prometheus.timeout",
        "> 0",
    ),
    (
        "timeout-words",
        {"prometheus": {"timeout": "soon"}},
        None,
        {},
        "analysis.prometheus.timeout",
        "duration",
    ),
    (
        "prometheus-unknown-field",
        {"prometheus": {"url": "http://x"}},
        None,
        {},
        "analysis.prometheus.url",
        "unknown field",
    ),
    ("metrics-not-list", {"metrics": {"a": 1}}, None, {}, "analysis.metrics", "list"),
    ("metric-not-mapping", {"metrics": ["kpi"]}, None, {}, "analysis.metrics[0]", "mapping"),
    ("metric-null", {"metrics": [None]}, None, {}, "analysis.metrics[0]", "mapping"),
    (
        "name-missing",
        {"metrics": [{"query": OK_Q, "max": 1}]},
        None,
        {},
        "analysis.metrics[0].name",
        "required",
    ),
    ("name-bad-chars", _m(name="a b"), None, {}, "analysis.metrics[0].name", "letters"),
    (
        "query-missing",
        {"metrics": [{"name": "k", "max": 1}]},
        None,
        {},
        "analysis.metrics[0].query",
        "required",
    ),
    ("query-empty", _m(query=" "), None, {}, "analysis.metrics[0].query", "non-empty"),
    ("query-not-string", _m(query=5), None, {}, "analysis.metrics[0].query", "non-empty"),
    (
        "unknown-placeholder",
        _m(query='x{r="{{rel}}"}'),
        None,
        {},
        "analysis.metrics[0].query",
        "unknown placeholder '{{rel}}'",
    ),
    (
        "no-condition",
        {"metrics": [{"name": "k", "query": OK_Q}]},
        None,
        {},
        "analysis.metrics[0]",
        "needs a condition",
    ),
    ("max-string", _m(max="0.8"), None, {}, "analysis.metrics[0].max", "finite number"),
    ("max-bool", _m(max=True), None, {}, "analysis.metrics[0].max", "finite number"),
    ("min-nan", _m(min=float("nan")), None, {}, "analysis.metrics[0].min", "finite number"),
    ("min-above-max", _m(min=2, max=1), None, {}, "analysis.metrics[0].min", "not be above max"),
    (
        "max-drop-without-compare",
        _m(max_drop=0.005),
        None,
        {},
        "analysis.metrics[0].max_drop",
        "compare: baseline",
    ),
    (
        "max-increase-without-compare",
        _m(max_increase=0.1),
        None,
        {},
        "analysis.metrics[0].max_increase",
        "compare: baseline",
    ),
    (
        "max-drop-negative",
        _m(compare="baseline", max_drop=-0.1),
        None,
        {},
        "analysis.metrics[0].max_drop",
        ">= 0",
    ),
    ("compare-wrong", _m(compare="stable"), None, {}, "analysis.metrics[0].compare", "'baseline'"),
    (
        "compare-without-bound",
        _m(compare="baseline"),
        None,
        {},
        "analysis.metrics[0].compare",
        "max_drop or max_increase",
    ),
    ("interval-zero", _m(interval=0), None, {}, "analysis.metrics[0].interval", "positive"),
    ("interval-words", _m(interval="often"), None, {}, "analysis.metrics[0].interval", "duration"),
    ("interval-negative", _m(interval=-5), None, {}, "analysis.metrics[0].interval", "duration"),
    ("interval-over-a-day", _m(interval="25h"), None, {}, "analysis.metrics[0].interval", "24h"),
    (
        "initial-delay-bad",
        _m(initial_delay="x"),
        None,
        {},
        "analysis.metrics[0].initial_delay",
        "duration",
    ),
    (
        "failure-limit-zero",
        _m(failure_limit=0),
        None,
        {},
        "analysis.metrics[0].failure_limit",
        "between 1",
    ),
    (
        "failure-limit-negative",
        _m(failure_limit=-1),
        None,
        {},
        "analysis.metrics[0].failure_limit",
        "between 1",
    ),
    (
        "failure-limit-float",
        _m(failure_limit=1.5),
        None,
        {},
        "analysis.metrics[0].failure_limit",
        "integer",
    ),
    (
        "failure-limit-bool",
        _m(failure_limit=True),
        None,
        {},
        "analysis.metrics[0].failure_limit",
        "integer",
    ),
    (
        "inconclusive-limit-zero",
        _m(inconclusive_limit=0),
        None,
        {},
        "analysis.metrics[0].inconclusive_limit",
        "between 1",
    ),
    (
        "min-requests-negative",
        _m(min_requests=-1),
        None,
        {},
        "analysis.metrics[0].min_requests",
        "between 0",
    ),
    (
        "min-requests-string",
        _m(min_requests="100"),
        None,
        {},
        "analysis.metrics[0].min_requests",
        "integer",
    ),
    (
        "action-unknown",
        _m(action="kill"),
        None,
        {},
        "analysis.metrics[0].action",
        "rollback, pause, observe",
    ),
    (
        "metric-unknown-field",
        _m(threshold=1),
        None,
        {},
        "analysis.metrics[0].threshold",
        "unknown field",
    ),
    (
        "duplicate-names",
        {"metrics": [_metric(), _metric()]},
        None,
        {},
        "analysis.metrics[1].name",
        "duplicate metric name 'kpi'",
    ),
    (
        "unknown-template",
        _m(template="nope"),
        None,
        {},
        "analysis.metrics[0].template",
        "unknown template 'nope'",
    ),
    (
        "template-bad-field",
        {
            "templates": {"t": {"query": OK_Q, "max": "high"}},
            "metrics": [{"name": "k", "template": "t"}],
        },
        None,
        {},
        "analysis.templates.t.max",
        "finite number",
    ),
    (
        "template-unknown-field",
        {"templates": {"t": {"name": "x", "query": OK_Q, "max": 1}}},
        None,
        {},
        "analysis.templates.t.name",
        "unknown field",
    ),
    ("templates-not-mapping", {"templates": ["t"]}, None, {}, "analysis.templates", "mapping"),
    (
        "template-placeholder",
        {"templates": {"t": {"query": "x{{svc}}", "max": 1}}},
        None,
        {},
        "analysis.templates.t.query",
        "unknown placeholder",
    ),
    ("service-analysis-not-mapping", None, "yes", {}, "services.pay.analysis", "mapping"),
    (
        "service-analysis-unknown",
        None,
        {"metric": []},
        {},
        "services.pay.analysis.metric",
        "unknown field",
    ),
    (
        "service-inherit-not-bool",
        None,
        {"inherit": "yes"},
        {},
        "services.pay.analysis.inherit",
        "true or false",
    ),
    (
        "service-metric-bad",
        None,
        {"metrics": [_metric(max="x")]},
        {},
        "services.pay.analysis.metrics[0].max",
        "finite number",
    ),
    (
        "service-inherit-duplicate",
        _m(),
        {"inherit": True, "metrics": [_metric()]},
        {},
        "services.pay.analysis.metrics[0].name",
        "duplicate metric name 'kpi'",
    ),
]


def _errors(doc: dict[str, Any], env: dict[str, str]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        C.build(doc, env=env)
    return list(e.value.errors)


@pytest.mark.parametrize(
    ("analysis", "service_analysis", "env", "field", "phrase"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_analysis_is_refused_naming_the_field(
    analysis: Any, service_analysis: Any, env: dict[str, str], field: str, phrase: str
) -> None:
    errors = _errors(_doc(analysis, service_analysis), env)
    assert any(p == field and phrase in m for p, m in errors), errors


def test_defaults_follow_the_documented_semantics() -> None:
    cfg = C.build(_doc(_m()), env={})
    (m,) = cfg.analysis.metrics_for("pay")
    assert (m.interval, m.initial_delay, m.failure_limit, m.inconclusive_limit) == (30, 30, 2, 3)
    assert (m.min_requests, m.action, m.compare) == (100, "rollback", None)
    assert cfg.analysis.prometheus.address == "http://127.0.0.1:9090"
    assert cfg.analysis.prometheus.timeout == 5 and cfg.analysis.always is False


def test_initial_delay_defaults_to_the_metric_interval() -> None:
    cfg = C.build(_doc(_m(interval="2s")), env={})
    assert cfg.analysis.metrics_for("pay")[0].initial_delay == 2


def test_env_overrides_the_address() -> None:
    doc = _doc({"prometheus": {"address": "http://a:1"}})
    cfg = C.build(doc, env={"PROMETHEUS_URL": "http://prom.local:9090/"})
    assert cfg.analysis.prometheus.address == "http://prom.local:9090"


@pytest.mark.parametrize(
    ("service_analysis", "names"),
    [
        (None, ["kpi"]),
        ({"metrics": [_metric(name="own")]}, ["own"]),
        ({"inherit": True, "metrics": [_metric(name="own")]}, ["kpi", "own"]),
        ({"inherit": True}, ["kpi"]),
        ({"metrics": []}, []),
    ],
    ids=["top-level", "own-replaces", "inherit-appends", "inherit-only", "empty-list-opts-out"],
)
def test_service_metrics_replace_or_inherit(service_analysis: Any, names: list[str]) -> None:
    cfg = C.build(_doc(_m(), service_analysis), env={})
    assert [m.name for m in cfg.analysis.metrics_for("pay")] == names


def test_a_template_with_overrides() -> None:
    analysis = {
        "templates": {
            "ok-ratio": {"query": OK_Q, "compare": "baseline", "max_drop": 0.005, "interval": "1m"}
        },
        "metrics": [{"name": "pay", "template": "ok-ratio", "max_drop": 0.01, "action": "pause"}],
    }
    (m,) = C.build(_doc(analysis), env={}).analysis.metrics_for("pay")
    assert m == MetricSpec(
        name="pay",
        query=OK_Q,
        compare="baseline",
        max_drop=0.01,
        interval=60,
        initial_delay=60,
        action="pause",
    )


def test_the_commented_example_is_valid() -> None:
    path = Path(__file__).resolve().parent.parent / "config" / "analysis.example.yaml"
    cfg = C.load(str(path), env={})
    assert cfg.analysis.metrics_for("payments")


def test_check_process_exits_2_naming_the_field(tmp_path: Path) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_text(yaml.safe_dump(_doc(_m(failure_limit=0, action="kill"))), encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_URL"},
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "analysis.metrics[0].failure_limit" in r.stderr
    assert "analysis.metrics[0].action" in r.stderr
    assert "Traceback" not in r.stderr
