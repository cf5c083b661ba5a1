"""The item and user catalog: a durable DynamoDB copy, a hot Redis copy, an in-process cache.

Serving enriches responses and filters on item metadata, and agents read item attributes
for user features, so the catalog lives here in the shared layer. Three tiers, each
filled from the one below:

    in-process TTL LRU    (namespace, kind, id) -> record or "absent"; bounded, per process
         │ miss
    Redis                 rs:{ns}:item:{id} / rs:{ns}:user:{id}: STRING, the record's JSON;
         │ miss           one MGET per call
    DynamoDB              table {prefix}-catalog: pk = {ns}#item#{id} / {ns}#user#{id},
                          doc = the same JSON; BatchGetItem, 100 keys a call; the records
                          found are written back to Redis (SET NX, so a newer put wins),
                          and the ids it does not hold as an empty "absent" marker that
                          expires (``catalog_absent_ttl_s``), so every process and a restart
                          skip DynamoDB for ids that are not in the catalog

Writes go to DynamoDB first (the durable copy), then Redis, then this process's cache.
Other processes see a change once their cache entry expires (``catalog_cache_ttl_s``);
a missing record is cached too, so ids that are not in the catalog (common before one is
loaded) do not cost a DynamoDB read on every request.

`MemoryCatalog` implements the same `CatalogStore` protocol in dicts, for unit tests;
tests/unit/test_catalog.py runs one contract against both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar

import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from recstream.aws import until_processed
from recstream.errors import StoreUnavailable
from recstream.keys import Keys
from recstream.settings import Settings
from streams.schema import Item, User

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

__all__ = ["CatalogStore", "MemoryCatalog", "RedisDynamoCatalog"]

log = logging.getLogger(__name__)

BATCH_GET_KEYS: Final = 100
"""DynamoDB's BatchGetItem limit."""
BATCH_WRITE_ITEMS: Final = 25
"""DynamoDB's BatchWriteItem limit."""
MAX_BATCH_ATTEMPTS: Final = 10
WRITE_CONCURRENCY: Final = 8
"""BatchWriteItem calls in flight at once for one put."""

Record = TypeVar("Record", Item, User)
K = TypeVar("K")
V = TypeVar("V")


class CatalogStore(Protocol):
    """Items and users by id, per namespace. Reads return only the ids that exist."""

    async def items(self, namespace: str, ids: Iterable[str]) -> dict[str, Item]: ...

    async def users(self, namespace: str, ids: Iterable[str]) -> dict[str, User]: ...

    async def put_items(self, namespace: str, items: Sequence[Item]) -> None: ...

    async def put_users(self, namespace: str, users: Sequence[User]) -> None: ...

    async def delete_items(self, namespace: str, ids: Iterable[str]) -> None: ...

    async def delete_users(self, namespace: str, ids: Iterable[str]) -> None: ...


def _unique(ids: Iterable[str]) -> list[str]:
    # BatchGetItem refuses duplicate keys, and a caller may pass the same id twice.
    return list(dict.fromkeys(ids))


def _last_by_id(records: Sequence[Record], kind: _Kind[Record]) -> dict[str, Record]:
    # BatchWriteItem refuses two writes to one key in a call; the last one wins, as it
    # would had they been sent one by one.
    return {kind.id_of(record): record for record in records}


@dataclass(frozen=True, slots=True)
class _Kind(Generic[Record]):
    """What differs between items and users: the model, the key names, the id field."""

    name: str
    model: type[Record]

    def id_of(self, record: Record) -> str:
        return record.item_id if isinstance(record, Item) else record.user_id

    def redis_key(self, namespace: str, record_id: str) -> str:
        keys = Keys(namespace)
        return keys.item(record_id) if self.name == "item" else keys.user(record_id)

    def pk(self, namespace: str, record_id: str) -> str:
        return f"{namespace}#{self.name}#{record_id}"

    def parse(self, raw: bytes | str) -> Record:
        return self.model.model_validate_json(raw)


ITEMS: Final = _Kind("item", Item)
USERS: Final = _Kind("user", User)


