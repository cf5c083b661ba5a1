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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import redis.asyncio as aioredis
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError, ResponseError

from agents.catalog import BatchContext, load_context
from recstream.aws import translate
from recstream.errors import RecstreamError, RequestRefused, StoreUnavailable
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
    context: Mapping[str, str] | None = None
    """The event's request context (device, page...), trimmed to fit the entry budget."""
    impression: tuple[str, ...] | None = None
    """What was shown alongside the item, trimmed to fit the entry budget."""

    @classmethod
    def of(cls, event: Event, max_bytes: int | None = None) -> WindowEntry:
        """The entry of ``event``; with ``max_bytes``, its context and impression are
        trimmed (the impression's tail first, then context keys in reverse order) until
        the entry's JSON fits, so one chatty producer cannot bloat every window."""
        assert event.item_id is not None
        entry = cls(
            item_id=event.item_id,
            event_type=event.event_type,
            timestamp=event.timestamp,
            event_id=event.event_id,
            event_value=event.event_value,
            recommendation_id=event.recommendation_id,
            context=dict(event.context) or None,
            impression=tuple(event.impression) or None,
        )
        if max_bytes is None or len(entry.dumps()) <= max_bytes:
            return entry
        context = dict(event.context)
        impression = list(event.impression)
        while impression or context:
            if impression:
                impression.pop()
            else:
                context.pop(next(reversed(context)))
            entry = replace(entry, context=context or None, impression=tuple(impression) or None)
            if len(entry.dumps()) <= max_bytes:
                break
        return entry

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
        if self.context:
            doc["c"] = self.context
        if self.impression:
            doc["m"] = self.impression
        return orjson.dumps(doc)

    @classmethod
    def loads(cls, raw: bytes | str) -> WindowEntry:
        doc = orjson.loads(raw)
        impression = doc.get("m")
        return cls(
            item_id=doc["i"],
            event_type=doc["t"],
            timestamp=doc["ts"],
            event_id=doc["e"],
            event_value=doc.get("v"),
            recommendation_id=doc.get("r"),
            context=doc.get("c"),
            impression=tuple(impression) if impression else None,
        )


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int
    duplicates: int
    fresh: frozenset[tuple[str, str]] = frozenset()
    """Actors whose window did not exist in the hot store before this batch: new actors,
    or actors whose window Redis lost (TTL, eviction, flush). Their durable copy must be
    merged back before it is overwritten."""
    created: Mapping[str, frozenset[tuple[str, str]]] = field(default_factory=dict)
    """Per part name: actors whose key of that part had to be created (as ``fresh``)."""


Actor = tuple[str, str]
"""(namespace, actor id)"""


class HotStore(Protocol):
    async def apply(self, events: Sequence[Event]) -> ApplyResult: ...
    async def window(
        self, namespace: str, actor: str, limit: int | None = None
    ) -> list[WindowEntry]: ...
    async def windows(self, actors: Sequence[Actor]) -> list[list[WindowEntry]]: ...
    async def merge_window(
        self, namespace: str, actor: str, entries: Sequence[WindowEntry]
    ) -> None: ...
    async def popular(self, namespace: str, k: int) -> list[tuple[str, float]]: ...


class DurableWindows(Protocol):
    async def put(self, windows: Mapping[Actor, Sequence[WindowEntry]]) -> None: ...
    async def get(self, namespace: str, actor: str) -> list[WindowEntry] | None: ...
    async def get_many(self, actors: Sequence[Actor]) -> dict[Actor, list[WindowEntry]]: ...


# Server replies that say "not now" rather than "never": retried like an outage.
_TRANSIENT_REPLIES = ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "NOSCRIPT")


def redis_failure(what: str, exc: RedisError) -> RecstreamError:
    """A Redis error as a recstream error: a script that fails on its input (a bug, or a
    value Lua cannot handle) fails again on a retry, so it is `RequestRefused`; lost
    connections, timeouts and a busy or loading server are `StoreUnavailable` (retried)."""
    if isinstance(exc, ResponseError) and not str(exc).startswith(_TRANSIENT_REPLIES):
        return RequestRefused(f"{what} was refused by Redis: {exc}")
    return StoreUnavailable(f"{what} failed: {exc}; is Redis up? (`recstream up` starts it)")


def merge_entries(
    current: Sequence[WindowEntry], other: Sequence[WindowEntry], size: int
) -> list[WindowEntry]:
    """Union by event id, newest first by event time, capped (the Lua merge does the same)."""
    seen = {e.event_id for e in current}
    merged = list(current) + [e for e in other if e.event_id not in seen]
    merged.sort(key=lambda e: -e.timestamp)  # stable: ties keep the current entry first
    return merged[:size]


