"""The attribution agent: which strategy's recommendations led to clicks, carts and purchases.

Serving logs every answer it gives in the served log (`recstream.served.ServedLog`,
shared with serving): the record ``rs:{ns}:served:{recommendation_id}`` (JSON
``{"actor","strategy","variant","items","ts","context"}``, TTL ``attribution_window_s``),
the actor's index of recent recommendation ids, and the strategy's ``impressions`` (the
number of items served), all in one Lua call that does nothing if the id was logged
before, so a recommendation's impressions count once however often serving retries.

For every batch of stream records the agent then finds, for each ``click``,
``add_to_cart`` and ``purchase``:

1. the recommendation its ``recommendation_id`` names, if that is still in the served
   log and the event happened within the window after it; otherwise
2. the newest recommendation served to the same actor (the user, the session of the
   event, or the user the session logged in as) within the window whose items include
   the event's item (last touch);

and counts it for that recommendation's strategy (and experiment variant, when serving
named one): ``clicks``, ``add_to_carts`` or ``purchases`` plus one, and for purchases
``revenue`` plus the event's ``event_value`` (no value adds nothing to revenue). The
event id is recorded in the actor's capped id set inside the same Lua call, so a replayed
batch (at-least-once delivery) attributes nothing twice.

Counters: ``rs:{ns}:attr:{strategy}`` (all time), ``rs:{ns}:attr_day:{YYYYMMDD}:{strategy}``
(UTC day of the event, or of the serving for impressions; TTL ``attribution_day_ttl_s``)
and ``rs:{ns}:attr_var:{strategy}:{variant}``. Each counter change is also noted in
``rs:{ns}:attr_dirty``; after every batch the agent copies the noted counters whole to
DynamoDB (``{prefix}-attribution``, idempotent puts) and clears exactly the notes it
copied. A counter Redis lost is recreated with a ``restore_pending`` field, and the
agent adds the durable copy back before it next writes that counter to DynamoDB.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agents.deadletter import DeadLetters, send_until_done
from agents.retry import Failure, RecordsRefused, RetryPolicy, process_bounded
from agents.state import redis_failure
from agents.windows import StreamRecord, parsed_events
from recstream.aws import until_processed
from recstream.keys import Keys
from recstream.served import COUNT_LUA, Served, counter_targets
from recstream.settings import Settings
from streams.schema import Event

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

__all__ = [
    "ATTRIBUTED",
    "CLOCK_SKEW_S",
    "COUNTER_FIELDS",
    "KIND",
    "AttributionAgent",
    "AttributionStats",
    "DynamoCounters",
]

log = logging.getLogger(__name__)

KIND = "attribution"
"""The dead-letter kind of records whose attribution failed (agents/deadletter.py)."""
ATTRIBUTED: Final[Mapping[str, str]] = {
    "click": "clicks",
    "add_to_cart": "add_to_carts",
    "purchase": "purchases",
}
"""Event type -> the counter it adds one to."""
COUNTER_FIELDS: Final = ("impressions", "clicks", "add_to_carts", "purchases", "revenue")
CLOCK_SKEW_S: Final = 60.0
"""An event timestamped up to this long before the serving still counts: event times come
from the producer's clock, the served time from the API's."""
RESTORE_PENDING: Final = "restore_pending"


# Many events in one call. ARGV: 1 id cap, 2 id ttl, then per event: event id, counter
# field, revenue ('' = none), number of counters n, then (note, ttl) per counter.
# KEYS per event: the actor's attributed event ids, the dirty notes, then its n counters.
# Returns per event 1 if counted now, 0 if it was attributed before, "!{error}" if its
# keys refused it (e.g. one of the wrong type): the others are counted all the same.
_ATTRIBUTE = (
    COUNT_LUA
    + """
