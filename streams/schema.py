"""The one event schema: used by the producer client, the collector, every agent and the tests.

It is modelled on Amazon Personalize's ``PutEvents`` event, with its limits: ids of at
most 256 characters, at most 25 impression items, bounded properties. Every kind of
event has the same fields (as in Personalize), so one model with a validated
``event_type`` serves better than a union of near-identical classes; the type's weight
comes from `Settings.event_weights`.

The catalog schemas, `Item` and `User`, mirror Personalize's CSV dataset schemas
(``ITEM_ID, CATEGORY, BRAND, PRICE, CREATION_TIMESTAMP``; ``USER_ID`` plus attributes),
and `Interaction` is one row of Personalize's interactions dataset.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from recstream.errors import FieldProblem
from recstream.settings import NAMESPACE_PATTERN

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_IMPRESSION",
    "Event",
    "EventType",
    "Interaction",
    "Item",
    "Timestamp",
    "User",
    "new_event_id",
    "problems_from",
]

MAX_ID_LENGTH: Final = 256
MAX_IMPRESSION: Final = 25
MAX_PROPERTIES: Final = 32
MAX_PROPERTIES_BYTES: Final = 1024
MAX_CONTEXT: Final = 16
# 1990-01-01: older than any real clickstream (MovieLens starts in 1996), yet it catches
# zero, negative and two-digit-year timestamps.
MIN_TIMESTAMP: Final = 631_152_000.0
# A clock a day fast is a broken clock, not a time zone.
MAX_FUTURE_S: Final = 86_400.0
# A "seconds" value this large is really milliseconds (year 5138 otherwise).
MILLIS_THRESHOLD: Final = 1e11

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
PropertyValue = str | int | float | bool


class EventType(StrEnum):
    """The built-in event types; any other lower_snake_case name is a custom type."""

    VIEW = "view"
    CLICK = "click"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    LIKE = "like"
    SHARE = "share"


# Built-in types are about an item, so they must name one; custom types (e.g. "search")
# may not.
ITEM_EVENT_TYPES: Final = frozenset(t.value for t in EventType)


def new_event_id() -> str:
    return uuid.uuid4().hex


def _now() -> float:
    return time.time()


def _timestamp(value: Any) -> Any:
    """Accept unix seconds or an ISO-8601 string; reject milliseconds with a clear fix."""
    if isinstance(value, bool):
        raise ValueError("timestamp must be a number of unix seconds, not a boolean")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        from datetime import datetime

        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(
                "timestamp must be unix seconds (e.g. 1700000000.5) or ISO-8601 "
                "(e.g. 2024-01-31T12:00:00Z)"
            ) from exc
        if parsed.tzinfo is None:
            raise ValueError("an ISO-8601 timestamp needs a time zone; append Z for UTC")
        return parsed.timestamp()
    return value


def _sane_timestamp(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("timestamp must be a finite number of unix seconds")
    if value >= MILLIS_THRESHOLD:
        raise ValueError(
            f"timestamp {value:.0f} looks like milliseconds; send unix seconds (divide by 1000)"
        )
    if value < MIN_TIMESTAMP:
        raise ValueError(f"timestamp {value} is before 1990; send unix seconds (UTC)")
    if value > time.time() + MAX_FUTURE_S:
        raise ValueError(
            f"timestamp {value} is more than a day in the future; check the sender's clock"
        )
    return value


Timestamp = Annotated[float, BeforeValidator(_timestamp), AfterValidator(_sane_timestamp)]
"""Unix seconds (or ISO-8601 with a zone), from 1990 to a day ahead: an event's time, and
a ranking request's ``as_of``."""


def _not_boolean(value: Any) -> Any:
    # pydantic's lax mode reads true as 1.0; a boolean here is a sender's bug, not a rating.
    if isinstance(value, bool):
        raise ValueError("event_value must be a number, not a boolean; send 1 or 0 (or omit it)")
    return value


def _flat_properties(value: Any) -> Any:
    # Nested values are refused: Personalize's event properties are flat, the agents and
    # features read scalars, and a nested value would otherwise produce four cryptic
    # union errors instead of one that says what to do.
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list):
                raise ValueError(
                    f"properties[{key!r}] is a nested {type(item).__name__}; properties hold "
                    f"flat strings, numbers or booleans: flatten it into keys like "
                    f"'{key}.field', or move structured data to the item catalog"
                )
    return value


