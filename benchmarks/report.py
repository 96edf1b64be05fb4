"""Medians, ratios, the results table, results.json and the chart."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Row = dict[str, Any]

MEDIAN_FIELDS = (
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "cpu_fwd_us_per_req",
    "cpu_ups_us_per_req",
    "gray_share_upstream",
    "gray_share_metrics",
    "kib_per_conn",
)
LOWER_IS_BETTER = {"p50_ms", "p90_ms", "p99_ms", "kib_per_conn", "cpu_fwd_us_per_req"}
METRIC_LABEL = {"rps": "req/s", "p50_ms": "p50", "p99_ms": "p99", "kib_per_conn": "KiB/conn"}


def medians(runs: Iterable[Mapping[str, Any]]) -> list[Row]:
    """One row per (scenario, probe, target), in first-seen order, medians over ok runs."""
    cells: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    meta: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for run in runs:
        key = (run["scenario"], run["probe"], run["target"])
        cells.setdefault(key, [])
        meta.setdefault(key, run)
        if run.get("ok"):
            cells[key].append(run)
    rows = []
    for key, ok_runs in cells.items():
        first = meta[key]
        row: Row = {
            "scenario": key[0],
            "probe": key[1],
            "target": key[2],
            "group": first.get("group", key[0]),
            "metric": first.get("metric", "rps"),
            "n": len(ok_runs),
        }
        for name in MEDIAN_FIELDS:
            values = [r[name] for r in ok_runs if r.get(name) is not None]
            row[name] = statistics.median(values) if values else None
        rows.append(row)
    return add_ratios(rows)


# The reference forwarders every row is compared with.
PEERS = ("nginx", "haproxy")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def add_ratios(rows: list[Row]) -> list[Row]:
    """Ratio of each row's primary metric (and forwarder CPU) to nginx, HAProxy and direct.

    The reference is the same scenario and probe when it ran that target, else
    another scenario of the same interleaved group with the same probe (the
    trace_* rows take c50_1k's), never a figure from a separate run.
    """
    index: dict[tuple[str, str, str], Row] = {
        (r["scenario"], r["probe"], r["target"]): r for r in rows
    }
    by_group: dict[tuple[str, str, str], Row] = {}
    for r in rows:
        by_group.setdefault((r["group"], r["probe"], r["target"]), r)

    def ref(row: Row, target: str) -> Row | None:
        return index.get((row["scenario"], row["probe"], target)) or by_group.get(
            (row["group"], row["probe"], target)
        )

    for row in rows:
        metric = row["metric"]
        direct = ref(row, "direct")
        row["vs_direct"] = _ratio(row.get(metric), direct.get(metric)) if direct else None
        for peer in PEERS:
            other = ref(row, peer)
            row[f"vs_{peer}"] = _ratio(row.get(metric), other.get(metric)) if other else None
            row[f"cpu_vs_{peer}"] = (
                _ratio(row.get("cpu_fwd_us_per_req"), other.get("cpu_fwd_us_per_req"))
                if other
                else None
            )
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def _gray(row: Row) -> float | None:
    share = row.get("gray_share_metrics")
    if share is None:
        share = row.get("gray_share_upstream")
    return None if share is None else share * 100


COLUMNS = (
    ("scenario", "<"),
    ("probe", "<"),
    ("target", "<"),
    ("n", ">"),
    ("req/s", ">"),
    ("p50 ms", ">"),
    ("p99 ms", ">"),
    ("fwd µs/req", ">"),
    ("ups µs/req", ">"),
    ("gray %", ">"),
    ("KiB/conn", ">"),
    ("ratio of", "<"),
    ("×nginx", ">"),
    ("×haproxy", ">"),
    ("×direct", ">"),
    ("cpu×nginx", ">"),
    ("cpu×haproxy", ">"),
)


def format_table(rows: list[Row]) -> str:
    """A plain-text table of the median rows."""
    cells = [
        [
            row["scenario"],
            row["probe"],
            row["target"],
            str(row["n"]),
            _fmt(row.get("rps"), ",.0f"),
            _fmt(row.get("p50_ms"), ".3f"),
            _fmt(row.get("p99_ms"), ".3f"),
            _fmt(row.get("cpu_fwd_us_per_req"), ".1f"),
            _fmt(row.get("cpu_ups_us_per_req"), ".1f"),
            _fmt(_gray(row), ".1f"),
            _fmt(row.get("kib_per_conn"), ".2f"),
            METRIC_LABEL.get(row["metric"], row["metric"]),
            _fmt(row.get("vs_nginx"), ".2f"),
            _fmt(row.get("vs_haproxy"), ".2f"),
            _fmt(row.get("vs_direct"), ".2f"),
            _fmt(row.get("cpu_vs_nginx"), ".2f"),
            _fmt(row.get("cpu_vs_haproxy"), ".2f"),
        ]
        for row in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(COLUMNS)]
    lines = ["  ".join(f"{h:{a}{w}}" for (h, a), w in zip(COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    previous = None
    for row, cell in zip(rows, cells, strict=True):
        if previous is not None and row["group"] != previous:
            lines.append("")
        previous = row["group"]
        lines.append(
            "  ".join(f"{c:{a}{w}}" for c, (_, a), w in zip(cell, COLUMNS, widths, strict=True))
        )
    return "\n".join(lines)


LEGEND = """\
ratio of: the figure ×nginx/×haproxy/×direct compare — req/s (higher is better) for wrk runs,
p99 (hey and wrk paced at 5k/s) and p50 (wrk c1) latency and KiB/conn (lower is better) otherwise.
fwd µs/req: user+sys CPU of the forwarder's processes per request; ups: of both upstreams.
gray %: share the gateway's http_requests_total counted for gray (else the upstreams' counts).
Medians of interleaved repeats; compare ratios within this run only
(benchmarks/README.md "Method, and why")."""


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


COLORS = {"direct": "#999999", "nginx": "#2b8a3e", "haproxy": "#d9480f", "gateway": "#1c64b8"}


def _panels(rows: list[Row]) -> list[tuple[str, str, list[Row]]]:
    """(title, field, rows) per chart panel; latency gets one panel per probe (scales differ)."""
    load = [r for r in rows if r["metric"] == "rps"]
    panels = [
        ("median req/s (wrk, higher is better)", "rps", load),
        ("forwarder CPU µs per request (lower is better)", "cpu_fwd_us_per_req", load),
    ]
    for probe in dict.fromkeys(r["probe"] for r in rows if r["metric"] in ("p50_ms", "p99_ms")):
        sel = [r for r in rows if r["probe"] == probe]
        panels.append((f"latency ms, {probe} (solid p50, light p99)", "latency", sel))
    idle = [r for r in rows if r["metric"] == "kib_per_conn"]
    panels.append(("RSS KiB per idle keep-alive connection", "kib_per_conn", idle))
    value = "p99_ms"
    return [
        (t, f, [r for r in sel if r.get(value if f == "latency" else f) is not None])
        for t, f, sel in panels
        if any(r.get(value if f == "latency" else f) is not None for r in sel)
    ]


def write_chart(path: Path, rows: list[Row]) -> bool:
    """A PNG of the median rows, one panel per figure; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = _panels(rows)
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.0 * len(panels)), squeeze=False)
    for ax, (title, field, sel) in zip(axes[:, 0], panels, strict=True):
        cats = list(dict.fromkeys((r["scenario"], r["probe"]) for r in sel))
        targets = list(dict.fromkeys(r["target"] for r in sel))
        width = 0.8 / len(targets)
        for ti, target in enumerate(targets):
            xs, p50, top = [], [], []
            for ci, cat in enumerate(cats):
                match = [
                    r for r in sel if r["target"] == target and (r["scenario"], r["probe"]) == cat
                ]
                if match:
                    xs.append(ci + (ti - (len(targets) - 1) / 2) * width)
                    top.append(match[0]["p99_ms" if field == "latency" else field])
                    p50.append(match[0].get("p50_ms") or 0.0)
            color = COLORS.get(target)
            if field == "latency":
                ax.bar(xs, top, width, color=color, alpha=0.35)
                ax.bar(xs, p50, width, color=color, label=target)
            else:
                ax.bar(xs, top, width, color=color, label=target)
        ax.set_xticks(range(len(cats)), [f"{s}\n{p}" for s, p in cats], fontsize=8)
        ax.set_xlim(-0.6, len(cats) - 0.4)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
