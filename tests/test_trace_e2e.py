"""Issue 5 acceptance 2-3 end to end: spans, traceparent, baggage and the access log.

The real in-process gateway in front of a real aiohttp upstream that records what it got; spans
go to an in-memory exporter through a SimpleSpanProcessor, so they are visible as soon as the
exchange ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway import config as C
from gateway.app import Gateway
from gateway.tally import Tally
from gateway.telemetry import Telemetry, TelemetryConfig
from tests.conftest import Upstream, free_port, gateway_config

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"
HEX = set("0123456789abcdef")

Make = Callable[..., Awaitable[Any]]


@dataclass
class Recorder:
    """An upstream that keeps the trace headers of every request it answers."""

    seen: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.seen.append(
                {
                    k: request.headers.get(k, "")
                    for k in ("traceparent", "tracestate", "baggage", "X-Release-Stage")
                }
            )
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def eventually(cond: Callable[[], bool], within: float = 5.0) -> None:
    """Poll until `cond()` holds; spans end in on_done, just after the client got its answer."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@dataclass
class Finished:
    """A handler Observer: gets each exchange once on_done has ended its spans."""

    statuses: list[int] = field(default_factory=list)

    def record_tally(self, t: Tally) -> None:
        self.statuses.extend(code for code, n in t.codes.items() for _ in range(n))
        self.statuses.extend(status for status, _, _ in t.odd)


@dataclass
class Traced:
    gw: Gateway
    mem: InMemorySpanExporter
    rec: Recorder
    up: Upstream
    finished: Finished

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gw.port}"

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.mem.get_finished_spans()


@pytest.fixture
async def traced(upstreams: Make, gateway: Make) -> AsyncIterator[Callable[..., Awaitable[Traced]]]:
    async def make(
        sampler: str = "parentbased_always_on",
        engine: str = "aiohttp",
        gray_weight: float = 0,
        **top: Any,
    ) -> Traced:
        rec = Recorder()
        up: Upstream = await upstreams(app=rec.app())
        gray = await upstreams(app=rec.app())
        mem = InMemorySpanExporter()
        tel = Telemetry(TelemetryConfig(sampler=sampler), processors=[SimpleSpanProcessor(mem)])
        releases = {
            "stable": {"weight": 100, "upstreams": [up.url]},
            "gray": {"weight": gray_weight, "upstreams": [gray.url]},
        }
        doc = gateway_config(
            {"user-api": {"match": {"hosts": ["user-api.local"]}, "releases": releases}},
            engine=engine,
            **top,
        )
        gw: Gateway = await gateway(doc, telemetry=tel)
        finished = Finished()
        gw.handler.observers.append(finished)
        return Traced(gw, mem, rec, up, finished)

    yield make


def _parts(tp: str) -> tuple[str, str, str, str]:
    version, trace_id, parent, flags = tp.split("-")
    return version, trace_id, parent, flags


async def _get(t: Traced, headers: dict[str, str], path: str = "/v1/users?id=7") -> int:
    h = {"Host": "user-api.local", **headers}
    async with aiohttp.ClientSession() as s, s.get(t.url + path, headers=h) as r:
        await r.read()
        return r.status


@pytest.mark.parametrize("engine", C.ENGINES)
async def test_sampled_requests_make_linked_server_and_client_spans(
    traced: Callable[..., Awaitable[Traced]], engine: str
) -> None:
    t = await traced(engine=engine)
    assert type(t.gw.engine).__name__ == {"fast": "FastEngine", "aiohttp": "AiohttpEngine"}[engine]
    incoming = [f"00-{i:032x}-{PID}-01" for i in range(1, 6)]
    for tp in incoming:
        assert await _get(t, {"traceparent": tp, "X-Release-Stage": "stable"}) == 200
    await eventually(lambda: len(t.finished.statuses) == len(incoming))
    assert len(t.spans()) == 2 * len(incoming)
    assert len(t.rec.seen) == len(incoming)
    for tp, seen in zip(incoming, t.rec.seen, strict=True):
        _, trace_id, parent, _ = _parts(tp)
        version, up_trace, up_parent, up_flags = _parts(seen["traceparent"])
        assert (version, up_trace, up_flags) == ("00", trace_id, "01")
        mine = [s for s in t.spans() if s.context and s.context.trace_id == int(trace_id, 16)]
        kinds = {s.kind: s for s in mine}
        assert len(mine) == 2 and set(kinds) == {SpanKind.SERVER, SpanKind.CLIENT}
        server, client = kinds[SpanKind.SERVER], kinds[SpanKind.CLIENT]
        assert server.context is not None and client.context is not None
        # SERVER continues the caller's trace; CLIENT is its child; upstream's parent is CLIENT.
        assert server.parent is not None and server.parent.span_id == int(parent, 16)
        assert client.parent is not None and client.parent.span_id == server.context.span_id
        assert up_parent == f"{client.context.span_id:016x}" != parent
        sa, ca = dict(server.attributes or {}), dict(client.attributes or {})
        for attrs in (sa, ca):
            assert attrs["release.stage"] == "stable"
            assert attrs["gateway.service"] == "user-api"
            assert attrs["http.request.method"] == "GET"
            assert attrs["http.response.status_code"] == 200
        assert sa["url.path"] == "/v1/users" and sa["url.query"] == "id=7"
        assert sa["url.scheme"] == "http" and sa["server.address"] == "user-api.local"
        assert sa["client.address"] == "127.0.0.1"
        assert sa["network.protocol.version"] == "1.1"
        assert ca["server.address"] == "127.0.0.1" and ca["server.port"] == t.up.port
        assert "error.type" not in sa and "error.type" not in ca