class TtlLru(Generic[K, V]):
    """A bounded cache whose entries also expire; the least recently used go first.

    With ``max_stale_s`` > 0 an expired entry is kept that much longer, for `lookup`'s
    callers that serve it while they read it again (stale-while-revalidate)."""

    def __init__(self, size: int, ttl_s: float, max_stale_s: float = 0.0) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self.max_stale_s = max_stale_s if ttl_s > 0 else 0.0
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K, now: float | None = None) -> tuple[bool, V | None]:
        """(found, value); an expired entry is not found. ``now`` (`time.monotonic`) lets
        a caller looking up many keys read the clock once."""
        fresh, _, value = self.lookup(key, now)
        return fresh, value if fresh else None

    def lookup(self, key: K, now: float | None = None) -> tuple[bool, bool, V | None]:
        """(fresh, found, value): ``found`` and not ``fresh`` is an expired entry still
        within ``max_stale_s``, to serve while it is read again."""
        entry = self._entries.get(key)
        if entry is None:
            return False, False, None
        age = (time.monotonic() if now is None else now) - entry[0]
        if age >= self.ttl_s:
            if age >= self.ttl_s + self.max_stale_s:
                del self._entries[key]
                return False, False, None
            return False, True, entry[1]
        self._entries.move_to_end(key)
        return True, True, entry[1]

    def put(self, key: K, value: V) -> None:
        self._entries[key] = (time.monotonic(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class RedisDynamoCatalog:
    """`CatalogStore` on DynamoDB (durable), Redis (hot) and an in-process TTL LRU."""

    def __init__(
        self,
        redis: aioredis.Redis,
        dynamodb: DynamoDBClient,
        settings: Settings,
        *,
        cache_size: int | None = None,
        cache_ttl_s: float | None = None,
    ) -> None:
        self.redis = redis
        self.dynamodb = dynamodb
        self.settings = settings
        self.table = settings.catalog_table
        # Items and users share one cache; its key names the kind. A size of 0 turns the
        # cache off (tools that write, and tests that watch the lower tiers).
        size = settings.catalog_cache_size if cache_size is None else cache_size
        ttl = settings.catalog_cache_ttl_s if cache_ttl_s is None else cache_ttl_s
        self.cache: TtlLru[tuple[str, str, str], BaseModel | None] = TtlLru(
            size, ttl, settings.catalog_cache_max_stale_s
        )
        # Expired records are served while one background read per record fetches them
        # again: a request never waits on the catalog for a record it has seen, where
        # every record's expiry used to send the next request that needed it to Redis.
        self._refreshing: set[tuple[str, str, str]] = set()
        self._refreshes: set[asyncio.Task[None]] = set()

    # --- reads ---------------------------------------------------------------------

    async def items(self, namespace: str, ids: Iterable[str]) -> dict[str, Item]:
        return await self._read(ITEMS, namespace, ids)

    def cached_items(self, namespace: str, ids: Iterable[str]) -> dict[str, Item] | None:
        """`items` from the in-process cache alone (expired records included, read again
        in the background); None when any id is not cached."""
        found, missing = self._cached(ITEMS, namespace, ids)
        return None if missing else found

    async def users(self, namespace: str, ids: Iterable[str]) -> dict[str, User]:
        return await self._read(USERS, namespace, ids)

    async def _read(
        self, kind: _Kind[Record], namespace: str, ids: Iterable[str]
    ) -> dict[str, Record]:
        found, missing = self._cached(kind, namespace, _unique(ids))
        if missing:
            found.update(await self._fetch(kind, namespace, missing))
        return found

    def _cached(
        self, kind: _Kind[Record], namespace: str, ids: Iterable[str]
    ) -> tuple[dict[str, Record], list[str]]:
        """The cached records among ``ids`` (expired ones too, read again in the
        background) and the ids not cached at all."""
        found: dict[str, Record] = {}
        missing: list[str] = []
        stale: list[str] = []
        now = time.monotonic()
        for record_id in ids:
            fresh, hit, value = self.cache.lookup((namespace, kind.name, record_id), now)
            if not hit:
                missing.append(record_id)
                continue
            if not fresh:
                stale.append(record_id)
            if value is not None:
                found[record_id] = value  # type: ignore[assignment]
        if stale:
            self._revalidate(kind, namespace, stale)
        return found, missing

    async def _fetch(
        self, kind: _Kind[Record], namespace: str, ids: Sequence[str]
    ) -> dict[str, Record]:
        """``ids`` from Redis, else DynamoDB (restoring Redis), into the cache."""
        found: dict[str, Record] = {}
        hot, absent, redis_ok = await self._read_redis(kind, namespace, ids)
        cold_ids = [i for i in ids if i not in hot and i not in absent]
        cold = await self._read_dynamodb(kind, namespace, cold_ids) if cold_ids else {}
        if cold_ids and redis_ok:
            await self._write_back(kind, namespace, cold, [i for i in cold_ids if i not in cold])
        for record_id in ids:
            record = hot.get(record_id) or cold.get(record_id)
            self.cache.put((namespace, kind.name, record_id), record)
            if record is not None:
                found[record_id] = record
        return found

    def _revalidate(self, kind: _Kind[Record], namespace: str, ids: Sequence[str]) -> None:
        """Read expired records again in the background, each at most once at a time."""
        wanted = [i for i in ids if (namespace, kind.name, i) not in self._refreshing]
        if not wanted:
            return
        keys = [(namespace, kind.name, i) for i in wanted]
        self._refreshing.update(keys)

        async def refresh() -> None:
            try:
                await self._fetch(kind, namespace, wanted)
            except Exception as exc:  # a background read: the stale records stay served
                log.warning(
                    "catalog: re-reading %d expired %ss failed (%s); serving them until "
                    "catalog_cache_max_stale_s passes",
                    len(wanted),
                    kind.name,
                    exc,
                )
            finally:
                self._refreshing.difference_update(keys)

        task = asyncio.get_running_loop().create_task(refresh())
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def aclose(self) -> None:
        """Stop the background re-reads (the clients belong to the caller)."""
        for task in list(self._refreshes):
            task.cancel()
        await asyncio.gather(*self._refreshes, return_exceptions=True)

    async def _read_redis(
        self, kind: _Kind[Record], namespace: str, ids: Sequence[str]
    ) -> tuple[dict[str, Record], set[str], bool]:
        """The records Redis holds, the ids it marks absent, and whether Redis answered at
        all. When it did not, DynamoDB answers for every id: a slow catalog beats a wrong
        one."""
        try:
            values = await self.redis.mget([kind.redis_key(namespace, i) for i in ids])
        except (RedisError, OSError) as exc:
            log.warning("catalog: Redis read failed (%s); reading DynamoDB instead", exc)
            return {}, set(), False
        out: dict[str, Record] = {}
        absent: set[str] = set()
        for record_id, raw in zip(ids, values, strict=True):
            if raw is None:
                continue
            if not raw:
                absent.add(record_id)
                continue
            try:
                out[record_id] = kind.parse(raw)
            except ValidationError:
                # Not written by this module (or by an older schema): the durable copy
                # decides, and its write-back repairs the hot copy.
                log.warning("catalog: unreadable %s %r in Redis; re-reading", kind.name, record_id)
        return out, absent, True

    async def _read_dynamodb(
        self, kind: _Kind[Record], namespace: str, ids: Sequence[str]
    ) -> dict[str, Record]:
        out: dict[str, Record] = {}
        for start in range(0, len(ids), BATCH_GET_KEYS):
            chunk = ids[start : start + BATCH_GET_KEYS]
            pending: dict[str, Any] = {
                self.table: {
                    "Keys": [{"pk": {"S": kind.pk(namespace, i)}} for i in chunk],
                    "ProjectionExpression": "doc",
                    "ConsistentRead": False,
                }
            }
            async for response in until_processed(
                self.dynamodb.batch_get_item,
                pending,
                "UnprocessedKeys",
                f"reading the catalog {self.table!r}",
                f"DynamoDB kept catalog keys unprocessed on {self.table!r} after "
                f"{MAX_BATCH_ATTEMPTS} attempts; raise the table's read capacity",
                self.settings,
                MAX_BATCH_ATTEMPTS,
            ):
                for row in response.get("Responses", {}).get(self.table, []):
                    record = kind.parse(row["doc"]["S"])
                    out[kind.id_of(record)] = record
        return out

    async def _write_back(
        self,
        kind: _Kind[Record],
        namespace: str,
        records: Mapping[str, Record],
        absent: Sequence[str],
    ) -> None:
        # NX: a put that landed between our DynamoDB read and now holds the newer record
        # (and a put overwrites an absent marker, so a new item is seen at once).
        absent_ttl = max(1, int(self.settings.catalog_absent_ttl_s))
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for record_id, record in records.items():
                    pipe.set(
                        kind.redis_key(namespace, record_id), record.model_dump_json(), nx=True
                    )
                for record_id in absent:
                    pipe.set(kind.redis_key(namespace, record_id), b"", nx=True, ex=absent_ttl)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning(
                "catalog: could not restore %d records to Redis: %s",
                len(records) + len(absent),
                exc,
            )

    # --- writes --------------------------------------------------------------------

    async def put_items(self, namespace: str, items: Sequence[Item]) -> None:
        await self._put(ITEMS, namespace, items)

    async def put_users(self, namespace: str, users: Sequence[User]) -> None:
        await self._put(USERS, namespace, users)

    async def _put(self, kind: _Kind[Record], namespace: str, records: Sequence[Record]) -> None:
        latest = _last_by_id(records, kind)
        now = repr(time.time())
        requests = [
            {
                "PutRequest": {
                    "Item": {
                        "pk": {"S": kind.pk(namespace, record_id)},
                        "doc": {"S": record.model_dump_json()},
                        "updated_at": {"N": now},
                    }
                }
            }
            for record_id, record in latest.items()
        ]
        await self._batch_write(requests, f"writing {len(requests)} catalog {kind.name}s")
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for record_id, record in latest.items():
                    pipe.set(kind.redis_key(namespace, record_id), record.model_dump_json())
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # DynamoDB has them, but Redis may still serve the old records: the caller must
            # retry (puts are idempotent) rather than believe the update is live.
            raise StoreUnavailable(
                f"catalog {kind.name}s were stored in DynamoDB but not in Redis ({exc}); "
                "retry the request once Redis is reachable"
            ) from exc
        for record_id, record in latest.items():
            self.cache.put((namespace, kind.name, record_id), record)

    async def delete_items(self, namespace: str, ids: Iterable[str]) -> None:
        await self._delete(ITEMS, namespace, ids)

    async def delete_users(self, namespace: str, ids: Iterable[str]) -> None:
        await self._delete(USERS, namespace, ids)

    async def _delete(self, kind: _Kind[Record], namespace: str, ids: Iterable[str]) -> None:
        unique = _unique(ids)
        if not unique:
            return
        requests = [
            {"DeleteRequest": {"Key": {"pk": {"S": kind.pk(namespace, i)}}}} for i in unique
        ]
        await self._batch_write(requests, f"deleting {len(requests)} catalog {kind.name}s")
        try:
            await self.redis.delete(*(kind.redis_key(namespace, i) for i in unique))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(
                f"catalog {kind.name}s were deleted from DynamoDB but not from Redis ({exc}); "
                "retry the request once Redis is reachable"
            ) from exc
        for record_id in unique:
            self.cache.put((namespace, kind.name, record_id), None)

    async def _batch_write(self, requests: Sequence[Mapping[str, Any]], what: str) -> None:
        chunks = [
            list(requests[start : start + BATCH_WRITE_ITEMS])
            for start in range(0, len(requests), BATCH_WRITE_ITEMS)
        ]
        # A bulk load is hundreds of calls; a few at a time keeps it from taking minutes
        # without flooding a provisioned table (unprocessed items are retried anyway).
        limit = asyncio.Semaphore(WRITE_CONCURRENCY)

        async def write(chunk: list[Mapping[str, Any]]) -> None:
            async with limit:
                await self._write_chunk(chunk, what)

        try:
            async with asyncio.TaskGroup() as group:
                for chunk in chunks:
                    group.create_task(write(chunk))
        except ExceptionGroup as errors:
            # The caller handles one RecstreamError; the first failure says what to fix.
            raise errors.exceptions[0] from None

    async def _write_chunk(self, chunk: list[Mapping[str, Any]], what: str) -> None:
        async for _ in until_processed(
            self.dynamodb.batch_write_item,
            {self.table: chunk},
            "UnprocessedItems",
            f"{what} in {self.table!r}",
            f"DynamoDB kept catalog writes unprocessed on {self.table!r} after "
            f"{MAX_BATCH_ATTEMPTS} attempts; raise the table's write capacity",
            self.settings,
            MAX_BATCH_ATTEMPTS,
        ):
            pass


class MemoryCatalog:
    """`CatalogStore` in dicts: the same contract, for unit tests and tools."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str, str], BaseModel] = {}

    async def items(self, namespace: str, ids: Iterable[str]) -> dict[str, Item]:
        return self._read(ITEMS, namespace, ids)

    def cached_items(self, namespace: str, ids: Iterable[str]) -> dict[str, Item] | None:
        return self._read(ITEMS, namespace, ids)  # all of it is in memory

    async def users(self, namespace: str, ids: Iterable[str]) -> dict[str, User]:
        return self._read(USERS, namespace, ids)

    def _read(self, kind: _Kind[Record], namespace: str, ids: Iterable[str]) -> dict[str, Record]:
        out: dict[str, Record] = {}
        for record_id in _unique(ids):
            record = self.records.get((namespace, kind.name, record_id))
            if record is not None:
                out[record_id] = record  # type: ignore[assignment]
        return out

    async def put_items(self, namespace: str, items: Sequence[Item]) -> None:
        for record_id, item in _last_by_id(items, ITEMS).items():
            self.records[(namespace, "item", record_id)] = item

    async def put_users(self, namespace: str, users: Sequence[User]) -> None:
        for record_id, user in _last_by_id(users, USERS).items():
            self.records[(namespace, "user", record_id)] = user

    async def delete_items(self, namespace: str, ids: Iterable[str]) -> None:
        for record_id in _unique(ids):
            self.records.pop((namespace, "item", record_id), None)

    async def delete_users(self, namespace: str, ids: Iterable[str]) -> None:
        for record_id in _unique(ids):
            self.records.pop((namespace, "user", record_id), None)
