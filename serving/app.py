"""The API: collector and ranking on Starlette, with an explicit lifespan.

Routes (``{namespace}`` defaults to ``default`` on the short forms):

    POST /v1/events                         /v1/{namespace}/events
    GET|POST /v1/recommendations, GET /v1/related-items, POST /v1/personalized-ranking,
    GET /v1/trending (and their /v1/{namespace}/… forms): serving/recommendations.py
    GET  /healthz                           Redis reachable
    GET  /readyz                            every dependency reachable (serving/ops.py)
    GET  /metrics                           Prometheus (serving/metrics.py)
    GET  /openapi.json, /docs               the API's contract (serving/openapi.py)

The catalog, filter and Personalize-compatible routes are in their own modules.
Observability (docs/observability.md): every Redis and AWS client the app opens is
instrumented (recstream/tracing.py), spans are exported when an OTLP endpoint is set,
and the agents' positions are read for /metrics in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from recstream import prom, tracing
from recstream.aws import async_client
from recstream.errors import RecstreamError
from recstream.heap import tuned_collector
from recstream.settings import Settings
from recstream.stores import open_stores
from serving import catalog_routes, openapi, personalize
from serving.collector import collect
from serving.filter_routes import filter_error_handler
from serving.filter_routes import routes as filter_routes
from serving.filter_store import open_filters
from serving.filters import FilterError
from serving.http import error_response, json_response, request_namespace
from serving.metrics import ModelVersions, stream_positions, watch_models
from serving.middleware import open_security, security_middleware
from serving.ops import routes as ops_routes
from serving.pipeline import kernels
from serving.recommendations import open_ranker
from serving.recommendations import routes as recommendation_routes
from serving.workers import serve as serve_workers
from streams.producer import KinesisProducer

__all__ = ["app_from_env", "create_app", "run"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


async def post_events(request: Request) -> Response:
    namespace = request_namespace(request)
    if isinstance(namespace, Response):
        return namespace
    return await collect(request, namespace, request.app.state.producer)


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
    prom.flush()  # this process's last second of observations (recstream/prom.py)
    if os.environ.get(MULTIPROC_ENV):
        # Several worker processes (`api_workers` > 1): any one of them answers for all,
        # from the files prometheus-client's multiprocess mode keeps per process.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


HOT = "/v1/recommendations"
"""The busiest path: its route is tried first."""


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            provider = tracing.configure(settings, "recstream-api")
            # Registered first, so it runs last: the spans of the shutdown are sent too.
            stack.push_async_callback(asyncio.to_thread, tracing.shutdown, provider)
            stores = await stack.enter_async_context(open_stores(settings))
            # Every client the app uses is timed per call (and traced when tracing is
            # on); the clients stay the ones `open_stores` owns and closes.
            tracing.instrument_redis(stores.redis)
            for client in (stores.dynamodb, stores.s3, stores.sqs):
                tracing.instrument_aws(client)
            kinesis = tracing.instrument_aws(
                await stack.enter_async_context(async_client(settings, "kinesis"))
            )
            producer = await stack.enter_async_context(KinesisProducer(settings, client=kinesis))
            app.state.settings = settings
            app.state.redis = stores.redis
            app.state.producer = producer
            # The catalog and the filters first: the ranker uses both.
            await stack.enter_async_context(catalog_routes.catalog_state(app, settings, stores))
            app.state.filters = await stack.enter_async_context(
                open_filters(settings, stores.dynamodb)
            )
            app.state.filter_resolver = app.state.filters
            # The ranking core's compiled loops, loaded from numba's cache (or compiled,
            # a few seconds, on a fresh install) off the event loop, before the ranker
            # that uses them (which would otherwise load them on the loop).
            await asyncio.to_thread(kernels.warm)
            # One BLAS thread: a request's ALS fold-in (two small products and a 128x128
            # solve) runs on the event loop, and OpenBLAS's own threads, with the agents
            # or other workers busy on the same cores, made it 40-180 ms instead of ~0.3
            # (docs/serving.md, the online replay). Workers, not threads, use the cores.
            stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
            ranker = await stack.enter_async_context(open_ranker(app, stores, settings))
            app.state.model_versions = ModelVersions(ranker.models, settings)
            watch_models(app.state.model_versions)
            app.state.security = await stack.enter_async_context(open_security(settings, stores))
            tracing.instrument_aws(app.state.security.clients.kinesis)
            app.state.stream_positions = await stack.enter_async_context(
                stream_positions(settings, kinesis)
            )
            # What start-up built (modules, botocore's service models: ~270k objects) lives
            # as long as the process; left to the collector, every full collection walked
            # it, a 130-300 ms pause under load. Frozen, it is never walked again, and full
            # collections of what the caches keep since (20-40 ms each) come ten times
            # less often (recstream/heap.py, docs/serving-speed.md).
            stack.enter_context(tuned_collector())
            # Batched histogram observations reach the shared values once a second, and
            # at shutdown (recstream/prom.py).
            await stack.enter_async_context(prom.flushing())
            yield

    async def on_http_error(request: Request, exc: Exception) -> Response:
        # The router's own 404 and 405, in the API's error shape (a client parses one
        # format), with the route list's address.
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return error_response(
                405,
                "method_not_allowed",
                f"{request.method} is not allowed on {request.url.path}; see /docs",
                headers=exc.headers,
            )
        return error_response(
            exc.status_code,
            "not_found" if exc.status_code == 404 else "http_error",
            f"no route for {request.method} {request.url.path}; the routes are listed at /docs",
            headers=exc.headers,
        )

    async def on_recstream_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RecstreamError)
        return error_response(503 if exc.retriable else 500, exc.code, str(exc))

    ranking = recommendation_routes()
    app = Starlette(
        routes=[
            # The two busiest paths first: the router tries the routes in order (a regex
            # each, 19 of them before these). No route before them matched these paths.
            *(r for r in ranking if getattr(r, "path", "") == HOT),
            Route("/v1/events", post_events, methods=["POST"]),
            # Before the {namespace} routes: a filter or an item may be named "events".
            *filter_routes(),
            *catalog_routes.routes(),
            Route("/v1/{namespace}/events", post_events, methods=["POST"]),
            *(r for r in ranking if getattr(r, "path", "") != HOT),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *personalize.routes(),
            *ops_routes(),
            *openapi.routes(settings),
        ],
        middleware=security_middleware(settings),
        lifespan=lifespan,
        exception_handlers={
            HTTPException: on_http_error,
            RecstreamError: on_recstream_error,
            FilterError: filter_error_handler,
        },
    )
    app.state.settings = settings
    return app


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory serving.app:app_from_env`` (settings from env)."""
    return create_app(Settings())


def run(settings: Settings, host: str, port: int, workers: int | None = None) -> None:
    """Serve the API until interrupted (used by `recstream serve`).

    With more than one worker (``api_workers``), that many processes serve the port, each
    accepting on a socket of its own (`serving.workers`); each builds its app from the
    environment, so the settings are exported first, and metrics go through
    prometheus-client's multiprocess directory."""
    workers = settings.api_workers if workers is None else workers
    # "auto" picks uvloop and httptools, project dependencies (docs/serving-speed.md).
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": "info",
        "access_log": False,
        "loop": "auto",
        "http": "auto",
    }
    if workers <= 1:
        uvicorn.run(create_app(settings), **options)
        return
    os.environ.update(settings.to_env())
    metrics_dir = (settings.state_dir / "metrics" / str(port)).resolve()
    shutil.rmtree(metrics_dir, ignore_errors=True)  # the last run's processes are gone
    metrics_dir.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(metrics_dir)
    # each worker on a socket of its own (serving/workers.py: uvicorn's one shared socket
    # gave one of two workers 72 % of the connections)
    config = uvicorn.Config("serving.app:app_from_env", factory=True, workers=workers, **options)
    with contextlib.suppress(KeyboardInterrupt):
        serve_workers(config)