async def test_without_traceparent_the_new_trace_id_is_the_spans(
    traced: Callable[..., Awaitable[Traced]],
) -> None:
    t = await traced()
    assert await _get(t, {}) == 200
    await eventually(lambda: len(t.finished.statuses) == 1)
    _, up_trace, up_parent, up_flags = _parts(t.rec.seen[0]["traceparent"])
    assert up_flags == "03"  # sampled, and the random trace-id flag of level 2
    kinds = {s.kind: s for s in t.spans()}
    server, client = kinds[SpanKind.SERVER], kinds[SpanKind.CLIENT]
    assert server.parent is None
    assert server.context is not None and client.context is not None
    assert f"{server.context.trace_id:032x}" == up_trace
    assert f"{client.context.span_id:016x}" == up_parent


@pytest.mark.parametrize(
    ("sampler", "headers", "same_trace"),
    [
        ("parentbased_always_on", {"traceparent": f"00-{TID}-{PID}-00"}, True),
        ("parentbased_always_on", {"traceparent": f"00-{TID}-{PID}-02"}, True),
        ("always_off", {"traceparent": f"00-{TID}-{PID}-01"}, True),
        ("always_off", {}, False),
        ("parentbased_always_off", {"traceparent": f"00-{TID.upper()}-{PID}-01"}, False),
    ],
    ids=[
        "caller-not-sampled",
        "caller-not-sampled-random",
        "always-off",
        "always-off-new",
        "invalid-restarts",
    ],
)
async def test_unsampled_requests_make_no_spans_but_propagate(
    traced: Callable[..., Awaitable[Traced]],
    sampler: str,
    headers: dict[str, str],
    same_trace: bool,
) -> None:
    t = await traced(sampler=sampler)
    assert await _get(t, headers) == 200
    await eventually(lambda: len(t.finished.statuses) == 1)
    assert t.spans() == ()
    version, trace_id, parent, flags = _parts(t.rec.seen[0]["traceparent"])
    assert version == "00" and set(trace_id) <= HEX and set(parent) <= HEX
    assert len(trace_id) == 32 and len(parent) == 16 and parent != PID
    assert (trace_id == TID) is same_trace
    assert int(flags, 16) & 0x01 == 0
    if not same_trace:
        assert flags == "02"  # our own fully random trace-id
    elif "traceparent" in headers:
        assert flags == headers["traceparent"][-2:].replace("01", "00")


async def test_baggage_and_tracestate_reach_the_upstream(
    traced: Callable[..., Awaitable[Traced]],
) -> None:
    t = await traced(gray_weight=100)
    headers = {
        "traceparent": f"00-{TID}-{PID}-01",
        "tracestate": "congo=t61rcWkgMzE, rojo@dc1=00f067aa0ba902b7",
        "baggage": "userId=alice, isProduction=false;meta=1, bad member, release.stage=forged",
        "X-Release-Stage": "gray",
    }
    assert await _get(t, headers) == 200
    await eventually(lambda: len(t.finished.statuses) == 1)
    seen = t.rec.seen[0]
    assert seen["X-Release-Stage"] == "gray"
    assert seen["tracestate"] == "congo=t61rcWkgMzE,rojo@dc1=00f067aa0ba902b7"
    # Incoming members unchanged and in order; malformed dropped; our release.stage replaces
    # a forged one (W3C Baggage "Mutating baggage": a key MAY be updated).
    assert seen["baggage"] == "userId=alice,isProduction=false;meta=1,release.stage=gray"
    for s in t.spans():
        assert s.attributes is not None and s.attributes["release.stage"] == "gray"


@pytest.mark.parametrize("engine", C.ENGINES)
async def test_upstream_down_marks_both_spans_with_the_error_kind(
    gateway: Make, engine: str
) -> None:
    mem = InMemorySpanExporter()
    tel = Telemetry(TelemetryConfig(), processors=[SimpleSpanProcessor(mem)])
    dead = free_port()
    doc = gateway_config(
        {"svc": {"releases": {"stable": {"weight": 1, "upstreams": [f"http://127.0.0.1:{dead}"]}}}},
        engine=engine,
    )
    gw: Gateway = await gateway(doc, telemetry=tel)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.port}/") as r:
        assert r.status == 502
    await eventually(lambda: len(mem.get_finished_spans()) == 2)
    kinds = {s.kind: s for s in mem.get_finished_spans()}
    for span in kinds.values():
        assert span.attributes is not None and span.attributes["error.type"] == "connect"
        assert span.status.status_code is StatusCode.ERROR
    server_attrs = dict(kinds[SpanKind.SERVER].attributes or {})
    client_attrs = dict(kinds[SpanKind.CLIENT].attributes or {})
    assert server_attrs["http.response.status_code"] == 502
    assert "http.response.status_code" not in client_attrs
    assert client_attrs["server.port"] == dead


async def test_access_log_line_names_trace_service_release_upstream_status_duration(
    traced: Callable[..., Awaitable[Traced]], caplog: pytest.LogCaptureFixture
) -> None:
    t = await traced(access_log=True, gray_weight=100)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        assert await _get(t, {"traceparent": f"00-{TID}-{PID}-00", "X-User-ID": "u1"}) == 200
        await eventually(lambda: len(t.finished.statuses) == 1)
    (rec,) = [r for r in caplog.records if r.name == "gateway.access"]
    line = json.loads(rec.getMessage())
    assert line["trace_id"] == TID == _parts(t.rec.seen[0]["traceparent"])[1]
    assert line["service"] == "user-api"
    assert line["release"] == t.rec.seen[0]["X-Release-Stage"]
    assert line["release"] in ("stable", "gray")
    assert line["upstream"].startswith("127.0.0.1:")
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
