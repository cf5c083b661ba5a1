"""The filter API, and what the recommendation routes call to apply a filter.

    POST   /v1/{namespace}/filters          {"name", "filter_expression"}: checked, then stored
    GET    /v1/{namespace}/filters          every filter of the namespace
    GET    /v1/{namespace}/filters/{name}   one filter
    DELETE /v1/{namespace}/filters/{name}

The short forms (``/v1/filters``…) use the default namespace. A malformed expression gets
400 with ``error.code`` ``filter_syntax_error`` and the position, problem and fix.

Wiring (serving/app.py): ``*filter_routes.routes()`` in the route list, ``app.state.filters =
await stack.enter_async_context(open_filters(settings, stores.dynamodb))`` in the lifespan,
and ``FilterError: filter_error_handler`` in the exception handlers. A recommendation route
then calls `resolve_filter` and passes the compiled filter and `filter_values_from` to the
pipeline.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from serving.filter_store import FilterRegistry
from serving.filters import (
    CompiledFilter,
    FilterError,
    FilterNotFound,
    FilterSyntaxError,
    FilterValuesError,
    validate_filter_values,
)
from serving.http import error_response, json_response, request_namespace

__all__ = [
    "filter_error_handler",
    "filter_error_response",
    "filter_values_from",
    "resolve_filter",
    "routes",
]


def filter_error_response(exc: FilterError) -> Response:
    """A FilterError as JSON: code and message, plus position/problem/fix for syntax errors."""
    error: dict[str, Any] = {"code": exc.code, "message": str(exc)}
    if isinstance(exc, FilterSyntaxError):
        error.update(position=exc.position, problem=exc.problem, fix=exc.fix)
    elif isinstance(exc, FilterValuesError):
        error.update(fix=exc.fix)
    return json_response({"error": error}, status_code=exc.status)


async def filter_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: filter errors are the caller's to fix (4xx), unlike the
    app's generic RecstreamError handler, which answers 500/503."""
    assert isinstance(exc, FilterError)
    return filter_error_response(exc)


async def resolve_filter(
    registry: FilterRegistry, namespace: str, ref: str | None
) -> CompiledFilter | None:
    """The compiled filter a request names (a filter name, or a Personalize filter ARN
    ``arn:aws:personalize:{region}:{account}:filter/{name}``); None when it names none.
    Raises `FilterNotFound` (404). Cached: no store round trip on most requests."""
    if not ref:
        return None
    return await registry.compiled(namespace, ref)


def filter_values_from(raw: object) -> dict[str, str]:
    """Filter parameter values from a request: a JSON object (a POST body's
    ``filter_values`` or Personalize's ``filterValues``) or its text (a query parameter
    ``filter_values={"CATEGORY": "\\"shoes\\""}``). Raises `FilterValuesError` (400)."""
    if isinstance(raw, str):
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise FilterValuesError(
                f"filter_values is not JSON ({exc})",
                'send a JSON object, e.g. filter_values={"CATEGORY": "\\"shoes\\""}',
            ) from None
    return validate_filter_values(raw)


def _registry(request: Request) -> FilterRegistry:
    registry: FilterRegistry = request.app.state.filters
    return registry


async def create_filter(request: Request) -> Response:
    namespace = request_namespace(request)
    if isinstance(namespace, Response):
        return namespace
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        return error_response(400, "bad_json", f"the body is not JSON ({exc}); send an object")
    if not isinstance(body, dict):
        return error_response(
            400, "bad_body", 'send {"name": "...", "filter_expression": "EXCLUDE ItemID ..."}'
        )
    name = body.get("name")
    # Personalize's CreateFilter spells it filterExpression; accept both.
    expression = body.get("filter_expression", body.get("filterExpression"))
    if not isinstance(name, str) or not name:
        return error_response(400, "missing_name", "send the filter's name as a JSON string")
    if not isinstance(expression, str):
        return error_response(
            400,
            "missing_filter_expression",
            'send filter_expression, e.g. "EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN '
            '(\\"purchase\\")"',
        )
    try:
        record, created = await _registry(request).create(namespace, name, expression)
    except FilterError as exc:
        return filter_error_response(exc)
    return json_response(record.as_json(), status_code=201 if created else 200)


async def list_filters(request: Request) -> Response:
    namespace = request_namespace(request)
    if isinstance(namespace, Response):
        return namespace
    records = await _registry(request).list(namespace)
    return json_response({"filters": [r.as_json() for r in records]})


async def get_filter(request: Request) -> Response:
    namespace = request_namespace(request)
    if isinstance(namespace, Response):
        return namespace
    name = request.path_params["name"]
    record = await _registry(request).get(namespace, name)
    if record is None:
        return filter_error_response(
            FilterNotFound(f"filter {name!r} does not exist in namespace {namespace!r}")
        )
    return json_response(record.as_json())


async def delete_filter(request: Request) -> Response:
    namespace = request_namespace(request)
    if isinstance(namespace, Response):
        return namespace
    name = request.path_params["name"]
    if not await _registry(request).delete(namespace, name):
        return filter_error_response(
            FilterNotFound(f"filter {name!r} does not exist in namespace {namespace!r}")
        )
    return Response(status_code=204)


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/filters", create_filter, methods=["POST"]),
        Route("/v1/filters", list_filters, methods=["GET"]),
        Route("/v1/filters/{name}", get_filter, methods=["GET"]),
        Route("/v1/filters/{name}", delete_filter, methods=["DELETE"]),
        Route("/v1/{namespace}/filters", create_filter, methods=["POST"]),
        Route("/v1/{namespace}/filters", list_filters, methods=["GET"]),
        Route("/v1/{namespace}/filters/{name}", get_filter, methods=["GET"]),
        Route("/v1/{namespace}/filters/{name}", delete_filter, methods=["DELETE"]),
    ]
