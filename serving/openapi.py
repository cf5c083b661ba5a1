"""The API's contract: an OpenAPI 3.1 document of every public route, and its docs page.

    GET /openapi.json     the document (built once per app, from the models below)
    GET /docs             Redoc over it (the script comes from a CDN; the page is static)

Request schemas are the pydantic models the routes validate with, never a second copy:
`streams.schema.Event` (the collector), `Item`/`User` (the catalog), the query models of
serving/recommendations.py, and the Personalize-compatible request models of
serving/personalize.py (whose authority remains botocore's service model, linked from
each operation). The JSON Schema pydantic derives from those models is refined here
only where a validator in code enforces more than a type can say (`_event_rules`), so
that a request the document calls valid is one the server accepts, and the other way
round; tests/reliability/test_schemathesis.py holds the server to that.

Responses have no pydantic models in the routes (they are built as dicts), so their
shapes are declared once, here (the ``*Answer`` models); the schemathesis test checks
every response it sees against them, so they cannot drift unnoticed. A route registered
in the app but missing here fails tests/serving/test_openapi.py.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from recstream.settings import NAMESPACE_PATTERN, Settings
from serving import personalize
from serving.filter_store import NAME_PATTERN
from serving.recommendations import (
    BLANK,
    NON_BLANK,
    RankingQuery,
    RecommendationsQuery,
    RelatedQuery,
    TrendingQuery,
)
from streams.schema import ITEM_EVENT_TYPES, MIN_TIMESTAMP, Event, Item, User

__all__ = ["OPERATIONS", "Operation", "build_spec", "routes"]

BOTOCORE_MODELS: Final = "https://github.com/boto/botocore/tree/develop/botocore/data"
MAX_REQUEST_LINE: Final = 64 * 1024
"""About where uvicorn's HTTP parser (httptools) refuses a request line, before the app."""
SPEC_PATH: Final = "/openapi.json"
DOCS_PATH: Final = "/docs"


# --- response shapes (declared once; see the module docstring) ----------------------------


class _Answer(BaseModel):
    # Responses are closed: a field the code adds without declaring it here is a change
    # of contract, and the schemathesis test says so.
    model_config = ConfigDict(extra="forbid")


class FieldProblemAnswer(_Answer):
    """One thing wrong with one field (`recstream.errors.FieldProblem`)."""

    field: str
    problem: str
    fix: str


class ErrorDetail(BaseModel):
    """Every error's ``error`` object: a machine-readable code and a sentence naming the
    field or the fix. Filter errors add ``position``/``problem``/``fix``; production 5xx
    answers add ``request_id``."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class ErrorAnswer(_Answer):
    error: ErrorDetail


class Rejected(_Answer):
    index: int
    errors: list[FieldProblemAnswer]


class AcceptedEvent(_Answer):
    index: int
    event_id: str


class FailedEvent(_Answer):
    index: int
    event_id: str
    error: str | None = None


class CollectorAnswer(_Answer):
    """Every posted event is in exactly one list. A 422 adds ``error``."""

    accepted: list[AcceptedEvent]
    rejected: list[Rejected]
    failed: list[FailedEvent]
    error: ErrorDetail | None = None


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[Event] = Field(min_length=1)


class CollectorQuery(BaseModel):
    """The collector's query (serving/collector.py reads it)."""

    atomic: bool = False
    """Refuse the whole batch when any event is invalid (nothing goes on the stream)."""


class AcceptedRecord(_Answer):
    index: int
    id: str


class CatalogAnswer(_Answer):
    accepted: list[AcceptedRecord]
    rejected: list[Rejected]
    error: ErrorDetail | None = None


class RecommendedItem(_Answer):
    item_id: str
    score: float
    reasons: list[str]
    title: str | None = None
    categories: list[str] | None = None


class RecommendationsAnswer(_Answer):
    """What every ranking endpoint answers (serving/pipeline/result.py)."""

    recommendation_id: str
    namespace: str
    actor: str | None
    items: list[RecommendedItem]
    degraded: list[str]
    """Stores or sources that missed their deadline; the answer came without them."""
    took_ms: float
    debug: dict[str, Any] | None = None


