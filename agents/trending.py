"""Popularity with time decay and trending over sliding windows, globally and per category.

Per event with a positive weight ``w`` (negative feedback and impressions never count),
inside the one per-event script of the hot store (so exactly once per event id):

* ``rs:{ns}:pop:decayed`` and ``rs:{ns}:pop:cat:{c}`` ZSET item -> forward-decayed count
  ``Σ w·2^((t - epoch)/half_life)`` (`Settings.popularity_epoch_s`,
  `Settings.popularity_half_life_s`): a constant multiple of training's `Popularity`
  score ``Σ w·2^(-(T - t)/half_life)`` at any ``T``, so the order and ratios are the
  offline ones; capped at ``popularity_cap`` items (smallest evicted);
* ``rs:{ns}:cnt:{span}:{start}[:cat:{c}]`` ZSET item -> weighted count of the events in
  ``[start, start + span)``: 300-second buckets for the 1-hour trend, 3600-second ones
  for the 24-hour trend; each is listed in ``rs:{ns}:cnt:index`` with the event time
  after which no trend window reads it, and is swept then (and has a TTL as backstop);
* ``rs:{ns}:trend:clock`` ``t``: the newest event time applied: the trend windows end
  there (the wall clock under live traffic, a replay's own time during a replay);
* ``rs:{ns}:cats`` ZSET category -> newest event time: which categories have lists
  (``category_cap`` most recent; the materializer deletes the lists of evicted ones).

The category of an item is its main (first) one, as in training's per-category
popularity. The materializer (`materialize`, every ``trend_interval_s`` on each worker,
guarded by a short lock so one worker does the work) writes
``rs:{ns}:trend:{1h,24h}[:cat:{c}]``: with ``E`` the end of the bucket holding the clock,
``recent`` = counts in ``[E - w, E)``, ``previous`` = counts in ``[E - 2w, E - w)``, and
the score `recstream.scoring.trend_scores` (training's `Trending` at ``now = E``), top
``trend_cap`` items (at the cut, equal scores keep the larger ids). Redis computes each
list itself, a weighted ZUNIONSTORE of the buckets (`_TREND_LISTS`).

Durability: these keys are rebuilt from the S3 archive: the archive holds every event,
so nothing else needs a durable copy. By hand with ``recstream trending rebuild``
(`rebuild`), and by themselves (`TrendKeeper`, on every worker's materializer tick):
``trend:clock`` also keeps ``since``, the event time from which the counts are complete.
The script sets it to the first event's time when it creates the clock, which happens
only in an empty Redis (a new namespace, or Redis lost its data); the keeper then replays
the archived events before ``since`` that are not in their actor's ``seen`` set (applied
since the loss), and sets ``since`` to 0: complete.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import itertools
import logging
import math
import os
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from agents.catalog import BatchContext, load_context
from agents.state import compose, redis_failure
from recstream.archive import ARCHIVE_PREFIX, read_events
from recstream.aws import async_client, translate
from recstream.decay import EXPONENT_LIMIT
from recstream.errors import ConfigurationError, RecstreamError
from recstream.keys import Keys, keys_of
from recstream.redisio import exact, pack, send_packed
from recstream.settings import Settings
from streams.schema import Event

__all__ = [
    "WINDOWS",
    "RebuildStats",
    "TrendKeeper",
    "TrendWindow",
    "TrendingPart",
    "materialize",
    "rebuild",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrendWindow:
    name: str
    """``1h`` or ``24h``: the suffix of ``rs:{ns}:trend:{name}``."""
    length_s: int
    span_s: int
    """Bucket length: the window's edges move by this much."""

    def end(self, clock: float) -> int:
        """The end of the bucket holding ``clock``: where the recent window ends."""
        return int(math.floor(clock / self.span_s) * self.span_s + self.span_s)

    def starts(self, clock: float) -> tuple[list[int], list[int]]:
        """Bucket starts of the recent and the previous window."""
        end = self.end(clock)
        recent = list(range(end - self.length_s, end, self.span_s))
        previous = list(range(end - 2 * self.length_s, end - self.length_s, self.span_s))
        return recent, previous

    def bucket(self, timestamp: float) -> int:
        return int(math.floor(timestamp / self.span_s) * self.span_s)

    def dead_at(self, start: int) -> int:
        """The clock from which no window reads the bucket starting at ``start``."""
        return start + 2 * self.length_s