# --- Redis -------------------------------------------------------------------------------


class LuaPart(Protocol):
    """One agent's share of the per-event Redis script.

    The hot store composes every part into ONE script that first records the event id
    in the actor's ``seen`` set and returns at once if it was there: each part's effects
    happen exactly once, atomically with the others (docs/agents.md says why one script
    rather than a dedup per agent). ``lua`` is the body of ``function(K, ev, ARGV)``: ``K``
    is the part's own keys, ``ev`` the decoded event document (``ev[name]`` is what
    `encode` returned); it returns 1 to raise the part's flag in the result, else 0.
    """

    name: str
    lua: str

    def encode(
        self, event: Event, context: BatchContext
    ) -> tuple[list[str], dict[str, Any] | None]: ...


# The windows part. K: window, popularity, popularity last-touched.
# ev.w: entry (JSON string) or absent, size, ttl, pw (positive weight), cap.
# Flag: the window key had to be created (new actor, or a window Redis lost).
_WINDOWS_LUA = """
local w = ev['w']
if not w then return 0 end
local created = 0
local ts = ev['ts']
local head = redis.call('LINDEX', K[1], 0)
if not head then created = 1 end
if (not head) or cjson.decode(head)['ts'] <= ts then
  redis.call('LPUSH', K[1], w['entry'])
else
  -- Out of order (PutRecords retries, several devices): keep the window sorted by
  -- event time, newest first.
  local items = redis.call('LRANGE', K[1], 1, -1)
  local placed = false
  for i = 1, #items do
    if cjson.decode(items[i])['ts'] <= ts then
      redis.call('LINSERT', K[1], 'BEFORE', items[i], w['entry'])
      placed = true
      break
    end
  end
  if not placed then redis.call('RPUSH', K[1], w['entry']) end
end
redis.call('LTRIM', K[1], 0, w['size'] - 1)
redis.call('EXPIRE', K[1], w['ttl'])
if w['pw'] > 0 then
  redis.call('ZINCRBY', K[2], w['pw'], ev['item'])
  -- Evict the least recently touched items, not the lowest counts: a new item starts
  -- at the bottom and must get the chance to climb.
  local now = redis.call('TIME')
  redis.call('ZADD', K[3], tonumber(now[1]) + tonumber(now[2]) / 1000000, ev['item'])
  local cap = w['cap']
  local n = redis.call('ZCARD', K[3])
  if n > cap then
    local victims = redis.call('ZRANGE', K[3], 0, n - cap - 1)
    redis.call('ZREM', K[2], unpack(victims))
    redis.call('ZREMRANGEBYRANK', K[3], 0, n - cap - 1)
  end
end
return created
"""


class WindowsPart:
    """The window list and the all-time popularity counter (``rs:{ns}:pop``)."""

    name = "w"
    lua = _WINDOWS_LUA

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def encode(
        self, event: Event, context: BatchContext
    ) -> tuple[list[str], dict[str, Any] | None]:
        if event.item_id is None:
            return [], None
        s = self.settings
        keys = Keys(event.namespace)
        entry = WindowEntry.of(event, s.window_entry_max_bytes).dumps().decode()
        return (
            [keys.window(event.actor), keys.popularity, keys.popularity_touched],
            {
                "entry": entry,
                "size": s.window_size,
                "ttl": s.window_ttl_s,
                # Negative feedback lowers affinities, never a popularity count.
                "pw": max(0.0, s.weight(event.event_type)),
                "cap": s.popularity_cap,
            },
        )


# The composed script. KEYS[1]: the actor's seen set; then each part's keys in order,
# ev._k[p] of them for part p. ARGV[1]: the event document (JSON); ARGV[2]: the event
# weights (JSON, decoded only by a part that needs them).
# Returns 0 if the event id was already applied, else 1 + 2 * (bit p-1 = part p's flag).
_DECODE = """
local ev = cjson.decode(ARGV[1])
local function fmt(x) return string.format('%.17g', x) end
local parts = {}
"""

_SEEN = """
if redis.call('ZSCORE', KEYS[1], ev['id']) then return 0 end
"""

