"""Amazon Personalize's runtime and events APIs, on recstream, for unchanged boto3 clients.

The wire format is botocore's own service models (``personalize-runtime`` 2018-05-22 and
``personalize-events`` 2018-03-22, protocol rest-json): the same operations, URIs,
members, limits and error shapes, so a client only changes ``endpoint_url``::

    boto3.client("personalize-runtime", endpoint_url=f"{api}/personalize-runtime")
    boto3.client("personalize-events", endpoint_url=f"{api}/personalize-events")

(botocore keeps the path of ``endpoint_url`` and appends each operation's URI to it.)

    POST /personalize-runtime/recommendations          GetRecommendations (userId, or
                                                       itemId: related items)
    POST /personalize-runtime/personalize-ranking      GetPersonalizedRanking
    POST /personalize-events/events                    PutEvents  -> Kinesis, as /v1/events
    POST /personalize-events/items                     PutItems   -> the catalog
    POST /personalize-events/users                     PutUsers   -> the catalog

Names (docs/personalize-api.md has the details and the differences from Personalize):

* ``campaignArn`` ``arn:aws:personalize:{region}:{account}:campaign/{namespace}`` and
  ``recommenderArn`` ``…:recommender/{namespace}`` name the namespace; an optional
  ``/{strategy}`` suffix names the strategy (today only ``personalized``, the ranker).
* ``trackingId`` (PutEvents) is the namespace itself.
* ``datasetArn`` ``…:dataset/{namespace}/ITEMS`` or ``…/USERS`` (PutItems, PutUsers).
* ``filterArn`` ``…:filter/{name}`` passes ``item_filter=name`` and
  ``filter_values=filterValues`` to the ranker.

Errors use the rest-json error format botocore parses (the ``x-amzn-ErrorType`` header
and a ``{"__type", "message"}`` body) with the modelled status codes, so boto3 raises
``client.exceptions.InvalidInputException`` (400), ``ResourceNotFoundException`` (404)
and so on. A store outage is ``ServiceUnavailableException`` (503), which botocore retries;
PutEvents derives missing event ids from the event's content, so a retried batch is not
counted twice.
"""

from __future__ import annotations

import inspect
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, Protocol, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from recstream.catalog import CatalogStore
from recstream.errors import RecstreamError, ValidationFailed
from recstream.identity import SESSION_PREFIX
from recstream.settings import NAMESPACE_PATTERN, Settings
from serving.collector import MAX_BODY_BYTES, read_capped
from serving.metrics import EVENTS
from streams.producer import KinesisProducer
from streams.schema import Event, Item, User, problems_from

__all__ = [
    "DEFAULT_NUM_RESULTS",
    "MAX_NUM_RESULTS",
    "STRATEGIES",
    "PersonalizeError",
    "PersonalizeRanker",
    "RankedItem",
    "RankedList",
    "parse_arn",
    "routes",
]

RUNTIME_PREFIX: Final = "/personalize-runtime"
EVENTS_PREFIX: Final = "/personalize-events"
DEFAULT_NUM_RESULTS: Final = 25
MAX_NUM_RESULTS: Final = 500
"""Personalize's limits (the models' documentation): 500 results, 50 with metadata."""
MAX_WITH_METADATA: Final = 50
MAX_METADATA_COLUMNS: Final = 10
STRATEGIES: Final = ("personalized",)
"""What a campaign or recommender ARN may name after the namespace; the first is the
default. Each is a way of calling the ranker; only the ranker's own strategy exists yet."""
# Personalize refuses these as event property names (case-insensitively): they are
# members of the event itself.
_RESERVED_PROPERTIES: Final = frozenset(
    {"userid", "sessionid", "eventtype", "timestamp", "recommendationid", "impression"}
)
# What the events API's members are called in our `Event`, to name fields in errors.
_EVENT_MEMBERS: Final = {
    "event_id": "eventId",
    "event_type": "eventType",
    "event_value": "eventValue",
    "item_id": "itemId",
    "timestamp": "sentAt",
    "recommendation_id": "recommendationId",
    "impression": "impression",
    "properties": "properties",
    "user_id": "userId",
    "session_id": "sessionId",
    "context": "metricAttribution",
}
_NAMESPACE = re.compile(NAMESPACE_PATTERN)
_ARN = re.compile(
    r"arn:(?P<partition>[a-z\d-]+):personalize:(?P<region>[^:]*):(?P<account>[^:]*):"
    r"(?P<resource>.+)"
)
M = TypeVar("M", bound=BaseModel)
_EVENT_ID_SPACE: Final = uuid.UUID("6f1c5b7e-3d1a-4c8e-9a0b-5e2f7d4c1a93")


