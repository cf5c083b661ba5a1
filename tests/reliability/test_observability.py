"""/readyz, request ids, JSON logs and the latency histogram, against a real server; and
(issue 10) Redis and AWS call metrics, the model versions served, the agents' positions,
and traces from the collector through the envelope to the agent and serving."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from recstream import stack, tracing
from recstream.keys import Keys
from recstream.logging import JsonFormatter
from recstream.settings import Settings
from serving.app import create_app
from serving.http import json_response
from streams.envelope import Message, decode
from streams.leases import Checkpoint, DynamoDBLeaseStore
from streams.producer import KinesisProducer
from streams.schema import Event
from tests.conftest import REPO, LocalStack, make_settings
from tests.reliability.conftest import running
from tests.serving.helpers import ROOMY, fitted, publish, two_clusters
from tests.serving.test_collector import click, raw_records


class Lines(logging.Handler):
    """Formats records as they are emitted (inside the request, where the id is set)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(orjson.loads(self.format(record)))


@pytest.fixture
def open_settings(local_stack: LocalStack) -> Settings:
    # A generous readiness budget: a loaded CI machine is not an unready dependency.
    return make_settings(local_stack, rate_limit_enabled=False, ready_timeout_s=60.0)


async def test_readyz_checks_every_dependency(open_settings: Settings) -> None:
    with running(open_settings) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            ready = await client.get("/readyz")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert set(checks) == {
        "redis",
        f"dynamodb:{open_settings.windows_table}",
        f"kinesis:{open_settings.stream_name}",
        f"s3:{open_settings.bucket}",
    }
    assert set(checks.values()) == {"ok"}