local cap, ttl = tonumber(ARGV[1]), ARGV[2]
local function one(seen, dirty, id, fieldname, revenue, n, k, a)
  if redis.call('ZSCORE', seen, id) then return 0 end
  -- Ranked by arrival, not event time, as the windows agent's seen set (agents/state.py).
  local last = redis.call('ZRANGE', seen, -1, -1, 'WITHSCORES')
  local arrival = 1
  if last[2] then arrival = tonumber(last[2]) + 1 end
  count(k, a, n, fieldname, 1, revenue, dirty)
  -- recorded last: an event that failed midway is retried, not taken for counted
  redis.call('ZADD', seen, arrival, id)
  redis.call('ZREMRANGEBYRANK', seen, 0, -cap - 1)
  redis.call('EXPIRE', seen, ttl)
  return 1
end
local k, a = 1, 3
local counted = {}
while a <= #ARGV do
  local seen, dirty = KEYS[k], KEYS[k + 1]
  local id, fieldname, revenue, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  k, a = k + 2, a + 4
  local ok, result = pcall(one, seen, dirty, id, fieldname, revenue, n, k, a)
  if ok then
    counted[#counted + 1] = result
  else
    if type(result) == 'table' then result = result['err'] end
    counted[#counted + 1] = '!' .. tostring(result)
  end
  k, a = k + n, a + 2 * n
end
return counted
"""
)
ATTRIBUTE_CHUNK: Final = 100
"""Events per attribution call: one round trip for many, short enough not to stall Redis."""

# KEYS: the actors' served indexes. ARGV: (min, max) served time per key. Returns per key
# a flat list of recommendation id, served time: one round trip instead of one per actor.
_RANGES = """
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('ZRANGEBYSCORE', KEYS[i], ARGV[2 * i - 1], ARGV[2 * i], 'WITHSCORES')
end
return out
"""

# KEYS: 1 counter. ARGV: (field, durable value) pairs. Adds the durable copy once.
_RESTORE = """
if redis.call('HEXISTS', KEYS[1], 'restore_pending') == 0 then return 0 end
for i = 1, #ARGV, 2 do
  if ARGV[i] == 'revenue' then
    redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
  else
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('HDEL', KEYS[1], 'restore_pending')
return 1
"""

# KEYS: 1 dirty notes. ARGV: (note, count seen when copied) pairs. A note changed since
# it was read stays, so its newer value is copied next time.
_CLEAN = """
local cleared = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    cleared = cleared + 1
  end
end
return cleared
"""


# --- the durable copy -------------------------------------------------------------------


class DynamoCounters:
    """Durable attribution counters in ``{prefix}-attribution``.

    Item: ``pk`` = the Redis key (``rs:{ns}:attr:…``), ``namespace``, ``kind`` (total, day
    or variant), ``strategy``, ``day`` / ``variant`` where they apply, one number per
    counter field, ``updated_at``, and ``expires_at`` (the table's TTL) on day counters.
    A put writes the whole counter, so writing it again is harmless."""

    def __init__(self, client: DynamoDBClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.table = settings.attribution_table

    async def put(self, rows: Sequence[tuple[Mapping[str, str], Mapping[str, str]]]) -> None:
        """Write (note, counter fields) rows."""
        now = time.time()
        requests: list[dict[str, Any]] = []
        for note, fields in rows:
            item: dict[str, Any] = {
                "pk": {"S": note["k"]},
                "namespace": {"S": note["ns"]},
                "kind": {"S": note["kind"]},
                "strategy": {"S": note["s"]},
                "updated_at": {"N": repr(now)},
            }
            if "d" in note:
                item["day"] = {"S": note["d"]}
                item["expires_at"] = {"N": str(int(now + self.settings.attribution_day_ttl_s))}
            if "v" in note:
                item["variant"] = {"S": note["v"]}
            for name in COUNTER_FIELDS:
                if name in fields:
                    item[name] = {"N": fields[name]}
            requests.append({"PutRequest": {"Item": item}})
        for start in range(0, len(requests), 25):
            pending: dict[str, Any] = {self.table: requests[start : start + 25]}
            await self._call("batch_write_item", pending, "UnprocessedItems", "writing")

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, str]]:
        """Counter fields by Redis key; absent counters are left out."""
        found: dict[str, dict[str, str]] = {}
        for start in range(0, len(keys), 100):
            request = {
                self.table: {
                    "Keys": [{"pk": {"S": k}} for k in keys[start : start + 100]],
                    "ConsistentRead": True,
                }
            }
            for response in await self._call(
                "batch_get_item", request, "UnprocessedKeys", "reading"
            ):
                for item in response.get("Responses", {}).get(self.table, []):
                    found[item["pk"]["S"]] = {
                        name: item[name]["N"] for name in COUNTER_FIELDS if name in item
                    }
        return found

    async def _call(
        self, method: str, request: dict[str, Any], unprocessed: str, what: str
    ) -> list[Mapping[str, Any]]:
        """Call a batch API, resending what DynamoDB left unprocessed (throttling)."""
        return [
            response
            async for response in until_processed(
                getattr(self.client, method),
                request,
                unprocessed,
                f"{what} attribution counters in {self.table!r}",
                f"DynamoDB kept {what} attribution counters unprocessed on {self.table!r}; "
                "raise its capacity",
                self.settings,
            )
        ]


# --- the agent -----------------------------------------------------------------------------


@dataclass
class AttributionStats:
    candidates: int = 0
    """Clicks, add-to-carts and purchases in the batch."""
    attributed: int = 0
    """Counted now."""
    duplicates: int = 0
    """Matched, but attributed before (a replay)."""
    persisted: int = 0
    """Counters copied to DynamoDB."""
    dead_lettered: int = 0
    """Records set aside: their attribution failed deterministically."""

    def add(self, other: AttributionStats) -> None:
        for name in ("candidates", "attributed", "duplicates", "persisted", "dead_lettered"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class AttributionAgent:
    """Attributes a stream's clicks, carts and purchases (see the module docstring).

    `process` runs a batch under the agents' failure policy (`agents.retry`): records that
    do not parse are skipped (the windows agent dead-letters them, once); transient
    failures are retried without limit; a record whose attribution fails
    deterministically (e.g. an actor's key of the wrong type) is retried a bounded number
    of times, then dead-lettered (kind ``attribution``), and the rest is counted."""

    def __init__(
        self,
        redis: aioredis.Redis,
        durable: DynamoCounters,
        settings: Settings,
        dead_letters: DeadLetters | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.redis = redis
        self.durable = durable
        self.settings = settings
        self.dead_letters = dead_letters
        self.policy = policy or RetryPolicy.of(settings)
        self._attribute = redis.register_script(_ATTRIBUTE)
        self._ranges = redis.register_script(_RANGES)
        self._restore = redis.register_script(_RESTORE)
        self._clean = redis.register_script(_CLEAN)
        self.totals = AttributionStats()

    async def process(
        self, records: Sequence[bytes | StreamRecord], source: str = "stream"
    ) -> AttributionStats:
        """Attribute a batch until every record is counted, skipped or dead-lettered."""
        parsed = parsed_events(records)
        total = AttributionStats()
        if not parsed:
            # Nothing to attribute, but counters serving changed still reach DynamoDB.
            total = await self.apply([], source)
        else:

            async def step(part: Sequence[tuple[StreamRecord, Event]]) -> AttributionStats:
                return await self.apply([event for _, event in part], source)

            async def give_up(failures: Sequence[Failure[tuple[StreamRecord, Event]]]) -> None:
                if self.dead_letters is None:
                    raise failures[0].error
                letters = [
                    f.item[0].letter(
                        f.reason, source, attempts=f.attempts, error=f.error_name, kind=KIND
                    )
                    for f in failures
                ]
                await send_until_done(self.dead_letters, letters, self.policy.max_delay)
                total.dead_lettered += len(letters)

            for stats in await process_bounded(
                parsed, step, give_up, self.policy, "attribution records"
            ):
                total.add(stats)
        self.totals.add(total)
        return total

    async def apply(self, events: Sequence[Event], source: str = "stream") -> AttributionStats:
        """Attribute parsed events once, then copy the changed counters (one attempt).
        Raises `RecordsRefused` with positions in ``events`` when Redis refused some."""
        candidates = [n for n, e in enumerate(events) if e.event_type in ATTRIBUTED]
        stats = AttributionStats(candidates=len(candidates))
        try:
            matches = await self.match([events[n] for n in candidates]) if candidates else []
            if matches:
                counted = await self.count([m for _, m in matches])
                refused = [n for n, c in enumerate(counted) if isinstance(c, str)]
                if refused:
                    first = counted[refused[0]]
                    raise RecordsRefused(
                        f"Redis refused attributing {len(refused)} events; the first: {first}",
                        [candidates[matches[n][0]] for n in refused],
                        [str(counted[n]) for n in refused],
                    )
                stats.attributed = sum(1 for c in counted if c == 1)
                stats.duplicates = len(matches) - stats.attributed
            namespaces = {e.namespace for e in events} | {self.settings.namespace}
            stats.persisted = await self.persist(sorted(namespaces))
        except RedisError as exc:
            raise redis_failure(f"attributing {len(candidates)} events", exc) from exc
        if stats.duplicates:
            log.info("%d events from %s were attributed before", stats.duplicates, source)
        return stats

    def _in_window(self, served: Served, event: Event) -> bool:
        delay = event.timestamp - served.ts
        return -CLOCK_SKEW_S <= delay <= self.settings.attribution_window_s

    async def _records(self, ids: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Served]:
        """Served records by (namespace, recommendation id); missing or malformed left out."""
        if not ids:
            return {}
        found: dict[tuple[str, str], Served] = {}
        raws = await self.redis.mget([Keys(namespace).served(rid) for namespace, rid in ids])
        for key, raw in zip(ids, raws, strict=True):
            if raw is None:
                continue
            try:
                found[key] = Served.loads(raw)
            except ValueError as exc:
                log.warning(
                    "served log %s is malformed, not attributing to it: %s",
                    Keys(key[0]).served(key[1]), exc,
                )  # fmt: skip
        return found

    async def match(self, events: Sequence[Event]) -> list[tuple[int, tuple[Event, Served]]]:
        """Each event (with its position in ``events``) with the recommendation it is
        attributed to; unmatched events are left out."""
        # 1. The recommendations named by the events, and the users sessions logged in as.
        named = await self._records(
            sorted({(e.namespace, e.recommendation_id) for e in events if e.recommendation_id})
        )
        matched: dict[int, Served] = {}
        rest: list[tuple[int, Event]] = []
        for n, event in enumerate(events):
            served = named.get((event.namespace, event.recommendation_id or ""))
            if served is not None and self._in_window(served, event):
                matched[n] = served
            elif event.item_id is not None:
                rest.append((n, event))
        if rest:
            await self._match_by_item(rest, matched)
        return [(n, (events[n], matched[n])) for n in sorted(matched)]

    async def _match_by_item(
        self, events: Sequence[tuple[int, Event]], matched: dict[int, Served]
    ) -> None:
        pipe = self.redis.pipeline(transaction=False)
        anonymous = [e for _, e in events if e.user_id is None and e.session_id is not None]
        for event in anonymous:
            assert event.session_id is not None
            pipe.get(Keys(event.namespace).alias(event.session_id))
        aliases = {
            (e.namespace, e.session_id): _text(user)
            for e, user in zip(anonymous, await pipe.execute(), strict=True)
            if user is not None
        }
        # 2. The recommendations served to the event's actors within the window: each
        # actor's index read once for the batch, then filtered per event by served time.
        window = self.settings.attribution_window_s
        wanted: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for n, event in events:
            actors = {event.actor}
            if event.session_id is not None:
                actors.add(f"session:{event.session_id}")
                alias = aliases.get((event.namespace, event.session_id))
                if alias is not None:
                    actors.add(alias)
            for actor in actors:
                wanted.setdefault((event.namespace, actor), []).append((n, event.timestamp))
        keys: list[str] = []
        bounds: list[float] = []
        for (namespace, actor), asks in wanted.items():
            times = [ts for _, ts in asks]
            keys.append(Keys(namespace).served_to(actor))
            bounds += [min(times) - window, max(times) + CLOCK_SKEW_S]
        rows = await self._ranges(keys=keys, args=bounds) if keys else []
        candidates: dict[int, set[tuple[str, str]]] = {}
        for ((namespace, _), asks), row in zip(wanted.items(), rows, strict=True):
            served = [(_text(row[i]), float(row[i + 1])) for i in range(0, len(row), 2)]
            for n, ts in asks:
                candidates.setdefault(n, set()).update(
                    (namespace, rid)
                    for rid, served_at in served
                    if ts - window <= served_at <= ts + CLOCK_SKEW_S
                )
        # 3. Their records; the newest one that served the item wins (last touch).
        records = await self._records(sorted(set().union(*candidates.values())))
        for n, event in events:
            served_here = [records[c] for c in candidates.get(n, ()) if c in records]
            hits = [
                s for s in served_here if event.item_id in s.items and self._in_window(s, event)
            ]
            if hits:
                matched[n] = max(hits, key=lambda s: s.ts)

    async def count(self, matches: Sequence[tuple[Event, Served]]) -> list[int | str]:
        """Count each match once; per match 1 if counted now, 0 if before (a replay), or
        the error that refused it."""
        s = self.settings
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(matches), ATTRIBUTE_CHUNK):
            keys: list[str] = []
            args: list[Any] = [s.dedup_per_actor, s.dedup_ttl_s]
            for event, served in matches[start : start + ATTRIBUTE_CHUNK]:
                targets = counter_targets(
                    s, event.namespace, served.strategy, served.variant, event.timestamp
                )
                revenue = (
                    repr(event.event_value)
                    if event.event_type == "purchase" and event.event_value is not None
                    else ""
                )
                keys += [
                    Keys(event.namespace).attribution_seen(event.actor),
                    Keys(event.namespace).attribution_dirty,
                    *[key for key, _, _ in targets],
                ]
                args += [event.event_id, ATTRIBUTED[event.event_type], revenue, len(targets)]
                for _, note, ttl in targets:
                    args += [note, ttl]
            await self._attribute(keys=keys, args=args, client=pipe)
        return [
            int(c) if isinstance(c, int) else _text(c)[1:]
            for chunk in await pipe.execute()
            for c in chunk
        ]

    async def persist(self, namespaces: Sequence[str]) -> int:
        """Copy the counters noted dirty in ``namespaces`` to DynamoDB; returns how many."""
        pipe = self.redis.pipeline(transaction=False)
        for namespace in namespaces:
            pipe.hgetall(Keys(namespace).attribution_dirty)
        notes: list[tuple[str, bytes, bytes]] = []  # (namespace, note, change count)
        for namespace, dirty in zip(namespaces, await pipe.execute(), strict=True):
            notes += [(namespace, note, n) for note, n in dirty.items()]
        if not notes:
            return 0
        parsed = [orjson.loads(note) for _, note, _ in notes]
        counters = await self._read([p["k"] for p in parsed])
        lost = [
            p["k"] for p, fields in zip(parsed, counters, strict=True) if RESTORE_PENDING in fields
        ]
        if lost:
            # Redis lost these counters and recreated them: add the durable copy back
            # before the durable copy is overwritten with the smaller numbers.
            durable = await self.durable.get_many(lost)
            pipe = self.redis.pipeline(transaction=False)
            for key in lost:
                args = [x for name, value in durable.get(key, {}).items() for x in (name, value)]
                await self._restore(keys=[key], args=args, client=pipe)
            await pipe.execute()
            counters = await self._read([p["k"] for p in parsed])
        await self.durable.put(
            [(p, fields) for p, fields in zip(parsed, counters, strict=True) if fields]
        )
        pipe = self.redis.pipeline(transaction=False)
        for namespace in namespaces:
            seen = [x for ns, note, n in notes if ns == namespace for x in (note, n)]
            if seen:
                await self._clean(keys=[Keys(namespace).attribution_dirty], args=seen, client=pipe)
        await pipe.execute()
        return len(notes)

    async def _read(self, keys: Sequence[str]) -> list[dict[str, str]]:
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return [{_text(k): _text(v) for k, v in fields.items()} for fields in await pipe.execute()]

    async def counters(self, namespace: str, strategy: str) -> dict[str, float]:
        """A strategy's all-time counters (absent fields are 0)."""
        fields = await self.redis.hgetall(Keys(namespace).attribution(strategy))
        found = {_text(k): float(v) for k, v in fields.items() if _text(k) in COUNTER_FIELDS}
        return {name: found.get(name, 0.0) for name in COUNTER_FIELDS}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
