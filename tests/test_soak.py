"""A bounded run of the soak benchmark (benchmarks/soak.py): real processes on 127.0.0.1."""

from __future__ import annotations

from benchmarks.soak import format_report, run_soak


def test_soak_smoke_has_no_failed_request_and_reports_every_tenth() -> None:
    r = run_soak(5000, concurrency=16, weight_every=0.3, churn_every=0.3)
    report = format_report(r)
    assert r.failed == 0, report
    assert r.requests == 5000
    assert r.weight_changes >= 1 and r.endpoint_changes >= 1, report
    marks = list(range(500, 5001, 500))
    assert len(r.samples) == len(marks) and r.samples[-1].done == 5000, report
    assert all(m <= s.done < m + 500 for s, m in zip(r.samples, marks, strict=True)), report
    for s in r.samples:
        assert s.rss_kib > 0 and s.fds > 0 and s.p99_ms >= s.p50_ms > 0
        # three upstreams, at most one connection per request in flight to each
        assert 1 <= s.upstream_sockets <= 3 * 16, report
    assert set(r.growth) == {"rss_kib", "fds", "upstream_sockets"}