# --- errors ------------------------------------------------------------------------------


class PersonalizeError(Exception):
    """An error in the service's own terms: its modelled name, status and message."""

    def __init__(self, name: str, status: int, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.status = status
        self.message = message


def invalid(message: str) -> PersonalizeError:
    return PersonalizeError("InvalidInputException", 400, message)


def not_found(message: str) -> PersonalizeError:
    return PersonalizeError("ResourceNotFoundException", 404, message)


def error_body(exc: PersonalizeError) -> Response:
    # botocore's rest-json parser takes the code from x-amzn-ErrorType (and __type in the
    # body), the message from "message".
    return Response(
        orjson.dumps({"__type": exc.name, "message": exc.message}),
        status_code=exc.status,
        media_type="application/json",
        headers={"x-amzn-ErrorType": exc.name, "x-amzn-RequestId": uuid.uuid4().hex},
    )


def from_recstream(exc: RecstreamError) -> PersonalizeError:
    """A recstream error met while answering, in the service's terms."""
    status = getattr(exc, "status", None)  # the filters' errors carry their HTTP status
    if status == 404:
        return not_found(str(exc))
    if isinstance(exc, ValidationFailed) or status == 400:
        return invalid(str(exc))
    if exc.retriable:
        # Retried by botocore's standard and legacy retry modes.
        return PersonalizeError("ServiceUnavailableException", 503, str(exc))
    return PersonalizeError("InternalFailure", 500, str(exc))


def _aws_problems(exc: ValidationError, prefix: str = "") -> PersonalizeError:
    parts = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in error["loc"])
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "body")
        msg = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            msg = "unknown member; remove it (see the service model for the members)"
        elif error["type"] == "missing":
            msg = "Member must not be null"
        parts.append(f"Value at '{loc}' failed to satisfy constraint: {msg}")
    count = len(parts)
    return invalid(f"{count} validation error{'s' * (count != 1)} detected: " + "; ".join(parts))


# --- names -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arn:
    kind: str
    """campaign, recommender, dataset, filter..."""
    parts: tuple[str, ...]
    """What follows ``{kind}/``, split on ``/``."""


def parse_arn(arn: str, member: str, kinds: Sequence[str]) -> Arn:
    """The resource an ARN names, or InvalidInputException naming ``member``."""
    match = _ARN.fullmatch(arn)
    if match is None or "/" not in match["resource"]:
        raise invalid(
            f"{member} {arn!r} is not a Personalize ARN; use "
            f"arn:aws:personalize:{{region}}:{{account}}:{kinds[0]}/{{namespace}}"
        )
    kind, _, rest = match["resource"].partition("/")
    if kind not in kinds:
        raise invalid(f"{member} {arn!r} names a {kind}; pass a {' or '.join(kinds)} ARN")
    return Arn(kind, tuple(rest.split("/")))


def known_namespace(settings: Settings, namespace: str, what: str) -> str:
    if not _NAMESPACE.fullmatch(namespace) or (
        settings.namespaces and namespace not in settings.namespaces
    ):
        served = settings.namespaces or [f"any matching {NAMESPACE_PATTERN}"]
        raise not_found(
            f"{what} names namespace {namespace!r}, which is not served here; use one of {served}"
        )
    return namespace