WINDOWS = (TrendWindow("1h", 3600, 300), TrendWindow("24h", 86400, 3600))
_STEP = math.gcd(*(w.span_s for w in WINDOWS))
"""Every window's bucket edges fall on multiples of this."""
INDEX_TTL_S = 2 * 86400 + 2 * 3600

# The trending part. K: clock, pop:decayed, cnt:index, one bucket per window, and with a
# category: pop:cat, cats, one category bucket per window.
# ev.r: pw positive weight (and ps, the same as a string), d its forward-decayed score (a
# string), b [dead_at...] (one per window), cat. H: pcap, bcap, ittl, spans (one per
# window). The increments come as strings (Python's exact shortest form): ZINCRBY reads
# them as they are, where a Lua number would be formatted (%.17g) on every call.
#
# Per event: one ZINCRBY per sorted set. What does not change per event is done once per
# chunk: the clock is read once and written in ``finish``, a bucket is indexed (and given
# its TTL) when the chunk first writes it, the categories' newest times are written once,
# and each sorted set is trimmed to its cap once, in ``finish`` (an event's item may stay
# over the cap until the chunk ends; the members kept are the same unless an item evicted
# earlier in the chunk was counted again after).
_TRENDING_PRELUDE = """
local T_clock = {}
local T_caps = {}
local T_index = {}
local T_cats = {}
local function t_bump(key, score, item, cap)
  redis.call('ZINCRBY', key, score, item)
  T_caps[key] = cap
end
-- A sorted set that most events write, as a skiplist rather than a listpack. Redis keeps
-- a sorted set of up to zset-max-listpack-entries (128) members as one flat array, and
-- an increment's insert walks it, parsing every score on the way (strtod of a 17-digit
-- decayed score: the largest single cost of the script); a skiplist finds the place
-- in O(log n). A member longer than zset-max-listpack-value (64) converts the set, and
-- Redis does not convert it back when members go, so one ZADD and ZREM of a member no
-- item can have (item ids are at most 256 characters) leave the same members and scores
-- in the faster encoding. Only the per-category popularity and the global buckets, a
-- few thousand keys whatever the users (bounded by their caps); the per-user seen sets
-- and the small per-category buckets keep the compact one (docs/agents.md, session 8:
-- the memory either way). Checked once per key and chunk: a restart that loaded the
-- set back as a listpack (or a Redis that shrinks encodings) is converted again.
local T_wide = {}
local WIDE = string.rep('~', 300)
local function t_wide(key)
  if T_wide[key] == nil then
    T_wide[key] = true
    if redis.call('OBJECT', 'ENCODING', key) == 'listpack' then
      redis.call('ZADD', key, '0', WIDE)
      redis.call('ZREM', key, WIDE)
    end
  end
end
-- the event's buckets from K[first] on (one per window); a function of the chunk, not a
-- closure made per event
local function t_buckets(K, first, r, item, clock, wide)
  local spans = H['spans']
  local dead = r['b']
  for i = 1, #spans do
    -- a bucket no window will read again (a very late event) is not written at all
    if clock < dead[i] then
      local key = K[first + i - 1]
      t_bump(key, r['ps'], item, H['bcap'])
      if wide then t_wide(key) end
      -- a bucket new to the index gets its TTL (a backstop: the sweep deletes it)
      if not T_index[key] then
        T_index[key] = true
        if redis.call('ZADD', K[3], 'NX', istr(dead[i]), key) == 1 then
          redis.call('EXPIRE', key, istr(math.ceil(dead[i] - clock + spans[i])))
          touch(K[3], H['ittl'])
        end
      end
    end
  end
end
"""

_TRENDING_LUA = """
local r = ev['r']
local ts = ev['ts']
local c = T_clock[K[1]]
if not c then
  local raw = redis.call('HGET', K[1], 't')
  c = {t = tonumber(raw)}
  -- a new clock: this Redis has no counts from before this event (TrendKeeper)
  if not raw then c.since = ts end
  T_clock[K[1]] = c
end
if (not c.t) or ts > c.t then
  c.t = ts
  c.dirty = true
end
local clock = c.t
local pw = r['pw']
if pw <= 0 then return 0 end
local item = ev['item']
t_bump(K[2], r['d'], item, H['pcap'])
t_buckets(K, 4, r, item, clock, true)
local cat = r['cat']
if cat then
  local at = 4 + #H['spans']
  t_bump(K[at], r['d'], item, H['pcap'])
  t_wide(K[at])
  local cats = T_cats[K[at + 1]]
  if not cats then
    -- read now so that a key of the wrong type fails this event, not the chunk's end
    redis.call('ZSCORE', K[at + 1], cat)
    cats = {}
    T_cats[K[at + 1]] = cats
  end
  local newest = cats[cat]
  if (not newest) or ts > newest then cats[cat] = ts end
  t_buckets(K, at + 2, r, item, clock, false)
end
return 0
"""

