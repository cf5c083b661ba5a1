"""Per-user state the agents keep: the recent-interaction window and item popularity.

`HotStore` (Redis; in memory for unit tests): the window list and the popularity counter
(and whatever other parts it is given), updated by one Lua script called once per chunk
of events, which for each event checks the event id in the actor's capped id set, runs
the parts, and records the id. A replayed event (at-least-once delivery after a crash)
finds its id and changes nothing, so every effect happens exactly once while the id is
remembered (``Settings.dedup_per_actor`` newest ids per actor, ``Settings.dedup_ttl_s``).

Each touched window is then copied to the durable store (`persist_windows`;
`recstream.windows.DurableWindows`, DynamoDB), and a window the hot store had to create
gets its durable copy merged back first (`recover_lost_windows`). The window entry, the
durable store and the merge into Redis live in recstream/windows.py because serving
uses them too: it reads the hot window and falls back to the durable copy when Redis
lost a window.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import (
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from agents.catalog import BatchContext, load_context
from agents.retry import RecordsRefused
from recstream.errors import RecstreamError, RequestRefused, StoreUnavailable
from recstream.keys import Keys, keys_of
from recstream.redisio import commands, pack, send_packed
from recstream.settings import Settings
from recstream.windows import (
    Actor,
    DurableWindows,
    DynamoWindows,
    WindowEntry,
    WindowMerge,
    merge_entries,
)
from streams.schema import Event

__all__ = [
    "APPLY_CHUNK",
    "ApplyResult",
    "HotStore",
    "MemoryHotStore",
    "RedisHotStore",
    "by_actor",
    "compose",
    "compose_chunk",
    "pack_evalsha",
]


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

    @staticmethod
    def merge(results: Iterable[ApplyResult]) -> ApplyResult:
        """One result for the events of several (counts add, actor sets join)."""
        results = list(results)
        created: dict[str, frozenset[tuple[str, str]]] = {}
        for r in results:
            for name, actors in r.created.items():
                created[name] = created.get(name, frozenset()) | actors
        return ApplyResult(
            applied=sum(r.applied for r in results),
            duplicates=sum(r.duplicates for r in results),
            fresh=frozenset().union(*(r.fresh for r in results)),
            created=created,
        )


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


# Server replies that say "not now" rather than "never": retried like an outage.
_TRANSIENT_REPLIES = ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "NOSCRIPT")


def redis_failure(what: str, exc: RedisError) -> RecstreamError:
    """A Redis error as a recstream error: a script that fails on its input (a bug, or a
    value Lua cannot handle) fails again on a retry, so it is `RequestRefused`; lost
    connections, timeouts and a busy or loading server are `StoreUnavailable` (retried)."""
    if isinstance(exc, ResponseError) and not str(exc).startswith(_TRANSIENT_REPLIES):
        return RequestRefused(f"{what} was refused by Redis: {exc}")
    return StoreUnavailable(f"{what} failed: {exc}; is Redis up? (`recstream up` starts it)")


# --- Redis -------------------------------------------------------------------------------


class LuaPart(Protocol):
    """One agent's share of the Redis script that applies events.

    The hot store composes every part into ONE script that runs a chunk of events: for
    each event it checks the event id in the actor's ``seen`` set and skips the event if
    it was there, else runs every part and records the id, so each part's effects happen
    exactly once, atomically with the others (docs/agents.md says why one script rather
    than a dedup per agent). ``lua`` is the body of ``function(K, ev, ARGV)``: ``K`` is
    the part's own keys, ``ev`` the decoded event document (``ev[name]`` is what `encode`
    returned, ``ev.ts``, ``ev.item``; ``N`` is its position in the chunk); it returns
    1 to raise the part's flag in the result, else 0.

    A part may also define ``prelude`` (Lua run once per chunk before the events: state
    shared by the chunk's events, such as caches of what the part read) and ``finish``
    (run once after them: writes deferred to the end of the chunk), and ``header``: JSON
    values the script reads as ``H[name]`` (settings, sent once per chunk instead of once
    per event). In scope for all of them: ``H``, ``fmt(x)`` (a number as ``%.17g``),
    ``touch(key, ttl)`` (EXPIRE the key once, at the end of the chunk), ``NOW`` (the
    server's time when the chunk started), ``now_plus(n)`` (``NOW`` + n µs as a string)
    and ``HOOK`` (functions a part offers the others).
    """

    name: str
    lua: str

    def encode(self, event: Event, context: BatchContext) -> tuple[tuple[str, ...], Any]: ...


# The windows part. K: window, popularity, popularity last-touched.
# ev.w: [entry (JSON string), positive weight], or absent (an event without an item).
# H: wsize, wttl, pcap. Flag: the window key had to be created (new actor, or a window
# Redis lost). Within a chunk the head's time, the touched set's size and the trims are
# kept in Lua: one LINDEX per window, one LTRIM and one EXPIRE per window at the end.
# Entries that go on the head wait in W_push and are pushed with one LPUSH per window
# (the same list as one LPUSH each): before an out-of-order insert reads the list, when
# another part reads it (HOOK.window, the embedding's rebuild), and at the chunk's end.
_WINDOWS_PRELUDE = """
local W_head = {}
local W_card = {}
local W_push = {}
local function w_flush(key)
  local pending = W_push[key]
  if pending and #pending > 0 then
    redis.call('LPUSH', key, unpack(pending))
    W_push[key] = {}
  end
end
HOOK.window = w_flush
"""

_WINDOWS_LUA = """
local w = ev['w']
if not w then return 0 end
local key = K[1]
local ts = ev['ts']
local head = W_head[key]
if head == nil then
  local raw = redis.call('LINDEX', key, '0')
  if raw then head = cjson.decode(raw)['ts'] else head = false end
end
local created = 0
if not head then created = 1 end
if (not head) or head <= ts then
  local pending = W_push[key]
  if not pending then
    pending = {}
    W_push[key] = pending
  end
  pending[#pending + 1] = w[1]
  head = ts
else
  -- Out of order (PutRecords retries, several devices): keep the window sorted by
  -- event time, newest first. (The list may hold more than wsize entries until the
  -- chunk's trim; the entries kept are the same.)
  w_flush(key)
  local items = redis.call('LRANGE', key, '1', '-1')
  local placed = false
  for i = 1, #items do
    if cjson.decode(items[i])['ts'] <= ts then
      redis.call('LINSERT', key, 'BEFORE', items[i], w[1])
      placed = true
      break
    end
  end
  if not placed then redis.call('RPUSH', key, w[1]) end
end
W_head[key] = head
touch(key, H['wttl'])
local pw = w[2]
if pw > 0 then
  redis.call('ZINCRBY', K[2], w[3], ev['item'])
  -- Evict the least recently touched items, not the lowest counts: a new item starts
  -- at the bottom and must get the chance to climb. (Events of one chunk are a
  -- microsecond apart, in order.)
  local added = redis.call('ZADD', K[3], now_plus(N), ev['item'])
  local n = W_card[K[3]]
  if n == nil then n = redis.call('ZCARD', K[3]) else n = n + added end
  local cap = H['pcap']
  if n > cap then
    local victims = redis.call('ZRANGE', K[3], '0', istr(n - cap - 1))
    redis.call('ZREM', K[2], unpack(victims))
    redis.call('ZREMRANGEBYRANK', K[3], '0', istr(n - cap - 1))
    n = cap
  end
  W_card[K[3]] = n
end
return created
"""

_WINDOWS_FINISH = """
for key in pairs(W_head) do
  w_flush(key)
  redis.call('LTRIM', key, '0', istr(H['wsize'] - 1))
end
"""


class WindowsPart:
    """The window list and the all-time popularity counter (``rs:{ns}:pop``)."""

    name = "w"
    lua = _WINDOWS_LUA
    prelude = _WINDOWS_PRELUDE
    finish = _WINDOWS_FINISH

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.header = {
            "wsize": settings.window_size,
            "wttl": settings.window_ttl_s,
            "pcap": settings.popularity_cap,
        }
        # Negative feedback lowers affinities, never a popularity count.
        self._pw = {t: max(0.0, w) for t, w in settings.event_weights.items()}
        self._texts: dict[float, str] = {}
        self._keys: dict[tuple[str, str], tuple[str, ...]] = {}

    def encode(self, event: Event, context: BatchContext) -> tuple[tuple[str, ...], Any]:
        if event.item_id is None:
            return (), None
        actor = (event.namespace, event.actor)
        found = self._keys.get(actor)
        if found is None:
            if len(self._keys) > 10_000:
                self._keys.clear()
            keys = keys_of(event.namespace)
            found = (keys.window(event.actor), keys.popularity, keys.popularity_touched)
            self._keys[actor] = found
        entry = WindowEntry.encode(event, self.settings.window_entry_max_bytes)
        pw = self._pw.get(event.event_type)
        if pw is None:
            pw = max(0.0, self.settings.weight(event.event_type))
        # the weight also as Python's exact shortest string: ZINCRBY reads it as it is,
        # where a Lua number would be formatted with %.17g (made once per weight)
        text = self._texts.get(pw)
        if text is None:
            text = self._texts[pw] = repr(pw)
        return found, [entry.decode(), pw, text]


# The script. It runs the parts of each event inside ``pcall``: an event whose part fails
# (a key of the wrong type, a bug) is reported in the result and its id not recorded, and
# the chunk's other events still apply. ``finish`` code runs whatever failed.
_PROLOGUE = """
local function fmt(x) return string.format('%.17g', x) end
-- An integer argument as a string: a number given to redis.call is formatted with %.17g
-- (glibc's slow multi-precision path), '%d' is cheap, and each is made once per chunk.
local ISTR = {}
local function istr(x)
  local s = ISTR[x]
  if not s then
    if x == math.floor(x) then s = string.format('%d', x) else s = fmt(x) end
    ISTR[x] = s
  end
  return s
end
local EXP = {}
local function touch(key, ttl) EXP[key] = ttl end
-- what a part offers the others (HOOK.window(key): the windows part's pending entries
-- pushed, before another part reads the window)
local HOOK = {}
local NOW = redis.call('TIME')
local NOW_S, NOW_US = tonumber(NOW[1]), tonumber(NOW[2])
NOW = NOW_S + NOW_US / 1000000
-- NOW + n µs as a decimal string made with integer formats (a number given to
-- redis.call is formatted with %.17g, glibc's slow multi-precision path)
local function now_plus(n)
  local us = NOW_US + n
  return string.format('%d.%06d', NOW_S + math.floor(us / 1000000), us % 1000000)
end
local parts = {}
-- the position in the chunk of the event the parts run for (a local of the script, not
-- a field of the event: a ninth key in an eight-key table would rehash it, per event)
local N = 0
"""

# The seen sets: ids ranked by arrival (a per-actor counter), not by event time, so a
# late event with an old timestamp is not the first one forgotten. The id is recorded
# after every part ran, so an event whose script failed midway (Redis does not roll a
# script back) is retried rather than taken for applied.
#
# Per chunk, not per event: the chunk's ids are looked up with one ZMSCORE per seen set
# (`preload`, before the first event), an id recorded during the chunk is remembered in
# Lua (so the same id twice in a chunk is a duplicate), and each set gets one ZADD of its
# new ids, written before the parts' deferred writes (as when each id was written at
# once) and with integer scores formatted as integers (%.17g is glibc's slow path).
_SEEN = """
local S_last = {}
local S_known = {}
local S_new = {}
local S_keys = {}
local function preload(key, ids)
  local got = redis.call('ZMSCORE', key, unpack(ids))
  local known = {}
  for i = 1, #ids do
    if got[i] then known[ids[i]] = true end
  end
  S_known[key] = known
end
local function seen(key, id)
  local known = S_known[key]
  if known == nil then
    return redis.call('ZSCORE', key, id)
  end
  return known[id]
end
local function mark(key, id)
  local last = S_last[key]
  if last == nil then
    local top = redis.call('ZRANGE', key, '-1', '-1', 'WITHSCORES')
    last = 0
    if top[2] then last = tonumber(top[2]) end
    S_keys[#S_keys + 1] = key
    S_new[key] = {}
  end
  last = last + 1
  S_last[key] = last
  local known = S_known[key]
  if known then known[id] = true end
  local new = S_new[key]
  new[#new + 1] = string.format('%d', last)
  new[#new + 1] = id
  touch(key, H['seen_ttl'])
end
"""

# The new ids, before the parts' ``finish`` (whatever a part's finish does, an id is
# recorded as surely as it was when each was written at once).
_SEEN_FLUSH = """
for _, key in ipairs(S_keys) do
  local new = S_new[key]
  for i = 1, #new, 7998 do
    redis.call('ZADD', key, unpack(new, i, math.min(#new, i + 7997)))
  end
end
"""

_SEEN_FINISH = """
for key in pairs(S_last) do
  redis.call('ZREMRANGEBYRANK', key, '0', istr(-H['seen_cap'] - 1))
end
"""

_RUN = """
local function run(ev, lists)
  local result = 1
  for p = 1, #parts do
    if parts[p](lists[p], ev, ARGV) == 1 then result = result + 2 ^ p end
  end
  return result
end
local function failure(err)
  if type(err) == 'table' then err = err['err'] or cjson.encode(err) end
  return '!' .. tostring(err)
end
"""

# A chunk: KEYS are the chunk's distinct keys; ARGV[1] the events (JSON list; each names
# its keys by position: ``s`` its seen set, ``k`` per part the number of a key list),
# ARGV[2] the event weights (JSON, decoded only by a part that needs them), ARGV[3] the
# header (JSON), ARGV[4] the key lists (JSON: lists of positions in KEYS; an actor's or a
# category's keys recur in a chunk, so each list is sent and built once, and its table is
# shared by the events that use it: parts only read it).
# Returns per event 0 (applied before), 1 + 2 * (bit p-1 = part p's flag), or
# "!{error}" (not applied).
_CHUNK = """
local EV = cjson.decode(ARGV[1])
local KL = cjson.decode(ARGV[4])
for l = 1, #KL do
  local K = KL[l]
  for j = 1, #K do K[j] = KEYS[K[j]] end
end
local ids = {}
for i = 1, #EV do
  local ev = EV[i]
  local list = ids[ev['s']]
  if not list then
    list = {}
    ids[ev['s']] = list
  end
  list[#list + 1] = ev['id']
end
for s, list in pairs(ids) do preload(KEYS[s], list) end
-- `run` with each part's key list named by number (no table of lists per event)
local function run_k(ev, k)
  local result = 1
  for p = 1, #parts do
    if parts[p](KL[k[p]], ev, ARGV) == 1 then result = result + 2 ^ p end
  end
  return result
end
local out = {}
for i = 1, #EV do
  local ev = EV[i]
  N = i
  local seen_key = KEYS[ev['s']]
  if seen(seen_key, ev['id']) then
    out[i] = 0
  else
    local ok, result = pcall(run_k, ev, ev['k'])
    if ok then
      mark(seen_key, ev['id'])
      out[i] = result
    else
      out[i] = failure(result)
    end
  end
end
"""

# One event, the parts' keys in order after KEYS[1] (the seen set), ``ev._k[p]`` of them
# for part p; ARGV[1] the event, ARGV[2] the weights, ARGV[3] (optional) the header.
# Returns 0 if applied before, else 1 + 2 * flags; an error fails the script.
_SINGLE = """
local ev = cjson.decode(ARGV[1])
N = 0
local lists = {}
local at = 2
for p = 1, #parts do
  local K = {}
  for j = 1, ev['_k'][p] do K[j] = KEYS[at]; at = at + 1 end
  lists[p] = K
end
local out = 0
if DEDUP and seen(KEYS[1], ev['id']) then
  out = 0
else
  out = run(ev, lists)
  if DEDUP then mark(KEYS[1], ev['id']) end
end
"""

_EPILOGUE = """
for key, ttl in pairs(EXP) do redis.call('EXPIRE', key, istr(ttl)) end
return out
"""


def _body(parts: Sequence[LuaPart], front: str, header: str) -> str:
    body = [header, _PROLOGUE, _SEEN]
    for part in parts:
        body.append(f"-- part {part.name}\n{getattr(part, 'prelude', '')}\n")
        body.append("parts[#parts + 1] = function(K, ev, ARGV)\n")
        body.append(part.lua)
        body.append("\nend\n")
    body += [_RUN, front, _SEEN_FLUSH]
    body += [f"\n{getattr(part, 'finish', '')}\n" for part in parts]
    body += [_SEEN_FINISH, _EPILOGUE]
    return "".join(body)


def compose_chunk(parts: Sequence[LuaPart]) -> str:
    """The script that applies a chunk of events with ``parts`` (each part's effects,
    once per event id)."""
    return _body(parts, _CHUNK, "local H = cjson.decode(ARGV[3])\n")


def compose(parts: Sequence[LuaPart], *, dedup: bool = True) -> str:
    """The script that applies ONE event with ``parts`` (its keys after KEYS[1], the
    seen set). ``dedup=False`` leaves the seen set alone (KEYS[1] is then unused): for
    rebuilds that deduplicate ids themselves."""
    header = (
        "local H = {}\nif ARGV[3] then H = cjson.decode(ARGV[3]) end\n"
        f"local DEDUP = {'true' if dedup else 'false'}\n"
    )
    return _body(parts, _SINGLE, header)


APPLY_CHUNK = 100
"""Events per script call: one call for many events (the per-call cost and the keys they
share are paid once), short enough (a few ms) not to hold Redis up for other clients."""


def by_actor(events: Sequence[Event]) -> list[int]:
    """The order in which `RedisHotStore.apply` runs ``events``: each actor's events
    together, in their own order, actors by their first event. What the script reads
    and writes once per actor and chunk (the seen set, the window's head, the feature
    hash, the embedding, their TTLs) is then paid about once per actor and batch rather
    than once per chunk the actor's events are spread over (a shard interleaves its
    actors). An event's own effects do not depend on other actors' events before it,
    but for what is shared by all: the trend clock (a bucket is not written once the
    clock is two windows past it), which items were touched last (the popularity cap
    evicts the least recent), and sums of several actors' popularity increments (equal
    up to rounding)."""
    # (a dict keeps its actors in order of their first event; a sort by that key cost
    # five times as much)
    groups: dict[tuple[str, str], list[int]] = {}
    for n, event in enumerate(events):
        key = (event.namespace, event.actor)
        found = groups.get(key)
        if found is None:
            groups[key] = [n]
        else:
            found.append(n)
    return [n for group in groups.values() for n in group]


def pack_evalsha(sha: str, keys: Sequence[str], args: Sequence[bytes]) -> bytes:
    """``EVALSHA sha len(keys) *keys *args`` in the Redis protocol, packed by hiredis in
    C: the same bytes as redis-py's own packer (`test_pack_evalsha_is_redis_py_s`), which
    encodes and measures every argument in Python (a chunk has a hundred keys or more;
    2.5 % of the worker's instructions, session 10)."""
    return pack("EVALSHA", sha, len(keys), *keys, *args)


@dataclass(frozen=True)
class PreparedCalls:
    """A batch's script calls, encoded ahead (`RedisHotStore.prepare`)."""

    events: Sequence[Event]
    """The batch they were made for (`apply` checks it is given the same list)."""
    order: list[int]
    """`by_actor`'s order of ``events``: the calls' events in turn."""
    calls: list[bytes]
    """Each chunk's ``EVALSHA``, packed."""


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
        self._apply = redis.register_script(compose_chunk(self.parts))
        self._loaded = False
        self._merger = WindowMerge(redis, settings)
        self._weights = orjson.dumps(settings.event_weights)
        header: dict[str, Any] = {
            "seen_cap": settings.dedup_per_actor,
            "seen_ttl": settings.dedup_ttl_s,
        }
        for part in self.parts:
            header.update(getattr(part, "header", {}))
        self._header = orjson.dumps(header)

    def _chunks(
        self, events: Sequence[Event], context: BatchContext
    ) -> Iterator[tuple[list[str], list[bytes]]]:
        """The (keys, args) of each script call, encoded as they are asked for."""
        # (each part's bound `encode` made once, not once per event)
        encoders = [(part.encode, part.name) for part in self.parts]
        for start in range(0, len(events), APPLY_CHUNK):
            index: dict[str, int] = {}
            # Each distinct key list (an actor's keys, a category's trending keys) is
            # sent once per chunk, by number, rather than once per event.
            lists: dict[tuple[str, ...], int] = {}
            positions: list[list[int]] = []
            docs: list[dict[str, Any]] = []
            # (an actor's events come together, `by_actor`: its seen set's number is
            # looked up once for the run of them)
            last_namespace: str | None = None
            last_actor: str | None = None
            seen = 0
            for event in events[start : start + APPLY_CHUNK]:
                namespace, actor = event.namespace, event.actor
                if actor != last_actor or namespace != last_namespace:
                    last_namespace, last_actor = namespace, actor
                    seen_key = keys_of(namespace).seen(actor)
                    seen = index.setdefault(seen_key, len(index) + 1)
                doc: dict[str, Any] = {
                    "id": event.event_id,
                    "ts": event.timestamp,
                    "item": event.item_id or "",
                    "s": seen,
                }
                numbers: list[int] = []
                for encode, name in encoders:
                    part_keys, args = encode(event, context)
                    number = lists.get(part_keys)
                    if number is None:
                        positions.append([index.setdefault(k, len(index) + 1) for k in part_keys])
                        number = lists[part_keys] = len(positions)
                    numbers.append(number)
                    if args is not None:
                        doc[name] = args
                doc["k"] = numbers
                docs.append(doc)
            yield (
                list(index),
                [orjson.dumps(docs), self._weights, self._header, orjson.dumps(positions)],
            )

    async def prepare(self, events: Sequence[Event]) -> PreparedCalls:
        """Everything `apply` does before it sends: the batch's catalog context read and
        its script calls encoded. `Pipeline.feed` (agents/windows.py) prepares a batch
        while Redis still runs the batch before it. Reads only what no script call
        writes (the catalog's hot copy, the published ALS version), so preparing early
        changes nothing that the calls do."""
        order = by_actor(events)
        ordered = [events[n] for n in order]
        context = await load_context(self.redis, ordered, self.settings)
        sha = self._apply.sha
        packed = [pack_evalsha(sha, keys, args) for keys, args in self._chunks(ordered, context)]
        return PreparedCalls(events, order, packed)

    async def apply(
        self, events: Sequence[Event], prepared: PreparedCalls | None = None
    ) -> ApplyResult:
        """Apply ``events`` (each once per id), in chunks of `APPLY_CHUNK` per script
        call, sent back to back on one connection. Raises `RecordsRefused` naming the
        events whose script failed (the others are applied), `StoreUnavailable` for an
        outage. ``prepared``: `prepare`'s result for these very events (the same list),
        sent as it is."""
        s = self.settings
        if prepared is not None and prepared.events is not events:
            raise ValueError("prepared calls are for another list of events")
        given = events
        order = prepared.order if prepared is not None else by_actor(events)
        events = [given[n] for n in order]
        if prepared is None:
            context = await load_context(self.redis, events, s) if events else BatchContext()

        # Sent on ONE connection as each is encoded, the replies read at the end: Redis
        # runs a chunk while the next one is encoded, and in the order sent.
        def calls() -> Iterator[tuple[bytes, int]]:
            if prepared is not None:
                return ((call, 1) for call in prepared.calls)
            sha = self._apply.sha
            return ((pack_evalsha(sha, k, a), 1) for k, a in self._chunks(events, context))

        try:
            if not self._loaded:
                await self.redis.script_load(self._apply.script)
                self._loaded = True
            try:
                replies = await send_packed(self.redis, calls())
            except NoScriptError:
                # Redis restarted or flushed its scripts: load it and apply again (the
                # events applied before the error are found applied).
                await self.redis.script_load(self._apply.script)
                replies = await send_packed(self.redis, calls())
        except (RedisError, OSError) as exc:
            if isinstance(exc, RedisError):
                raise redis_failure(f"applying {len(events)} events to Redis", exc) from exc
            raise StoreUnavailable(f"applying {len(events)} events to Redis: {exc}") from exc
        # each event's outcome at its own position in ``given`` again
        outcomes: list[int | str] = [0] * len(order)
        ran = (o if isinstance(o, int) else _text(o) for reply in replies for o in reply)
        for n, outcome in zip(order, ran, strict=True):
            outcomes[n] = outcome
        events = given
        failed = [(n, o) for n, o in enumerate(outcomes) if isinstance(o, str)]
        if failed:
            reasons = [o[1:] for _, o in failed]
            if any(reason.startswith(_TRANSIENT_REPLIES) for reason in reasons):
                raise StoreUnavailable(
                    f"Redis could not apply {len(failed)} events now: {reasons[0]}; retrying"
                )
            raise RecordsRefused(
                f"Redis refused {len(failed)} of {len(events)} events; the first: {reasons[0]}",
                [n for n, _ in failed],
                reasons,
            )
        changed = [(e, o) for e, o in zip(events, outcomes, strict=True) if int(o) > 0]
        flagged: dict[str, set[Actor]] = {part.name: set() for part in self.parts}
        for event, outcome in changed:
            for bit, part in enumerate(self.parts, start=1):
                if int(outcome) >> bit & 1:
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
        return [[WindowEntry.loads(item) for item in row] for row in await self.raw_windows(actors)]

    async def raw_windows(self, actors: Sequence[Actor]) -> list[list[bytes]]:
        """`windows`, each entry as the JSON Redis holds."""
        stop = self.settings.window_size - 1
        try:
            rows = await commands(
                self.redis,
                [("LRANGE", keys_of(ns).window(actor), 0, stop) for ns, actor in actors],
            )
        except RedisError as exc:
            raise StoreUnavailable(
                f"reading {len(actors)} windows from Redis failed: {exc}"
            ) from exc
        return [list(row) for row in rows]

    async def merge_window(
        self, namespace: str, actor: str, entries: Sequence[WindowEntry]
    ) -> None:
        """Merge entries (e.g. the durable copy) into the hot window without losing any
        event written meanwhile."""
        await self._merger.merge(namespace, actor, entries)

    async def popular(self, namespace: str, k: int) -> list[tuple[str, float]]:
        raw = await self.redis.zrevrange(Keys(namespace).popularity, 0, k - 1, withscores=True)
        return [(_text(pair[0]), float(pair[1])) for pair in raw]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
    # A window the hot store no longer has (Redis lost it between the batch and this
    # copy, or a login moved it) is not written: an empty list would overwrite the
    # durable copy, the one place its history is left.
    if isinstance(hot, RedisHotStore) and isinstance(durable, DynamoWindows):
        # Redis holds each entry as its JSON already: copied as is, not parsed and
        # encoded again (the agent's hot path).
        raw = await hot.raw_windows(actors)
        found = {a: w for a, w in zip(actors, raw, strict=True) if w}
        await durable.put_raw(found)
        return len(found)
    windows = await hot.windows(actors)
    kept = {a: w for a, w in zip(actors, windows, strict=True) if w}
    await durable.put(kept)
    return len(kept)