def campaign(settings: Settings, arn: str, member: str, kinds: Sequence[str]) -> tuple[str, str]:
    """(namespace, strategy) of a campaign or recommender ARN."""
    parsed = parse_arn(arn, member, kinds)
    if len(parsed.parts) > 2 or not parsed.parts[0]:
        raise invalid(
            f"{member} {arn!r}: name the namespace and optionally a strategy, "
            f"…:{parsed.kind}/{{namespace}}[/{{strategy}}]"
        )
    namespace = known_namespace(settings, parsed.parts[0], member)
    strategy = parsed.parts[1] if len(parsed.parts) == 2 else STRATEGIES[0]
    if strategy not in STRATEGIES:
        raise not_found(
            f"{member} {arn!r} names strategy {strategy!r}, which does not "
            f"exist; use one of {list(STRATEGIES)}"
        )
    return namespace, strategy


def dataset(settings: Settings, arn: str, expected: Literal["ITEMS", "USERS"]) -> str:
    """The namespace of a dataset ARN, ``…:dataset/{namespace}/{ITEMS|USERS}``."""
    parsed = parse_arn(arn, "datasetArn", ["dataset"])
    if len(parsed.parts) != 2 or parsed.parts[1].upper() not in ("ITEMS", "USERS"):
        raise invalid(f"datasetArn {arn!r}: use …:dataset/{{namespace}}/{expected}")
    if parsed.parts[1].upper() != expected:
        raise invalid(
            f"datasetArn {arn!r} names the {parsed.parts[1]} dataset; "
            f"this operation writes …/{expected}"
        )
    return known_namespace(settings, parsed.parts[0], "datasetArn")


# --- the ranker's interface ---------------------------------------------------------------


