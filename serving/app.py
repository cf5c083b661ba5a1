"""The API: collector and ranking on Starlette, with an explicit lifespan.

Routes (``{namespace}`` defaults to ``default`` on the short forms):

    POST /v1/events                         /v1/{namespace}/events
    GET  /v1/recommendations?user_id=…      /v1/{namespace}/recommendations
         (or session_id=…; num_results=1..500, default 25; exclude=id,id,…)
    GET  /healthz                           Redis reachable
    GET  /readyz                            every dependency reachable (serving/ops.py)
    GET  /metrics                           Prometheus
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agents.state import DynamoWindows, RedisHotStore
from recstream.errors import RecstreamError
from recstream.settings import NAMESPACE_PATTERN, Settings
from recstream.stores import open_stores
from serving.candidates import PublishedModels
from serving.collector import collect
from serving.http import error_response, json_response
from serving.metrics import RANK_DEGRADED, RANK_LATENCY
from serving.middleware import open_security, security_middleware
from serving.ops import routes as ops_routes
from serving.ranking import Ranker
from streams.producer import KinesisProducer

__all__ = ["app_from_env", "create_app", "run"]

_NAMESPACE = re.compile(NAMESPACE_PATTERN)
MAX_RESULTS = 500


def _namespace(request: Request) -> str | Response:
    settings: Settings = request.app.state.settings
    namespace = request.path_params.get("namespace", settings.namespace)
    if not _NAMESPACE.fullmatch(namespace):
        return error_response(
            404, "bad_namespace", f"namespace {namespace!r} must match {NAMESPACE_PATTERN}"
        )
    if settings.namespaces and namespace not in settings.namespaces:
        return error_response(
            404,
            "unknown_namespace",
            f"namespace {namespace!r} is not served here; use one of {settings.namespaces}",
        )
    return str(namespace)


async def post_events(request: Request) -> Response:
    namespace = _namespace(request)
    if isinstance(namespace, Response):
        return namespace
    return await collect(request, namespace, request.app.state.producer)


async def get_recommendations(request: Request) -> Response:
    started = time.perf_counter()
    namespace = _namespace(request)
    if isinstance(namespace, Response):
        return namespace
    params = request.query_params
    user_id, session_id = params.get("user_id"), params.get("session_id")
    if not user_id and not session_id:
        return error_response(
            422, "missing_user_id", "pass ?user_id=… (or ?session_id=… for an anonymous visitor)"
        )
    try:
        num_results = int(params.get("num_results", "25"))
    except ValueError:
        return error_response(
            422, "bad_num_results", f"num_results must be an integer from 1 to {MAX_RESULTS}"
        )
    if not 1 <= num_results <= MAX_RESULTS:
        return error_response(
            422, "bad_num_results", f"num_results must be an integer from 1 to {MAX_RESULTS}"
        )
    actor = user_id if user_id else f"session:{session_id}"
    ranker: Ranker = request.app.state.ranker
    exclude = frozenset(i for i in params.get("exclude", "").split(",") if i)
    if len(exclude) > MAX_RESULTS:
        return error_response(
            422, "bad_exclude", f"exclude at most {MAX_RESULTS} comma-separated item ids"
        )
    result = await ranker.recommend(namespace, actor, num_results, exclude)
    for store in result.degraded:
        RANK_DEGRADED.labels(store=store).inc()
    RANK_LATENCY.observe(time.perf_counter() - started)
    return json_response(result.as_json())


async def healthz(request: Request) -> Response:
    checks: dict[str, str] = {}
    try:
        await request.app.state.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # report, don't raise: this is the health endpoint
        checks["redis"] = f"error: {exc}"
    ok = all(v == "ok" for v in checks.values())
    return json_response({"ok": ok, "checks": checks}, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            stores = await stack.enter_async_context(open_stores(settings))
            producer = await stack.enter_async_context(KinesisProducer(settings))
            hot = RedisHotStore(stores.redis, settings)
            durable = DynamoWindows(stores.dynamodb, settings)
            app.state.settings = settings
            app.state.redis = stores.redis
            app.state.producer = producer
            app.state.ranker = Ranker(hot, durable, settings, PublishedModels(stores.redis))
            app.state.security = await stack.enter_async_context(open_security(settings, stores))
            yield

    async def on_recstream_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RecstreamError)
        return error_response(503 if exc.retriable else 500, exc.code, str(exc))

    app = Starlette(
        routes=[
            Route("/v1/events", post_events, methods=["POST"]),
            Route("/v1/{namespace}/events", post_events, methods=["POST"]),
            Route("/v1/recommendations", get_recommendations, methods=["GET"]),
            Route("/v1/{namespace}/recommendations", get_recommendations, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *ops_routes(),
        ],
        middleware=security_middleware(settings),
        lifespan=lifespan,
        exception_handlers={RecstreamError: on_recstream_error},
    )
    app.state.settings = settings
    return app


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory serving.app:app_from_env`` (settings from env)."""
    return create_app(Settings())


def run(settings: Settings, host: str, port: int) -> None:
    """Serve the API until interrupted (used by `recstream serve`)."""
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False)