async def test_readyz_names_what_is_missing(open_settings: Settings) -> None:
    broken = open_settings.model_copy(
        update={"bucket": "no-such-bucket-here", "stream_name": "no-such-stream"}
    )
    with running(broken) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            ready = await client.get("/readyz")
            alive = await client.get("/healthz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["unready"] == ["kinesis:no-such-stream", "s3:no-such-bucket-here"]
    assert body["checks"]["redis"] == "ok"
    assert alive.status_code == 200  # liveness is not readiness


async def test_request_ids_and_json_access_logs(open_settings: Settings) -> None:
    lines = Lines()
    access = logging.getLogger("recstream.access")
    access.addHandler(lines)
    try:
        with running(open_settings) as api:
            async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
                given = await client.post(
                    "/v1/events", json=click(), headers={"X-Request-Id": "abc-123"}
                )
                generated = await client.get("/healthz")
                hostile = await client.get("/healthz", headers={"X-Request-Id": "x\ty" * 100})
    finally:
        access.removeHandler(lines)
    assert given.headers["x-request-id"] == "abc-123"
    assert len(generated.headers["x-request-id"]) == 32
    assert hostile.headers["x-request-id"] != "x\ty" * 100  # replaced, not echoed
    (line,) = [x for x in lines.lines if x["request_id"] == "abc-123"]
    assert line["status"] == 202
    assert line["route"] == "/v1/events"
    assert line["method"] == "POST"
    assert isinstance(line["duration_ms"], float)
    assert line["level"] == "info"


async def test_latency_histogram_by_route(open_settings: Settings) -> None:
    with running(open_settings) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            await client.post("/v1/shop/events", json=click())
            await client.get("/nowhere")
            text = (await client.get("/metrics")).text
    assert (
        'recstream_http_request_seconds_count{method="POST",route="/v1/{namespace}/events",' in text
    )
    assert 'route="unmatched",status="4xx"' in text


async def test_every_route_caps_its_body(open_settings: Settings) -> None:
    """Routes that read their body (here a tiny one) get the cap from the middleware,
    declared or streamed without a length."""
    limit = open_settings.max_body_bytes

    async def echo(request: Request) -> Response:
        return json_response({"bytes": len(await request.body())})

    app = create_app(open_settings)
    app.router.routes.append(Route("/echo", echo, methods=["POST"]))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    with running(open_settings, app) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
            small = await client.post("/echo", content=b"x" * 1000)
            declared = await client.post("/echo", content=b"x" * (limit + 1))
            streamed = await client.post("/echo", content=chunks())
    assert small.json() == {"bytes": 1000}
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "body_too_large"
    assert streamed.status_code == 413
    assert str(limit) in streamed.json()["error"]["message"]


# --- issue 10, item 5: store calls, model versions, agent positions, traces -------------------


def sample(name: str, **labels: str) -> float:
    """One sample of this process's registry (the in-thread server shares it)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def scrape(api_url: str) -> str:
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as client:
        answer = await client.get("/metrics")
    assert answer.status_code == 200
    return answer.text


async def test_metrics_carry_redis_and_aws_call_latency_and_errors(
    open_settings: Settings,
) -> None:
    put_records = (
        "recstream_aws_call_seconds_count",
        {"service": "kinesis", "operation": "PutRecords"},
    )
    before = sample(put_records[0], **put_records[1])
    broken = open_settings.model_copy(update={"stream_name": "no-such-stream"})
    with running(open_settings) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            assert (await client.post("/v1/events", json=click())).status_code == 202
            assert (await client.get("/v1/recommendations?user_id=u1")).status_code == 200
            text = await scrape(api.url)
    assert sample(put_records[0], **put_records[1]) == before + 1
    assert (
        'recstream_aws_call_seconds_bucket{le="0.0002",operation="PutRecords",service="kinesis"}'
        in text
    )
    # the ranking pipeline's state read is one Redis pipeline (MULTI or not)
    assert re.search(
        r'recstream_redis_call_seconds_count\{command="(PIPELINE|MULTI)"\} [1-9]', text
    )
    missing = ("recstream_aws_call_errors_total", {
        "service": "kinesis", "operation": "DescribeStreamSummary",
        "error": "ResourceNotFoundException",
    })  # fmt: skip
    errors_before = sample(missing[0], **missing[1])
    with running(broken) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            assert (await client.get("/readyz")).status_code == 503
            text = await scrape(api.url)
    assert sample(missing[0], **missing[1]) == errors_before + 1
    assert "recstream_aws_call_errors_total{" in text


async def test_redis_errors_are_counted_by_command(open_settings: Settings) -> None:
    # Nothing listens on this port: every Redis call fails to connect.
    dead = open_settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{stack.free_port()}/0"}
    )
    before = sample("recstream_redis_call_errors_total", command="PING", error="ConnectionError")
    with running(dead) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            assert (await client.get("/healthz")).status_code == 503
            text = await scrape(api.url)
    after = sample("recstream_redis_call_errors_total", command="PING", error="ConnectionError")
    assert after == before + 1
    assert 'recstream_redis_call_errors_total{command="PING",error="ConnectionError"}' in text


async def test_metrics_name_the_model_versions_being_served(local_stack: LocalStack) -> None:
    settings = make_settings(local_stack, rate_limit_enabled=False).model_copy(update=ROOMY)
    log = two_clusters()
    models = fitted(log)
    redis = aioredis.from_url(settings.redis_url)
    keys = Keys(settings.namespace)

    async def current(name: str) -> str:
        value = await redis.get(keys.model_pointer(name))
        assert value is not None
        return value if isinstance(value, str) else value.decode()

    try:
        await publish(settings, models.values(), log)
        first = await current("blend")
        with running(settings) as api:
            async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
                assert (await client.get("/v1/recommendations?user_id=u1")).status_code == 200
                text = await scrape(api.url)
                line = (
                    f'recstream_serving_model_info{{model="blend",'
                    f'namespace="{settings.namespace}",version="{first}"}} 1.0'
                )
                assert line in text
                assert f'model="als",namespace="{settings.namespace}"' in text
                # A new version published: the next request loads it, the metric follows.
                await publish(settings, [models["blend"]], log)
                second = await current("blend")
                assert second != first
                for _ in range(50):  # the new version loads in the background
                    await client.get("/v1/recommendations?user_id=u1")
                    text = await scrape(api.url)
                    if f'version="{second}"' in text:
                        break
                    await asyncio.sleep(0.1)
        assert f'model="blend",namespace="{settings.namespace}",version="{second}"' in text
        assert f'version="{first}"' not in text
    finally:
        await redis.aclose()


async def test_agent_lag_checkpoint_and_lease_age_per_shard(local_stack: LocalStack) -> None:
    """Read from the lease table and Kinesis by the API (no worker needed: a dead fleet
    must show up too): records past the checkpoint make the checkpoint age grow; a
    checkpoint at the newest record makes it 0."""
    settings = make_settings(local_stack, rate_limit_enabled=False, stream_status_interval_s=0.1)
    app_id, scope = "lagging-app", f"lagging-app#{settings.stream_name}"
    async with KinesisProducer(settings) as producer:
        results = await producer.put_events([Event(event_type="click", user_id="u1", item_id="i")])
    (put,) = results
    assert put.ok
    assert put.shard_id is not None
    written = time.time()
    async with DynamoDBLeaseStore(settings) as store:
        # a lease last written 100 s ago, still at TRIM_HORIZON: the record waits
        assert await store.create_lease(scope, put.shard_id, parent_shard_ids=(), now=written - 100)
        await asyncio.sleep(1.1)  # the record is now more than a second old
        with running(settings) as api:
            labels = {"app": app_id, "shard": put.shard_id}
            waiting = await _positions(api.url, labels)
            assert waiting["recstream_agent_checkpoint_age_seconds"] >= 1.0
            assert waiting["recstream_agent_lease_age_seconds"] >= 100.0
            assert "recstream_agent_lag_seconds" in waiting
            # The app catches up: its checkpoint is the record just read.
            lease = await store.take_lease(
                scope, put.shard_id, owner="w1", expected_owner=None, expected_counter=0,
                now=time.time(), expires_at=time.time() + 60,
            )  # fmt: skip
            assert lease is not None
            assert put.sequence_number is not None
            done = await store.update_checkpoint(
                scope, put.shard_id, Checkpoint(put.sequence_number), owner="w1",
                expected_counter=lease.counter, now=time.time(), expires_at=time.time() + 60,
            )  # fmt: skip
            assert done is not None
            for _ in range(100):
                caught_up = await _positions(api.url, labels)
                if caught_up["recstream_agent_checkpoint_age_seconds"] == 0.0:
                    break
                await asyncio.sleep(0.05)
            assert caught_up["recstream_agent_checkpoint_age_seconds"] == 0.0
            assert caught_up["recstream_agent_lease_age_seconds"] < 100.0


async def _positions(api_url: str, labels: dict[str, str]) -> dict[str, float]:
    """The agent-position gauges of one shard, once the API has read them."""
    for _ in range(200):
        text = await scrape(api_url)
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels == labels:
                    found[s.name] = s.value
        if "recstream_agent_checkpoint_age_seconds" in found:
            return found
        await asyncio.sleep(0.05)
    pytest.fail(f"no agent positions for {labels} in /metrics:\n{text[-3000:]}")


# --- traces -----------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process (the in-thread API), into memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


class Collector:
    """A tiny OTLP/HTTP receiver: keeps every protobuf POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    received.append(request)
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list[tuple[str, str, Any]]:
        """(service name, kind of span, span) of everything received."""
        out = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    out += [(service, s.name, s) for s in scope.spans]
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    try:
        yield receiver
    finally:
        receiver.close()


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


async def test_a_trace_goes_from_the_collector_through_the_envelope_to_the_agent_and_serving(
    open_settings: Settings,
    spans: InMemorySpanExporter,
    collector: Collector,
    tmp_path: Path,
) -> None:
    traceparent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
    with running(open_settings) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            posted = await client.post(
                "/v1/events", json=click("traced"), headers={"traceparent": traceparent}
            )
            assert posted.status_code == 202
            # 1. the API: the request's span continues the caller's trace ...
            server = _one(spans, "POST /v1/events")
            assert format(server.context.trace_id, "032x") == TRACE_ID
            assert server.parent is not None
            assert format(server.parent.span_id, "016x") == CALLER_SPAN
            assert server.kind is SpanKind.SERVER
            # ... the publish is its child, and PutRecords the publish's
            publish = _one(spans, f"{open_settings.stream_name} publish")
            assert publish.parent is not None
            assert publish.parent.span_id == server.context.span_id
            put = _one(spans, "kinesis.PutRecords")
            assert put.parent is not None
            assert put.parent.span_id == publish.context.span_id
            # 2. the envelope carries the publish span's context
            (headers,) = [m.headers for m in _envelopes(open_settings)]
            carried = dict(headers)["traceparent"].decode()
            assert carried == f"00-{TRACE_ID}-{format(publish.context.span_id, '016x')}-01"
            # 3. the agent (a real `recstream agents` process, exporting over OTLP/HTTP
            # to the receiver above) continues it
            with agent_process(open_settings, tmp_path, otlp=collector.url):
                consumed = await _eventually(
                    lambda: [
                        (service, s)
                        for service, name, s in collector.spans()
                        if name == "windows process" and s.trace_id.hex() == TRACE_ID
                    ],
                    "the agent's span",
                    tmp_path / "agents.log",
                )
                # the click reached Redis: serving reflects it
                answer = await client.get(
                    "/v1/recommendations?user_id=traced", headers={"traceparent": traceparent}
                )
            ((service, agent_span),) = consumed
            assert service == "recstream-agents"
            assert agent_span.parent_span_id.hex() == format(publish.context.span_id, "016x")
            assert agent_span.kind == agent_span.SPAN_KIND_CONSUMER
            # 4. serving: the recommendation request is in the caller's trace, with its
            # Redis calls as children
            assert answer.status_code == 200
            served = _one(spans, "GET /v1/recommendations")
            assert format(served.context.trace_id, "032x") == TRACE_ID
            redis_calls = [
                s
                for s in spans.get_finished_spans()
                if s.name.startswith("redis ")
                and s.parent is not None
                and s.parent.span_id == served.context.span_id
            ]
            assert redis_calls


def test_no_endpoint_means_no_tracing_and_unchanged_envelopes(open_settings: Settings) -> None:
    assert open_settings.otlp_endpoint is None
    assert tracing.configure(open_settings, "recstream-api") is None
    assert not tracing.enabled()
    assert tracing.envelope_headers() == ()
    with running(open_settings) as api:
        posted = httpx.post(
            f"{api.url}/v1/events",
            json=click(),
            headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
        )
    assert posted.status_code == 202
    assert [m.headers for m in _envelopes(open_settings)] == [()]


def test_the_otlp_endpoint_setting_reads_both_variables() -> None:
    assert Settings(_env_file=None, otlp_endpoint="http://a:4318").otlp_endpoint == "http://a:4318"
    assert tracing.traces_url("http://a:4318") == "http://a:4318/v1/traces"
    assert tracing.traces_url("http://a:4318/v1/traces") == "http://a:4318/v1/traces"


def test_the_standard_otel_variable_turns_tracing_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert Settings().otlp_endpoint == "http://collector:4318"
    monkeypatch.setenv("RECSTREAM_OTLP_ENDPOINT", "http://ours:4318")
    assert Settings().otlp_endpoint == "http://ours:4318"  # ours wins


def _one(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in spans.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in spans.get_finished_spans()]
    return found[0]


def _envelopes(settings: Settings) -> list[Message]:
    return [message for record in raw_records(settings) for message in decode(record["Data"])]


@contextmanager
def agent_process(settings: Settings, workdir: Path, otlp: str) -> Iterator[None]:
    """`recstream agents` as a child process of this checkout, exporting spans to ``otlp``."""
    env = {
        **os.environ,
        **settings.to_env(),
        "PYTHONPATH": str(REPO),
        "RECSTREAM_OTLP_ENDPOINT": otlp,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export every 0.1 s, not every 5 s
        "RECSTREAM_STATE_DIR": str(workdir),
        "RECSTREAM_POLL_INTERVAL_S": "0.05",
        "RECSTREAM_LEASE_DURATION_S": "5",
        "RECSTREAM_AGENT_BATCH_WINDOW_S": "0.02",
    }
    with (workdir / "agents.log").open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "recstream.cli", "agents"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
        )  # fmt: skip
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def _eventually(check: Any, what: str, log: Path, within: float = 90.0) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(0.1)
    text = await asyncio.to_thread(log.read_text)
    pytest.fail(f"{what} did not arrive within {within:.0f}s; agent log:\n{text[-4000:]}")
