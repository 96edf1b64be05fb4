"""Issue 5 acceptance 4: the admin `/metrics` as an operator's Prometheus would read it.

Two scrapes around a 95/5 run feed the gray-share expression of README "Tracing & metrics"
(evaluated here for its one shape, and by `promtool test rules` when promtool is installed); the
gauges, the upstream error kinds and the `--workers 2` aggregation are checked on the exposition
text.
"""

from __future__ import annotations

import bisect
import math
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.config import ENGINES
from gateway.metrics import BUCKETS
from tests.conftest import free_port, gateway_config, run_gateway_process, two_releases
from tests.loadclient import ThreadedUpstreams, releases_for_users, start_fixed_upstream

# The gray-share query as README "Tracing & metrics" prints it: it must work as written.
GRAY_SHARE = (
    'sum(rate(http_requests_total{service="user-api",release="gray"}[5m])) / '
    'sum(rate(http_requests_total{service="user-api"}[5m])) * 100'
)
Labels = tuple[tuple[str, str], ...]
Scrape = dict[tuple[str, Labels], float]
Make = Callable[..., Awaitable[Any]]


def parse(text: str) -> Scrape:
    """name + sorted labels -> value, for every sample of the exposition."""
    out: Scrape = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def select(scrape: Scrape, name: str, **match: str) -> dict[Labels, float]:
    return {
        labels: v
        for (n, labels), v in scrape.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    }


_SUM_RATE = r"sum\(rate\((\w+)\{([^}]*)\}\[(\w+)\]\)\)"
_RATIO = re.compile(rf"{_SUM_RATE}\s*/\s*{_SUM_RATE}\s*\*\s*100")


def eval_share(expr: str, first: Scrape, second: Scrape, seconds: float) -> float:
    """Evaluate `sum(rate(a{..}[w])) / sum(rate(b{..}[w])) * 100` over two scrapes.

    rate() of one series is its increase between the scrapes over the time between them; as in
    Prometheus a series needs a sample in both scrapes to have a rate.
    """
    m = _RATIO.fullmatch(expr)
    assert m is not None, expr

    def sum_rate(name: str, matchers: str) -> float:
        want = dict(re.findall(r'(\w+)="([^"]*)"', matchers))
        now, before = select(second, name, **want), select(first, name, **want)
        return sum((v - before[k]) / seconds for k, v in now.items() if k in before)

    return sum_rate(m[1], m[2]) / sum_rate(m[4], m[5]) * 100


async def scrape(session: aiohttp.ClientSession, gw: Gateway) -> tuple[str, float]:
    async with session.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text(), time.monotonic()