class FilterIn(BaseModel):
    """A filter to create (Personalize's ``filterExpression`` spelling is accepted too)."""

    name: str = Field(pattern=NAME_PATTERN)
    filter_expression: str = Field(
        description='e.g. EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN ("purchase")'
    )


class FilterAnswer(_Answer):
    name: str
    namespace: str
    filter_expression: str
    status: str
    created_at: float


class FilterList(_Answer):
    filters: list[FilterAnswer]


class HealthAnswer(_Answer):
    ok: bool
    checks: dict[str, str]
    unready: list[str] | None = None


class PredictedItem(_Answer):
    itemId: str
    score: float
    reason: list[str] | None = None
    metadata: dict[str, str] | None = None


class GetRecommendationsResponse(_Answer):
    itemList: list[PredictedItem]
    recommendationId: str


class GetPersonalizedRankingResponse(_Answer):
    personalizedRanking: list[PredictedItem]
    recommendationId: str


class PersonalizeErrorAnswer(_Answer):
    """rest-json errors, as botocore parses them (also in ``x-amzn-ErrorType``)."""

    type: str = Field(alias="__type")
    message: str


# --- operations ------------------------------------------------------------------------------

Answer = type[BaseModel] | tuple[type[BaseModel], ...] | None
Ref = Callable[[type[BaseModel]], dict[str, Any]]
Body = type[BaseModel] | Callable[[Ref, Settings], dict[str, Any]]
"""A request body: a model, or a function building a schema from model references."""


@dataclass(frozen=True)
class Operation:
    """One operation of the document: its paths (the short and the namespaced form share
    one description), method, parameters, body and answers."""

    paths: tuple[str, ...]
    method: Literal["get", "post", "delete"]
    operation_id: str
    summary: str
    tag: str
    description: str = ""
    query: type[BaseModel] | None = None
    """Query parameters: the fields of this model."""
    query_lists: tuple[str, ...] = ()
    """Fields sent comma-separated (``exclude=a,b``)."""
    body: Body | None = None
    responses: Mapping[int, tuple[str, Answer]] = field(default_factory=dict)
    """status: (description, model of the JSON body (or models, any of which), or None
    for no JSON body)."""
    media_type: str = "application/json"
    """Of the 200 answer when it has no model (the metrics' text format, the docs' HTML)."""
    external_docs: str | None = None


def _both(path: str) -> tuple[str, ...]:
    """The short form (default namespace) and the namespaced form of a /v1 path."""
    return (f"/v1{path}", f"/v1/{{namespace}}{path}")


_REFUSED = "the request names a bad field; the message says which and how to fix it"
_ERRORS: Final[dict[int, tuple[str, Answer]]] = {
    404: ("unknown or malformed namespace", ErrorAnswer),
    422: (_REFUSED, ErrorAnswer),
    413: ("the body is over the size limit", ErrorAnswer),
}
_RANKING_ERRORS: Final[dict[int, tuple[str, Answer]]] = {
    **_ERRORS,
    400: ("`filter` cannot be applied, or its values are wrong", ErrorAnswer),
    503: ("the filter store is unreachable", ErrorAnswer),
}
_RANKING_OK: Final = (
    "the ranked items; `degraded` names any store that missed its deadline",
    RecommendationsAnswer,
)
_PERSONALIZE_ERRORS: Final[dict[int, tuple[str, Answer]]] = {
    400: ("InvalidInputException: the message names the member", PersonalizeErrorAnswer),
    404: ("ResourceNotFoundException: unknown namespace, strategy or filter", None),
    500: ("InternalFailure: the deployment needs fixing (a missing stream)", None),
    503: ("ServiceUnavailableException: a store is unreachable; botocore retries", None),
}


def _events_body(ref: Ref, settings: Settings) -> dict[str, Any]:
    max_batch = settings.max_batch
    return {
        "description": 'One event, an array of events, or {"events": [...]}; the route '
        "sets `namespace` (an event that names another one is rejected).",
        "anyOf": [
            ref(Event),
            {"type": "array", "items": ref(Event), "minItems": 1, "maxItems": max_batch},
            ref(EventBatch),
        ],
    }