# Runs after every event of the chunk (whatever failed): the caps, the categories' newest
# times and the clocks.
_TRENDING_FINISH = """
for key, cap in pairs(T_caps) do redis.call('ZREMRANGEBYRANK', key, '0', istr(-cap - 1)) end
for key, cats in pairs(T_cats) do
  local args = {'GT'}
  for cat, ts in pairs(cats) do
    args[#args + 1] = ts
    args[#args + 1] = cat
  end
  if #args > 1 then redis.call('ZADD', key, unpack(args)) end
end
for key, c in pairs(T_clock) do
  if c.dirty then redis.call('HSET', key, 't', fmt(c.t)) end
  if c.since then redis.call('HSETNX', key, 'since', fmt(c.since)) end
end
"""


class TrendingPart:
    """The popularity-and-trending share of the per-event script."""

    name = "r"
    lua = _TRENDING_LUA
    prelude = _TRENDING_PRELUDE
    finish = _TRENDING_FINISH

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.header = {
            "pcap": settings.popularity_cap,
            "bcap": settings.bucket_cap,
            "ittl": INDEX_TTL_S,
            "spans": [w.span_s for w in WINDOWS],
        }
        self._weights = {t: max(0.0, w) for t, w in settings.event_weights.items()}
        # each weight as its exact shortest string (a handful of weights)
        self._texts: dict[float, str] = {}
        self._keys: dict[tuple[str, str | None, tuple[int, ...]], tuple[str, ...]] = {}
        self._shared: dict[tuple[str, tuple[int, ...]], tuple[str, ...]] = {}
        self._category: dict[tuple[str, str], tuple[str, ...]] = {}
        self._steps: dict[int, tuple[tuple[int, ...], list[int]]] = {}

    def _keys_of(
        self, namespace: str, category: str | None, starts: tuple[int, ...]
    ) -> tuple[str, ...]:
        """The keys of an event (namespace, main category, bucket starts), built once: in
        a stream the same few combinations come again and again."""
        found = self._keys.get((namespace, category, starts))
        if found is None:
            # A miss is common (a category's first event of a 300 s step: about half
            # the events of a stream with a thousand categories), so the parts that do
            # not change with it are kept apart: the namespace's and the step's keys,
            # and the category's lists; only its buckets are made here.
            if len(self._keys) > 10_000:
                self._keys.clear()
            shared = self._shared.get((namespace, starts))
            if shared is None:
                if len(self._shared) > 1_000:
                    self._shared.clear()
                keys = keys_of(namespace)
                shared = self._shared[(namespace, starts)] = (
                    keys.trend_clock,
                    keys.popularity_decayed,
                    keys.counts_index,
                    *(
                        keys.counts_bucket(w.span_s, b)
                        for w, b in zip(WINDOWS, starts, strict=True)
                    ),
                )
            if category is None:
                found = shared
            else:
                lists = self._category.get((namespace, category))
                if lists is None:
                    if len(self._category) > 10_000:
                        self._category.clear()
                    keys = keys_of(namespace)
                    lists = self._category[(namespace, category)] = (
                        keys.popularity_category(category),
                        keys.categories,
                    )
                # the category's buckets from the step's (`shared` ends with one per window)
                found = (
                    shared + lists + tuple([Keys.category_bucket(b, category) for b in shared[3:]])
                )
            self._keys[(namespace, category, starts)] = found
        return found

    def _buckets(self, ts: float) -> tuple[tuple[int, ...], list[int]]:
        """The bucket starts of an event at ``ts`` and the times from which no window
        reads them: the same for every event of a `_STEP` (300 s) away from its edges,
        so made once per step (events of a stream come in time order, roughly)."""
        step = math.floor(ts / _STEP)
        low = step * _STEP
        if low + 1 <= ts < low + _STEP - 1:  # (at an edge, float division decides)
            found = self._steps.get(step)
            if found is not None:
                return found
        starts = tuple(w.bucket(ts) for w in WINDOWS)
        made = (starts, [w.dead_at(b) for w, b in zip(WINDOWS, starts, strict=True)])
        if low + 1 <= ts < low + _STEP - 1:
            if len(self._steps) > 1_000:
                self._steps.clear()
            self._steps[step] = made
        return made

    def encode(
        self, event: Event, context: BatchContext
    ) -> tuple[tuple[str, ...], dict[str, Any] | None]:
        s = self.settings
        weight = self._weights.get(event.event_type)
        if weight is None:
            weight = max(0.0, s.weight(event.event_type))
        if event.item_id is None or weight <= 0:
            return (keys_of(event.namespace).trend_clock,), {"pw": 0.0}
        text = self._texts.get(weight)
        if text is None:
            text = self._texts[weight] = repr(weight)
        category = context.facts(event).category
        ts = event.timestamp
        starts, dead = self._buckets(ts)
        # the forward-decayed score, computed as training's Popularity computes it
        decayed = weight * 2 ** min(
            (ts - s.popularity_epoch_s) / s.popularity_half_life_s, EXPONENT_LIMIT
        )
        doc: dict[str, Any] = {"pw": weight, "ps": text, "d": exact(decayed), "b": dead}
        if category is not None:
            doc["cat"] = category
        return self._keys_of(event.namespace, category, starts), doc


