"""Per-user state the agents keep: the recent-interaction window and item popularity.

Two stores, one interface each, with real and in-memory implementations:

* `HotStore` (Redis): the window list and the popularity counter, updated with one Lua
  script per event that first records the event id in the actor's capped id set. A
  replayed event (at-least-once delivery after a crash) finds its id and changes
  nothing, so every effect happens exactly once while the id is remembered
  (``Settings.dedup_per_actor`` newest ids per actor, ``Settings.dedup_ttl_s``).
* `DurableWindows` (DynamoDB): a durable copy of each touched window, written after the
  hot store. Putting a whole window is idempotent, so a replay rewrites the same item.

Serving reads the hot store and falls back to the durable copy when Redis lost a window.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import redis.asyncio as aioredis
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from recstream.aws import translate
from recstream.errors import StoreUnavailable
from recstream.keys import Keys
from recstream.settings import Settings
from streams.schema import Event

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

__all__ = [
    "ApplyResult",
    "DurableWindows",
    "DynamoWindows",
    "HotStore",
    "MemoryDurableWindows",
    "MemoryHotStore",
    "RedisHotStore",
    "WindowEntry",
]


@dataclass(frozen=True, slots=True)
class WindowEntry:
    """One interaction in a window (newest first in every list)."""

    item_id: str
    event_type: str
    timestamp: float
    event_id: str
    event_value: float | None = None
    recommendation_id: str | None = None

    @classmethod
    def of(cls, event: Event) -> WindowEntry:
        assert event.item_id is not None
        return cls(
            item_id=event.item_id,
            event_type=event.event_type,
            timestamp=event.timestamp,
            event_id=event.event_id,
            event_value=event.event_value,
            recommendation_id=event.recommendation_id,
        )

    def dumps(self) -> bytes:
        doc: dict[str, Any] = {
            "i": self.item_id,
            "t": self.event_type,
            "ts": self.timestamp,
            "e": self.event_id,
        }
        if self.event_value is not None:
            doc["v"] = self.event_value
        if self.recommendation_id is not None:
            doc["r"] = self.recommendation_id
        return orjson.dumps(doc)

    @classmethod
    def loads(cls, raw: bytes | str) -> WindowEntry:
        doc = orjson.loads(raw)
        return cls(
            item_id=doc["i"],
            event_type=doc["t"],
            timestamp=doc["ts"],
            event_id=doc["e"],
            event_value=doc.get("v"),
            recommendation_id=doc.get("r"),
        )


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int
    duplicates: int
    actors: frozenset[tuple[str, str]]
    """(namespace, actor) pairs whose window changed."""


class HotStore(Protocol):
    async def apply(self, events: Sequence[Event]) -> ApplyResult: ...
    async def window(
        self, namespace: str, actor: str, limit: int | None = None
    ) -> list[WindowEntry]: ...
    async def restore_window(
        self, namespace: str, actor: str, entries: Sequence[WindowEntry]
    ) -> None: ...
    async def popular(self, namespace: str, k: int) -> list[tuple[str, float]]: ...


class DurableWindows(Protocol):
    async def put(self, windows: Mapping[tuple[str, str], Sequence[WindowEntry]]) -> None: ...
    async def get(self, namespace: str, actor: str) -> list[WindowEntry] | None: ...


# --- Redis -------------------------------------------------------------------------------

# KEYS: seen, window, popularity. ARGV: dedup ttl, entry ('' = none), window size,
# window ttl, item ('' = none), weight, popularity cap, event id, seen cap.
# Returns 1 if applied, 0 if the event id was already applied. Ids are ranked by arrival
# (a per-actor counter), not by event time, so a late event with an old timestamp is not
# the first one evicted.
_APPLY = """
if redis.call('ZSCORE', KEYS[1], ARGV[8]) then return 0 end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local arrival = 1
if last[2] then arrival = tonumber(last[2]) + 1 end
redis.call('ZADD', KEYS[1], arrival, ARGV[8])
local seen_cap = tonumber(ARGV[9])
if redis.call('ZCARD', KEYS[1]) > seen_cap then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -seen_cap - 1)
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
if ARGV[5] ~= '' then
  redis.call('ZINCRBY', KEYS[3], ARGV[6], ARGV[5])
  local cap = tonumber(ARGV[7])
  local n = redis.call('ZCARD', KEYS[3])
  if n > cap then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, n - cap - 1) end