# The id is recorded after every part ran: a script that fails midway (Redis does not
# roll a script back) is then retried rather than taken for applied. A broken key of the
# first part (the window) fails its first command, before any write; a failure inside a
# later part repeats the earlier parts' effects on each attempt (at most
# agent_max_attempts) before the record is dead-lettered (docs/agents.md).
_MARK = """
-- Ids are ranked by arrival (a per-actor counter), not by event time, so a late event
-- with an old timestamp is not the first one forgotten.
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local arrival = 1
if last[2] then arrival = tonumber(last[2]) + 1 end
redis.call('ZADD', KEYS[1], arrival, ev['id'])
local seen_cap = ev['seen_cap']
if redis.call('ZCARD', KEYS[1]) > seen_cap then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -seen_cap - 1)
end
redis.call('EXPIRE', KEYS[1], ev['seen_ttl'])
"""

_RUN = """
local result = 1
local at = 2
for p = 1, #parts do
  local n = ev['_k'][p]
  local K = {}
  for i = 1, n do K[i] = KEYS[at + i - 1] end
  at = at + n
  if parts[p](K, ev, ARGV) == 1 then result = result + 2 ^ p end
end
"""


def compose(parts: Sequence[LuaPart], *, dedup: bool = True) -> str:
    """The per-event script of ``parts`` (each part's effects, once per event id).
    ``dedup=False`` leaves the seen set alone (KEYS[1] is then unused): for rebuilds that
    deduplicate ids themselves."""
    body = [_DECODE, _SEEN if dedup else ""]
    for part in parts:
        body.append(f"-- part {part.name}\nparts[#parts + 1] = function(K, ev, ARGV)\n")
        body.append(part.lua)
        body.append("\nend\n")
    body += [_RUN, _MARK if dedup else "", "return result\n"]
    return "".join(body)


# KEYS: window. ARGV: 1 window size, 2 ttl, 3.. entries to merge in (JSON).
# Union by event id, sorted newest first by event time, capped, rewritten atomically, so
# an event the agent pushes concurrently is never lost.
_MERGE = """
local all = {}
local seen = {}
local function add(raw)
  local doc = cjson.decode(raw)
  if not seen[doc['e']] then
    seen[doc['e']] = true
    all[#all + 1] = {ts = doc['ts'], raw = raw, order = #all}
  end
end
for _, raw in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do add(raw) end
for i = 3, #ARGV do add(ARGV[i]) end
table.sort(all, function(a, b)
  if a.ts == b.ts then return a.order < b.order end
  return a.ts > b.ts
end)
redis.call('DEL', KEYS[1])
local size = math.min(#all, tonumber(ARGV[1]))
for i = 1, size do redis.call('RPUSH', KEYS[1], all[i].raw) end
if size > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return size
"""