# --- the materializer ------------------------------------------------------------------


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# One category's trend lists (or the global ones), one per window, computed where the
# counts are. The score (1 + gamma) * recent - gamma * previous
# (`recstream.scoring.trend_scores`) is linear in the counts, so ZUNIONSTORE with a
# weight per bucket makes the whole list: an item in neither window is in no bucket
# (the formula's -inf), and one in the previous window alone scores -gamma * previous,
# as in training. The list is then cut to the cap: ZREMRANGEBYRANK drops the lowest
# (score, item), so at the cut equal scores keep the larger ids, the order serving
# reads them in (ZREVRANGE). Atomic per call: a reader sees a category's lists before
# or after, never a list being built.
# KEYS: the lists (one per window), then each window's buckets, recent ones first.
# ARGV: 1 the recent weight (1 + gamma), 2 the previous one (-gamma), 3 the cap, 4 the
# lists' TTL, then per window its number of recent and of previous buckets.
_TREND_LISTS = """
local up, down, cap, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local windows = (#ARGV - 4) / 2
local at = windows
local sizes = {}
for w = 1, windows do
  local recent, previous = tonumber(ARGV[3 + 2 * w]), tonumber(ARGV[4 + 2 * w])
  local n = recent + previous
  local args = {KEYS[w], string.format('%d', n)}
  for i = 1, n do args[2 + i] = KEYS[at + i] end
  args[n + 3] = 'WEIGHTS'
  for i = 1, n do
    if i <= recent then args[n + 3 + i] = up else args[n + 3 + i] = down end
  end
  local size = redis.call('ZUNIONSTORE', unpack(args))
  if size > cap then
    redis.call('ZREMRANGEBYRANK', KEYS[w], '0', string.format('%d', size - cap - 1))
  end
  -- a category that stops getting events loses its lists with its buckets
  if size > 0 then redis.call('EXPIRE', KEYS[w], ttl) end
  sizes[w] = size
  at = at + n
end
return sizes
"""

TREND_CALLS_PER_WRITE = 100
"""Categories whose lists one write of the materializer carries: Redis runs the calls
as they arrive, the agents' scripts and serving's reads in between."""


async def _evict_categories(
    redis: aioredis.Redis, settings: Settings, keys: Keys, clock: float
) -> None:
    """Drop the least recent categories beyond ``category_cap``: their lists, and the time
    buckets still alive for them (a replay through thousands of categories would keep
    two days of buckets for each otherwise)."""
    stale = await redis.zrange(keys.categories, 0, -settings.category_cap - 1)
    if not stale:
        return
    pipe = redis.pipeline(transaction=False)
    for raw in stale:
        category = _str(raw)
        buckets = [
            keys.counts_bucket(w.span_s, start, category)
            for w in WINDOWS
            for start in range(
                w.bucket(clock - 2 * w.length_s), w.bucket(clock) + w.span_s, w.span_s
            )
        ]
        pipe.delete(
            keys.popularity_category(category),
            *(keys.trending(w.name, category) for w in WINDOWS),
            *buckets,
        )
        pipe.zrem(keys.counts_index, *buckets)
        pipe.zrem(keys.categories, category)
    await pipe.execute()


