"""The ranking endpoints, over the pipeline (serving/pipeline). ``{namespace}`` defaults
to ``Settings.namespace`` on the short forms.

    GET|POST /v1/recommendations            /v1/{namespace}/recommendations
    GET      /v1/related-items?item_id=…    /v1/{namespace}/related-items
    POST     /v1/personalized-ranking       /v1/{namespace}/personalized-ranking
    GET      /v1/trending?window=1h|24h     /v1/{namespace}/trending

Recommendations take ``user_id`` (or ``session_id`` for an anonymous visitor),
``num_results`` (1-500, default 25), ``exclude`` (item ids), ``context`` (string values:
``device``, ``hour``, ...), ``filter`` (a filter's name or ARN) with ``filter_values``,
and ``debug``. In a POST body they are JSON fields (``exclude`` a list, ``context`` and
``filter_values`` objects); in a GET query ``exclude=a,b,c``, ``context.device=mobile``,
``filter_values.CATEGORY="shoes"``, ``debug=true``. ``as_of`` (epoch seconds) ranks as
of that time instead of now (replays, backtests). Unknown parameters are refused.

Every error is a 4xx JSON body ``{"error": {"code", "message"}}`` naming the field and
the fix; a store that fails degrades the answer (``degraded``), it never fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from recstream import prom
from recstream.errors import RecstreamError
from recstream.features import DynamoFeatures
from recstream.identity import resolve_actor, session_actor
from recstream.model_restore import RegistryRestorer
from recstream.settings import Settings
from recstream.stores import Stores
from recstream.windows import DynamoWindows
from serving.collector import read_capped
from serving.http import error_response, json_response, request_namespace
from serving.metrics import RANK_DEGRADED, RANK_LATENCY
from serving.pipeline import CandidateFilter, ItemCatalog, Ranker, Recommendations
from serving.pipeline.detach import detached
from serving.pipeline.state import DurableActorState
from streams.schema import Timestamp

__all__ = ["FilterResolver", "open_ranker", "routes"]

MAX_RESULTS = 500
MAX_BODY_BYTES = 1024 * 1024
BLANK = r"[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
r"""The characters pydantic strips (Rust's White_Space), spelled out: ``\s`` means three
different sets in Rust, Python and JSON Schema's ECMA-262 regexes."""
NON_BLANK = "[^" + BLANK[1:]
# The pattern is implied by stripping then min_length (so no request changes fate); it
# is stated so that the JSON Schema (serving/openapi.py) says what the server accepts.
Id = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=256, pattern=NON_BLANK),
]
Short = Annotated[str, StringConstraints(max_length=256)]


class FilterResolver(Protocol):
    """Turns a request's ``filter`` (name or ARN) into the rule to apply; raises a
    `RecstreamError` (e.g. `ResourceNotFound`) naming the filter when it is unknown."""

    async def resolve(self, namespace: str, name: str) -> CandidateFilter: ...


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    context: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], Short] = Field(
        default_factory=dict, max_length=32
    )
    filter: Id | None = None
    filter_values: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], Short] = (
        Field(default_factory=dict, max_length=25)
    )
    debug: bool = False


class _Personal(_Common):
    user_id: Id | None = None
    session_id: Id | None = None
    # (a replay or backtest of logged events ranks as of each event's time: the features'
    # ages and the hour count from it, not from the server's clock)
    as_of: Timestamp | None = Field(
        None, description="rank as of this time (unix seconds) instead of now: replays, backtests"
    )


class RecommendationsQuery(_Personal):
    num_results: int = Field(25, ge=1, le=MAX_RESULTS)
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_RESULTS)


class RankingQuery(_Personal):
    item_ids: list[Id] = Field(min_length=1, max_length=MAX_RESULTS)


class RelatedQuery(_Common):
    item_id: Id
    num_results: int = Field(25, ge=1, le=MAX_RESULTS)
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_RESULTS)


_Q = TypeVar("_Q", RecommendationsQuery, RankingQuery)


class TrendingQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    window: str = Field("24h", pattern=r"^(1h|24h)$")
    category: Id | None = None
    num_results: int = Field(25, ge=1, le=MAX_RESULTS)


_FIXES = {
    "num_results": f"send an integer from 1 to {MAX_RESULTS}",
    "exclude": f"send at most {MAX_RESULTS} item ids (comma-separated in a query)",
    "item_ids": f"send a JSON list of 1 to {MAX_RESULTS} item ids",
    "item_id": "pass ?item_id=… (the item to find related items for)",
    "window": "use window=1h or window=24h",
    "debug": "use true or false",
    "as_of": "send the time to rank for in unix seconds (or ISO-8601), or leave it out",
    "context": "send string values, at most 32 entries (context.device=mobile in a query)",
    "filter_values": "send string values, at most 25 (filter_values.NAME=value in a query)",
}