class RedisHotStore:
    """`HotStore` on Redis. Every key it writes has a cap or a TTL.

    ``parts`` are the agents applied per event (default: the window and the all-time
    popularity only, which is what serving needs to read windows)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        settings: Settings,
        parts: Sequence[LuaPart] | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.parts: tuple[LuaPart, ...] = (
            tuple(parts) if parts is not None else (WindowsPart(settings),)
        )
        self._apply = redis.register_script(compose(self.parts))
        self._merge = redis.register_script(_MERGE)
        self._weights = orjson.dumps(settings.event_weights)

    async def apply(self, events: Sequence[Event]) -> ApplyResult:
        s = self.settings
        context = await load_context(self.redis, events, s) if events else BatchContext()
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            keys = [Keys(event.namespace).seen(event.actor)]
            doc: dict[str, Any] = {
                "id": event.event_id,
                "ts": event.timestamp,
                "item": event.item_id or "",
                "seen_cap": s.dedup_per_actor,
                "seen_ttl": s.dedup_ttl_s,
            }
            counts: list[int] = []
            for part in self.parts:
                part_keys, args = part.encode(event, context)
                keys += part_keys
                counts.append(len(part_keys))
                if args is not None:
                    doc[part.name] = args
            doc["_k"] = counts
            await self._apply(keys=keys, args=[orjson.dumps(doc), self._weights], client=pipe)
        try:
            outcomes = await pipe.execute()
        except RedisError as exc:
            raise redis_failure(f"applying {len(events)} events to Redis", exc) from exc
        changed = [(e, int(o)) for e, o in zip(events, outcomes, strict=True) if int(o) > 0]
        flagged: dict[str, set[Actor]] = {part.name: set() for part in self.parts}
        for event, outcome in changed:
            for bit, part in enumerate(self.parts, start=1):
                if outcome >> bit & 1:
                    flagged[part.name].add((event.namespace, event.actor))
        return ApplyResult(
            applied=len(changed),
            duplicates=len(events) - len(changed),
            fresh=frozenset(flagged.get(WindowsPart.name, ())),
            created={name: frozenset(actors) for name, actors in flagged.items()},
        )

    async def window(
        self, namespace: str, actor: str, limit: int | None = None
    ) -> list[WindowEntry]:
        stop = (limit or self.settings.window_size) - 1
        try:
            raw = await self.redis.lrange(Keys(namespace).window(actor), 0, stop)
        except RedisError as exc:
            raise StoreUnavailable(f"reading a window from Redis failed: {exc}") from exc
        return [WindowEntry.loads(item) for item in raw]

    async def windows(self, actors: Sequence[Actor]) -> list[list[WindowEntry]]:
        """Many windows in one round trip (one connection, however many actors)."""
        pipe = self.redis.pipeline(transaction=False)
        for namespace, actor in actors:
            pipe.lrange(Keys(namespace).window(actor), 0, self.settings.window_size - 1)
        try:
            rows = await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(
                f"reading {len(actors)} windows from Redis failed: {exc}"
            ) from exc
        return [[WindowEntry.loads(item) for item in row] for row in rows]

    async def merge_window(
        self, namespace: str, actor: str, entries: Sequence[WindowEntry]
    ) -> None:
        """Merge entries (e.g. the durable copy) into the hot window without losing any
        event written meanwhile."""
        if not entries:
            return
        try:
            await self._merge(
                keys=[Keys(namespace).window(actor)],
                args=[
                    self.settings.window_size,
                    self.settings.window_ttl_s,
                    *[e.dumps() for e in entries],
                ],
            )
        except RedisError as exc:
            raise StoreUnavailable(f"merging a window into Redis failed: {exc}") from exc

    async def popular(self, namespace: str, k: int) -> list[tuple[str, float]]:
        raw = await self.redis.zrevrange(Keys(namespace).popularity, 0, k - 1, withscores=True)
        return [(_text(pair[0]), float(pair[1])) for pair in raw]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- DynamoDB ------------------------------------------------------------------------------


DURABLE_ITEM_BYTES = 300 * 1024
"""Budget of one durable JSON document. DynamoDB refuses items over 400 KB, and a refused
item would fail its whole batch again on every retry; keys and other attributes fit in
what is left."""


def bounded_json_list(docs: Sequence[bytes], limit: int) -> bytes:
    """The JSON list of ``docs`` (newest first), without the oldest ones beyond ``limit``
    bytes: a durable window keeps as many of its newest entries as fit."""
    size, kept = 2, 0
    for doc in docs:
        if size + len(doc) + 1 > limit:
            break
        size += len(doc) + 1
        kept += 1
    return b"[" + b",".join(docs[:kept]) + b"]"


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
            body = bounded_json_list([e.dumps() for e in entries], DURABLE_ITEM_BYTES)
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
        async for _ in self._until_processed(
            self.client.batch_write_item, {self.table: requests}, "UnprocessedItems", "writing"
        ):
            pass

    async def _until_processed(
        self,
        call: Callable[..., Awaitable[Any]],
        request: dict[str, Any],
        unprocessed: str,
        what: str,
    ) -> AsyncIterator[Mapping[str, Any]]:
        """Yield the responses of a batch call, resending what DynamoDB left unprocessed
        (routine under throttling) with backoff."""
        pending = request
        for attempt in range(10):
            try:
                response = await call(RequestItems=pending)
            except (BotoCoreError, ClientError) as exc:
                raise translate(exc, f"{what} windows in {self.table!r}", self.settings) from exc
            yield response
            pending = dict(response.get(unprocessed) or {})
            if not pending:
                return
            await asyncio.sleep(min(1.0, 0.05 * 2**attempt))
        raise StoreUnavailable(
            f"DynamoDB kept {what} windows unprocessed on {self.table!r}; raise its capacity"
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
        return None if item is None else self._entries(item)

    @staticmethod
    def _entries(item: Mapping[str, Any]) -> list[WindowEntry]:
        return [WindowEntry.loads(orjson.dumps(doc)) for doc in orjson.loads(item["window"]["S"])]

    async def get_many(self, actors: Sequence[Actor]) -> dict[Actor, list[WindowEntry]]:
        """Windows of many actors (BatchGetItem, 100 keys a call); absent ones are left out."""
        by_pk = {self.pk(ns, actor): (ns, actor) for ns, actor in actors}
        found: dict[Actor, list[WindowEntry]] = {}
        pks = list(by_pk)
        for start in range(0, len(pks), 100):
            request = {
                self.table: {
                    "Keys": [{"pk": {"S": pk}} for pk in pks[start : start + 100]],
                    "ConsistentRead": True,
                }
            }
            async for response in self._until_processed(
                self.client.batch_get_item, request, "UnprocessedKeys", "reading"
            ):
                for item in response.get("Responses", {}).get(self.table, []):
                    found[by_pk[item["pk"]["S"]]] = self._entries(item)
        return found


# --- in memory (unit tests) --------------------------------------------------------------


class MemoryHotStore:
    """`HotStore` in a dict, with the same idempotence, ordering and caps as Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: dict[Actor, list[str]] = defaultdict(list)
        self.hot: dict[Actor, list[WindowEntry]] = {}
        self.popularity: dict[str, dict[str, float]] = defaultdict(dict)
        self.touched: dict[str, dict[str, int]] = defaultdict(dict)
        self._clock = 0

    async def apply(self, events: Sequence[Event]) -> ApplyResult:
        applied = 0
        fresh: set[Actor] = set()
        for event in events:
            key = (event.namespace, event.actor)
            seen = self.seen[key]
            if event.event_id in seen:
                continue
            seen.append(event.event_id)
            del seen[: -self.settings.dedup_per_actor]
            applied += 1
            if event.item_id is None:
                continue
            if not self.hot.get(key):
                fresh.add(key)
            self.hot[key] = merge_entries(
                [WindowEntry.of(event, self.settings.window_entry_max_bytes)],
                self.hot.get(key, []),
                self.settings.window_size,
            )
            weight = self.settings.weight(event.event_type)
            if weight <= 0:
                continue  # negative feedback never lowers a popularity count
            counts, touched = self.popularity[event.namespace], self.touched[event.namespace]
            counts[event.item_id] = counts.get(event.item_id, 0.0) + weight
            self._clock += 1
            touched[event.item_id] = self._clock
            while len(touched) > self.settings.popularity_cap:
                stale = min(touched, key=touched.__getitem__)
                del touched[stale], counts[stale]
        return ApplyResult(
            applied=applied, duplicates=len(events) - applied, fresh=frozenset(fresh)
        )

    async def window(
        self, namespace: str, actor: str, limit: int | None = None
    ) -> list[WindowEntry]:
        return list(self.hot.get((namespace, actor), [])[: limit or self.settings.window_size])

    async def windows(self, actors: Sequence[Actor]) -> list[list[WindowEntry]]:
        return [await self.window(ns, actor) for ns, actor in actors]

    async def merge_window(
        self, namespace: str, actor: str, entries: Sequence[WindowEntry]
    ) -> None:
        key = (namespace, actor)
        self.hot[key] = merge_entries(self.hot.get(key, []), entries, self.settings.window_size)

    def forget(self, namespace: str, actor: str) -> None:
        """Drop a hot window, as a Redis TTL, eviction or flush would."""
        self.hot.pop((namespace, actor), None)

    async def popular(self, namespace: str, k: int) -> list[tuple[str, float]]:
        counts = self.popularity.get(namespace, {})
        # Ties in reverse member order, as Redis's ZREVRANGE returns them.
        return sorted(counts.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]


