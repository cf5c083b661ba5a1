"""/readyz, request ids, JSON logs and the latency histogram, against a real server."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from recstream.logging import JsonFormatter
from recstream.settings import Settings
from serving.app import create_app
from serving.http import json_response
from tests.conftest import LocalStack, make_settings
from tests.reliability.conftest import running
from tests.serving.test_collector import click


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