async def materialize(
    redis: aioredis.Redis, settings: Settings, namespace: str, *, lock: bool = True
) -> bool:
    """Write the trend lists of ``namespace`` as of its clock; False when another worker
    holds the lock or nothing was applied yet. Safe to run anywhere, any time: it only
    reads counts and replaces whole lists atomically."""
    keys = Keys(namespace)
    try:
        if lock and not await redis.set(
            keys.trend_lock,
            f"{os.getpid()}",
            nx=True,
            px=max(1, int(settings.trend_interval_s * 900)),
        ):
            return False
        raw_clock = await redis.hget(keys.trend_clock, "t")
        if raw_clock is None:
            return False
        clock = float(raw_clock)
        await _evict_categories(redis, settings, keys, clock)
        categories: list[str | None] = [None]
        categories += [_str(c) for c in await redis.zrevrange(keys.categories, 0, -1)]
        # Redis computes the lists (`_TREND_LISTS`): the worker only names the keys. It
        # read every bucket's counts and scored them in numpy: 300-470 ms of its CPU a
        # tick with the Taobao slice's 1,343 categories, ~30 ms now (session 15).
        sha = await redis.script_load(_TREND_LISTS)
        buckets: list[str] = []
        sizes: list[str] = []
        for window in WINDOWS:
            recent, previous = window.starts(clock)
            buckets += [keys.counts_bucket(window.span_s, s) for s in recent + previous]
            sizes += [str(len(recent)), str(len(previous))]
        gamma = settings.trend_gamma
        args = (exact(1.0 + gamma), exact(-gamma), str(settings.trend_cap), str(INDEX_TTL_S))
        calls = [
            pack(
                "EVALSHA",
                sha,
                len(WINDOWS) + len(buckets),
                *(keys.trending(w.name, category) for w in WINDOWS),
                *(
                    buckets
                    if category is None
                    else [Keys.category_bucket(b, category) for b in buckets]
                ),
                *args,
                *sizes,
            )
            for category in categories
        ]
        step = TREND_CALLS_PER_WRITE
        await send_packed(
            redis,
            [
                (b"".join(calls[i : i + step]), len(calls[i : i + step]))
                for i in range(0, len(calls), step)
            ],
            name="EVALSHA",
        )
        dead = await redis.zrangebyscore(keys.counts_index, "-inf", clock)
        if dead:
            sweep = redis.pipeline(transaction=False)
            sweep.delete(*dead)
            sweep.zrem(keys.counts_index, *dead)
            await sweep.execute()
    except RedisError as exc:
        raise redis_failure(f"materializing the trends of {namespace!r}", exc) from exc
    return True


# --- rebuilding after a Redis loss ----------------------------------------------------------


async def trending_keys(redis: aioredis.Redis, namespace: str) -> list[str]:
    """Every key this agent keeps for ``namespace`` (found through its own indexes)."""
    keys = Keys(namespace)
    found = [
        keys.popularity_decayed,
        keys.counts_index,
        keys.categories,
        keys.trend_clock,
        keys.trend_lock,
    ]
    found += [keys.trending(w.name) for w in WINDOWS]
    for raw in await redis.zrange(keys.categories, 0, -1):
        category = _str(raw)
        found.append(keys.popularity_category(category))
        found += [keys.trending(w.name, category) for w in WINDOWS]
    found += [_str(raw) for raw in await redis.zrange(keys.counts_index, 0, -1)]
    return found


REBUILD_LEASE_S = 60.0
"""The rebuild lease, renewed with every batch replayed: a worker that died mid-rebuild
hands the namespace to another within this long."""
RETRY_AFTER_S = 30.0
"""A failed automatic rebuild (S3 or Redis down) is tried again after this long."""


@dataclass(frozen=True)
class RebuildStats:
    events: int
    duplicates: int
    skipped: int = 0
    """Events already applied since the loss (in their actor's ``seen`` set)."""