def users(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


@pytest.fixture
async def fixed_upstreams() -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """Factory of cheap keep-alive upstreams answering their release name."""
    servers = []

    async def make(release: str) -> str:
        srv, port = await start_fixed_upstream(release)
        servers.append(srv)
        return f"http://127.0.0.1:{port}"

    yield make
    for s in servers:
        s.close()
        await s.wait_closed()


def user_api(stable: str, gray: str, stable_w: float = 95, gray_w: float = 5) -> dict[str, Any]:
    return {
        "user-api": {
            "releases": {
                "stable": {"weight": stable_w, "upstreams": [stable]},
                "gray": {"weight": gray_w, "upstreams": [gray]},
            }
        }
    }


async def wait_count(
    session: aiohttp.ClientSession, gw: Gateway, name: str, total: float, within: float = 10.0
) -> Scrape:
    """Scrape until the samples of `name` sum to `total` (on_done may trail the response)."""
    end = time.monotonic() + within
    while True:
        got = parse((await scrape(session, gw))[0])
        if sum(select(got, name).values()) >= total or time.monotonic() > end:
            return got


@pytest.mark.parametrize("engine", ENGINES)
async def test_gray_share_from_two_scrapes_is_the_weight(
    fixed_upstreams: Callable[[str], Awaitable[str]],
    gateway: Make,
    tmp_path: Path,
    engine: str,
) -> None:
    stable, gray = await fixed_upstreams("stable"), await fixed_upstreams("gray")
    gw: Gateway = await gateway(gateway_config(user_api(stable, gray), engine=engine))
    assert gw.port is not None
    async with aiohttp.ClientSession() as session:
        # Warm-up: both series must exist at the first scrape to have a rate at all.
        warm = await releases_for_users(gw.port, users("warm", 300))
        forced = await releases_for_users(gw.port, ["gray", "stable"], header="X-Release-Stage")
        assert {s for s, _, _ in warm.values()} == {200} and len(forced) == 2
        first = await wait_count(session, gw, "http_requests_total", 302)
        t0 = time.monotonic()
        got = await releases_for_users(gw.port, users("run", 4000))
        assert all(status == 200 for status, _, _ in got.values())
        second = await wait_count(session, gw, "http_requests_total", 4302)
        t1 = time.monotonic()
    assert sum(select(second, "http_requests_total").values()) == 4302
    share = eval_share(GRAY_SHARE, first, second, t1 - t0)
    assert abs(share - 5.0) <= 1.0, share
    served_gray = sum(1 for _, stage, _ in got.values() if stage == "gray") / 40
    assert share == pytest.approx(served_gray)  # the metric counts what was served
    if shutil.which("promtool"):
        promtool_agrees(tmp_path, first, second)


def promtool_agrees(tmp: Path, first: Scrape, second: Scrape) -> None:
    """Prometheus' own engine on the two scrapes, one minute apart: the share is within 5 ± 1."""
    series = []
    for (name, labels), v in second.items():
        if name == "http_requests_total" and (name, labels) in first:
            sel = ",".join(f'{k}="{val}"' for k, val in labels)
            series.append({"series": f"{name}{{{sel}}}", "values": f"{first[(name, labels)]} {v}"})
    doc = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": f"(({GRAY_SHARE}) > bool 4) * (({GRAY_SHARE}) < bool 6)",
                        "eval_time": "1m",
                        "exp_samples": [{"labels": "{}", "value": 1}],
                    }
                ],
            }
        ],
    }
    path = tmp / "share_test.yml"
    path.write_text(yaml.safe_dump(doc))
    res = subprocess.run(
        ["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


async def test_weight_endpoint_and_state_gauges(
    fixed_upstreams: Callable[[str], Awaitable[str]], gateway: Make
) -> None:
    stable, gray = await fixed_upstreams("stable"), await fixed_upstreams("gray")
    gw: Gateway = await gateway(gateway_config(user_api(stable, gray, 19, 1)))
    async with aiohttp.ClientSession() as session:
        m = parse((await scrape(session, gw))[0])
    weights = {dict(k)["release"]: v for k, v in select(m, "gateway_release_weight").items()}
    assert weights == {"stable": 95.0, "gray": 5.0}  # normalized percent, not raw 19/1
    eps = {dict(k)["release"]: v for k, v in select(m, "gateway_upstream_endpoints").items()}
    assert eps == {"stable": 1.0, "gray": 1.0}
    for labels in (*select(m, "gateway_release_weight"), *select(m, "gateway_upstream_endpoints")):
        assert dict(labels)["service"] == "user-api"
    (version,) = select(m, "gateway_state_version").values()
    assert version == gw.holder.current.version


@pytest.mark.parametrize("engine", ENGINES)
async def test_upstream_down_counts_connect_errors_and_502s(
    fixed_upstreams: Callable[[str], Awaitable[str]],
    gateway: Make,
    engine: str,
) -> None:
    stable = await fixed_upstreams("stable")
    dead = f"http://127.0.0.1:{free_port()}"
    gw: Gateway = await gateway(gateway_config(user_api(stable, dead), engine=engine))
    assert gw.port is not None
    got = await releases_for_users(gw.port, ["gray", "stable"], header="X-Release-Stage")
    assert sorted(s for s, _, _ in got.values()) == [200, 502]
    async with aiohttp.ClientSession() as session:
        m = await wait_count(session, gw, "http_requests_total", 2)
    errors = select(m, "gateway_upstream_errors_total")
    assert errors == {(("kind", "connect"), ("release", "gray"), ("service", "user-api")): 1.0}
    codes = {(dict(k)["release"], dict(k)["code"]) for k in select(m, "http_requests_total")}
    assert codes == {("gray", "502"), ("stable", "200")}


async def test_labels_come_from_closed_sets_and_latency_buckets_fit_the_alerts(
    fixed_upstreams: Callable[[str], Awaitable[str]], gateway: Make
) -> None:
    stable, gray = await fixed_upstreams("stable"), await fixed_upstreams("gray")
    gw: Gateway = await gateway(gateway_config(user_api(stable, gray)))
    assert gw.port is not None
    paths = [f"u{i}" for i in range(50)]  # distinct users; each also hits its own path below
    await releases_for_users(gw.port, paths)
    async with aiohttp.ClientSession() as session:
        for p in ("/users/alice?x=1", "/%2e%2e/etc", "/" + "a" * 300):
            async with session.get(f"http://127.0.0.1:{gw.port}{p}") as r:
                await r.read()
        m = await wait_count(session, gw, "http_requests_total", 53)
    allowed = {
        "service": {"user-api"},
        "release": {"stable", "gray"},
        "code": {"200"},
        "le": {*(str(float(b)) for b in BUCKETS), "+Inf"},
    }
    for (name, labels), _ in m.items():
        if name.startswith(("http_", "gateway_")):
            for k, v in labels:
                assert k in allowed or k in ("kind", "reason", "state"), (name, k)
                if k in allowed:
                    assert v in allowed[k], (name, k, v)
    counts = select(m, "http_request_duration_seconds_count")
    assert sum(counts.values()) == 53
    les = {dict(k)["le"] for k in select(m, "http_request_duration_seconds_bucket")}
    assert "0.8" in les  # GrayLatencyP95 (> 800 ms) reads an exact bucket boundary


# --- --workers 2 --------------------------------------------------------------------------


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        body: bytes = r.read()
        return body.decode()


@pytest.fixture
def threaded_upstreams() -> Iterator[ThreadedUpstreams]:
    with ThreadedUpstreams(["stable", "gray"]) as up:
        yield up


@pytest.mark.slow
def test_two_workers_counters_add_up_to_the_requests_sent(
    tmp_path: Path, threaded_upstreams: ThreadedUpstreams
) -> None:
    import asyncio

    up = threaded_upstreams
    doc = gateway_config(user_api(up.url("stable"), up.url("gray")), drain_timeout="1s")
    sent = 3000
    with run_gateway_process(
        tmp_path, doc, workers=2, env={"OTEL_TRACES_EXPORTER": "none", "GATEWAY_ENV": ""}
    ) as gp:
        # 32 connections: SO_REUSEPORT spreads connections, not requests, over the workers.
        got = asyncio.run(releases_for_users(gp.port, users("w", sent), conns=32))
        assert len(got) == sent and all(s == 200 for s, _, _ in got.values())
        served = {r: sum(1 for _, st, _ in got.values() if st == r) for r in ("stable", "gray")}
        end = time.monotonic() + 10
        while True:
            m = parse(_get_text(f"{gp.admin}/metrics"))
            total = sum(select(m, "http_requests_total").values())
            if total >= sent or time.monotonic() > end:
                break
            time.sleep(0.05)
        assert total == sent
        for release, n in served.items():
            assert sum(select(m, "http_requests_total", release=release).values()) == n
        assert sum(select(m, "http_request_duration_seconds_count").values()) == sent
        weights = {dict(k)["release"]: v for k, v in select(m, "gateway_release_weight").items()}
        assert weights == {"stable": 95.0, "gray": 5.0}  # one series per label set, no pid


async def test_process_metrics_are_exposed(upstreams: Any, gateway: Any) -> None:
    st = await upstreams("stable")
    gw = await gateway(gateway_config(two_releases(st.url, st.url)))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as r:
            text = await r.text()
    assert "process_resident_memory_bytes" in text and "python_info" in text


def test_batched_accounting_equals_one_by_one() -> None:
    import random as _random

    from gateway.metrics import BUCKETS, Metrics
    from gateway.tally import Tally

    rng = _random.Random(3)
    items = [
        (
            "svc",
            rng.choice(["stable", "gray"]),
            rng.choice([200, 200, 500, 0]),
            rng.random() * 3 if rng.random() < 0.7 else rng.choice(BUCKETS),  # bounds: v <= le
            rng.choice([None, None, "connect", "client_abort"]),
        )
        for _ in range(500)
    ]
    one, batch, tallied = Metrics(), Metrics(), Metrics()
    for svc, rel, code, secs, err in items:
        if err is not None and err != "client_abort":
            one.upstream_error(svc, rel, err)
        if code:
            one.observe(svc, rel, code, secs)
    batch.observe_batch(items[:3])  # small batches take the plain path
    batch.observe_batch(items[3:])
    tallies = {rel: Tally("svc", rel) for rel in ("stable", "gray")}
    for i, (_, rel, code, secs, err) in enumerate(items):
        tallies[rel].add(code, secs, err)
        if i in (2, 250):  # flushes in between, as the data path does
            for t in tallies.values():
                tallied.observe_tally(t)
                t.clear()
    for t in tallies.values():
        tallied.observe_tally(t)

    def series(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): round(s.value, 9)
            for fam in text_string_to_metric_families(m.exposition().decode())
            for s in fam.samples
            if s.name.startswith(("http_", "gateway_upstream_errors")) and "created" not in s.name
        }

    assert series(one) == series(batch) == series(tallied)


_ON_AND_AROUND = [
    (f"{name}-{i}", v)
    for i, b in enumerate(BUCKETS)
    for name, v in (
        ("below", math.nextafter(b, 0.0)),
        ("on", b),
        ("above", math.nextafter(b, math.inf)),
    )
]


@pytest.mark.parametrize(
    "value",
    [v for _, v in _ON_AND_AROUND] + [0.0, -0.0, -1.0, 1e-9, 31.0, 1e300, math.inf, math.nan],
    ids=[n for n, _ in _ON_AND_AROUND] + ["0", "-0", "neg", "tiny", "31s", "huge", "inf", "nan"],
)
def test_bucket_index_is_observes_bucket(value: float) -> None:
    """The compare tree puts every value where Histogram.observe (bisect_left) does."""
    from gateway.metrics import _UPPER_BOUNDS, bucket_index

    assert bucket_index(value) == bisect.bisect_left(_UPPER_BOUNDS, value)


def test_batched_histogram_on_the_bounds_equals_observe() -> None:
    """Values on, just below and just above every bound: the batch counts what observe does."""
    from prometheus_client import CollectorRegistry, Histogram

    from gateway.metrics import _observe_many

    values = [v for _, v in _ON_AND_AROUND] + [0.0, 0.0002, 12.0, 31.0, math.inf]
    one, batch = (
        Histogram("d", "d", buckets=BUCKETS, registry=CollectorRegistry()) for _ in range(2)
    )
    for v in values:
        one.observe(v)
    _observe_many(batch, values)

    def counts(h: Histogram) -> list[tuple[str, float]]:
        return [
            (s.labels.get("le", s.name), s.value)
            for m in h.collect()
            for s in m.samples
            if s.name.endswith(("_bucket", "_count"))
        ]

    assert counts(one) == counts(batch)
    assert counts(batch)[0][1] == 4  # just below and on the first bound, 0.0 and 0.0002


@pytest.mark.parametrize(
    "values",
    [
        [0.0004] * 6,
        [0.0004, 0.003, 0.0004, 0.003, 0.0004, 0.003],
        [0.0004] * 3 + [0.003] * 3 + [0.2],
        [0.2] + [0.0004] * 5 + [0.2, 0.2],
    ],
    ids=["one-run", "alternating", "runs-then-one", "one-then-runs"],
)
def test_batched_histogram_counts_runs_of_one_bucket_as_observe(values: list[float]) -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from gateway.metrics import _observe_many

    one, batch = (
        Histogram("d", "d", buckets=BUCKETS, registry=CollectorRegistry()) for _ in range(2)
    )
    for v in values:
        one.observe(v)
    _observe_many(batch, values)

    def samples(h: Histogram) -> list[tuple[str, str, float]]:
        return [
            (s.name, s.labels.get("le", ""), s.value)
            for m in h.collect()
            for s in m.samples
            if not s.name.endswith("_created")
        ]

    assert samples(one) == samples(batch)


def test_a_failing_observer_never_stops_the_accounting(caplog: pytest.LogCaptureFixture) -> None:
    from gateway import config as C
    from gateway.engine.api import Forward, RequestHead
    from gateway.tally import Tally

    class Flaky:
        def __init__(self) -> None:
            self.calls = 0
            self.counted = 0

        def record_tally(self, t: Tally) -> None:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("boom")
            self.counted += t.n

    gw = Gateway(
        C.build(gateway_config(two_releases("http://127.0.0.1:9", "http://127.0.0.1:9")), env={})
    )
    flaky = Flaky()
    h = gw.handler
    h.observers.append(flaky)
    h.defer = lambda fn: None  # flush by hand, as the loop would once per iteration
    head = RequestHead(b"GET", b"/", [(b"Host", b"x"), (b"X-Release-Stage", b"gray")], "127.0.0.1")
    for _ in range(2):
        for _ in range(3):
            fwd = h.handle(head)
            assert isinstance(fwd, Forward)
            fwd.on_done(200, None)
        h.flush()
    assert flaky.calls == 2 and flaky.counted == 3  # the second batch still arrived
    assert "accounting failed for svc/gray" in caplog.text
    total = sum(
        s.value
        for fam in text_string_to_metric_families(gw.metrics.exposition().decode())
        for s in fam.samples
        if s.name == "http_requests_total" and s.labels["release"] == "gray"
    )
    assert total == 6  # metrics ran before the observer failed, both times


async def test_a_scrape_counts_the_requests_answered_before_it_at_once(
    upstreams: Any, gateway: Any
) -> None:
    """The accounting waits up to 50 ms (app.py ACCOUNTING_INTERVAL); a scrape flushes it first.

    One scrape right after the answers, no polling: every request answered before
    it is counted, although the deferred flush has not run yet.
    """
    st = await upstreams("stable")
    gw = await gateway(gateway_config(two_releases(st.url, st.url), engine="fast"))
    assert gw.port is not None
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            async with s.get(f"http://127.0.0.1:{gw.port}/", headers={"X-User-ID": f"u{i}"}) as r:
                assert r.status == 200
        text, _ = await scrape(s, gw)
    assert sum(select(parse(text), "http_requests_total").values()) == 3