def _records_body(model: type[BaseModel], plural: str) -> Body:
    def body(ref: Ref, settings: Settings) -> dict[str, Any]:
        return {
            "description": f'One record, an array, or {{"{plural}": [...]}}; a put replaces '
            "the whole record",
            "anyOf": [
                ref(model),
                {
                    "type": "array",
                    "items": ref(model),
                    "minItems": 1,
                    "maxItems": settings.catalog_max_batch,
                },
                {
                    "type": "object",
                    "properties": {plural: {"type": "array", "items": ref(model), "minItems": 1}},
                    "required": [plural],
                    "additionalProperties": False,
                },
            ],
        }

    return body


def _personalize(
    path: str, operation: str, model: type[BaseModel], ok: type[BaseModel] | None
) -> Operation:
    service = (
        "personalize-runtime" if path.startswith("/personalize-runtime") else ("personalize-events")
    )
    return Operation(
        paths=(path,),
        method="post",
        operation_id=f"personalize{operation}",
        summary=f"Amazon Personalize {operation}, for unchanged boto3 clients",
        tag="Personalize-compatible",
        description=f"botocore's `{service}` service model is the contract (members, limits, "
        "errors); docs/personalize-api.md lists the names and the differences. Clients "
        f"set `endpoint_url` to `{{api}}/{service}`.",
        body=model,
        responses={200: ("the operation's output", ok), **_PERSONALIZE_ERRORS},
        external_docs=f"{BOTOCORE_MODELS}/{service}",
    )


class _Empty(_Answer):
    pass


OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation(
        _both("/events"),
        "post",
        "postEvents",
        "Put events on the stream",
        "Events",
        "Every valid event goes on Kinesis; `202` lists each input index in exactly one of "
        "`accepted`, `rejected` (each bad field and its fix) and `failed` (resend those). "
        "`?atomic=true` refuses the whole batch when any event is invalid.",
        query=CollectorQuery,
        body=_events_body,
        responses={
            202: ("the valid events are on the stream", CollectorAnswer),
            413: ("too many events, or a body over 5 MiB", ErrorAnswer),
            404: _ERRORS[404],
            422: (
                "nothing valid (or any invalid event with atomic=true), or no events at all",
                (CollectorAnswer, ErrorAnswer),
            ),
            500: ("the deployment is broken (e.g. no stream); `failed` lists the ids", None),
            503: ("Kinesis refused some events even after retries; resend `failed`", None),
        },
    ),
    Operation(
        _both("/recommendations"),
        "get",
        "getRecommendations",
        "Top items for a user or an anonymous session",
        "Ranking",
        "Pass `user_id` (or `session_id`). `context.KEY=value` and `filter_values.NAME=value` "
        "query parameters carry the context and the filter's values (docs/serving.md).",
        query=RecommendationsQuery,
        query_lists=("exclude",),
        responses={200: _RANKING_OK, **_RANKING_ERRORS},
    ),
    Operation(
        _both("/recommendations"),
        "post",
        "postRecommendations",
        "Top items for a user or an anonymous session (parameters as a JSON body)",
        "Ranking",
        body=RecommendationsQuery,
        responses={200: _RANKING_OK, **_RANKING_ERRORS},
    ),
    Operation(
        _both("/related-items"),
        "get",
        "getRelatedItems",
        "Items like one item",
        "Ranking",
        "item2item neighbours, session kNN and ALS cosine, blended; popular items fill up "
        "(an unknown item gets only those: 200, not 404).",
        query=RelatedQuery,
        query_lists=("exclude",),
        responses={200: _RANKING_OK, **_RANKING_ERRORS},
    ),
    Operation(
        _both("/personalized-ranking"),
        "post",
        "postPersonalizedRanking",
        "Re-rank a given list of items for a user",
        "Ranking",
        "Every given item comes back exactly once (duplicates folded), unless a filter removes it.",
        body=RankingQuery,
        responses={200: _RANKING_OK, **_RANKING_ERRORS},
    ),
    Operation(
        _both("/trending"),
        "get",
        "getTrending",
        "Trending items, overall or in one category",
        "Ranking",
        query=TrendingQuery,
        responses={200: _RANKING_OK, **_ERRORS},
    ),
    Operation(
        _both("/items"),
        "post",
        "putItems",
        "Put items into the catalog",
        "Catalog",
        body=_records_body(Item, "items"),
        responses={
            200: ("every valid item is stored; `rejected` lists the others", CatalogAnswer),
            422: ("nothing valid, or no records at all", (CatalogAnswer, ErrorAnswer)),
            413: _ERRORS[413],
            404: _ERRORS[404],
            503: ("a store is unreachable; retry (puts are idempotent)", ErrorAnswer),
        },
    ),
    Operation(
        _both("/items/{item_id}"),
        "get",
        "getItem",
        "One item of the catalog",
        "Catalog",
        responses={
            200: ("the item", Item),
            404: ("no such item (or namespace)", ErrorAnswer),
            503: ("a store is unreachable", ErrorAnswer),
        },
    ),
    Operation(
        _both("/users"),
        "post",
        "putUsers",
        "Put users into the catalog",
        "Catalog",
        body=_records_body(User, "users"),
        responses={
            200: ("every valid user is stored; `rejected` lists the others", CatalogAnswer),
            422: ("nothing valid, or no records at all", (CatalogAnswer, ErrorAnswer)),
            413: _ERRORS[413],
            404: _ERRORS[404],
            503: ("a store is unreachable; retry (puts are idempotent)", ErrorAnswer),
        },
    ),
    Operation(
        _both("/users/{user_id}"),
        "get",
        "getUser",
        "One user of the catalog",
        "Catalog",
        responses={
            200: ("the user", User),
            404: ("no such user (or namespace)", ErrorAnswer),
            503: ("a store is unreachable", ErrorAnswer),
        },
    ),
    Operation(
        _both("/filters"),
        "post",
        "createFilter",
        "Create a filter (Personalize's filter expression language)",
        "Filters",
        "`400 filter_syntax_error` gives the position, the problem and the fix. Creating "
        "the same name with the same expression again is a 200.",
        body=FilterIn,
        responses={
            201: ("created", FilterAnswer),
            200: ("it already existed with this expression", FilterAnswer),
            400: ("a bad name or expression", ErrorAnswer),
            404: _ERRORS[404],
            409: ("the name holds another expression", ErrorAnswer),
            413: _ERRORS[413],
        },
    ),
    Operation(
        _both("/filters"),
        "get",
        "listFilters",
        "Every filter of the namespace",
        "Filters",
        responses={200: ("the filters", FilterList), 404: _ERRORS[404]},
    ),
    Operation(
        _both("/filters/{name}"),
        "get",
        "getFilter",
        "One filter",
        "Filters",
        responses={200: ("the filter", FilterAnswer), 404: ("no such filter", ErrorAnswer)},
    ),
    Operation(
        _both("/filters/{name}"),
        "delete",
        "deleteFilter",
        "Delete a filter",
        "Filters",
        responses={204: ("deleted", None), 404: ("no such filter", ErrorAnswer)},
    ),
    _personalize(
        "/personalize-runtime/recommendations",
        "GetRecommendations",
        personalize.GetRecommendationsRequest,
        GetRecommendationsResponse,
    ),
    _personalize(
        "/personalize-runtime/personalize-ranking",
        "GetPersonalizedRanking",
        personalize.GetPersonalizedRankingRequest,
        GetPersonalizedRankingResponse,
    ),
    _personalize("/personalize-events/events", "PutEvents", personalize.PutEventsRequest, _Empty),
    _personalize("/personalize-events/items", "PutItems", personalize.PutItemsRequest, _Empty),
    _personalize("/personalize-events/users", "PutUsers", personalize.PutUsersRequest, _Empty),
    Operation(
        ("/healthz",),
        "get",
        "healthz",
        "Liveness: Redis answers",
        "Operations",
        responses={200: ("alive", HealthAnswer), 503: ("Redis does not answer", HealthAnswer)},
    ),
    Operation(
        ("/readyz",),
        "get",
        "readyz",
        "Readiness: every dependency answers",
        "Operations",
        responses={200: ("ready", HealthAnswer), 503: ("`unready` names each", HealthAnswer)},
    ),
    Operation(
        ("/metrics",),
        "get",
        "metrics",
        "Prometheus metrics (docs/observability.md)",
        "Operations",
        responses={200: ("the text exposition format", None)},
        media_type="text/plain",
    ),
    Operation(
        (SPEC_PATH,),
        "get",
        "openapi",
        "This document",
        "Operations",
        responses={200: ("OpenAPI 3.1", None)},
    ),
    Operation(
        (DOCS_PATH,),
        "get",
        "docs",
        "This document, as a page",
        "Operations",
        responses={200: ("HTML", None)},
        media_type="text/html",
    ),
)