class Event(BaseModel):
    """One interaction posted by a producer. Frozen: agents never mutate what they read."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    event_id: Id = Field(default_factory=new_event_id)
    """Idempotency key. Supply your own to make retries safe; otherwise the server makes one."""
    event_type: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
    """view, click, add_to_cart, purchase, like, share, or a custom lower_snake_case type."""
    user_id: Id | None = None
    """Known user. Anonymous events leave it out and must carry session_id."""
    session_id: Id | None = None
    item_id: Id | None = None
    """Required for the built-in types, which are all about an item."""
    timestamp: Timestamp = Field(default_factory=_now)
    """When it happened, unix seconds (UTC). Defaults to the time the server received it."""
    event_value: Annotated[float | None, BeforeValidator(_not_boolean)] = None
    """e.g. a rating or a purchase amount."""
    recommendation_id: Id | None = None
    """The recommendation response this event followed, for attribution."""
    impression: list[Id] = Field(default_factory=list, max_length=MAX_IMPRESSION)
    """Items that were shown alongside item_id."""
    properties: Annotated[
        dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], PropertyValue],
        BeforeValidator(_flat_properties),
    ] = Field(default_factory=dict, max_length=MAX_PROPERTIES)
    """Flat scalars only (docs/security.md says why nested values are refused)."""
    context: dict[
        Annotated[str, StringConstraints(min_length=1, max_length=64)],
        Annotated[str, StringConstraints(max_length=MAX_ID_LENGTH)],
    ] = Field(default_factory=dict, max_length=MAX_CONTEXT)
    """Device, locale, page and similar request context."""
    namespace: str = Field("default", pattern=NAMESPACE_PATTERN)
    """Tenant or surface. The collector sets it from the route."""

    @field_validator("event_value")
    @classmethod
    def _finite_value(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("event_value must be a finite number")
        return value

    @field_validator("properties")
    @classmethod
    def _bounded_properties(cls, value: dict[str, PropertyValue]) -> dict[str, PropertyValue]:
        size = len(orjson.dumps(value))
        if size > MAX_PROPERTIES_BYTES:
            raise ValueError(
                f"properties serialize to {size} bytes; keep them under "
                f"{MAX_PROPERTIES_BYTES} (move large data to the item catalog)"
            )
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"properties[{key!r}] must be a finite number")
        return value

    @model_validator(mode="after")
    def _who_and_what(self) -> Event:
        if self.user_id is not None and self.user_id.startswith("session:"):
            # "session:" prefixes anonymous actors (see `actor`); a user id with it would
            # share a window with an anonymous session.
            raise ValueError("user_id must not start with 'session:'; send session_id instead")
        if self.user_id is None and self.session_id is None:
            raise ValueError("an event needs user_id, or session_id for an anonymous visitor")
        if self.item_id is None and self.event_type in ITEM_EVENT_TYPES:
            raise ValueError(f"a {self.event_type!r} event needs item_id")
        return self

    # When the stream accepted the event (a consumer sets it from the record's arrival
    # time): not part of the event's JSON, nor of what a producer can claim.
    _accepted_at: float | None = PrivateAttr(default=None)

    @property
    def accepted_at(self) -> float | None:
        """When the stream accepted the event (Kinesis's arrival time of its record), on
        an event a consumer read; None elsewhere. Freshness counts from it."""
        return self._accepted_at

    def mark_accepted(self, at: float) -> None:
        self._accepted_at = at

    @property
    def actor(self) -> str:
        """Whose window this event belongs to: the user, else the anonymous session."""
        return self.user_id if self.user_id is not None else f"session:{self.session_id}"

    @property
    def partition_key(self) -> str:
        """Kinesis partition key: by user, so one user's events stay in order on one shard."""
        return self.actor

    def to_json(self) -> bytes:
        # pydantic-core's serializer (Rust) is several times faster than dump + orjson.
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Event:
        return cls.model_validate_json(data)


class Interaction(BaseModel):
    """One row of a Personalize interactions dataset (CSV header in upper case)."""

    model_config = ConfigDict(frozen=True)

    user_id: Id
    item_id: Id
    timestamp: float
    event_type: str = EventType.CLICK.value
    event_value: float | None = None

    CSV_COLUMNS: ClassVar[tuple[str, ...]] = (
        "USER_ID",
        "ITEM_ID",
        "TIMESTAMP",
        "EVENT_TYPE",
        "EVENT_VALUE",
    )

    @classmethod
    def from_csv_row(cls, row: Mapping[str, str]) -> Interaction:
        value = row.get("EVENT_VALUE") or None
        return cls(
            user_id=row["USER_ID"],
            item_id=row["ITEM_ID"],
            timestamp=float(row["TIMESTAMP"]),
            event_type=(row.get("EVENT_TYPE") or EventType.CLICK.value).lower(),
            event_value=float(value) if value is not None else None,
        )

    def to_event(self, namespace: str = "default") -> Event:
        return Event(
            event_id=f"{self.user_id}:{self.item_id}:{self.timestamp}:{self.event_type}",
            event_type=self.event_type,
            user_id=self.user_id,
            item_id=self.item_id,
            timestamp=self.timestamp,
            event_value=self.event_value,
            namespace=namespace,
        )


def _split_categories(value: Any) -> Any:
    if isinstance(value, str):
        return [part for part in value.split("|") if part and part != "(no genres listed)"]
    return value


class Item(BaseModel):
    """An item of the catalog: Personalize's items dataset schema."""

    model_config = ConfigDict(frozen=True)

    item_id: Id
    categories: Annotated[list[str], BeforeValidator(_split_categories)] = Field(
        default_factory=list
    )
    """Pipe-separated in CSV (``CATEGORY_L1|CATEGORY_L2``), as Personalize's categorical fields."""
    brand: str | None = None
    price: float | None = Field(None, ge=0)
    creation_timestamp: float | None = None
    title: str | None = None

    CSV_COLUMNS: ClassVar[tuple[str, ...]] = (
        "ITEM_ID",
        "CATEGORIES",
        "BRAND",
        "PRICE",
        "CREATION_TIMESTAMP",
        "TITLE",
    )

    @classmethod
    def from_csv_row(cls, row: Mapping[str, str]) -> Item:
        def opt(name: str) -> str | None:
            return row.get(name) or None

        price, created = opt("PRICE"), opt("CREATION_TIMESTAMP")
        return cls(
            item_id=row["ITEM_ID"],
            categories=row.get("CATEGORIES") or row.get("CATEGORY") or "",
            brand=opt("BRAND"),
            price=float(price) if price is not None else None,
            creation_timestamp=float(created) if created is not None else None,
            title=opt("TITLE"),
        )


class User(BaseModel):
    """A user of the catalog: Personalize's users dataset schema (USER_ID + attributes)."""

    model_config = ConfigDict(frozen=True)

    user_id: Id
    attributes: dict[str, str] = Field(default_factory=dict, max_length=MAX_PROPERTIES)

    @classmethod
    def from_csv_row(cls, row: Mapping[str, str]) -> User:
        return cls(
            user_id=row["USER_ID"],
            attributes={k.lower(): v for k, v in row.items() if k != "USER_ID" and v},
        )


# --- turning pydantic's errors into problems a sender can fix ------------------------

_FIXES: Final[dict[str, str]] = {
    "missing": "add this field",
    "extra_forbidden": "remove this field; see the Event schema for the allowed fields",
    "string_type": "send a JSON string",
    "string_too_short": "send a non-empty string",
    "string_too_long": f"shorten it to at most {MAX_ID_LENGTH} characters",
    "string_pattern_mismatch": "use lower_snake_case letters, digits and underscores",
    "float_type": "send a JSON number",
    "float_parsing": "send a JSON number",
    "list_type": "send a JSON array",
    "too_long": "send fewer entries",
    "dict_type": "send a JSON object",
    "model_type": "send a JSON object with the event's fields",
    "json_invalid": "send valid JSON",
}


def problems_from(exc: ValidationError, prefix: str = "") -> list[FieldProblem]:
    """One `FieldProblem` per pydantic error, each naming the field and a fix."""
    problems: list[FieldProblem] = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in error["loc"])
        if not loc and error["type"] == "value_error":
            # Cross-field checks (model validators) have no location; name the field
            # their message is about, so the sender knows where to look.
            msg = str(error["msg"])
            loc = next((f for f in ("user_id", "item_id") if f"needs {f}" in msg), "")
        field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "body")
        message = str(error["msg"]).removeprefix("Value error, ")
        fix = "add this field" if error["type"] == "value_error" and "needs" in message else ""
        fix = fix or _FIXES.get(error["type"], "")
        if error["type"] == "too_long" and "impression" in loc:
            fix = f"send at most {MAX_IMPRESSION} impression items"
        if not fix:
            fix = message if error["type"] == "value_error" else "see the Event schema"
        problems.append(FieldProblem(field=field, problem=message, fix=fix))
    return problems