class MemoryDurableWindows:
    def __init__(self) -> None:
        self.items: dict[Actor, list[WindowEntry]] = {}

    async def put(self, windows: Mapping[Actor, Sequence[WindowEntry]]) -> None:
        for key, entries in windows.items():
            self.items[key] = list(entries)

    async def get(self, namespace: str, actor: str) -> list[WindowEntry] | None:
        found = self.items.get((namespace, actor))
        return list(found) if found is not None else None

    async def get_many(self, actors: Sequence[Actor]) -> dict[Actor, list[WindowEntry]]:
        return {a: list(self.items[a]) for a in actors if a in self.items}


async def recover_lost_windows(
    hot: HotStore, durable: DurableWindows, fresh: Iterable[Actor]
) -> int:
    """Merge the durable copy back into windows the hot store had to create, so a window
    Redis lost is not overwritten by its newest event alone; returns how many merged."""
    found = await durable.get_many(list(fresh))
    for (namespace, actor), entries in found.items():
        await hot.merge_window(namespace, actor, entries)
    return len(found)


async def persist_windows(hot: HotStore, durable: DurableWindows, actors: Iterable[Actor]) -> int:
    """Copy the current hot windows of ``actors`` to the durable store; returns how many."""
    actors = list(actors)
    if not actors:
        return 0
    windows = await hot.windows(actors)
    await durable.put(dict(zip(actors, windows, strict=True)))
    return len(actors)