# --- building the document ---------------------------------------------------------------------


def _non_blank(node: Any) -> None:
    """`Event` strips every string before checking it (``str_strip_whitespace``), so a
    string that must not be empty must hold a non-blank character, and a pattern may be
    surrounded by blanks."""
    if isinstance(node, dict):
        if node.get("minLength", 0) >= 1 and "pattern" not in node:
            node["pattern"] = NON_BLANK
        elif isinstance(node.get("pattern"), str) and node["pattern"].startswith("^"):
            node["pattern"] = f"^{BLANK}*" + node["pattern"][1:-1] + f"{BLANK}*$"
            node.pop("maxLength", None)  # (counted after stripping; the pattern bounds it)
        for value in node.values():
            _non_blank(value)
    elif isinstance(node, list):
        for value in node:
            _non_blank(value)


def _event_rules(schema: dict[str, Any], now: float) -> None:
    """What `Event`'s validators enforce beyond its field types, in JSON Schema: who
    (``_who_and_what``), the item of built-in types, and the timestamp's bounds
    (``_sane_timestamp``; the upper bound is the document's build time, which the
    server's "a day ahead of now" always exceeds)."""
    _non_blank(schema["properties"])
    props = schema["properties"]
    # The route decides the namespace; a body may repeat it but not choose it, which a
    # schema shared by every route cannot say: the field is left out (docs/serving.md).
    del props["namespace"]
    user = copy.deepcopy(props["user_id"]["anyOf"][0])
    # "session:" prefixes anonymous actors; a user id with it is refused.
    user["not"] = {"pattern": r"^\s*session:"}
    props["user_id"]["anyOf"][0] = user
    schema["anyOf"] = _ONE_ACTOR
    schema["if"] = {
        "properties": {"event_type": {"enum": sorted(ITEM_EVENT_TYPES)}},
        "required": ["event_type"],
    }
    schema["then"] = {
        "properties": {"item_id": {"type": "string"}},
        "required": ["item_id"],
    }
    props["timestamp"].update(
        {
            "minimum": MIN_TIMESTAMP,
            "maximum": float(int(now)),
            "description": "unix seconds (UTC); an ISO-8601 string with a zone is accepted "
            "too. Before 1990, or more than a day ahead of the server's clock, is refused.",
        }
    )
    schema.setdefault(
        "description",
        "Exactly one of user_id or session_id is needed at least; built-in types need item_id.",
    )


_ONE_ACTOR: Final = [
    {"properties": {"user_id": {"type": "string"}}, "required": ["user_id"]},
    {"properties": {"session_id": {"type": "string"}}, "required": ["session_id"]},
]


def _catalog_rules(schemas: dict[str, dict[str, Any]]) -> None:
    """`serving.catalog_routes.validate_record` refuses fields the models do not have
    (they would ignore them: a typo would be lost), and `Item` takes its categories as a
    list or as Personalize's ``"A|B"`` string."""
    for name in ("Item", "User"):
        schemas[name]["additionalProperties"] = False
    categories = schemas["Item"]["properties"]["categories"]
    schemas["Item"]["properties"]["categories"] = {
        "anyOf": [categories, {"type": "string", "description": '"A|B": pipe-separated'}]
    }


