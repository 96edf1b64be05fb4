"""OpenTelemetry for the gateway: OTEL_* configuration, a cheap sampler, spans only when sampled.

Why: README "Tracing & metrics" promises a SERVER span per request and a CLIENT span per
upstream attempt with the current HTTP semantic conventions, configured by the standard `OTEL_*`
variables plus `GATEWAY_ENV` profiles. An unsampled SDK span costs ~4.4 µs (CPython 3.11) against a
~16 µs
request budget, so the per-request decision is a plain function over the parsed `traceparent`
(`Telemetry.sampler`) and SDK span objects exist only for sampled requests
(`Telemetry.tracer`). Propagation itself stays in `gateway.propagation` and happens either way.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from opentelemetry import trace as trace_api
from opentelemetry.context import Context, create_key, get_value, set_value
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.sdk.version import __version__ as _SDK_VERSION
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode
from opentelemetry.util.http import PARAMS_TO_REDACT, redact_query_parameters

from gateway.engine.api import ERR_CLIENT, RequestHead
from gateway.sampling import KINDS, RequestSampler

if TYPE_CHECKING:
    import aiohttp
    from opentelemetry.trace.span import TraceState
    from opentelemetry.util.types import Attributes

log = logging.getLogger("gateway.telemetry")

SpanDone = Callable[[int, str | None], None]

SAMPLERS: Final = KINDS  # the OTEL_TRACES_SAMPLER values decided per request
EXPORTERS: Final = ("otlp", "console", "none")
# GATEWAY_ENV -> (sampler, ratio, exporters). Unset: nothing is exported unless OTEL_* says so.
PROFILES: Final[Mapping[str, tuple[str, float, tuple[str, ...]]]] = {
    "prod": ("parentbased_always_on", 1.0, ("otlp",)),
    "staging": ("parentbased_traceidratio", 0.1, ("otlp",)),
    "dev": ("parentbased_always_on", 1.0, ("console",)),
}
DEFAULT_SERVICE_NAME: Final = "gray-gateway"
_OTLP_DEFAULT_BASE = "http://localhost:4318"
_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
# Marks contexts whose spans the gateway has already decided to sample (see _DecidedSampler).
_DECIDED = create_key("gateway.sampled")


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """Tracing settings resolved from the environment once, at start.

    Why: no env reads outside one loader, and only `OTEL_*` plus `GATEWAY_ENV`
    (README "Tracing & metrics"); `problems` collects invalid values, which the OTel spec
    says to warn about and replace with the default rather than refuse to start.
    """

    service_name: str = DEFAULT_SERVICE_NAME
    environment: str | None = None
    disabled: bool = False
    exporters: tuple[str, ...] = ()
    sampler: str = "parentbased_always_on"
    sampler_ratio: float = 1.0
    otlp_endpoint: str = f"{_OTLP_DEFAULT_BASE}/v1/traces"
    otlp_headers: tuple[tuple[str, str], ...] = ()
    otlp_timeout: float | None = None
    resource_attributes: tuple[tuple[str, str], ...] = ()
    problems: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TelemetryConfig:
        """Read every tracing variable; explicit `OTEL_*` values win over the profile's."""
        problems: list[str] = []
        profile = env.get("GATEWAY_ENV", "").strip().lower() or None
        if profile is not None and profile not in PROFILES:
            problems.append(f"GATEWAY_ENV={profile!r} is not one of {', '.join(PROFILES)}")
            profile = None
        sampler, ratio, exporters = PROFILES.get(profile or "", ("parentbased_always_on", 1.0, ()))
        raw_sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
        if raw_sampler:
            if raw_sampler in SAMPLERS:
                sampler, ratio = raw_sampler, 1.0
            else:
                problems.append(f"OTEL_TRACES_SAMPLER={raw_sampler!r} is not supported")
        raw_arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        if raw_arg and sampler.endswith("traceidratio"):
            try:
                ratio = float(raw_arg)
                if not 0.0 <= ratio <= 1.0:
                    raise ValueError
            except ValueError:
                problems.append(f"OTEL_TRACES_SAMPLER_ARG={raw_arg!r} is not a ratio in [0, 1]")
                ratio = 1.0
        raw_exp = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        if raw_exp:
            names = [n.strip() for n in raw_exp.split(",") if n.strip()]
            for n in names:
                if n not in EXPORTERS:
                    problems.append(
                        f"OTEL_TRACES_EXPORTER: {n!r} is not one of otlp, console, none"
                    )
            exporters = tuple(n for n in dict.fromkeys(names) if n in EXPORTERS and n != "none")
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        if protocol.strip() != "http/protobuf" and "otlp" in exporters:
            problems.append(f"OTLP protocol {protocol!r} is not installed; using http/protobuf")
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        if not endpoint:
            base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or _OTLP_DEFAULT_BASE
            endpoint = base.rstrip("/") + "/v1/traces"
        headers = _key_values(
            env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS")
        )
        timeout: float | None = None
        raw_timeout = env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get(
            "OTEL_EXPORTER_OTLP_TIMEOUT"
        )
        if raw_timeout:
            try:
                timeout = float(raw_timeout) / 1000.0  # the spec gives it in milliseconds
            except ValueError:
                problems.append(f"OTEL_EXPORTER_OTLP_TIMEOUT={raw_timeout!r} is not milliseconds")
        return cls(
            service_name=env.get("OTEL_SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME,
            environment=profile,
            # OTel's boolean env vars: only "true" (any case) is true.
            disabled=env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true",
            exporters=exporters,
            sampler=sampler,
            sampler_ratio=ratio,
            otlp_endpoint=endpoint,
            otlp_headers=headers,
            otlp_timeout=timeout,
            resource_attributes=_key_values(env.get("OTEL_RESOURCE_ATTRIBUTES")),
            problems=tuple(problems),
        )


def _key_values(raw: str | None) -> tuple[tuple[str, str], ...]:
    """`k1=v1,k2=v2` with percent-encoded values (OTEL_RESOURCE_ATTRIBUTES, *_HEADERS)."""
    out: list[tuple[str, str]] = []
    for item in (raw or "").split(","):
        key, eq, value = item.partition("=")
        if eq and key.strip():
            out.append((key.strip(), unquote(value.strip())))
    return tuple(out)


def decision_function(kind: str, ratio: float, rng: random.Random | None = None) -> RequestSampler:
    """The per-request sampling decision, equal to the OTel SDK sampler of the same name.

    Why: the SDK decides only while creating a span (~4.4 µs even when dropped);
    this reads the parsed `traceparent` instead (gateway/sampling.py), with the SDK's
    ratio bound.
    """
    return RequestSampler(kind, TraceIdRatioBased.get_bound_for_rate(ratio), rng)


def sdk_sampler(kind: str, ratio: float) -> Sampler:
    """The SDK sampler for spans the gateway does not decide itself (its own admin clients)."""
    roots: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
    }
    if kind.startswith("parentbased_"):
        return ParentBased(roots[kind.removeprefix("parentbased_")])
    return roots[kind]


