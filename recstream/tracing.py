"""Traces (OpenTelemetry) from collector to agent to serving, and the latency and errors
of every Redis and AWS call (Prometheus). docs/observability.md has the whole picture.

Tracing is off unless an OTLP endpoint is configured (``RECSTREAM_OTLP_ENDPOINT`` or the
standard ``OTEL_EXPORTER_OTLP_ENDPOINT``, `Settings.otlp_endpoint`). Off means off: the
SDK is not imported, no span object is created, and every helper here returns after one
``is None`` check, so an untraced deployment pays nothing for it.

    configure(settings, service)   once per process: the API's lifespan, the agent worker
    span(name, kind, attributes)   a span around a block (a no-op context when off)
    envelope_headers()             the current trace context as Kinesis envelope headers
    consuming(name, headers, ...)  the agent's side: one span per message, continuing the
                                   trace its producer put in the envelope
    instrument_redis(client)       Prometheus latency/errors per command (+ client spans)
    instrument_aws(client|session) Prometheus latency/errors per operation (+ client spans)

Every Redis client `recstream.stores.open_redis` opens, and every AWS client
`recstream.aws.async_client` opens, is timed, in the API and in the agent worker alike
(each serves the same families on its own /metrics). Client spans are started only
inside a trace (a request, a publish).

The trace context travels as W3C ``traceparent``/``tracestate``: in HTTP headers into the
API, and in the envelope's headers (streams/envelope.py, which has carried headers since
version 1) from the collector to the agents, so records written before this change, or
by producers that do not trace, read as before.

The provider is this module's, not OpenTelemetry's process-global one: the global can be
set only once per process, while tests (and an embedding application) need to install
their own (`install`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter, Histogram

from recstream.prom import child
from recstream.settings import Settings

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import redis.asyncio as aioredis
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "AWS_ERRORS",
    "AWS_LATENCY",
    "REDIS_ERRORS",
    "REDIS_LATENCY",
    "TRACE_HEADERS",
    "SpanKind",
    "configure",
    "consuming",
    "enabled",
    "envelope_headers",
    "extract",
    "finish_server_span",
    "incoming",
    "install",
    "instrument_aws",
    "instrument_redis",
    "shutdown",
    "span",
    "timed_redis",
    "tracer",
    "traces_url",
]

log = logging.getLogger(__name__)

TRACE_HEADERS: Final = ("traceparent", "tracestate")
_PROPAGATOR: Final = TraceContextTextMapPropagator()
_LATENCY_BUCKETS: Final = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)

REDIS_LATENCY = Histogram(
    "recstream_redis_call_seconds",
    "Time of one Redis call by command (PIPELINE and MULTI for pipelines), until its "
    "answer or until the caller gave up on it (a deadline).",
    ["command"],
    buckets=_LATENCY_BUCKETS,
)
REDIS_ERRORS = Counter(
    "recstream_redis_call_errors_total",
    "Redis calls that failed, by command and error class (CancelledError: the caller's "
    "deadline passed first).",
    ["command", "error"],
)
AWS_LATENCY = Histogram(
    "recstream_aws_call_seconds",
    "Time of one AWS API call (botocore's own retries included), by service and operation.",
    ["service", "operation"],
    buckets=_LATENCY_BUCKETS,
)
AWS_ERRORS = Counter(
    "recstream_aws_call_errors_total",
    "AWS API calls that failed, by service, operation and error code (the AWS code, or "
    "the exception class when no answer came back).",
    ["service", "operation", "error"],
)

_provider: TracerProvider | None = None
_tracer: Tracer | None = None


# --- the provider ----------------------------------------------------------------------


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL, as the OpenTelemetry spec
    derives it from OTEL_EXPORTER_OTLP_ENDPOINT (a URL that already names the traces path
    is kept as it is)."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1/traces") else f"{base}/v1/traces"


def configure(settings: Settings, service: str) -> TracerProvider | None:
    """Export this process's spans to ``settings.otlp_endpoint`` (OTLP/HTTP protobuf,
    batched in a background thread); None, and nothing set up, when no endpoint is set.
    Call `shutdown` on the way out so the last spans are sent."""
    if not settings.otlp_endpoint:
        return None
    # Imported here: a process that does not trace never loads the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES add to (and may rename) this.
        resource=Resource.create({"service.name": service}),
        # A trace started upstream (the browser, a gateway) keeps its caller's decision.
        sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)),
    )
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(settings.otlp_endpoint)))
    )
    install(provider)
    log.info("tracing: exporting spans of %s to %s", service, settings.otlp_endpoint)
    return provider


def install(provider: TracerProvider | None) -> None:
    """Make ``provider`` the one this process's spans go to (None: tracing off). Tests
    install one with an in-memory exporter."""
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer("recstream") if provider is not None else None


def shutdown(provider: TracerProvider | None) -> None:
    """Send the spans still queued and stop exporting (blocking: run it in a thread from
    async code). A no-op for None."""
    if provider is None:
        return
    if _provider is provider:
        install(None)
    provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


def tracer() -> Tracer:
    """The tracer spans are started with (OpenTelemetry's no-op one when tracing is off)."""
    return _tracer if _tracer is not None else trace.NoOpTracer()


def span(
    name: str, kind: SpanKind = SpanKind.INTERNAL, attributes: dict[str, Any] | None = None
) -> AbstractContextManager[Span | None]:
    """A span around a block, current inside it; a no-op context when tracing is off."""
    if _tracer is None:
        return nullcontext()
    return _tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def incoming(
    name: str, headers: Sequence[tuple[str, bytes]], attributes: dict[str, Any]
) -> AbstractContextManager[Span | None]:
    """The SERVER span of one request, continuing the caller's ``traceparent`` (a new
    trace when it sends none), current inside the block; a no-op context when off."""
    if _tracer is None:
        return nullcontext()
    return _tracer.start_as_current_span(
        name, context=extract(headers), kind=SpanKind.SERVER, attributes=attributes
    )


def finish_server_span(server: Span, method: str, route: str, status: int) -> str:
    """Name a request's span after its route template (known only once routed; the path
    itself would make one span name per id) and record the status; returns the trace id
    for the access log."""
    server.update_name(f"{method} {route}")
    server.set_attribute("http.route", route)
    server.set_attribute("http.response.status_code", status)
    if status >= 500:
        server.set_status(Status(StatusCode.ERROR))
    return format(server.get_span_context().trace_id, "032x")


# --- propagation ------------------------------------------------------------------------


def extract(headers: Sequence[tuple[str, bytes]]) -> Any:
    """The OpenTelemetry context of a message's envelope (or HTTP) headers; the current
    context's root when they carry none."""
    carrier = {
        name.lower(): value.decode("latin-1")
        for name, value in headers
        if name.lower() in TRACE_HEADERS
    }
    return _PROPAGATOR.extract(carrier)


def envelope_headers() -> tuple[tuple[str, bytes], ...]:
    """The current trace context as envelope headers (``traceparent``, ``tracestate``);
    empty when tracing is off or no span is recording, so untraced records stay as
    small as before."""
    if _tracer is None:
        return ()
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return tuple((name, value.encode("latin-1")) for name, value in carrier.items())


@contextmanager
def consuming(
    name: str,
    messages: Sequence[Sequence[tuple[str, bytes]] | Mapping[str, bytes]],
    attributes: dict[str, Any] | None = None,
) -> Iterator[None]:
    """Around the processing of a batch: one CONSUMER span per message whose headers
    carry a trace context, each a child of its producer's span, so each event's trace
    goes on into the agent. They share the batch's start and end (the batch is processed
    as one unit) and its outcome. Messages without a context start no trace: a span per
    untraced event would bury the traced ones."""
    if _tracer is None:
        yield
        return
    spans: list[Span] = []
    for raw in messages:
        # (faust hands a list of pairs; other transports may hand a mapping)
        headers = list(raw.items()) if isinstance(raw, Mapping) else list(raw)
        if not any(key.lower() == "traceparent" for key, _ in headers):
            continue
        spans.append(
            _tracer.start_span(
                name,
                context=extract(headers),
                kind=SpanKind.CONSUMER,
                attributes={**(attributes or {}), "messaging.batch.message_count": len(messages)},
            )
        )
    try:
        yield
    except BaseException as exc:
        for each in spans:
            each.record_exception(exc)
            each.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        for each in spans:
            each.end()


# --- Redis ----------------------------------------------------------------------------------


def _command(name: object) -> str:
    text = name.decode() if isinstance(name, bytes) else str(name)
    return text.upper()


class _Timed:
    """One call being timed: the Prometheus sample always, a CLIENT span when tracing."""

    __slots__ = ("error_labels", "errors", "labels", "latency", "span", "started")

    def __init__(
        self,
        latency: Histogram,
        errors: Counter,
        labels: tuple[str, ...],
        span_name: str,
        attributes: dict[str, Any],
    ) -> None:
        self.latency = latency
        self.errors = errors
        self.labels = labels
        self.started = time.perf_counter()
        self.span: Span | None = None
        # A CLIENT span only inside a trace: outside one (a worker's GetRecords polls and
        # lease renewals, the API's background reads) each call would start a trace of
        # its own, several a second per shard, burying the traces of events.
        if _tracer is not None and trace.get_current_span().is_recording():
            self.span = _tracer.start_span(span_name, kind=SpanKind.CLIENT, attributes=attributes)

    def done(self, error: str | None) -> None:
        child(self.latency, *self.labels).observe(time.perf_counter() - self.started)
        if error is not None:
            self.errors.labels(*self.labels, error).inc()
        if self.span is not None:
            if error is not None:
                self.span.set_status(Status(StatusCode.ERROR, error))
            self.span.end()


def timed_redis(name: str, batch: int | None = None) -> _Timed:
    """One Redis round trip being timed under ``name`` (a command, or PIPELINE / MULTI);
    ``.done(None)`` or ``.done(error class)`` when it ends. For round trips that go by a
    connection rather than the client's commands (recstream/redisio.py); `instrument_redis`
    times the client's own."""
    attributes: dict[str, Any] = {"db.system.name": "redis", "db.operation.name": name}
    if batch is not None:
        attributes["db.operation.batch.size"] = batch
    return _Timed(REDIS_LATENCY, REDIS_ERRORS, (name,), f"redis {name}", attributes)


_TIMED: Final = "_recstream_timed"


def instrument_redis(client: aioredis.Redis) -> aioredis.Redis:
    """Time every command and pipeline of ``client`` (returned, for chaining).

    The client's own methods are wrapped on the instance: every command method, script
    (``EVALSHA``) and pipeline of redis-py goes through ``execute_command`` or a
    pipeline's ``execute``, so nothing that uses the client needs to change.
    `recstream.stores.open_redis` instruments every client it opens; a second call on
    the same client does nothing (each call would be counted twice)."""
    if getattr(client, _TIMED, False):
        return client
    setattr(client, _TIMED, True)
    # (redis-py's asyncio client is untyped here; its callables are kept as Any)
    command: Any = client.execute_command
    make_pipeline: Any = client.pipeline

    async def execute_command(*args: Any, **options: Any) -> Any:
        call = timed_redis(_command(args[0]) if args else "?")
        try:
            result = await command(*args, **options)
        except BaseException as exc:
            call.done(type(exc).__name__)
            raise
        call.done(None)
        return result

    def pipeline(transaction: bool = True, shard_hint: str | None = None) -> Any:
        pipe = make_pipeline(transaction, shard_hint)
        execute = pipe.execute
        name = "MULTI" if transaction else "PIPELINE"

        async def execute_pipeline(raise_on_error: bool = True) -> Any:
            call = timed_redis(name, len(pipe.command_stack))
            try:
                result = await execute(raise_on_error)
            except BaseException as exc:
                call.done(type(exc).__name__)
                raise
            call.done(None)
            return result

        pipe.execute = execute_pipeline
        return pipe

    client.execute_command = execute_command  # type: ignore[method-assign]
    client.pipeline = pipeline  # type: ignore[method-assign]
    return client


# --- AWS --------------------------------------------------------------------------------------

_CALL: Final = "recstream_call"


def _before(model: Any, context: dict[str, Any], **_: Any) -> None:
    service = model.service_model.service_id.hyphenize()
    context[_CALL] = _Timed(
        AWS_LATENCY,
        AWS_ERRORS,
        (service, model.name),
        f"{service}.{model.name}",
        {"rpc.system": "aws-api", "rpc.service": service, "rpc.method": model.name},
    )


def _after(http_response: Any, parsed: Any, context: dict[str, Any], **_: Any) -> None:
    call: _Timed | None = context.pop(_CALL, None)
    if call is None:
        return
    error = None
    if getattr(http_response, "status_code", 200) >= 300:
        error = str((parsed or {}).get("Error", {}).get("Code") or http_response.status_code)
    call.done(error)


def _after_error(exception: BaseException, context: dict[str, Any], **_: Any) -> None:
    call: _Timed | None = context.pop(_CALL, None)
    if call is not None:
        call.done(type(exception).__name__)


def instrument_aws(target: Any) -> Any:
    """Time every API call of an aiobotocore (or botocore) client, or of every client a
    session creates from now on (returned, for chaining), through botocore's own event
    hooks: ``before-parameter-build`` starts the clock, ``after-call`` (an answer, maybe
    an error code) and ``after-call-error`` (no answer: a connection error or timeout)
    stop it.

    `recstream.aws` instruments its session, so every client a process opens through
    `recstream.aws.async_client` is timed (botocore copies a session's hooks into each
    new client); the hooks have fixed ids, so instrumenting such a client again does
    nothing."""
    events = (
        target.meta.events if hasattr(target, "meta") else target.get_component("event_emitter")
    )
    events.register("before-parameter-build", _before, unique_id="recstream-aws-before")
    events.register("after-call", _after, unique_id="recstream-aws-after")
    events.register("after-call-error", _after_error, unique_id="recstream-aws-error")
    return target
