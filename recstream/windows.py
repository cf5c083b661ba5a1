"""The recent-interaction window as the agents and serving share it.

* `WindowEntry`: one interaction, as its JSON sits in ``rs:{ns}:win:{actor}`` (newest
  first; the agents' hot store, agents/state.py, writes it) and in the durable copy.
* `DurableWindows` (DynamoDB: `DynamoWindows`; in memory: `MemoryDurableWindows`): a
  durable copy of each window, which the agents write after the hot store and read back
  into windows Redis lost, and serving reads when Redis has no window. Putting a whole
  window is idempotent, so a replay rewrites the same item.
* `WindowMerge`: merges entries (a durable copy) into the hot window in Redis without
  losing an event written meanwhile; the agents' hot store merges with it, and so does
  serving when it restores a window it found only in DynamoDB.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import orjson
import redis.asyncio as aioredis
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from recstream.aws import translate, until_processed
from recstream.dynamo import DURABLE_ITEM_BYTES, BatchGets, in_parallel
from recstream.errors import StoreUnavailable
from recstream.keys import Keys
from recstream.settings import Settings
from streams.schema import Event

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

__all__ = [
    "WINDOW_UNION_LUA",
    "Actor",
    "DurableWindows",
    "DynamoWindows",
    "MemoryDurableWindows",
    "WindowEntry",
    "WindowMerge",
    "bounded_json_list",
    "merge_entries",
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
    lag_s: float | None = None
    """How long after its event time the stream accepted the event, when that is
    `LAG_KEPT_S` or more (a client's own timestamp, a replay of old events); else None
    and the two are taken as one. Freshness counts from the acceptance."""

    @property
    def accepted_at(self) -> float:
        """When the stream accepted the event (its event time, to within `LAG_KEPT_S`)."""
        return self.timestamp + (self.lag_s or 0.0)

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
            lag_s=_lag(event),
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

    @staticmethod
    def encode(event: Event, max_bytes: int | None = None) -> bytes:
        """``WindowEntry.of(event, max_bytes).dumps()``, without building the entry
        when the event fits (the agent's hot path)."""
        assert event.item_id is not None
        doc = _document(
            event.item_id,
            event.event_type,
            event.timestamp,
            event.event_id,
            event.event_value,
            event.recommendation_id,
            event.context,
            event.impression,
            _lag(event),
        )
        raw = orjson.dumps(doc)
        if max_bytes is None or len(raw) <= max_bytes:
            return raw
        return WindowEntry.of(event, max_bytes).dumps()

    def dumps(self) -> bytes:
        doc = _document(
            self.item_id,
            self.event_type,
            self.timestamp,
            self.event_id,
            self.event_value,
            self.recommendation_id,
            self.context,
            self.impression,
            self.lag_s,
        )
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
            lag_s=doc.get("a"),
        )


LAG_KEPT_S = 1.0
"""An acceptance this far or more from the event time is kept in the entry (``"a"``)."""


def _document(
    item_id: str,
    event_type: str,
    timestamp: float,
    event_id: str,
    value: float | None,
    recommendation_id: str | None,
    context: Mapping[str, str] | None,
    impression: Sequence[str] | None,
    lag_s: float | None,
) -> dict[str, Any]:
    """An entry's JSON document: short keys, the empty and absent fields left out."""
    doc: dict[str, Any] = {"i": item_id, "t": event_type, "ts": timestamp, "e": event_id}
    if value is not None:
        doc["v"] = value
    if recommendation_id is not None:
        doc["r"] = recommendation_id
    if context:
        doc["c"] = context
    if impression:
        doc["m"] = impression
    if lag_s is not None:
        doc["a"] = lag_s
    return doc


def _lag(event: Event) -> float | None:
    accepted = event.accepted_at
    if accepted is None:
        return None
    lag = accepted - event.timestamp
    return round(lag, 3) if abs(lag) >= LAG_KEPT_S else None


Actor = tuple[str, str]
"""(namespace, actor id)"""


class DurableWindows(Protocol):
    async def put(self, windows: Mapping[Actor, Sequence[WindowEntry]]) -> None: ...
    async def get(self, namespace: str, actor: str) -> list[WindowEntry] | None: ...
    async def get_many(self, actors: Sequence[Actor]) -> dict[Actor, list[WindowEntry]]: ...


def merge_entries(
    current: Sequence[WindowEntry], other: Sequence[WindowEntry], size: int
) -> list[WindowEntry]:
    """Union by event id, newest first by event time, capped (the Lua merge does the same)."""
    seen = {e.event_id for e in current}
    merged = list(current) + [e for e in other if e.event_id not in seen]
    merged.sort(key=lambda e: -e.timestamp)  # stable: ties keep the current entry first
    return merged[:size]


# --- Redis -------------------------------------------------------------------------------


WINDOW_UNION_LUA = """
local all = {}
local seen = {}
local function add(raw)
  local doc = cjson.decode(raw)
  if not seen[doc['e']] then
    seen[doc['e']] = true
    all[#all + 1] = {ts = doc['ts'], raw = raw, order = #all}
  end
end
local function newest_first()
  table.sort(all, function(a, b)
    if a.ts == b.ts then return a.order < b.order end
    return a.ts > b.ts
  end)
end
"""
"""The Lua side of `merge_entries`, for the scripts that merge windows in Redis (here and
agents/identity.py): ``add(raw)`` each window entry (JSON), the first of an event id
kept, then ``newest_first()`` sorts ``all`` ({ts, raw, order}) by event time, ties in the
order added."""

# KEYS: window. ARGV: 1 window size, 2 ttl, 3.. entries to merge in (JSON).
# Union by event id, sorted newest first by event time, capped, rewritten atomically, so
# an event the agent pushes concurrently is never lost.
_MERGE = (
    WINDOW_UNION_LUA
    + """
for _, raw in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do add(raw) end
for i = 3, #ARGV do add(ARGV[i]) end
newest_first()
redis.call('DEL', KEYS[1])
local size = math.min(#all, tonumber(ARGV[1]))
for i = 1, size do redis.call('RPUSH', KEYS[1], all[i].raw) end
if size > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return size
"""
)


class WindowMerge:
    """Merges entries into hot windows in Redis (`merge`): one script call per window."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.settings = settings
        self._merge = redis.register_script(_MERGE)

    async def merge(self, namespace: str, actor: str, entries: Sequence[WindowEntry]) -> None:
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


# --- DynamoDB ------------------------------------------------------------------------------


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

    def __init__(
        self, client: DynamoDBClient, settings: Settings, reads: BatchGets | None = None
    ) -> None:
        self.client = client
        self.settings = settings
        self.table = settings.windows_table
        self.reads = reads or BatchGets(client, settings)
        """Its `get_many` reads (shared with other tables' to coalesce them)."""

    @staticmethod
    def pk(namespace: str, actor: str) -> str:
        return f"{namespace}#{actor}"

    async def put(self, windows: Mapping[tuple[str, str], Sequence[WindowEntry]]) -> None:
        await self.put_raw(
            {actor: [e.dumps() for e in entries] for actor, entries in windows.items()}
        )

    async def put_raw(self, windows: Mapping[tuple[str, str], Sequence[bytes]]) -> None:
        """`put`, each entry given as its JSON."""
        now = time.time()
        requests: list[dict[str, Any]] = []
        for (namespace, actor), entries in windows.items():
            body = bounded_json_list(entries, DURABLE_ITEM_BYTES)
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
        await in_parallel(
            [
                self._batch_write(requests[start : start + 25])
                for start in range(0, len(requests), 25)
            ]
        )

    async def _batch_write(self, requests: list[dict[str, Any]]) -> None:
        async for _ in until_processed(
            self.client.batch_write_item,
            {self.table: requests},
            "UnprocessedItems",
            f"writing windows in {self.table!r}",
            f"DynamoDB kept writing windows unprocessed on {self.table!r}; raise its capacity",
            self.settings,
        ):
            pass

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
        """Windows of many actors (BatchGetItem, 100 keys a call, with other tables' reads
        of the moment: `BatchGets`); absent ones are left out."""
        by_pk = {self.pk(ns, actor): (ns, actor) for ns, actor in actors}
        items = await self.reads.get(self.table, list(by_pk))
        return {by_pk[pk]: self._entries(item) for pk, item in items.items()}


# --- in memory (unit tests) --------------------------------------------------------------


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
