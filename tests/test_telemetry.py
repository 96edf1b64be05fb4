"""Telemetry setup (README): OTEL_* / GATEWAY_ENV resolution, the cheap sampler, span shape."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

from gateway import config as C
from gateway.app import Gateway
from gateway.engine.api import RequestHead
from gateway.propagation import TraceParent
from gateway.telemetry import (
    PROFILES,
    SAMPLERS,
    SpanTracer,
    Telemetry,
    TelemetryConfig,
    decision_function,
    sdk_sampler,
)
from tests.conftest import Upstream, free_port, gateway_config

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"
SPAN = "b7ad6b7169203331"


# --- configuration from the environment -------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "sampler", "ratio", "exporters"),
    [
        ({}, "parentbased_always_on", 1.0, ()),
        ({"GATEWAY_ENV": "prod"}, "parentbased_always_on", 1.0, ("otlp",)),
        ({"GATEWAY_ENV": "staging"}, "parentbased_traceidratio", 0.1, ("otlp",)),
        ({"GATEWAY_ENV": "dev"}, "parentbased_always_on", 1.0, ("console",)),
        ({"GATEWAY_ENV": "PROD "}, "parentbased_always_on", 1.0, ("otlp",)),
        (
            {
                "GATEWAY_ENV": "prod",
                "OTEL_TRACES_SAMPLER": "traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.25",
            },
            "traceidratio",
            0.25,
            ("otlp",),
        ),
        (
            {"GATEWAY_ENV": "staging", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
            "parentbased_traceidratio",
            0.5,
            ("otlp",),
        ),
        (
            {"GATEWAY_ENV": "staging", "OTEL_TRACES_SAMPLER": "always_off"},
            "always_off",
            1.0,
            ("otlp",),
        ),
        ({"GATEWAY_ENV": "dev", "OTEL_TRACES_EXPORTER": "none"}, "parentbased_always_on", 1.0, ()),
        (
            {"GATEWAY_ENV": "prod", "OTEL_TRACES_EXPORTER": "console,otlp,console"},
            "parentbased_always_on",
            1.0,
            ("console", "otlp"),
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "parentbased_always_on", 1.0, ("otlp",)),
    ],
    ids=[
        "unset-exports-nothing",
        "prod",
        "staging",
        "dev",
        "profile-case-and-space",
        "explicit-sampler-wins",
        "explicit-ratio-wins",
        "explicit-always-off",
        "explicit-none-exporter",
        "exporter-list-deduplicated",
        "otel-without-profile",
    ],
)
def test_profiles_and_explicit_otel_variables(
    env: dict[str, str], sampler: str, ratio: float, exporters: tuple[str, ...]
) -> None:
    cfg = TelemetryConfig.from_env(env)
    assert (cfg.sampler, cfg.sampler_ratio, cfg.exporters) == (sampler, ratio, exporters)
    assert cfg.problems == ()


def test_every_profile_is_documented_in_spec_order() -> None:
    assert tuple(PROFILES) == ("prod", "staging", "dev")


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"GATEWAY_ENV": "production"}, "GATEWAY_ENV"),
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
    ],
    ids=[
        "unknown-profile",
        "unknown-sampler",
        "ratio-above-1",
        "ratio-not-a-number",
        "unknown-exporter",
        "grpc-not-installed",
        "bad-timeout",
    ],
)
def test_invalid_values_warn_and_fall_back(
    env: dict[str, str], problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = TelemetryConfig.from_env(env)
    assert any(problem in p for p in cfg.problems), cfg.problems
    assert cfg.sampler in SAMPLERS and 0.0 <= cfg.sampler_ratio <= 1.0
    with caplog.at_level(logging.WARNING, "gateway.telemetry"):
        t = Telemetry(cfg)
    assert any(problem in r.getMessage() for r in caplog.records)
    t.shutdown()


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({}, "http://localhost:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318/"}, "http://otel:4318/v1/traces"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://x/api/spans",
            },
            "https://x/api/spans",
        ),
    ],
    ids=["default", "base-gets-signal-path", "per-signal-used-as-is"],
)
def test_otlp_endpoint_resolution(env: dict[str, str], endpoint: str) -> None:
    assert TelemetryConfig.from_env(env).otlp_endpoint == endpoint


def test_service_name_headers_timeout_and_resource_attributes() -> None:
    cfg = TelemetryConfig.from_env(
        {
            "OTEL_SERVICE_NAME": "edge-gw",
            "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20abc, x-tenant=t1",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
            "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=gw-0,service.name=ignored",
            "OTEL_SDK_DISABLED": "TRUE",
        }
    )
    assert cfg.service_name == "edge-gw"
    assert cfg.otlp_headers == (("authorization", "Bearer abc"), ("x-tenant", "t1"))
    assert cfg.otlp_timeout == 2.5
    assert ("k8s.pod.name", "gw-0") in cfg.resource_attributes
    assert cfg.disabled


@pytest.mark.parametrize(
    ("value", "disabled"),
    [("true", True), ("TRUE", True), (" True ", True), ("1", False), ("yes", False), ("", False)],
    ids=["true", "upper", "spaces", "one", "yes", "empty"],
)
def test_sdk_disabled_only_by_true(value: str, disabled: bool) -> None:
    # OTel spec, "Parsing boolean values": anything but "true" (any case) is false.
    assert TelemetryConfig.from_env({"OTEL_SDK_DISABLED": value}).disabled is disabled


def test_resource_names_the_service_version_and_environment() -> None:
    mem = InMemorySpanExporter()
    cfg = TelemetryConfig.from_env(
        {
            "GATEWAY_ENV": "staging",
            "OTEL_SERVICE_NAME": "edge-gw",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,team=edge",
        }
    )
    t = Telemetry(cfg, processors=[SimpleSpanProcessor(mem)], version="1.2.3")
    assert t.provider is not None
    attrs = t.provider.resource.attributes
    assert attrs["service.name"] == "edge-gw"  # OTEL_SERVICE_NAME beats the resource list
    assert attrs["service.version"] == "1.2.3"
    assert attrs["deployment.environment.name"] == "staging"
    assert attrs["team"] == "edge"
    t.shutdown()


# --- zero work when nothing is traced -------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_SDK_DISABLED": "true", "GATEWAY_ENV": "prod"},
        {"GATEWAY_ENV": "prod", "OTEL_TRACES_EXPORTER": "none"},
    ],
    ids=["unset", "sdk-disabled", "exporter-none"],
)
def test_no_provider_and_no_tracer_when_nothing_is_exported(env: dict[str, str]) -> None:
    t = Telemetry.from_env(env)
    assert t.provider is None and t.tracer is None and t.trace_configs() == []
    t.shutdown()


def test_disabled_sdk_keeps_the_callers_sampling_decision() -> None:
    t = Telemetry.from_env({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_SAMPLER": "always_on"})
    assert t.sampler.sample(TraceParent(0, TID, PID, 0x01)) is True
    assert t.sampler.sample(TraceParent(0, TID, PID, 0x00)) is False
    assert t.sampler.sample(None) is False


def test_exporters_are_batched_and_shut_down() -> None:
    t = Telemetry.from_env({"GATEWAY_ENV": "dev"})
    assert t.provider is not None and t.tracer is not None
    procs = t.provider._active_span_processor._span_processors
    assert [type(p) for p in procs] == [BatchSpanProcessor]
    t.shutdown()
    assert t.provider is None
    t.shutdown()  # idempotent


# --- the cheap sampler agrees with the SDK ----------------------------------------------------


def _parent_context(tp: TraceParent | None) -> Context | None:
    if tp is None:
        return None
    sc = SpanContext(int(tp.trace_id, 16), int(tp.parent_id, 16), True, TraceFlags(tp.flags))
    return set_span_in_context(NonRecordingSpan(sc))


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 1.0], ids=lambda r: f"ratio-{r}")
@pytest.mark.parametrize("kind", SAMPLERS)
def test_decision_equals_sdk_sampler_for_incoming_traces(kind: str, ratio: float) -> None:
    rng = random.Random(5)
    decide = decision_function(kind, ratio, rng)
    sdk = sdk_sampler(kind, ratio)
    for _ in range(2000):
        tid = f"{rng.getrandbits(128):032x}"
        tp = TraceParent(0, tid, PID, rng.choice((0, 1, 2, 3)))
        want = sdk.should_sample(_parent_context(tp), int(tid, 16), "GET").decision
        assert decide.sample(tp) is (want is Decision.RECORD_AND_SAMPLE), (kind, tp)


@pytest.mark.parametrize(
    ("kind", "ratio", "low", "high"),
    [
        ("always_on", 1.0, 1.0, 1.0),
        ("always_off", 1.0, 0.0, 0.0),
        ("parentbased_always_on", 1.0, 1.0, 1.0),
        ("parentbased_always_off", 1.0, 0.0, 0.0),
        ("traceidratio", 0.1, 0.08, 0.12),
        ("parentbased_traceidratio", 0.25, 0.22, 0.28),
    ],
    ids=["on", "off", "pb-on", "pb-off", "ratio", "pb-ratio"],
)
def test_root_decision_share(kind: str, ratio: float, low: float, high: float) -> None:
    decide = decision_function(kind, ratio, random.Random(11))
    share = sum(decide.sample(None) for _ in range(10_000)) / 10_000
    assert low <= share <= high


# --- span shape ----------------------------------------------------------------------------


@pytest.fixture
def traced() -> Iterator[tuple[Telemetry, InMemorySpanExporter]]:
    mem = InMemorySpanExporter()
    t = Telemetry(TelemetryConfig(), processors=[SimpleSpanProcessor(mem)])
    yield t, mem
    t.shutdown()


def _head(method: bytes = b"GET", target: bytes = b"/v1/users?id=7&sig=secret") -> RequestHead:
    return RequestHead(
        method=method,
        target=target,
        headers=[(b"Host", b"user-api.local:8080"), (b"User-Agent", b"curl/8")],
        client_ip="10.1.2.3",
    )


def _by_kind(spans: tuple[ReadableSpan, ...]) -> dict[SpanKind, ReadableSpan]:
    assert len(spans) == 2
    out = {s.kind: s for s in spans}
    assert set(out) == {SpanKind.SERVER, SpanKind.CLIENT}
    return out


def _start(t: Telemetry, head: RequestHead, parent: str | None = PID) -> Any:
    assert t.tracer is not None
    return t.tracer.start(
        head,
        "user-api",
        "gray",
        TID,
        parent,
        SPAN,
        upstream_host="127.0.0.1",
        upstream_port=9002,
    )


def test_server_and_client_span_ids_attributes_and_links(
    traced: tuple[Telemetry, InMemorySpanExporter],
) -> None:
    t, mem = traced
    _start(t, _head())(200, None)
    spans = _by_kind(mem.get_finished_spans())
    server, client = spans[SpanKind.SERVER], spans[SpanKind.CLIENT]
    assert server.context is not None and client.context is not None
    assert server.context.trace_id == client.context.trace_id == int(TID, 16)
    assert server.parent is not None and server.parent.span_id == int(PID, 16)
    assert server.parent.is_remote
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.context.span_id == int(SPAN, 16)
    assert server.name == client.name == "GET"
    assert dict(server.attributes or {}) == {
        "http.request.method": "GET",
        "url.path": "/v1/users",
        "url.query": "id=7&sig=REDACTED",
        "url.scheme": "http",
        "server.address": "user-api.local",
        "server.port": 8080,
        "client.address": "10.1.2.3",
        "network.protocol.version": "1.1",
        "user_agent.original": "curl/8",
        "http.response.status_code": 200,
        "release.stage": "gray",
        "gateway.service": "user-api",
    }
    assert dict(client.attributes or {}) == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": 9002,
        "url.full": "http://127.0.0.1:9002/v1/users?id=7&sig=REDACTED",
        "http.response.status_code": 200,
        "release.stage": "gray",
        "gateway.service": "user-api",
    }
    assert server.status.status_code is StatusCode.UNSET
    assert client.status.status_code is StatusCode.UNSET


def test_new_trace_takes_the_trace_id_already_sent_upstream(
    traced: tuple[Telemetry, InMemorySpanExporter],
) -> None:
    t, mem = traced
    _start(t, _head(), parent=None)(204, None)
    spans = _by_kind(mem.get_finished_spans())
    server, client = spans[SpanKind.SERVER], spans[SpanKind.CLIENT]
    assert server.parent is None
    assert server.context is not None and server.context.trace_id == int(TID, 16)
    assert client.context is not None and client.context.span_id == int(SPAN, 16)
    # The pins are one-shot: the next span the provider makes gets fresh ids.
    _start(t, _head(), parent=PID)(200, None)
    later = [s for s in mem.get_finished_spans() if s.kind is SpanKind.SERVER][-1]
    assert later.context is not None and later.context.span_id not in (int(SPAN, 16), 0)


@pytest.mark.parametrize(
    ("status", "error", "server_err", "client_err", "client_code", "server_code"),
    [
        (502, "connect", "connect", "connect", None, StatusCode.ERROR),
        (504, "timeout", "timeout", "timeout", None, StatusCode.ERROR),
        (502, "reset", "reset", "reset", None, StatusCode.ERROR),
        (503, None, "503", "503", 503, StatusCode.ERROR),
        (404, None, None, "404", 404, StatusCode.UNSET),
        (200, "client_abort", "client_abort", "client_abort", 200, StatusCode.UNSET),
    ],
    ids=["connect", "timeout", "reset", "upstream-503", "upstream-404", "client-abort"],
)
def test_failures_set_error_type_and_status(
    traced: tuple[Telemetry, InMemorySpanExporter],
    status: int,
    error: str | None,
    server_err: str | None,
    client_err: str | None,
    client_code: int | None,
    server_code: StatusCode,
) -> None:
    t, mem = traced
    _start(t, _head())(status, error)
    spans = _by_kind(mem.get_finished_spans())
    server, client = spans[SpanKind.SERVER], spans[SpanKind.CLIENT]
    assert server.attributes is not None and client.attributes is not None
    assert server.attributes.get("error.type") == server_err
    assert client.attributes.get("error.type") == client_err
    assert server.attributes["http.response.status_code"] == status
    assert client.attributes.get("http.response.status_code") == client_code
    assert server.status.status_code is server_code
    client_failed = error not in (None, "client_abort") or status >= 400
    assert client.status.status_code is (StatusCode.ERROR if client_failed else StatusCode.UNSET)


def test_unknown_method_is_other_with_the_original_kept(
    traced: tuple[Telemetry, InMemorySpanExporter],
) -> None:
    t, mem = traced
    _start(t, _head(method=b"PURGE", target=b"/"))(200, None)
    for s in mem.get_finished_spans():
        assert s.name == "_OTHER"
        assert s.attributes is not None
        assert s.attributes["http.request.method"] == "_OTHER"
        assert s.attributes["http.request.method_original"] == "PURGE"


def test_sdk_sampler_does_not_override_the_gateways_decision() -> None:
    # Ratio 0 would drop every span the SDK decides itself; the data path decided already.
    mem = InMemorySpanExporter()
    cfg = TelemetryConfig(sampler="traceidratio", sampler_ratio=0.0)
    t = Telemetry(cfg, processors=[SimpleSpanProcessor(mem)])
    _start(t, _head())(200, None)
    assert len(mem.get_finished_spans()) == 2
    t.shutdown()


def test_span_tracer_satisfies_the_handler_protocol() -> None:
    from gateway.handler import Tracer

    t = Telemetry(TelemetryConfig(), processors=[SimpleSpanProcessor(InMemorySpanExporter())])
    tracer: Tracer | None = t.tracer  # mypy checks the protocol here
    assert isinstance(tracer, SpanTracer)
    t.shutdown()
    assert Telemetry(TelemetryConfig(), processors=[]).tracer is None  # nothing to export to


# --- the gateway's own aiohttp clients (Consul, webhooks) --------------------------------------


async def test_own_client_sessions_are_traced_with_current_semconv(
    upstreams: Any,
) -> None:
    seen: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent", ""))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", hook)
    up: Upstream = await upstreams(app=app)
    mem = InMemorySpanExporter()
    t = Telemetry(TelemetryConfig(), processors=[SimpleSpanProcessor(mem)])
    try:
        async with t.client_session() as s, s.post(f"{up.url}/hook", json={"a": 1}) as r:
            assert r.status == 200
    finally:
        t.shutdown()
    (span,) = mem.get_finished_spans()
    assert span.kind is SpanKind.CLIENT and span.name == "POST"
    assert span.attributes is not None
    assert span.attributes["http.request.method"] == "POST"
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["server.port"] == up.port
    assert span.attributes["url.full"] == f"{up.url}/hook"
    assert span.context is not None
    assert seen == [
        f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-03"
    ]  # sampled + random (level 2)


async def test_untraced_client_session_has_no_trace_config() -> None:
    t = Telemetry.from_env({})
    async with t.client_session() as s:
        assert s.trace_configs == []


# --- wiring ---------------------------------------------------------------------------------


async def test_gateway_builds_telemetry_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_ENV", "dev")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    doc = gateway_config(
        {"svc": {"releases": {"stable": {"weight": 1, "upstreams": ["http://127.0.0.1:1"]}}}}
    )
    gw = Gateway(C.build(doc, env={}))
    assert gw.telemetry.config.environment == "dev"
    assert gw.handler.tracer is None
    assert gw.handler.sampler is gw.telemetry.sampler
    assert gw.handler.sampler is not None and gw.handler.sampler.sample(None) is False
    await gw.stop(0)


async def test_gateway_passes_injected_telemetry_and_shuts_it_down() -> None:
    mem = InMemorySpanExporter()
    t = Telemetry(TelemetryConfig(), processors=[SimpleSpanProcessor(mem)])
    doc = gateway_config(
        {"svc": {"releases": {"stable": {"weight": 1, "upstreams": ["http://127.0.0.1:1"]}}}}
    )
    gw = Gateway(C.build(doc, env={}), telemetry=t)
    assert gw.handler.tracer is t.tracer and t.tracer is not None
    await gw.stop(0)
    assert t.provider is None


# --- export ---------------------------------------------------------------------------------


async def test_prod_profile_exports_otlp_http_to_the_configured_endpoint(upstreams: Any) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    got: list[ExportTraceServiceRequest] = []
    headers: list[str] = []

    async def collect(request: web.Request) -> web.Response:
        req = ExportTraceServiceRequest()
        req.ParseFromString(await request.read())
        got.append(req)
        headers.append(request.headers.get("x-tenant", ""))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    up: Upstream = await upstreams(app=app)
    env = {
        "GATEWAY_ENV": "prod",
        "OTEL_EXPORTER_OTLP_ENDPOINT": up.url,
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=edge",
        "OTEL_SERVICE_NAME": "edge-gw",
    }
    t = Telemetry.from_env(env, version="9.9")
    _start(t, _head())(200, None)
    await asyncio.to_thread(t.shutdown)  # the flush posts to our collector on this loop
    (req,) = got
    assert headers == ["edge"]
    (rs,) = req.resource_spans
    resource = {a.key: a.value.string_value for a in rs.resource.attributes}
    assert resource["service.name"] == "edge-gw" and resource["service.version"] == "9.9"
    spans = [s for ss in rs.scope_spans for s in ss.spans]
    assert sorted(s.kind for s in spans) == [2, 3]  # SPAN_KIND_SERVER, SPAN_KIND_CLIENT
    assert {s.trace_id.hex() for s in spans} == {TID}


def test_shutdown_is_bounded_when_the_collector_is_away(caplog: pytest.LogCaptureFixture) -> None:
    dead = free_port()
    env = {"GATEWAY_ENV": "prod", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{dead}"}
    t = Telemetry.from_env(env)
    _start(t, _head())(200, None)
    start = time.monotonic()
    with caplog.at_level(logging.ERROR):  # the exporter's retry warnings are expected here
        t.shutdown(timeout=0.3)
    # Without the bound the OTLP exporter retries for up to its 10 s timeout.
    assert time.monotonic() - start < 3.0


async def test_consul_discovery_calls_are_traced(upstreams: Any, gateway: Any) -> None:
    from gateway.discovery import Pacing
    from tests.consul_double import ConsulDouble

    stable, gray = await upstreams("stable"), await upstreams("gray")
    mem = InMemorySpanExporter()
    tel = Telemetry(TelemetryConfig(), processors=[SimpleSpanProcessor(mem)])
    async with ConsulDouble(jitter=False) as consul:
        consul.register(
            {"ID": "gray-1", "Name": "user-api", "Tags": ["v2", "gray"],
             "Address": "127.0.0.1", "Port": gray.port}
        )  # fmt: skip
        releases = {
            "stable": {"weight": 95, "upstreams": [stable.url]},
            "gray": {"weight": 5, "consul": {"service": "user-api", "tags": ["v2", "gray"]}},
        }
        doc = gateway_config(
            {"user-api": {"releases": releases}}, consul={"address": consul.address}
        )
        gw: Gateway = await gateway(doc, telemetry=tel, consul_pacing=Pacing(rate=50, burst=50))
        deadline = time.monotonic() + 10
        while not gw.holder.current.services["user-api"].releases["gray"].endpoints:
            assert time.monotonic() < deadline, "gray never discovered"
            await asyncio.sleep(0.02)
        assert any(
            s.kind is SpanKind.CLIENT
            and str((s.attributes or {}).get("url.full", "")).startswith(consul.address)
            for s in mem.get_finished_spans()
        ), [s.attributes for s in mem.get_finished_spans()]
