"""Named filters, stored durably, compiled once and cached for a few seconds.

    FilterStore (Protocol)      create / get / list / delete one namespace's filters
    ├── DynamoFilterStore       table {prefix}-filters, pk "{namespace}#{name}"
    └── MemoryFilterStore       a dict, for unit tests and tools
    FilterRegistry              validates before storing; resolves a name or a Personalize
                                filter ARN to a CompiledFilter through a TTL cache

A filter's item in DynamoDB: ``pk``, ``namespace``, ``name``, ``expression``,
``created_at`` (unix seconds) and ``status`` (``ACTIVE``: a filter is checked before it is
stored, so it is usable at once, unlike Personalize's CREATE PENDING).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from recstream.aws import error_code, translate
from recstream.errors import RecstreamError
from recstream.settings import Settings
from serving.filters import (
    CompiledFilter,
    FilterExists,
    FilterNameError,
    FilterNotFound,
    compile_filter,
)

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

__all__ = [
    "NAME_PATTERN",
    "DynamoFilterStore",
    "FilterRecord",
    "FilterRegistry",
    "FilterStore",
    "MemoryFilterStore",
    "filter_name_from",
    "open_filters",
]

NAME_PATTERN: Final = r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,62}$"
"""Personalize's filter name: 1-63 characters, letters, digits, '-' and '_'."""
_NAME = re.compile(NAME_PATTERN)
_ARN = re.compile(r"^arn:[a-z\d-]+:personalize:[^:]*:[^:]*:filter/(?P<name>[^/]+)$")


@dataclass(frozen=True, slots=True)
class FilterRecord:
    namespace: str
    name: str
    expression: str
    created_at: float
    status: str = "ACTIVE"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "filter_expression": self.expression,
            "status": self.status,
            "created_at": self.created_at,
        }


class FilterStore(Protocol):
    async def create(self, record: FilterRecord) -> FilterRecord:
        """Store a new filter and return it; the stored one when the same name already
        holds the same expression (a retried create); `FilterExists` when it holds another."""
        ...

    async def get(self, namespace: str, name: str) -> FilterRecord | None: ...
    async def list(self, namespace: str) -> list[FilterRecord]: ...
    async def delete(self, namespace: str, name: str) -> bool:
        """True when the filter existed."""
        ...


def _exists(existing: FilterRecord) -> FilterExists:
    return FilterExists(
        f"filter {existing.name!r} already exists in namespace {existing.namespace!r} with "
        f"another expression; delete it first or choose another name"
    )


class MemoryFilterStore:
    def __init__(self) -> None:
        self._filters: dict[tuple[str, str], FilterRecord] = {}

    async def create(self, record: FilterRecord) -> FilterRecord:
        key = (record.namespace, record.name)
        existing = self._filters.get(key)
        if existing is not None:
            if existing.expression != record.expression:
                raise _exists(existing)
            return existing
        self._filters[key] = record
        return record

    async def get(self, namespace: str, name: str) -> FilterRecord | None:
        return self._filters.get((namespace, name))

    async def list(self, namespace: str) -> list[FilterRecord]:
        return sorted(
            (r for (ns, _), r in self._filters.items() if ns == namespace), key=lambda r: r.name
        )

    async def delete(self, namespace: str, name: str) -> bool:
        return self._filters.pop((namespace, name), None) is not None


class DynamoFilterStore:
    def __init__(self, client: DynamoDBClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.table = settings.filters_table

    def _error(self, exc: Exception, what: str) -> RecstreamError:
        return translate(exc, f"{what} in table {self.table!r}", self.settings)

    @staticmethod
    def _record(item: dict[str, Any]) -> FilterRecord:
        return FilterRecord(
            namespace=item["namespace"]["S"],
            name=item["name"]["S"],
            expression=item["expression"]["S"],
            created_at=float(item["created_at"]["N"]),
            status=item.get("status", {}).get("S", "ACTIVE"),
        )

    async def create(self, record: FilterRecord) -> FilterRecord:
        try:
            await self.client.put_item(
                TableName=self.table,
                Item={
                    "pk": {"S": f"{record.namespace}#{record.name}"},
                    "namespace": {"S": record.namespace},
                    "name": {"S": record.name},
                    "expression": {"S": record.expression},
                    "created_at": {"N": repr(record.created_at)},
                    "status": {"S": record.status},
                },
                ConditionExpression="attribute_not_exists(pk)",
            )
            return record
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise self._error(exc, f"creating filter {record.name!r}") from exc
        except BotoCoreError as exc:
            raise self._error(exc, f"creating filter {record.name!r}") from exc
        existing = await self.get(record.namespace, record.name)
        if existing is None:  # deleted between our put and get: try once more
            return await self.create(record)
        if existing.expression != record.expression:
            raise _exists(existing)
        return existing

    async def get(self, namespace: str, name: str) -> FilterRecord | None:
        try:
            response = await self.client.get_item(
                TableName=self.table, Key={"pk": {"S": f"{namespace}#{name}"}}, ConsistentRead=True
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, f"reading filter {name!r}") from exc
        item = response.get("Item")
        return self._record(item) if item else None

    async def list(self, namespace: str) -> list[FilterRecord]:
        # A scan: filters are few (Personalize allows 10 per dataset group by default), and
        # listing them is an admin call, never on the request path.
        records: list[FilterRecord] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "FilterExpression": "#ns = :ns",
            "ExpressionAttributeNames": {"#ns": "namespace"},
            "ExpressionAttributeValues": {":ns": {"S": namespace}},
            "ConsistentRead": True,
        }
        try:
            while True:
                response = await self.client.scan(**kwargs)
                records.extend(self._record(i) for i in response.get("Items", []))
                if "LastEvaluatedKey" not in response:
                    break
                kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, f"listing the filters of {namespace!r}") from exc
        return sorted(records, key=lambda r: r.name)

    async def delete(self, namespace: str, name: str) -> bool:
        try:
            response = await self.client.delete_item(
                TableName=self.table,
                Key={"pk": {"S": f"{namespace}#{name}"}},
                ReturnValues="ALL_OLD",
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, f"deleting filter {name!r}") from exc
        return bool(response.get("Attributes"))