end
return 1
"""


class RedisHotStore:
    """`HotStore` on Redis. Every key it writes has a cap or a TTL."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._script = redis.register_script(_APPLY)

    async def apply(self, events: Sequence[Event]) -> ApplyResult:
        s = self.settings
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            keys = Keys(event.namespace)
            entry = WindowEntry.of(event).dumps() if event.item_id is not None else b""
            await self._script(
                keys=[keys.seen(event.actor), keys.window(event.actor), keys.popularity],
                args=[
                    s.dedup_ttl_s,
                    entry,
                    s.window_size,
                    s.window_ttl_s,
                    event.item_id or "",
                    s.weight(event.event_type),
                    s.popularity_cap,
                    event.event_id,
                    s.dedup_per_actor,
                ],
                client=pipe,
            )
        try:
            outcomes = await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"applying {len(events)} events to Redis failed: {exc}") from exc
        applied = sum(1 for o in outcomes if o == 1)
        actors = frozenset(
            (e.namespace, e.actor)
            for e, o in zip(events, outcomes, strict=True)
            if o == 1 and e.item_id is not None
        )
        return ApplyResult(applied=applied, duplicates=len(events) - applied, actors=actors)

    async def window(
        self, namespace: str, actor: str, limit: int | None = None
    ) -> list[WindowEntry]:
        stop = (limit or self.settings.window_size) - 1
        raw = await self.redis.lrange(Keys(namespace).window(actor), 0, stop)
        return [WindowEntry.loads(item) for item in raw]

    async def restore_window(
        self, namespace: str, actor: str, entries: Sequence[WindowEntry]
    ) -> None:
        """Put back a window read from the durable copy (e.g. after Redis lost it)."""
        if not entries:
            return
        key = Keys(namespace).window(actor)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        pipe.rpush(key, *[e.dumps() for e in entries[: self.settings.window_size]])
        pipe.expire(key, self.settings.window_ttl_s)
        await pipe.execute()

    async def popular(self, namespace: str, k: int) -> list[tuple[str, float]]:
        raw = await self.redis.zrevrange(Keys(namespace).popularity, 0, k - 1, withscores=True)
        return [(_text(pair[0]), float(pair[1])) for pair in raw]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- DynamoDB ------------------------------------------------------------------------------


class DynamoWindows:
    """`DurableWindows` on DynamoDB table ``{prefix}-windows``.

    Item: ``pk`` = ``{namespace}#{actor}``, ``window`` = JSON list (newest first),
    ``updated_at``, and ``expires_at`` (the table's TTL attribute), so abandoned windows
    expire as they do in Redis.
    """

    def __init__(self, client: DynamoDBClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.table = settings.windows_table

    @staticmethod
    def pk(namespace: str, actor: str) -> str:
        return f"{namespace}#{actor}"

    async def put(self, windows: Mapping[tuple[str, str], Sequence[WindowEntry]]) -> None:
        now = time.time()
        requests: list[dict[str, Any]] = []
        for (namespace, actor), entries in windows.items():
            body = b"[" + b",".join(e.dumps() for e in entries) + b"]"
            requests.append(
                {
                    "PutRequest": {
                        "Item": {
                            "pk": {"S": self.pk(namespace, actor)},
                            "window": {"S": body.decode()},
                            "updated_at": {"N": repr(now)},
                            "expires_at": {"N": str(int(now + self.settings.window_ttl_s))},
                        }
                    }
                }
            )
        for start in range(0, len(requests), 25):
            await self._batch_write(requests[start : start + 25])

    async def _batch_write(self, requests: list[dict[str, Any]]) -> None:
        pending: dict[str, Any] = {self.table: requests}
        for attempt in range(10):
            try:
                response = await self.client.batch_write_item(RequestItems=pending)
            except (BotoCoreError, ClientError) as exc:
                raise translate(
                    exc, f"writing windows to table {self.table!r}", self.settings
                ) from exc
            pending = dict(response.get("UnprocessedItems") or {})
            if not pending:
                return
            await asyncio.sleep(min(1.0, 0.05 * 2**attempt))
        raise StoreUnavailable(
            f"DynamoDB kept {sum(len(v) for v in pending.values())} window writes unprocessed "
            f"on {self.table!r}; raise the table's capacity"
        )

    async def get(self, namespace: str, actor: str) -> list[WindowEntry] | None:
        try:
            response = await self.client.get_item(
                TableName=self.table,
                Key={"pk": {"S": self.pk(namespace, actor)}},
                ConsistentRead=True,
            )
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"reading a window from {self.table!r}", self.settings) from exc
        item = response.get("Item")
        if item is None:
            return None
        return [WindowEntry.loads(orjson.dumps(doc)) for doc in orjson.loads(item["window"]["S"])]


