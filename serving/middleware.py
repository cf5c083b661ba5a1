"""The API's ASGI middleware, outermost first (`security_middleware` builds the list):

1. `RequestContext`: a request id (from ``X-Request-Id`` or generated, echoed back), one
   JSON access-log line per request, the latency histogram by route, the body-size cap
   of every route, and, in production, 5xx bodies trimmed to a code and a generic
   sentence (the detail goes to the log under the request id). When tracing is on
   (recstream/tracing.py), a SERVER span per request continues the caller's W3C
   ``traceparent``, so every span the request makes (Redis, AWS, the collector's
   envelope) belongs to the caller's trace.
2. `serving.ratelimit.RateLimitMiddleware` by client IP (before any key is checked, so a
   flood of made-up keys is bounded too).
3. `serving.auth.AuthMiddleware`: API keys, scopes, namespaces, SigV4.
4. `serving.ratelimit.RateLimitMiddleware` by API key, with the limit of the route's scope.

All are pure ASGI (no ``BaseHTTPMiddleware``): they add no task or stream per request.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
from prometheus_client import Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recstream import prom, tracing
from recstream.ids import new_id
from recstream.logging import REQUEST_ID, configure_logging
from recstream.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_kinesis import KinesisClient
    from types_aiobotocore_s3 import S3Client

    from recstream.apikeys import ApiKeyStore
    from recstream.stores import Stores

__all__ = [
    "HTTP_LATENCY",
    "BodyTooLarge",
    "Clients",
    "RequestContext",
    "Security",
    "open_security",
    "read_body",
    "replay",
    "security_middleware",
    "send_error",
]

log = logging.getLogger("recstream.access")

HTTP_LATENCY = Histogram(
    "recstream_http_request_seconds",
    "Time to answer one HTTP request, by route template, method and status class.",
    ["route", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
GENERIC: Final = {
    500: "internal error; the operator can find the details in the logs under this request id",
    502: "a dependency answered badly; retry later",
    503: "temporarily unavailable; retry after the Retry-After delay",
    504: "a dependency timed out; retry later",
}


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing it as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app a body already read, then defers to the real one."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def send_error(
    send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    """A JSON error from middleware, shaped like `serving.http.error_response`."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _capped(receive: Receive, limit: int) -> Receive:
    """Count body bytes as the app reads them; past ``limit``, end the request."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge
        return message

    return capped


class RequestContext:
    """Request ids, access logs, latency by route, body caps and production error trimming."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.production = settings.env == "production"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        offered = headers.get("x-request-id", "")
        request_id = offered if _REQUEST_ID.match(offered) else new_id()
        token = REQUEST_ID.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        trimmed: dict[str, Any] = {}

        async def send_wrapped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                mutable = MutableHeaders(scope=message)
                mutable["x-request-id"] = request_id
                if self.production and status >= 500:
                    # Hold the start: the body is replaced and its length changes.
                    trimmed["start"] = message
                    trimmed["body"] = b""
                    return
            elif message["type"] == "http.response.body" and "start" in trimmed:
                trimmed["body"] += message.get("body", b"")
                if message.get("more_body", False):
                    return
                await self._send_trimmed(send, trimmed["start"], trimmed["body"], request_id)
                return
            await send(message)

        with (
            tracing.incoming(
                scope["method"],
                [(name.decode("latin-1"), value) for name, value in scope["headers"]],
                {"http.request.method": scope["method"], "url.path": scope["path"]},
            )
            if tracing.enabled()  # (else the headers were decoded for nothing, per request)
            else nullcontext()
        ) as server_span:
            try:
                declared = headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.settings.max_body_bytes:
                    status = 413
                    await send_error(
                        send_wrapped,
                        413,
                        "body_too_large",
                        f"the body is {declared} bytes; send at most "
                        f"{self.settings.max_body_bytes}",
                    )
                    return
                try:
                    await self.app(
                        scope, _capped(receive, self.settings.max_body_bytes), send_wrapped
                    )
                except BodyTooLarge:
                    status = 413
                    await send_error(
                        send_wrapped,
                        413,
                        "body_too_large",
                        f"the body is over {self.settings.max_body_bytes} bytes; send less",
                    )
            finally:
                elapsed = time.perf_counter() - started
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                prom.observe(HTTP_LATENCY, elapsed, template, scope["method"], f"{status // 100}xx")
                key = scope.get("state", {}).get("api_key")
                extra: dict[str, Any] = {
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": template,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "client": (scope.get("client") or ("", 0))[0],
                    "key_id": getattr(key, "key_id", None),
                }
                if server_span is not None:
                    extra["trace_id"] = tracing.finish_server_span(
                        server_span, scope["method"], template, status
                    )
                log.info("%s %s %d", scope["method"], scope["path"], status, extra=extra)
                REQUEST_ID.reset(token)

    async def _send_trimmed(self, send: Send, start: Message, body: bytes, request_id: str) -> None:
        status = start["status"]
        code = "internal_error"
        try:
            doc = orjson.loads(body)
            error = doc.get("error") if isinstance(doc, dict) else None
            if isinstance(error, dict) and isinstance(error.get("code"), str):
                code = error["code"]
        except orjson.JSONDecodeError:
            doc = None
        # The detail is for the operator: into the log, under the request id.
        log.error(
            "trimmed %d answer: %s",
            status,
            body[:4000].decode(errors="replace"),
            extra={"status": status, "code": code},
        )
        payload: dict[str, Any] = {
            "error": {
                "code": code,
                "message": GENERIC.get(status, GENERIC[500]),
                "request_id": request_id,
            }
        }
        if isinstance(doc, dict):
            # Keep what the client needs to resend (ids and indexes), drop the hints.
            for name in ("accepted", "rejected", "checks", "unready"):
                if name in doc:
                    payload[name] = doc[name]
            if isinstance(doc.get("failed"), list):
                payload["failed"] = [
                    {k: v for k, v in entry.items() if k != "error"}
                    for entry in doc["failed"]
                    if isinstance(entry, dict)
                ]
        new_body = orjson.dumps(payload)
        headers = MutableHeaders(scope=start)
        headers["content-length"] = str(len(new_body))
        headers["content-type"] = "application/json"
        await send(start)
        await send({"type": "http.response.body", "body": new_body})