def _problem(exc: ValidationError) -> Response:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else "body"
    where = ".".join(str(part) for part in error["loc"]) or "body"
    if error["type"] == "extra_forbidden":
        return error_response(
            422,
            "unknown_parameter",
            f"{where!r} is not a parameter of this endpoint; remove it (see docs/serving.md)",
        )
    fix = _FIXES.get(field, "see docs/serving.md for the accepted values")
    return error_response(422, f"bad_{field}", f"{where}: {error['msg']}; {fix}")


def _query_fields(request: Request, lists: tuple[str, ...]) -> dict[str, Any]:
    """A GET query as the POST body's fields: ``a,b`` lists, ``context.k=v`` objects."""
    fields: dict[str, Any] = {}
    for key, value in request.query_params.multi_items():
        head, dot, tail = key.partition(".")
        if dot and head in ("context", "filter_values"):
            fields.setdefault(head, {})[tail] = value
        elif key in lists:
            # Blank entries (`exclude=`, `a,,b`) are dropped, but still count towards the
            # limit: 100,000 commas are not a short list.
            entries = value.split(",")
            kept = [v for v in entries if v.strip()]
            fields[key] = kept if len(entries) <= MAX_RESULTS else entries
        else:
            fields[key] = value
    return fields


async def _body(request: Request) -> dict[str, Any] | Response:
    raw = await read_capped(request, MAX_BODY_BYTES)
    if raw is None:
        return error_response(413, "body_too_large", f"send at most {MAX_BODY_BYTES} bytes")
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        return error_response(422, "malformed_body", f"the body is not valid JSON ({exc})")
    if not isinstance(body, dict):
        return error_response(422, "malformed_body", "send a JSON object with the parameters")
    return {key: _integral(value) for key, value in body.items()}


def _integral(value: Any) -> Any:
    # JSON has one number type: 25.0 is an integer to JSON Schema (and to the document),
    # while the strict validation of bodies would refuse it for num_results.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _actor(query: RecommendationsQuery | RankingQuery) -> str | Response:
    if query.user_id:
        return query.user_id
    if query.session_id:
        return session_actor(query.session_id)
    return error_response(
        422, "missing_user_id", "pass user_id=… (or session_id=… for an anonymous visitor)"
    )


async def _logged_in_as(request: Request, namespace: str, session_id: str, actor: str) -> str:
    """The user a session logged in as (the agents' identity stitching moved its history
    there, and keep applying its events there), else the session's own actor. A slow or
    failed lookup keeps the session's actor: its window is still a fair answer."""
    ranker: Ranker = request.app.state.ranker
    try:
        async with asyncio.timeout(ranker.settings.store_timeout_ms / 1000):
            return await detached(resolve_actor(ranker.redis, namespace, session_id), ranker.reads)
    except (TimeoutError, RedisError, OSError):
        return actor


async def _filter(
    request: Request, namespace: str, name: str | None
) -> CandidateFilter | Response | None:
    if name is None:
        return None
    resolver: FilterResolver | None = getattr(request.app.state, "filter_resolver", None)
    if resolver is None:
        return error_response(
            400,
            "filters_unavailable",
            f"filter {name!r} cannot be applied: this server has no filter store; "
            "leave out `filter`",
        )
    try:
        return await resolver.resolve(namespace, name)
    except RecstreamError as exc:
        # The filter store's errors carry their HTTP status (404 unknown filter).
        status = 503 if exc.retriable else int(getattr(exc, "status", 400))
        return error_response(status, exc.code, str(exc))


def _answer(result: Recommendations, started: float) -> Response:
    for store in result.degraded:
        RANK_DEGRADED.labels(store=store).inc()
    prom.observe(RANK_LATENCY, time.perf_counter() - started)
    return json_response(result.as_json())


async def _parse(
    request: Request, model: type[BaseModel], lists: tuple[str, ...]
) -> tuple[str, Any] | Response:
    namespace = request_namespace(request)
    if isinstance(namespace, Response):
        return namespace
    if request.method == "POST":
        fields = await _body(request)
        if isinstance(fields, Response):
            return fields
    else:
        fields = _query_fields(request, lists)
    try:
        # A query's values are all strings, read leniently ("5", "true"); a JSON body's
        # types are what they say: `"debug": 1` or `"num_results": true` are refused.
        return namespace, model.model_validate(fields, strict=request.method == "POST")
    except ValidationError as exc:
        return _problem(exc)