# --- in memory (unit tests) --------------------------------------------------------------


class MemoryHotStore:
    """`HotStore` in a dict, with the same idempotence and caps as Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: dict[tuple[str, str], list[str]] = defaultdict(list)
        self.windows: dict[tuple[str, str], list[WindowEntry]] = defaultdict(list)
        self.popularity: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    async def apply(self, events: Sequence[Event]) -> ApplyResult:
        applied = 0
        actors: set[tuple[str, str]] = set()
        for event in events:
            seen = self.seen[(event.namespace, event.actor)]
            if event.event_id in seen:
                continue
            seen.append(event.event_id)
            del seen[: -self.settings.dedup_per_actor]
            applied += 1
            if event.item_id is None:
                continue
            window = self.windows[(event.namespace, event.actor)]
            window.insert(0, WindowEntry.of(event))
            del window[self.settings.window_size :]
            counts = self.popularity[event.namespace]
            counts[event.item_id] += self.settings.weight(event.event_type)
            if len(counts) > self.settings.popularity_cap:
                del counts[min(counts, key=lambda item: counts[item])]
            actors.add((event.namespace, event.actor))
        return ApplyResult(
            applied=applied, duplicates=len(events) - applied, actors=frozenset(actors)
        )

    async def window(
        self, namespace: str, actor: str, limit: int | None = None
    ) -> list[WindowEntry]:
        return list(self.windows.get((namespace, actor), [])[: limit or self.settings.window_size])

    async def restore_window(
        self, namespace: str, actor: str, entries: Sequence[WindowEntry]
    ) -> None:
        self.windows[(namespace, actor)] = list(entries[: self.settings.window_size])

    async def popular(self, namespace: str, k: int) -> list[tuple[str, float]]:
        counts = self.popularity.get(namespace, {})
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


class MemoryDurableWindows:
    def __init__(self) -> None:
        self.items: dict[tuple[str, str], list[WindowEntry]] = {}

    async def put(self, windows: Mapping[tuple[str, str], Sequence[WindowEntry]]) -> None:
        for key, entries in windows.items():
            self.items[key] = list(entries)

    async def get(self, namespace: str, actor: str) -> list[WindowEntry] | None:
        found = self.items.get((namespace, actor))
        return list(found) if found is not None else None


async def persist_windows(
    hot: HotStore, durable: DurableWindows, actors: Iterable[tuple[str, str]]
) -> int:
    """Copy the current hot windows of ``actors`` to the durable store; returns how many."""
    actors = list(actors)
    if not actors:
        return 0
    windows = await asyncio.gather(*(hot.window(ns, actor) for ns, actor in actors))
    await durable.put(dict(zip(actors, windows, strict=True)))
    return len(actors)