class _Replay:
    """Archived events through the trending part, with the archive's ids counted once
    and, with ``skip_applied``, without the events the agents applied since the loss."""

    def __init__(
        self, redis: aioredis.Redis, settings: Settings, namespace: str, skip_applied: bool
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.namespace = namespace
        self.skip_applied = skip_applied
        self.part = TrendingPart(settings)
        # The same part, without the seen check: ids are deduplicated here, and the
        # agents' seen sets are left alone.
        self.script = redis.register_script(compose([self.part], dedup=False))
        self.header = orjson.dumps(self.part.header)
        self.ids: set[str] = set()
        self.applied = self.duplicates = self.skipped = 0

    async def _already_applied(self, batch: Sequence[Event]) -> list[bool]:
        """Whether each event is in its actor's seen set: the agents applied it since the
        loss. An anonymous event of a session that logged in counts under the user."""
        keys = Keys(self.namespace)
        sessions = [e.session_id for e in batch if e.user_id is None and e.session_id]
        aliases: dict[str, str] = {}
        if sessions:
            found = await self.redis.mget([keys.alias(s) for s in sessions])
            aliases = {s: _str(u) for s, u in zip(sessions, found, strict=True) if u}
        pipe = self.redis.pipeline(transaction=False)
        for event in batch:
            pipe.zscore(keys.seen(event.actor), event.event_id)
            user = aliases.get(event.session_id or "") if event.user_id is None else None
            pipe.zscore(keys.seen(user) if user else keys.seen(event.actor), event.event_id)
        scores = await pipe.execute()
        return [
            scores[2 * i] is not None or scores[2 * i + 1] is not None for i in range(len(batch))
        ]

    async def apply(self, events: Iterable[Event]) -> None:
        batch: list[Event] = []
        for event in events:
            if event.namespace != self.namespace:
                continue
            if event.event_id in self.ids:
                self.duplicates += 1
                continue
            self.ids.add(event.event_id)
            batch.append(event)
        if not batch:
            return
        try:
            if self.skip_applied:
                done = await self._already_applied(batch)
                self.skipped += sum(done)
                batch = [e for e, d in zip(batch, done, strict=True) if not d]
            if not batch:
                return
            context = await load_context(self.redis, batch, self.settings)
            pipe = self.redis.pipeline(transaction=False)
            for event in batch:
                part_keys, doc = self.part.encode(event, context)
                body = {"id": event.event_id, "ts": event.timestamp, "item": event.item_id or ""}
                body.update({"r": doc, "_k": [len(part_keys)]})
                await self.script(
                    keys=[part_keys[0], *part_keys],
                    args=[orjson.dumps(body), b"{}", self.header],
                    client=pipe,
                )
            await pipe.execute()
        except RedisError as exc:
            raise redis_failure(f"rebuilding the trends of {self.namespace!r}", exc) from exc
        self.applied += len(batch)

    def stats(self) -> RebuildStats:
        return RebuildStats(events=self.applied, duplicates=self.duplicates, skipped=self.skipped)


async def rebuild(
    redis: aioredis.Redis,
    settings: Settings,
    namespace: str,
    events: Iterable[Event],
    batch_size: int = 500,
) -> RebuildStats:
    """Replace the popularity and trending state of ``namespace`` with what ``events``
    (e.g. `recstream.archive.read_events` over the popularity horizon) make of it, then
    materialize. Duplicates in ``events`` (an at-least-once archive) count once."""
    replay = _Replay(redis, settings, namespace, skip_applied=False)
    lock, token = Keys(namespace).trend_rebuild, f"cli-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if not await redis.set(lock, token, nx=True, px=int(REBUILD_LEASE_S * 1000)):
            raise ConfigurationError(
                f"the trends of {namespace!r} are being rebuilt already (a worker does it by "
                "itself after a Redis loss); wait for it to finish"
            )
        stale = await trending_keys(redis, namespace)
        if stale:
            await redis.delete(*stale)
    except RedisError as exc:
        raise redis_failure(f"clearing the trends of {namespace!r}", exc) from exc
    try:
        it = iter(events)
        while batch := list(itertools.islice(it, batch_size)):
            await replay.apply(batch)
            await redis.pexpire(lock, int(REBUILD_LEASE_S * 1000))
        await materialize(redis, settings, namespace, lock=False)
    finally:
        with contextlib.suppress(RedisError, OSError):
            if _str(await redis.get(lock) or b"") == token:
                await redis.delete(lock)
    return replay.stats()


# --- noticing a Redis loss and rebuilding by itself ------------------------------------------


def _take(events: Iterator[Event], n: int) -> list[Event]:
    return list(itertools.islice(events, n))


class TrendKeeper:
    """One worker's trend upkeep: `tick` materializes a namespace, and when its counts
    are incomplete (``since`` > 0 or absent: Redis lost them) rebuilds them from the S3
    archive in the background, once per namespace at a time across workers (a lease)."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.rebuilt: dict[str, RebuildStats] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._retry_at: dict[str, float] = {}

    async def tick(self, namespace: str) -> None:
        keys = Keys(namespace)
        t, since = await self.redis.hmget(keys.trend_clock, ["t", "since"])
        if since is None and t is not None:
            # Counts built before `since` existed (an upgrade): they are what they are.
            await self.redis.hsetnx(keys.trend_clock, "since", 0)
        elif (
            (since is None or float(since) > 0)
            and namespace not in self._tasks
            and time.monotonic() >= self._retry_at.get(namespace, 0.0)
        ):
            task = asyncio.create_task(self._recover(namespace), name=f"trends[{namespace}]")
            self._tasks[namespace] = task
            task.add_done_callback(lambda _: self._tasks.pop(namespace, None))
        await materialize(self.redis, self.settings, namespace)

    async def _archive_days(self, namespace: str) -> list[str]:
        """The archive's day prefixes of ``namespace`` (``…/dt=YYYY-MM-DD/``), oldest first."""
        prefix = f"{ARCHIVE_PREFIX}/{namespace}/"
        days: list[str] = []
        try:
            async with async_client(self.settings, "s3") as s3:
                pages = s3.get_paginator("list_objects_v2").paginate(
                    Bucket=self.settings.bucket, Prefix=prefix, Delimiter="/"
                )
                async for page in pages:
                    days += [c["Prefix"] for c in page.get("CommonPrefixes", []) if "Prefix" in c]
        except (BotoCoreError, ClientError) as exc:
            raise translate(
                exc, f"listing s3://{self.settings.bucket}/{prefix}", self.settings
            ) from exc
        return sorted(days)

    async def _recover(self, namespace: str) -> None:
        keys = Keys(namespace)
        s = self.settings
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        grace = s.archive_flush_s + 2 * s.trend_interval_s
        try:
            if not await self.redis.set(
                keys.trend_rebuild, token, nx=True, px=int((grace + REBUILD_LEASE_S) * 1000)
            ):
                return  # another worker rebuilds it
            days = await self._archive_days(namespace)
            if days:
                # What was applied just before the loss may still be in an archive
                # agent's buffer: let it reach S3 first.
                await asyncio.sleep(grace)
                since = await self.redis.hget(keys.trend_clock, "since")
                end = float(since) if since is not None else time.time() + 86400
                horizon = end - 86400 - 20 * s.popularity_half_life_s
                first = days[0].rsplit("dt=", 1)[1].rstrip("/")
                start = max(horizon, calendar.timegm(time.strptime(first, "%Y-%m-%d")))
                replay = _Replay(self.redis, s, namespace, skip_applied=True)
                events = read_events(s, start, end, namespace=namespace)
                while batch := await asyncio.to_thread(_take, events, 1000):
                    await replay.apply(batch)
                    await self.redis.pexpire(keys.trend_rebuild, int(REBUILD_LEASE_S * 1000))
                self.rebuilt[namespace] = replay.stats()
                log.warning(
                    "the trends of %s were incomplete (Redis lost them?); replayed %d archived "
                    "events before %s from s3://%s (%d applied since, skipped)",
                    namespace, replay.applied, since, s.bucket, replay.skipped,
                )  # fmt: skip
            await self.redis.hset(keys.trend_clock, "since", 0)
            await materialize(self.redis, s, namespace, lock=False)
        except (RecstreamError, RedisError, OSError) as exc:
            self._retry_at[namespace] = time.monotonic() + RETRY_AFTER_S
            log.warning(
                "rebuilding the trends of %s failed, retrying in %.0f s: %s",
                namespace, RETRY_AFTER_S, exc,
            )  # fmt: skip
        finally:
            with contextlib.suppress(RedisError, OSError):
                if _str(await self.redis.get(keys.trend_rebuild) or b"") == token:
                    await self.redis.delete(keys.trend_rebuild)

    async def aclose(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