def _strip_titles(node: Any) -> Any:
    """pydantic's generated ``title`` on every property only repeats its name."""
    if isinstance(node, dict):
        return {
            k: _strip_titles(v)
            for k, v in node.items()
            if not (k == "title" and isinstance(v, str) and "properties" not in node)
        }
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter cannot be JSON null: keep the non-null branch of ``X | None``."""
    options = schema.get("anyOf")
    if isinstance(options, list):
        rest = [o for o in options if o.get("type") != "null"]
        if len(rest) == 1:
            merged = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
            merged.update(rest[0])
            return merged
    return {k: v for k, v in schema.items() if k != "default"}


def _query_parameters(
    operation: Operation, schemas: Mapping[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    if operation.query is None:
        return []
    model = schemas[operation.query.__name__]
    required = set(model.get("required", []))
    out: list[dict[str, Any]] = []
    for name, prop in model["properties"].items():
        if prop.get("type") == "object":
            continue  # context.K=v, filter_values.K=v: described in the operation's text
        parameter: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": _not_null(prop),
        }
        if name in operation.query_lists:
            parameter.update(style="form", explode=False)
            # A comma would split one id in two; blank entries (`exclude=` or `a,,b`) are
            # dropped rather than refused, so the empty list needs no special spelling.
            parameter["schema"]["items"] = {
                "type": "string",
                "maxLength": prop["items"].get("maxLength", 256),
                "pattern": "^[^,]*$",
            }
            parameter["description"] = "comma-separated; blank entries are ignored"
        out.append(parameter)
    return out


def _path_parameters(path: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if "{namespace}" in path:
        out.append(
            {
                "name": "namespace",
                "in": "path",
                "required": True,
                "description": "the tenant; the short form (without it) serves RECSTREAM_NAMESPACE",
                "schema": {"type": "string", "pattern": NAMESPACE_PATTERN},
            }
        )
    for name, schema in (
        # (an id holding a line feed is stored, but no route template matches it: 404)
        ("item_id", {"type": "string", "minLength": 1}),
        ("user_id", {"type": "string", "minLength": 1}),
        ("name", {"type": "string", "pattern": NAME_PATTERN}),
    ):
        if f"{{{name}}}" in path:
            out.append({"name": name, "in": "path", "required": True, "schema": schema})
    return out


def build_spec(settings: Settings, now: float | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `OPERATIONS`."""
    inputs: list[type[BaseModel]] = [Event, EventBatch, Item, User, FilterIn]
    outputs: list[type[BaseModel]] = []
    for operation in OPERATIONS:
        if isinstance(operation.body, type):
            inputs.append(operation.body)
        if operation.query is not None:
            inputs.append(operation.query)
        for _, declared in operation.responses.values():
            outputs += declared if isinstance(declared, tuple) else [declared] if declared else []
    pairs: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (m, "validation") for m in dict.fromkeys(inputs)
    ] + [(m, "serialization") for m in dict.fromkeys(outputs)]
    keys, defs = models_json_schema(pairs, ref_template="#/components/schemas/{model}")
    schemas: dict[str, dict[str, Any]] = _strip_titles(defs.get("$defs", {}))
    built = time.time() if now is None else now
    _event_rules(schemas["Event"], built)
    _catalog_rules(schemas)
    schemas["EventBatch"]["properties"]["events"]["maxItems"] = settings.max_batch
    for name in ("RecommendationsQuery", "RankingQuery"):
        # `_actor`: a user, or an anonymous session (a query cannot say this; a body can).
        schemas[name]["anyOf"] = _ONE_ACTOR
        # `as_of` is a `streams.schema.Timestamp`: an event timestamp's bounds
        number = schemas[name]["properties"]["as_of"]["anyOf"][0]
        number.update({"minimum": MIN_TIMESTAMP, "maximum": float(int(built))})

    def ref(model: type[BaseModel], mode: str = "validation") -> dict[str, Any]:
        return dict(keys[(model, mode)])  # type: ignore[index]

    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        for path in operation.paths:
            namespaced = "{namespace}" in path
            entry: dict[str, Any] = {
                "operationId": operation.operation_id + ("InNamespace" if namespaced else ""),
                "summary": operation.summary,
                "tags": [operation.tag],
                "parameters": _path_parameters(path) + _query_parameters(operation, schemas),
                "responses": {},
            }
            if operation.description:
                entry["description"] = operation.description
            if operation.external_docs:
                entry["externalDocs"] = {"url": operation.external_docs}
            if operation.body is not None:
                body = (
                    ref(operation.body)
                    if isinstance(operation.body, type)
                    else operation.body(ref, settings)
                )
                entry["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": body}},
                }
            responses = dict(operation.responses)
            if operation.method == "get" and operation.query is not None:
                responses.setdefault(400, ("", None))
            for status, (description, model) in sorted(responses.items()):
                answer: dict[str, Any] = {"description": description}
                if isinstance(model, tuple):
                    answer["content"] = {
                        "application/json": {
                            "schema": {"anyOf": [ref(m, "serialization") for m in model]}
                        }
                    }
                elif model is not None:
                    answer["content"] = {
                        "application/json": {"schema": ref(model, "serialization")}
                    }
                elif status == 200:
                    answer["content"] = {operation.media_type: {"schema": {}}}
                if status == 400 and operation.method == "get" and operation.query is not None:
                    refusal = (
                        f"as text/plain, the HTTP server's refusal of a request line over "
                        f"{MAX_REQUEST_LINE // 1024} KiB (send long lists in a POST body)"
                    )
                    answer["description"] = (
                        f"{description}; or, {refusal}" if description else f"Sent {refusal}"
                    )
                    answer.setdefault("content", {})["text/plain"] = {"schema": {"type": "string"}}
                entry["responses"][str(status)] = answer
            paths.setdefault(path, {})[operation.method] = entry
    # Open (local) mode: no key needed, which OpenAPI writes as one empty requirement.
    security: list[dict[str, list[str]]] = (
        [{"bearer": []}, {"apiKey": []}] if settings.api_keys_required else [{}]
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "recstream",
            "version": "1",
            "description": "Real-time recommendations: the event collector, the ranking "
            "endpoints, the catalog, filters, and Amazon Personalize's runtime and events "
            'APIs. Errors are JSON `{"error": {"code", "message"}}` naming the field '
            "and the fix (Personalize's routes use its own error format). docs/serving.md, "
            "docs/security.md (keys and scopes), docs/personalize-api.md.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "security": security,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "rs_<id>_<secret>"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            },
        },
    }