def filter_name_from(ref: str) -> str:
    """A filter name, or the name inside a Personalize filter ARN
    (``arn:aws:personalize:{region}:{account}:filter/{name}``)."""
    match = _ARN.match(ref)
    return match.group("name") if match else ref


@dataclass(slots=True)
class _Cached:
    expires: float
    compiled: CompiledFilter | None


class FilterRegistry:
    """The filters of every namespace: validated on create, cached compiled on read.

    A filter changed by another API process is seen within ``filter_cache_ttl_s``; this
    process's own creates and deletes are seen at once. When the store fails, an expired
    entry is served rather than failing the request (a filter rarely changes)."""

    def __init__(self, store: FilterStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.ttl = settings.filter_cache_ttl_s
        self._cache: dict[tuple[str, str], _Cached] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[CompiledFilter | None]] = {}

    async def create(self, namespace: str, name: str, expression: str) -> tuple[FilterRecord, bool]:
        """Check the name and expression (raising `FilterSyntaxError`), then store it.
        Returns the stored record and whether this call created it (False: a retry found
        the same filter already there)."""
        if not _NAME.match(name):
            raise FilterNameError(
                f"filter name {name!r} is invalid; use 1-63 letters, digits, '-' or '_', "
                "starting with a letter or digit"
            )
        compiled = compile_filter(expression, name)
        existing = await self.store.list(namespace)
        limit = self.settings.filters_per_namespace
        if len(existing) >= limit and all(r.name != name for r in existing):
            raise FilterExists(
                f"namespace {namespace!r} already has {len(existing)} filters (the limit, "
                f"RECSTREAM_FILTERS_PER_NAMESPACE={limit}); delete one first"
            )
        new = FilterRecord(namespace, name, expression, time.time())
        record = await self.store.create(new)
        self._put(namespace, name, compiled)
        return record, record is new

    async def get(self, namespace: str, name: str) -> FilterRecord | None:
        return await self.store.get(namespace, filter_name_from(name))

    async def list(self, namespace: str) -> list[FilterRecord]:
        return await self.store.list(namespace)

    async def delete(self, namespace: str, name: str) -> bool:
        deleted = await self.store.delete(namespace, name)
        self._put(namespace, name, None)
        return deleted

    def _put(self, namespace: str, name: str, compiled: CompiledFilter | None) -> None:
        self._cache[(namespace, name)] = _Cached(time.monotonic() + self.ttl, compiled)

    async def resolve(self, namespace: str, name: str) -> CompiledFilter:
        """`compiled`, under the name the recommendation routes' resolver protocol uses."""
        return await self.compiled(namespace, name)

    async def compiled(self, namespace: str, ref: str) -> CompiledFilter:
        """The compiled filter named by ``ref`` (a name or a filter ARN); `FilterNotFound`."""
        name = filter_name_from(ref)
        key = (namespace, name)
        cached = self._cache.get(key)
        if cached is not None and cached.expires > time.monotonic():
            found = cached.compiled
        else:
            found = await self._load(key, cached)
        if found is None:
            raise FilterNotFound(
                f"filter {ref!r} does not exist in namespace {namespace!r}; create it with "
                f"POST /v1/{namespace}/filters or list them with GET /v1/{namespace}/filters"
            )
        return found

    async def _load(self, key: tuple[str, str], stale: _Cached | None) -> CompiledFilter | None:
        # Concurrent misses for one filter share a single read.
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[CompiledFilter | None] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            try:
                record = await self.store.get(*key)
            except RecstreamError:
                if stale is None:
                    raise
                compiled = stale.compiled  # serve the expired entry while the store is down
            else:
                compiled = compile_filter(record.expression, record.name) if record else None
                self._put(*key, compiled)
            future.set_result(compiled)
            return compiled
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so a future nobody awaited logs nothing
            raise
        finally:
            del self._loading[key]


@asynccontextmanager
async def open_filters(
    settings: Settings, dynamodb: DynamoDBClient
) -> AsyncIterator[FilterRegistry]:
    """The API's filter registry over DynamoDB (entered from the app's lifespan)."""
    yield FilterRegistry(DynamoFilterStore(dynamodb, settings), settings)