async def _personal(
    request: Request, model: type[_Q], lists: tuple[str, ...]
) -> tuple[str, _Q, str, CandidateFilter | None] | Response:
    """What a request about one user needs: its namespace, parameters, actor and filter
    (or the error response that says what to fix)."""
    parsed = await _parse(request, model, lists)
    if isinstance(parsed, Response):
        return parsed
    namespace, query = parsed
    actor = _actor(query)
    if isinstance(actor, Response):
        return actor
    if not query.user_id and query.session_id:
        actor = await _logged_in_as(request, namespace, query.session_id, actor)
    item_filter = await _filter(request, namespace, query.filter)
    if isinstance(item_filter, Response):
        return item_filter
    return namespace, query, actor, item_filter


async def recommendations(request: Request) -> Response:
    started = time.perf_counter()
    parsed = await _personal(request, RecommendationsQuery, ("exclude",))
    if isinstance(parsed, Response):
        return parsed
    namespace, query, actor, item_filter = parsed
    ranker: Ranker = request.app.state.ranker
    result = await ranker.recommend(
        namespace,
        actor,
        query.num_results,
        frozenset(query.exclude),
        context=query.context,
        item_filter=item_filter,
        filter_values=query.filter_values,
        debug=query.debug,
        as_of=query.as_of,
    )
    return _answer(result, started)


async def personalized_ranking(request: Request) -> Response:
    started = time.perf_counter()
    parsed = await _personal(request, RankingQuery, ("item_ids",))
    if isinstance(parsed, Response):
        return parsed
    namespace, query, actor, item_filter = parsed
    ranker: Ranker = request.app.state.ranker
    result = await ranker.rerank(
        namespace,
        actor,
        query.item_ids,
        context=query.context,
        item_filter=item_filter,
        filter_values=query.filter_values,
        debug=query.debug,
        as_of=query.as_of,
    )
    return _answer(result, started)


async def related_items(request: Request) -> Response:
    started = time.perf_counter()
    parsed = await _parse(request, RelatedQuery, ("exclude",))
    if isinstance(parsed, Response):
        return parsed
    namespace, query = parsed
    item_filter = await _filter(request, namespace, query.filter)
    if isinstance(item_filter, Response):
        return item_filter
    ranker: Ranker = request.app.state.ranker
    result = await ranker.related(
        namespace,
        query.item_id,
        query.num_results,
        exclude=frozenset(query.exclude),
        item_filter=item_filter,
        filter_values=query.filter_values,
        debug=query.debug,
    )
    return _answer(result, started)


async def trending(request: Request) -> Response:
    started = time.perf_counter()
    parsed = await _parse(request, TrendingQuery, ())
    if isinstance(parsed, Response):
        return parsed
    namespace, query = parsed
    ranker: Ranker = request.app.state.ranker
    result = await ranker.trending(namespace, query.window, query.category, query.num_results)
    return _answer(result, started)


def routes() -> list[BaseRoute]:
    out: list[BaseRoute] = []
    for path, endpoint, methods in (
        ("recommendations", recommendations, ["GET", "POST"]),
        ("related-items", related_items, ["GET"]),
        ("personalized-ranking", personalized_ranking, ["POST"]),
        ("trending", trending, ["GET"]),
    ):
        out.append(Route(f"/v1/{path}", endpoint, methods=methods))
        out.append(Route(f"/v1/{{namespace}}/{path}", endpoint, methods=methods))
    return out


@asynccontextmanager
async def open_ranker(app: Any, stores: Stores, settings: Settings) -> AsyncIterator[Ranker]:
    """The pipeline for the app's lifetime: ``app.state.ranker`` (and a
    ``filter_resolver`` slot the filter store fills). Uses ``app.state.catalog`` when an
    earlier part of the lifespan set one."""
    catalog: ItemCatalog | None = getattr(app.state, "catalog", None)
    # The durable fallback of an actor Redis lost: its window, and its feature vector put
    # back in Redis beside it (serving/pipeline/state.py).
    durable = DurableActorState(
        DynamoWindows(stores.dynamodb, settings),
        DynamoFeatures(stores.dynamodb, settings),
        stores.redis,
        settings,
    )
    ranker = Ranker(stores.redis, durable, settings, catalog=catalog)
    # Redis lost the model pointers: restore what served from S3 (recstream.model_restore).
    ranker.models.restorer = RegistryRestorer(stores.redis, stores.s3, settings)
    app.state.ranker = ranker
    if not hasattr(app.state, "filter_resolver"):
        app.state.filter_resolver = None

    async def warm() -> None:
        # Load the default namespace's models now rather than on the first requests;
        # best effort: nothing published, or Redis down, only means a cold first request.
        with contextlib.suppress(RecstreamError, RedisError, OSError):
            await ranker.warm(settings.namespace)

    warming = asyncio.create_task(warm())
    try:
        yield ranker
    finally:
        warming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warming
        await ranker.aclose()