_DOCS_PAGE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>recstream API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
</head>
<body>
<redoc spec-url="{spec}"></redoc>
<script src="https://cdn.redoc.ly/redoc/v2.1.5/bundles/redoc.standalone.js"></script>
</body>
</html>
"""


def routes(settings: Settings) -> list[BaseRoute]:
    """``GET /openapi.json`` and ``GET /docs``; the document is built once, on first use."""
    built: list[bytes] = []

    async def spec(request: Request) -> Response:
        if not built:
            built.append(orjson.dumps(build_spec(settings)))
        return Response(built[0], media_type="application/json")

    async def docs(request: Request) -> Response:
        return HTMLResponse(_DOCS_PAGE.format(spec=SPEC_PATH))

    return [
        Route(SPEC_PATH, spec, methods=["GET"]),
        Route(DOCS_PATH, docs, methods=["GET"]),
    ]


def route_paths(app_routes: Sequence[BaseRoute]) -> set[tuple[str, str]]:
    """(path template as OpenAPI writes it, method) of every route of an app, e.g.
    ``/v1/items/{item_id:path}`` as ``/v1/items/{item_id}``."""
    import re

    out: set[tuple[str, str]] = set()
    for route in app_routes:
        if not isinstance(route, Route):
            continue
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        for method in route.methods or ():
            if method != "HEAD":
                out.add((path, method.lower()))
    return out