class RankedItem(Protocol):
    @property
    def item_id(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def reasons(self) -> Sequence[str]: ...


class RankedList(Protocol):
    @property
    def recommendation_id(self) -> str: ...
    @property
    def items(self) -> Sequence[RankedItem]: ...


class PersonalizeRanker(Protocol):
    """What this module calls on ``app.state.ranker``.

    Also used when present (checked by signature, so the ranker can grow them):
    keyword arguments ``context`` (dict[str, str]), ``item_filter`` (the filter's name)
    and ``filter_values`` (dict[str, str]) of ``recommend``; and a method
    ``rerank(namespace, actor, item_ids, *, context=…, item_filter=…, filter_values=…)``
    returning a `RankedList` of (a subset of, when a filter drops some) ``item_ids``.
    """

    async def recommend(
        self, namespace: str, actor: str, num_results: int, exclude: frozenset[str]
    ) -> RankedList: ...


_SIGNATURES: dict[Any, frozenset[str]] = {}


def _accepts(method: Any, name: str) -> bool:
    """Whether ``method`` takes keyword ``name``. Signatures are read once per function
    (a bound method is a new object per access; its ``__func__`` is not)."""
    function = getattr(method, "__func__", method)
    names = _SIGNATURES.get(function)
    if names is None:
        try:
            parameters = tuple(inspect.signature(method).parameters.values())
        except (TypeError, ValueError):
            parameters = ()
        names = frozenset(
            "**" if p.kind is inspect.Parameter.VAR_KEYWORD else p.name for p in parameters
        )
        _SIGNATURES[function] = names
    return name in names or "**" in names


def _ranker_kwargs(
    method: Any,
    context: Mapping[str, str] | None,
    filter_name: str | None,
    filter_values: Mapping[str, str] | None,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if context and _accepts(method, "context"):
        # Context is a hint (Personalize too uses it only if the model was trained with
        # it), so a ranker that cannot use it still answers.
        kwargs["context"] = dict(context)
    if filter_name is not None:
        # A filter is a business rule: never silently ignored.
        if not (_accepts(method, "item_filter") and _accepts(method, "filter_values")):
            raise invalid(
                "filterArn: this deployment's ranker does not apply filters yet; "
                "leave filterArn out"
            )
        kwargs["item_filter"] = filter_name
        kwargs["filter_values"] = dict(filter_values or {})
    elif filter_values:
        raise invalid("filterValues were given without filterArn; pass the filter's ARN")
    return kwargs


async def _resolve_filter(request: Request, namespace: str, kwargs: dict[str, Any]) -> None:
    """Replace the filter's name in ``kwargs`` by the rule the ranker applies, through the
    app's filter store (``app.state.filter_resolver``); an unknown name raises the
    store's not-found error (ResourceNotFoundException)."""
    name = kwargs.get("item_filter")
    if not isinstance(name, str):
        return
    resolver = getattr(request.app.state, "filter_resolver", None)
    if resolver is None:
        raise invalid("filterArn: this deployment has no filter store; leave filterArn out")
    kwargs["item_filter"] = await resolver.resolve(namespace, name)


# --- requests ----------------------------------------------------------------------------

ArnStr = Annotated[
    str, StringConstraints(max_length=256, pattern=r"^arn:([a-z\d-]+):personalize:.*:.*:.+$")
]
Id = Annotated[str, StringConstraints(max_length=256)]
Context = dict[
    Annotated[str, StringConstraints(max_length=150, pattern=r"^[A-Za-z\d_]+$")],
    Annotated[str, StringConstraints(max_length=1000)],
]
FilterValues = dict[
    Annotated[str, StringConstraints(max_length=50, pattern=r"^[A-Za-z0-9_]+$")],
    Annotated[str, StringConstraints(max_length=1000)],
]
MetadataColumns = dict[
    Annotated[str, StringConstraints(max_length=256)],
    Annotated[list[Annotated[str, StringConstraints(max_length=150)]], Field(max_length=99)],
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GetRecommendationsRequest(_Request):
    campaignArn: ArnStr | None = None
    recommenderArn: ArnStr | None = None
    itemId: Id | None = None
    userId: Id | None = None
    numResults: int = Field(DEFAULT_NUM_RESULTS, ge=0)
    context: Context | None = Field(None, max_length=150)
    filterArn: ArnStr | None = None
    filterValues: FilterValues | None = Field(None, max_length=25)
    promotions: list[dict[str, Any]] | None = Field(None, max_length=1)
    metadataColumns: MetadataColumns | None = Field(None, max_length=1)


class GetPersonalizedRankingRequest(_Request):
    campaignArn: ArnStr
    inputList: list[Id]
    userId: Id
    context: Context | None = Field(None, max_length=150)
    filterArn: ArnStr | None = None
    filterValues: FilterValues | None = Field(None, max_length=25)
    metadataColumns: MetadataColumns | None = Field(None, max_length=1)


StringType = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class MetricAttribution(_Request):
    eventAttributionSource: Annotated[str, StringConstraints(max_length=1024)]


class PersonalizeEvent(_Request):
    eventId: StringType | None = None
    eventType: StringType
    eventValue: float | None = None
    itemId: StringType | None = None
    properties: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = None
    sentAt: float | str
    recommendationId: Annotated[str, StringConstraints(min_length=1, max_length=40)] | None = None
    impression: Annotated[list[StringType], Field(min_length=1, max_length=25)] | None = None
    metricAttribution: MetricAttribution | None = None


class PutEventsRequest(_Request):
    trackingId: StringType
    userId: StringType | None = None
    sessionId: StringType
    eventList: Annotated[list[PersonalizeEvent], Field(min_length=1, max_length=10)]


class PersonalizeItem(_Request):
    itemId: StringType
    properties: Annotated[str, StringConstraints(min_length=1, max_length=32000)] | None = None


class PersonalizeUser(_Request):
    userId: StringType
    properties: Annotated[str, StringConstraints(min_length=1, max_length=24000)] | None = None


class PutItemsRequest(_Request):
    datasetArn: ArnStr
    items: Annotated[list[PersonalizeItem], Field(min_length=1, max_length=10)]


class PutUsersRequest(_Request):
    datasetArn: ArnStr
    users: Annotated[list[PersonalizeUser], Field(min_length=1, max_length=10)]


async def _parse(request: Request, model: type[M]) -> M:
    raw = await read_capped(request, MAX_BODY_BYTES)
    if raw is None:
        raise invalid(f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise _aws_problems(exc) from exc


# --- properties: Personalize's JSON strings -> our records ----------------------------------


def _snake(name: str) -> str:
    """``numberOfRatings`` and ``NUMBER_OF_RATINGS`` -> ``number_of_ratings``, the
    column naming `streams.schema.User.from_csv_row` uses."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _properties(text: str | None, where: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise invalid(
            f"{where}.properties is not valid JSON ({exc}); send a JSON object "
            'as a string, e.g. "{\\"genres\\": \\"Comedy|Drama\\"}"'
        ) from exc
    if not isinstance(value, dict):
        raise invalid(f"{where}.properties must be a JSON object, not {type(value).__name__}")
    for key, item in value.items():
        if isinstance(item, dict | list) or item is None:
            raise invalid(f"{where}.properties[{key!r}] must be a string, number or boolean")
        if isinstance(item, float) and not math.isfinite(item):
            raise invalid(f"{where}.properties[{key!r}] must be a finite number")
    return value


_ITEM_FIELDS: Final = {
    "categories": "categories",
    "category": "categories",
    "genres": "categories",
    "genre": "categories",
    "brand": "brand",
    "price": "price",
    "creation_timestamp": "creation_timestamp",
    "title": "title",
}
_LEVEL = re.compile(r"category_l(\d+)")


def to_item(raw: PersonalizeItem, where: str) -> Item:
    """An `Item` from PutItems' ``itemId`` and ``properties``. Property names are matched
    as Personalize matches them to the items schema (camelCase to UPPER_SNAKE, any case);
    ``categoryL1``, ``categoryL2``… become the categories in level order. A property with
    no field in our items schema is refused, as Personalize refuses one not in its schema."""
    fields: dict[str, Any] = {"item_id": raw.itemId}
    levels: dict[int, str] = {}
    for key, value in _properties(raw.properties, where).items():
        name = _snake(key)
        level = _LEVEL.fullmatch(name)
        if level:
            levels[int(level[1])] = str(value)
        elif name in _ITEM_FIELDS:
            fields[_ITEM_FIELDS[name]] = value
        else:
            raise invalid(
                f"{where}.properties has {key!r}, which is not a field of the items schema; "
                f"use {', '.join(sorted(_ITEM_FIELDS))} or categoryL1, categoryL2, …"
            )
    if levels:
        if "categories" in fields:
            raise invalid(f"{where}.properties: send categories or categoryL1…, not both")
        fields["categories"] = [levels[n] for n in sorted(levels)]
    try:
        return Item.model_validate(fields)
    except ValidationError as exc:
        problem = problems_from(exc)[0]
        raise invalid(
            f"{where}.properties: {problem.field}: {problem.problem}; {problem.fix}"
        ) from exc


def to_user(raw: PersonalizeUser, where: str) -> User:
    attributes = {
        _snake(key): str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in _properties(raw.properties, where).items()
    }
    try:
        return User(user_id=raw.userId, attributes=attributes)
    except ValidationError as exc:
        problem = problems_from(exc)[0]
        raise invalid(f"{where}.properties: {problem.problem}; {problem.fix}") from exc


def _event_type(value: str) -> str:
    # Our event types are lower_snake_case; Personalize's are free strings ("Watch",
    # "add-to-cart"), so they are folded into ours the one obvious way.
    return re.sub(r"[\s\-]+", "_", value.strip()).lower()


def to_event(body: PutEventsRequest, index: int, raw: PersonalizeEvent, namespace: str) -> Event:
    where = f"eventList.{index}"
    properties = _properties(raw.properties, where)
    reserved = sorted(k for k in properties if k.lower() in _RESERVED_PROPERTIES)
    if reserved:
        raise invalid(
            f"{where}.properties: {reserved} are members of the event itself; "
            "send them as members, not properties"
        )
    fields: dict[str, Any] = {
        "event_type": _event_type(raw.eventType),
        "user_id": body.userId,
        "session_id": body.sessionId,
        "item_id": raw.itemId,
        "timestamp": raw.sentAt,
        "event_value": raw.eventValue,
        "recommendation_id": raw.recommendationId,
        "impression": raw.impression or [],
        "properties": properties,
        "namespace": namespace,
    }
    if raw.metricAttribution is not None:
        fields["context"] = {"attribution_source": raw.metricAttribution.eventAttributionSource}
    # No eventId: derive one from the content, so a batch botocore retries after a 503
    # (some events may have landed) is deduplicated by the agents instead of counted twice.
    fields["event_id"] = (
        raw.eventId
        or uuid.uuid5(
            _EVENT_ID_SPACE, orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode()
        ).hex
    )
    try:
        return Event.model_validate(fields)
    except ValidationError as exc:
        parts = []
        for problem in problems_from(exc):
            head, _, tail = problem.field.partition(".")
            member = _EVENT_MEMBERS.get(head, head) + (f".{tail}" if tail else "")
            parts.append(
                f"Value at '{where}.{member}' failed to satisfy constraint: "
                f"{problem.problem}; {problem.fix}"
            )
        raise invalid(f"{len(parts)} validation error(s) detected: " + "; ".join(parts)) from exc


# --- responses -----------------------------------------------------------------------------


def _metadata_columns(columns: Mapping[str, list[str]] | None) -> list[str]:
    if not columns:
        return []
    ((dataset_type, names),) = columns.items()
    if dataset_type != "ITEMS":
        raise invalid(f"metadataColumns: the key must be ITEMS, not {dataset_type!r}")
    if len(names) > MAX_METADATA_COLUMNS:
        raise invalid(f"metadataColumns: at most {MAX_METADATA_COLUMNS} columns")
    unknown = [n for n in names if _snake(n) not in _METADATA]
    if unknown:
        raise invalid(
            f"metadataColumns: {unknown} are not columns of the items dataset; "
            f"use {sorted(c.upper() for c in _METADATA)}"
        )
    return names


def _joined(item: Item) -> str | None:
    return "|".join(item.categories) if item.categories else None


_METADATA: Final[dict[str, Callable[[Item], str | None]]] = {
    "item_id": lambda item: item.item_id,
    "title": lambda item: item.title,
    "categories": _joined,
    "category": _joined,
    "genres": _joined,
    "genre": _joined,
    "brand": lambda item: item.brand,
    "price": lambda item: None if item.price is None else repr(item.price),
    "creation_timestamp": lambda item: (
        None if item.creation_timestamp is None else repr(item.creation_timestamp)
    ),
}


async def _item_list(
    request: Request,
    namespace: str,
    ranked: Sequence[tuple[str, float, Sequence[str]]],
    columns: list[str],
) -> list[dict[str, Any]]:
    records: dict[str, Item] = {}
    if columns:
        catalog: CatalogStore = request.app.state.catalog
        records = await catalog.items(namespace, [item_id for item_id, _, _ in ranked])
    out: list[dict[str, Any]] = []
    for item_id, score, reasons in ranked:
        entry: dict[str, Any] = {"itemId": item_id, "score": round(score, 6)}
        if reasons:
            entry["reason"] = [r[:256] for r in reasons]
        if columns:
            record = records.get(item_id)
            metadata = {}
            if record is not None:
                for column in columns:
                    value = _METADATA[_snake(column)](record)
                    if value is not None:
                        metadata[column] = value
            entry["metadata"] = metadata
        out.append(entry)
    return out


def _ok(payload: Mapping[str, Any], result: RankedList | None = None) -> Response:
    headers = {"x-amzn-RequestId": uuid.uuid4().hex}
    # Personalize's response has no member for it, so the stores that missed their
    # deadline (the native API's "degraded") are named in a header boto3 ignores.
    degraded = getattr(result, "degraded", None)
    if degraded:
        headers["x-recstream-degraded"] = ",".join(degraded)
    return Response(orjson.dumps(payload), media_type="application/json", headers=headers)


def _filter_name(settings: Settings, arn: str | None) -> str | None:
    if arn is None:
        return None
    parsed = parse_arn(arn, "filterArn", ["filter"])
    if len(parsed.parts) != 1 or not parsed.parts[0]:
        raise invalid(f"filterArn {arn!r}: use …:filter/{{name}}")
    return parsed.parts[0]


def _actor(user_id: str) -> str:
    if not user_id:
        raise invalid("userId must not be empty")
    if user_id.startswith(SESSION_PREFIX):
        raise invalid(
            f"userId must not start with {SESSION_PREFIX!r} (recstream's anonymous actors)"
        )
    return user_id


# --- handlers --------------------------------------------------------------------------------


def _handler(operation: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        try:
            return await operation(request)  # type: ignore[no-any-return]
        except PersonalizeError as exc:
            return error_body(exc)
        except RecstreamError as exc:
            return error_body(from_recstream(exc))

    endpoint.__name__ = operation.__name__
    return endpoint


async def get_recommendations(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    body = await _parse(request, GetRecommendationsRequest)
    if (body.campaignArn is None) == (body.recommenderArn is None):
        raise invalid("pass exactly one of campaignArn and recommenderArn")
    if body.campaignArn is not None:
        namespace, _ = campaign(settings, body.campaignArn, "campaignArn", ["campaign"])
    else:
        assert body.recommenderArn is not None
        namespace, _ = campaign(settings, body.recommenderArn, "recommenderArn", ["recommender"])
    if body.userId is None and body.itemId is None:
        raise invalid(
            "pass userId (recommendations for a user) or itemId (items related to an item, "
            "as RELATED_ITEMS recipes answer)"
        )
    if body.promotions:
        raise invalid("promotions are not supported by recstream; leave them out")
    columns = _metadata_columns(body.metadataColumns)
    limit = MAX_WITH_METADATA if columns else MAX_NUM_RESULTS
    if body.numResults > limit:
        raise invalid(
            f"numResults is {body.numResults}; at most {limit}"
            + (" with metadataColumns" if columns else "")
        )
    actor = _actor(body.userId) if body.userId is not None else None
    if body.itemId is not None and not body.itemId.strip():
        raise invalid("itemId must not be empty")
    filter_name = _filter_name(settings, body.filterArn)
    if body.numResults == 0:
        return _ok({"itemList": [], "recommendationId": f"RID-{uuid.uuid4()}"})
    ranker: PersonalizeRanker = request.app.state.ranker
    result: RankedList
    if body.itemId is not None:
        # Related items (Personalize's RELATED_ITEMS recipes): our related-items path. A
        # userId given with it is checked above but does not personalize the list, as
        # Personalize's SIMS does not either.
        related = getattr(ranker, "related", None)
        if related is None:
            raise invalid("itemId: this deployment's ranker has no related items; pass userId")
        kwargs = _ranker_kwargs(related, body.context, filter_name, body.filterValues)
        await _resolve_filter(request, namespace, kwargs)
        result = await related(namespace, body.itemId, body.numResults, **kwargs)
    else:
        assert actor is not None
        kwargs = _ranker_kwargs(ranker.recommend, body.context, filter_name, body.filterValues)
        await _resolve_filter(request, namespace, kwargs)
        result = await ranker.recommend(namespace, actor, body.numResults, frozenset(), **kwargs)
    ranked = [(r.item_id, r.score, r.reasons) for r in result.items[: body.numResults]]
    return _ok(
        {
            "itemList": await _item_list(request, namespace, ranked, columns),
            "recommendationId": result.recommendation_id,
        },
        result,
    )


async def get_personalized_ranking(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    body = await _parse(request, GetPersonalizedRankingRequest)
    namespace, _ = campaign(settings, body.campaignArn, "campaignArn", ["campaign"])
    columns = _metadata_columns(body.metadataColumns)
    limit = MAX_WITH_METADATA if columns else MAX_NUM_RESULTS
    if not 1 <= len(body.inputList) <= limit:
        raise invalid(
            f"inputList has {len(body.inputList)} items; send 1 to {limit}"
            + (" with metadataColumns" if columns else "")
        )
    actor = _actor(body.userId)
    filter_name = _filter_name(settings, body.filterArn)
    given = list(dict.fromkeys(body.inputList))  # each item exactly once, first place kept
    ranker: Any = request.app.state.ranker
    rerank = getattr(ranker, "rerank", None)
    if rerank is not None:
        kwargs = _ranker_kwargs(rerank, body.context, filter_name, body.filterValues)
        await _resolve_filter(request, namespace, kwargs)
        result = await rerank(namespace, actor, given, **kwargs)
        ranked = _rerank_result(result, given, filtered=filter_name is not None)
    else:
        if filter_name is not None:
            raise invalid(
                "filterArn: this deployment's ranker cannot filter a given "
                "inputList yet; leave filterArn out"
            )
        kwargs = _ranker_kwargs(ranker.recommend, body.context, None, None)
        result = await ranker.recommend(namespace, actor, MAX_NUM_RESULTS, frozenset(), **kwargs)
        ranked = rank_by_recommendations(given, result)
    return _ok(
        {
            "personalizedRanking": await _item_list(request, namespace, ranked, columns),
            "recommendationId": result.recommendation_id,
        },
        result,
    )


def rank_by_recommendations(
    given: Sequence[str], result: RankedList
) -> list[tuple[str, float, Sequence[str]]]:
    """The given items, those the ranker scored first (best first), then the others in
    the given order with score 0, as Personalize appends items it has no data for."""
    wanted = set(given)
    scored: list[tuple[str, float, Sequence[str]]] = []
    for r in result.items:
        if r.item_id in wanted:
            scored.append((r.item_id, r.score, r.reasons))
            wanted.discard(r.item_id)  # a ranker listing an item twice is counted once
    rest = [(item_id, 0.0, ()) for item_id in given if item_id in wanted]
    return scored + rest


def _rerank_result(
    result: RankedList, given: Sequence[str], *, filtered: bool
) -> list[tuple[str, float, Sequence[str]]]:
    """The ranker's order, restricted to the given items, each once; an item it left out
    is appended unless a filter may have removed it."""
    ranked = rank_by_recommendations(given, result)
    if filtered:
        returned = {r.item_id for r in result.items}
        return [entry for entry in ranked if entry[0] in returned]
    return ranked


async def put_events(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    body = await _parse(request, PutEventsRequest)
    namespace = _tracked_namespace(settings, body.trackingId)
    events = [to_event(body, i, raw, namespace) for i, raw in enumerate(body.eventList)]
    producer: KinesisProducer = request.app.state.producer
    results = await producer.put_events(events)
    failed = [r for r in results if not r.ok]
    EVENTS.labels(outcome="accepted").inc(len(results) - len(failed))
    EVENTS.labels(outcome="failed").inc(len(failed))
    if failed:
        message = (
            f"{len(failed)} of {len(events)} events did not reach the stream "
            f"({failed[0].error}); send the request again (event ids make it safe)"
        )
        if all(r.retriable for r in failed):
            raise PersonalizeError("ServiceUnavailableException", 503, message)
        raise PersonalizeError("InternalFailure", 500, message)
    return _ok({})


def _tracked_namespace(settings: Settings, tracking_id: str) -> str:
    # PutEvents models only InvalidInputException, so an unknown tracking id is one.
    try:
        return known_namespace(settings, tracking_id, "trackingId")
    except PersonalizeError as exc:
        raise invalid(exc.message) from exc


async def put_items(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    body = await _parse(request, PutItemsRequest)
    namespace = dataset(settings, body.datasetArn, "ITEMS")
    items = [to_item(raw, f"items.{i}") for i, raw in enumerate(body.items)]
    catalog: CatalogStore = request.app.state.catalog
    await catalog.put_items(namespace, items)
    return _ok({})


async def put_users(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    body = await _parse(request, PutUsersRequest)
    namespace = dataset(settings, body.datasetArn, "USERS")
    users = [to_user(raw, f"users.{i}") for i, raw in enumerate(body.users)]
    catalog: CatalogStore = request.app.state.catalog
    await catalog.put_users(namespace, users)
    return _ok({})


def routes() -> list[BaseRoute]:
    return [
        Route(f"{RUNTIME_PREFIX}/recommendations", _handler(get_recommendations), methods=["POST"]),
        Route(
            f"{RUNTIME_PREFIX}/personalize-ranking",
            _handler(get_personalized_ranking),
            methods=["POST"],
        ),
        Route(f"{EVENTS_PREFIX}/events", _handler(put_events), methods=["POST"]),
        Route(f"{EVENTS_PREFIX}/items", _handler(put_items), methods=["POST"]),
        Route(f"{EVENTS_PREFIX}/users", _handler(put_users), methods=["POST"]),
    ]