class _DecidedSampler(Sampler):
    """Records spans started under a context marked `_DECIDED`; asks `fallback` otherwise.

    Why: the data path has already sampled with `decision_function` (for a new trace, before
    its id existed), so re-deciding in the SDK could disagree and drop half a trace.
    """

    def __init__(self, fallback: Sampler) -> None:
        self.fallback = fallback

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[trace_api.Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if parent_context is not None and get_value(_DECIDED, parent_context):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self.fallback.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"GatewayDecided{{{self.fallback.get_description()}}}"


class _PinnedIds(RandomIdGenerator):
    """Hands out one pinned id next (per thread), then random ones again.

    Why: the upstream already got `traceparent` with our span id as parent and a new trace its
    id before any span existed (README "On every hop"); the SDK takes ids only from its IdGenerator.
    """

    def __init__(self) -> None:
        self.pins = threading.local()

    def generate_trace_id(self) -> int:
        pinned: int = getattr(self.pins, "trace_id", 0)
        if pinned:
            self.pins.trace_id = 0
            return pinned
        return super().generate_trace_id()

    def generate_span_id(self) -> int:
        pinned: int = getattr(self.pins, "span_id", 0)
        if pinned:
            self.pins.span_id = 0
            return pinned
        return super().generate_span_id()


def _host_port(value: str) -> tuple[str, int | None]:
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return host, int(port) if port.isdigit() else None


class SpanTracer:
    """The handler's `Tracer`: a SERVER span and its CLIENT child for one sampled request.

    Why: README "Tracing & metrics" and the OpenTelemetry HTTP semantic conventions (v1.26+
    attribute names); the CLIENT span takes the span id the handler already sent upstream, so the
    upstream's parent is that span.
    """

    def __init__(self, tracer: trace_api.Tracer, ids: _PinnedIds) -> None:
        self._tracer = tracer
        self._ids = ids
        self._decided = set_value(_DECIDED, True, Context())

    def start(
        self,
        head: RequestHead,
        service: str,
        release: str,
        trace_id: str,
        parent: str | None,
        span_id: str,
        *,
        upstream_host: str,
        upstream_port: int,
        extra_attrs: Sequence[tuple[str, str]] = (),
    ) -> SpanDone:
        """The SERVER and CLIENT spans; `extra_attrs` go on the SERVER one (`gray.tag`, …)."""
        method = head.method.decode("latin-1")
        known = method if method in _METHODS else "_OTHER"
        target = head.target.decode("latin-1")
        path, _, query = target.partition("?")
        host = agent = None
        for k, v in head.headers:
            lk = k.lower()
            if lk == b"host":
                host = v.decode("latin-1")
            elif lk == b"user-agent":
                agent = v.decode("latin-1")
        common: dict[str, str | int] = {
            "http.request.method": known,
            "release.stage": release,
            "gateway.service": service,
        }
        if known == "_OTHER":
            common["http.request.method_original"] = method
        attrs = dict(common)
        attrs["url.path"] = path
        attrs["url.scheme"] = head.scheme
        attrs["network.protocol.version"] = head.http_version
        # Semconv: scrub known credential parameters; parsing the query costs µs, so only then.
        redact = bool(query) and any(p in query for p in PARAMS_TO_REDACT)
        if query:
            attrs["url.query"] = redact_query_parameters(f"?{query}")[1:] if redact else query
        if host:
            name, port = _host_port(host)
            attrs["server.address"] = name
            if port is not None:
                attrs["server.port"] = port
        if head.client_ip:
            attrs["client.address"] = head.client_ip
        if agent:
            attrs["user_agent.original"] = agent
        for name_a, value_a in extra_attrs:
            attrs[name_a] = value_a
        cattrs = dict(common)
        cattrs["server.address"] = upstream_host
        cattrs["server.port"] = upstream_port
        netloc = f"[{upstream_host}]" if ":" in upstream_host else upstream_host
        url = f"http://{netloc}:{upstream_port}{target}"
        cattrs["url.full"] = redact_query_parameters(url) if redact else url

        ctx = self._decided
        pins = self._ids.pins
        if parent is None:
            pins.trace_id = int(trace_id, 16)
        else:
            remote = SpanContext(int(trace_id, 16), int(parent, 16), is_remote=True)
            ctx = trace_api.set_span_in_context(NonRecordingSpan(remote), ctx)
        try:
            server = self._tracer.start_span(known, ctx, SpanKind.SERVER, attrs)
        finally:
            pins.trace_id = 0
        pins.span_id = int(span_id, 16)
        try:
            client = self._tracer.start_span(
                known, trace_api.set_span_in_context(server, self._decided), SpanKind.CLIENT, cattrs
            )
        finally:
            pins.span_id = 0

        def done(status: int, error: str | None) -> None:
            failed = error is not None and error != ERR_CLIENT
            if status:
                server.set_attribute("http.response.status_code", status)
            if failed or status >= 500:
                server.set_attribute("error.type", error or str(status))
                server.set_status(StatusCode.ERROR)
            elif error is not None:
                server.set_attribute("error.type", error)
            # connect/timeout/protocol/reset: the status is the gateway's own error answer (or
            # may be), not something the upstream sent.
            if status and error in (None, ERR_CLIENT):
                client.set_attribute("http.response.status_code", status)
            if failed or (error is None and status >= 400):
                client.set_attribute("error.type", error or str(status))
                client.set_status(StatusCode.ERROR)
            elif error is not None:
                client.set_attribute("error.type", error)
            client.end()
            server.end()

        return done


class Telemetry:
    """Owns the TracerProvider (if any) and exposes the handler's `sampler` and `tracer`.

    Why: one owner that `Gateway.stop()` shuts down, so buffered spans are flushed on drain;
    with tracing disabled or nothing to export there is no provider and `tracer` is None, so a
    request costs only the `sampler` call (propagation happens regardless:
    README "Tracing & metrics").
    """

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        processors: Sequence[SpanProcessor] | None = None,
        version: str = "dev",
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.provider: TracerProvider | None = None
        self.tracer: SpanTracer | None = None
        self._exporters: list[SpanExporter] = []
        for problem in config.problems:
            log.warning("tracing: %s; using the default", problem)
        if config.disabled:
            # No SDK: keep the caller's decision so a sampled trace is not cut at this hop.
            self.sampler = decision_function("parentbased_always_off", 1.0)
            return
        self.sampler = decision_function(config.sampler, config.sampler_ratio, rng)
        procs = list(processors) if processors is not None else self._exporting_processors()
        if not procs:
            return
        attrs: dict[str, str] = {
            "telemetry.sdk.language": "python",
            "telemetry.sdk.name": "opentelemetry",
            "telemetry.sdk.version": _SDK_VERSION,
            **dict(config.resource_attributes),
            "service.name": config.service_name,
            "service.version": version,
        }
        if config.environment:
            attrs["deployment.environment.name"] = config.environment
        ids = _PinnedIds()
        self.provider = TracerProvider(
            sampler=_DecidedSampler(sdk_sampler(config.sampler, config.sampler_ratio)),
            resource=Resource(attrs),
            id_generator=ids,
            shutdown_on_exit=False,
        )
        for p in procs:
            self.provider.add_span_processor(p)
        self.tracer = SpanTracer(self.provider.get_tracer("gateway", version), ids)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, version: str = "dev") -> Telemetry:
        """Build from `OTEL_*` and `GATEWAY_ENV` (README "Tracing & metrics")."""
        return cls(TelemetryConfig.from_env(env), version=version)

    def _exporting_processors(self) -> list[SpanProcessor]:
        exporters: list[SpanExporter] = []
        for name in self.config.exporters:
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                exporters.append(
                    OTLPSpanExporter(
                        endpoint=self.config.otlp_endpoint,
                        headers=dict(self.config.otlp_headers) or None,
                        timeout=self.config.otlp_timeout,
                    )
                )
            elif name == "console":
                exporters.append(ConsoleSpanExporter())
        self._exporters = exporters
        return [BatchSpanProcessor(e) for e in exporters]

    def trace_configs(self) -> list[aiohttp.TraceConfig]:
        """aiohttp `trace_configs` that trace the gateway's own client calls (Consul, webhooks).

        Why: the gateway's own calls are traced with
        opentelemetry-instrumentation-aiohttp-client; attaching it per session instead of
        `AioHttpClientInstrumentor().instrument()` keeps it off the data path's pooled session,
        which would otherwise pay for a span on every request.
        """
        if self.provider is None:
            return []
        from opentelemetry.instrumentation._semconv import _StabilityMode
        from opentelemetry.instrumentation.aiohttp_client import create_trace_config

        return [
            create_trace_config(
                tracer_provider=self.provider, sem_conv_opt_in_mode=_StabilityMode.HTTP
            )
        ]

    def client_session(
        self, *, trace_configs: Sequence[aiohttp.TraceConfig] = (), **kwargs: Any
    ) -> aiohttp.ClientSession:
        """A ClientSession for the gateway's own calls, traced when tracing is on."""
        import aiohttp

        configs = [*self.trace_configs(), *trace_configs]
        return aiohttp.ClientSession(trace_configs=configs, **kwargs)

    def shutdown(self, timeout: float = 3.0) -> None:
        """Flush and stop the exporters within about `timeout` s; blocking, call it off the loop.

        Why: the batch processor flushes on shutdown, and an OTLP export to a collector that is
        away retries for up to its own timeout (10 s by default), which would stretch every
        drain; stopping the exporters after `timeout` interrupts those retries.
        """
        provider, self.provider = self.provider, None
        if provider is None:
            return
        timer = threading.Timer(timeout, self._stop_exporters)
        timer.daemon = True
        timer.start()
        try:
            provider.shutdown()
        finally:
            timer.cancel()

    def _stop_exporters(self) -> None:
        log.warning("tracing: exporters did not flush in time; dropping buffered spans")
        for e in self._exporters:
            e.shutdown()