# --- what the API composes ------------------------------------------------------------


@dataclass(frozen=True)
class Clients:
    """The AWS clients /readyz probes with."""

    dynamodb: DynamoDBClient
    s3: S3Client
    kinesis: KinesisClient


@dataclass(frozen=True)
class Security:
    """State the middleware and /readyz need, opened in the lifespan."""

    keys: ApiKeyStore
    clients: Clients


@asynccontextmanager
async def open_security(settings: Settings, stores: Stores) -> AsyncIterator[Security]:
    from recstream.apikeys import ApiKeyStore
    from recstream.aws import async_client

    if not settings.api_keys_required:
        logging.getLogger("recstream.security").warning(
            "the API is OPEN: no API key is required (RECSTREAM_ENV=%s). Set "
            "RECSTREAM_REQUIRE_API_KEYS=true, or RECSTREAM_ENV=production, before exposing it",
            settings.env,
        )
    async with async_client(settings, "kinesis") as kinesis:
        yield Security(
            keys=ApiKeyStore(stores.dynamodb, settings),
            clients=Clients(dynamodb=stores.dynamodb, s3=stores.s3, kinesis=kinesis),
        )


def security_middleware(settings: Settings) -> list[Middleware]:
    """The middleware list of `serving.app.create_app`, outermost first."""
    from serving.auth import AuthMiddleware
    from serving.ratelimit import RateLimitMiddleware

    configure_logging(settings)
    return [
        Middleware(RequestContext, settings=settings),
        Middleware(RateLimitMiddleware, settings=settings, by="ip"),
        Middleware(AuthMiddleware, settings=settings),
        Middleware(RateLimitMiddleware, settings=settings, by="key"),
    ]
