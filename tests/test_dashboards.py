"""Issue 5 acceptance 5: the Grafana dashboard and the Prometheus alert rules under config/.

Always: both files load, every rule and panel is complete, and every metric and label they use
is one the gateway exposes (README "Tracing & metrics"). With promtool on PATH also: the
rules and every panel query parse, and each alert fires (or stays quiet) on synthetic series.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus-alerts.yml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"

SPEC_METRICS = {  # README "Tracing & metrics", plus gateway_state_version (issue 5)
    "http_requests_total": "counter",
    "http_request_duration_seconds": "histogram",
    "gateway_release_weight": "gauge",
    "gateway_upstream_endpoints": "gauge",
    "gateway_upstream_errors_total": "counter",
    "gateway_guard_trips_total": "counter",
    "gateway_rollout_state": "gauge",
    "gateway_state_version": "gauge",
}
SERIES_NAMES = {
    *SPEC_METRICS,
    *(f"http_request_duration_seconds_{s}" for s in ("bucket", "sum", "count")),
}
STANDARD = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
LABELS = {"service", "release", "code", "le", "kind", "reason", "state", "job", "instance"}
REQUIRED_ALERTS = {
    "GrayShareDrift",
    "GrayErrorRate",
    "GrayLatencyP95",
    "GuardTripped",
    "NoHealthyEndpoints",
}
KEYWORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "topk", "bottomk", "quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset",
}  # fmt: skip
GRAFANA_VARS = {"$service": "user-api", "$__rate_interval": "1m", "$__range": "1h"}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are no function, keyword or label."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    found = set()
    for m in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", e):
        if m[0] in KEYWORDS or e[m.end() :].lstrip().startswith("("):
            continue
        found.add(m[0])
    return found


def label_names(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    names = set()
    for matchers in re.findall(r"\{([^}]*)\}", e):
        names |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", e):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    return names


def check_names(expr: str) -> None:
    for name in metric_names(expr):
        assert name in SERIES_NAMES or name in STANDARD or name.startswith("process_"), (
            f"{name!r} is not a metric the gateway exposes: {expr}"
        )
    assert label_names(expr) <= LABELS, (label_names(expr) - LABELS, expr)


@pytest.mark.parametrize(
    ("expr", "names", "labels"),
    [
        (
            'sum by (service, le) (rate(http_request_duration_seconds_bucket{code=~"5.."}[5m]))',
            {"http_request_duration_seconds_bucket"},
            {"service", "le", "code"},
        ),
        (
            "a unless b offset 10m > on (x) group_left clamp_min(c * 0.2, 2)",
            {"a", "b", "c"},
            {"x"},
        ),
        ('up{job="x"} == 0 and 1e3 > bool 5', {"up"}, {"job"}),
    ],
    ids=["aggregation", "set-operators", "standard"],
)
def test_expression_scanner(expr: str, names: set[str], labels: set[str]) -> None:
    assert metric_names(expr) == names
    assert label_names(expr) == labels


def test_spec_metric_names_are_what_the_gateway_exposes() -> None:
    m = Metrics()
    m.observe("s", "r", 200, 0.01)
    m.upstream_error("s", "r", "connect")
    m.guard_trips.labels("s", "r", "error_rate").inc()
    m.set_rollout_state("s", "Progressing")
    m.set_weights({"s": {"r": 1.0}})
    m.set_endpoints({("s", "r"): 1})
    exposed = {
        s.name: fam.type
        for fam in text_string_to_metric_families(m.exposition().decode())
        for s in fam.samples
    }
    for name, kind in SPEC_METRICS.items():
        sample = name if kind != "histogram" else f"{name}_count"
        assert exposed.get(sample) == kind, name


# --- alert rules ---------------------------------------------------------------------------


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    assert isinstance(doc, dict) and isinstance(doc["groups"], list)
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert rules
    return rules


def test_alert_rules_are_complete() -> None:
    rules = load_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    for r in rules:
        assert isinstance(r["expr"], str) and r["expr"].strip(), r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"].strip(), r["alert"]
        assert r["annotations"].get("description", "").strip(), r["alert"]
        check_names(r["expr"])


@pytest.mark.parametrize(
    ("alert", "must_use"),
    [
        ("GrayShareDrift", {"http_requests_total", "gateway_release_weight"}),
        ("GrayErrorRate", {"http_requests_total"}),
        ("GrayLatencyP95", {"http_request_duration_seconds_bucket"}),
        ("GuardTripped", {"gateway_guard_trips_total"}),
        ("NoHealthyEndpoints", {"gateway_upstream_endpoints"}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_each_required_alert_reads_its_metric(alert: str, must_use: set[str]) -> None:
    (rule,) = [r for r in load_rules() if r["alert"] == alert]
    assert metric_names(rule["expr"]) >= must_use


def test_thresholds_are_the_guard_defaults() -> None:
    rules = {r["alert"]: r["expr"] for r in load_rules()}
    assert re.search(r"\)\s*>\s*0\.01\b", rules["GrayErrorRate"])  # 1 %
    assert re.search(r"\)\s*>\s*0\.8\b", rules["GrayLatencyP95"])  # 800 ms
    assert 'code=~"5.."' in rules["GrayErrorRate"]


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH")


def promtool(*args: str) -> None:
    res = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    promtool("check", "rules", str(RULES))


def _sel(name: str, **labels: str) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _req(release: str, values: str, code: str = "200") -> dict[str, str]:
    return {
        "series": _sel("http_requests_total", service="user-api", release=release, code=code),
        "values": values,
    }


def _gauge(name: str, release: str, values: str) -> dict[str, str]:
    return {"series": _sel(name, service="user-api", release=release), "values": values}


def _fires(alert: str, at: str, *labels: dict[str, str]) -> dict[str, Any]:
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [{"exp_labels": {"service": "user-api", **lab}} for lab in labels],
    }


_WARN, _CRIT = {"severity": "warning"}, {"severity": "critical"}
_WEIGHTS = [
    _gauge("gateway_release_weight", "gray", "5x40"),
    _gauge("gateway_release_weight", "stable", "95x40"),
]
_BUCKETS = "http_request_duration_seconds_bucket"


def _latency(release: str, le_05: str) -> list[dict[str, str]]:
    lab = {"service": "user-api", "release": release}
    return [
        {"series": _sel(_BUCKETS, **lab, le="0.5"), "values": le_05},
        {"series": _sel(_BUCKETS, **lab, le="0.8"), "values": "0+50x20"},
        {"series": _sel(_BUCKETS, **lab, le="1.0"), "values": "0+100x20"},
        {"series": _sel(_BUCKETS, **lab, le="+Inf"), "values": "0+100x20"},
        {"series": _sel("http_request_duration_seconds_count", **lab), "values": "0+100x20"},
    ]


ALERT_CASES: list[tuple[str, list[dict[str, str]], list[dict[str, Any]]]] = [
    (
        "share-20-of-5-drifts",
        [_req("gray", "0+120x40"), _req("stable", "0+480x40"), *_WEIGHTS],
        [
            _fires("GrayShareDrift", "10m"),  # still pending: `for: 15m`
            _fires("GrayShareDrift", "30m", {"release": "gray", **_WARN}),
        ],
    ),
    (
        "share-at-weight-is-quiet",
        [_req("gray", "0+30x40"), _req("stable", "0+570x40"), *_WEIGHTS],
        [_fires("GrayShareDrift", "30m")],
    ),
    (
        "gray-2pct-5xx",
        [_req("gray", "0+600x20"), _req("gray", "0+12x20", "500"), _req("stable", "0+6000x20")],
        [_fires("GrayErrorRate", "10m", {"release": "gray", **_CRIT})],
    ),
    (
        "gray-half-pct-5xx-is-quiet",
        [_req("gray", "0+600x20"), _req("gray", "0+3x20", "503"), _req("stable", "0+10x20", "500")],
        [_fires("GrayErrorRate", "10m")],
    ),
    (
        "gray-p95-980ms",
        _latency("gray", "0+10x20"),
        [_fires("GrayLatencyP95", "15m", {"release": "gray", **_WARN})],
    ),
    (
        "gray-p95-fast-is-quiet",
        _latency("gray", "0+100x20"),
        [_fires("GrayLatencyP95", "15m")],
    ),
    (
        "guard-trip-new-and-counted",
        [
            {
                "series": _sel("gateway_guard_trips_total", service="user-api", release="gray",
                               reason="error_rate"),
                "values": "_x5 1x30",
            },
            {
                "series": _sel("gateway_guard_trips_total", service="user-api", release="b2",
                               reason="latency_p95"),
                "values": "0x5 1x30",
            },
        ],
        [
            _fires(
                "GuardTripped", "7m",
                {"release": "gray", "reason": "error_rate", **_CRIT},
                {"release": "b2", "reason": "latency_p95", **_CRIT},
            ),
            _fires("GuardTripped", "30m"),  # an old trip does not keep paging
        ],
    ),
    (
        "no-endpoints-with-weight",
        [
            _gauge("gateway_upstream_endpoints", "gray", "1x3 0x10"),
            _gauge("gateway_upstream_endpoints", "stable", "2x13"),
            _gauge("gateway_upstream_endpoints", "canary", "0x13"),
            _gauge("gateway_release_weight", "gray", "5x13"),
            _gauge("gateway_release_weight", "stable", "95x13"),
            _gauge("gateway_release_weight", "canary", "0x13"),
        ],
        [_fires("NoHealthyEndpoints", "8m", {"release": "gray", **_CRIT})],
    ),
    (
        "connect-errors",
        [
            {
                "series": _sel("gateway_upstream_errors_total", service="user-api", release="gray",
                               kind="connect"),
                "values": "0+60x20",
            }
        ],
        [_fires("UpstreamConnectErrors", "12m", {"release": "gray", "kind": "connect", **_WARN})],
    ),
]  # fmt: skip


@needs_promtool
@pytest.mark.parametrize(("series", "checks"), [c[1:] for c in ALERT_CASES],
                         ids=[c[0] for c in ALERT_CASES])  # fmt: skip
def test_alerts_fire_on_synthetic_series(
    tmp_path: Path, series: list[dict[str, str]], checks: list[dict[str, Any]]
) -> None:
    # Annotations are templates for people; promtool would need them verbatim, so drop them.
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    stripped = copy.deepcopy(doc)
    for g in stripped["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(stripped))
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": checks}],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    promtool("test", "rules", str(tmp_path / "test.yml"))


# --- Grafana dashboard ------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def panel_exprs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for p in doc["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    for a in doc["annotations"]["list"]:
        if "expr" in a:
            out.append((a["name"], a["expr"]))
    return out


def test_dashboard_loads_and_panels_are_complete() -> None:
    doc = load_dashboard()
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["targets"] and p["description"], p["title"]
        assert all(t["refId"] and t["expr"].strip() for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    m = re.fullmatch(r"label_values\((\w+), service\)", variables["service"]["definition"])
    assert m is not None and m[1] in SPEC_METRICS


def test_dashboard_queries_use_only_spec_metrics() -> None:
    for title, expr in panel_exprs(load_dashboard()):
        check_names(expr)
        assert "$" not in expr.replace("$service", "").replace("$__rate_interval", "").replace(
            "$__range", ""
        ), title


@pytest.mark.parametrize(
    ("what", "needles"),
    [
        ("share vs weight", ["http_requests_total", "gateway_release_weight", "by (release)"]),
        ("error rate", ['code=~"5.."', "http_requests_total", "by (release)"]),
        ("p95", ["histogram_quantile(0.95", "http_request_duration_seconds_bucket", "release"]),
        ("guard trips", ["gateway_guard_trips_total"]),
        ("rollout state", ["gateway_rollout_state", "by (state)"]),
        ("upstream errors", ["gateway_upstream_errors_total", "kind"]),
        ("endpoints", ["gateway_upstream_endpoints"]),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_dashboard_has_a_panel_for(what: str, needles: list[str]) -> None:
    texts = [" ".join(t["expr"] for t in p["targets"]) for p in load_dashboard()["panels"]]
    assert any(all(n in text for n in needles) for text in texts), f"no panel shows {what}"


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    rules = []
    for i, (_, expr) in enumerate(panel_exprs(load_dashboard())):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(path))
