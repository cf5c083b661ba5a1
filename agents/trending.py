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
``trend_cap`` items.

Durability: these keys are rebuilt from the S3 archive (`rebuild`, ``recstream trending
rebuild``): the archive holds every event, so nothing else needs a durable copy.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agents.catalog import BatchContext, load_context
from agents.state import compose, redis_failure
from recstream.keys import Keys
from recstream.scoring import trend_scores
from recstream.settings import Settings
from streams.schema import Event

__all__ = ["WINDOWS", "TrendWindow", "TrendingPart", "materialize", "rebuild"]

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
INDEX_TTL_S = 2 * 86400 + 2 * 3600
EXPONENT_LIMIT = 1000.0
"""2^1000 is near the largest double: events further than 1000 half-lives after the
epoch would overflow, so their exponent is capped (docs/agents.md: move the epoch)."""

# The trending part. K: clock, pop:decayed, cnt:index, one bucket per window, and with a
# category: pop:cat, cats, one category bucket per window.
# ev.r: pw positive weight, epoch, hl, pcap, bcap, ittl, b [[dead_at, span]...], cat.
_TRENDING_LUA = """
local r = ev['r']
local ts = ev['ts']
local clock = tonumber(redis.call('HGET', K[1], 't'))
if (not clock) or ts > clock then
  redis.call('HSET', K[1], 't', fmt(ts))
  clock = ts
end
if r['pw'] <= 0 then return 0 end
local item = ev['item']
local function bump(zkey, score, cap)
  redis.call('ZINCRBY', zkey, score, item)
  local n = redis.call('ZCARD', zkey)
  if n > cap then redis.call('ZREMRANGEBYRANK', zkey, 0, n - cap - 1) end
end
local decayed = r['pw'] * 2 ^ math.min((ts - r['epoch']) / r['hl'], r['xmax'])
bump(K[2], decayed, r['pcap'])
local nb = #r['b']
local function buckets(first)
  for i = 1, nb do
    local dead, span = r['b'][i][1], r['b'][i][2]
    -- a bucket no window will read again (a very late event) is not written at all
    if clock < dead then
      local key = K[first + i - 1]
      bump(key, r['pw'], r['bcap'])
      -- a bucket new to the index gets its TTL (a backstop: the sweep deletes it)
      if redis.call('ZADD', K[3], 'NX', dead, key) == 1 then
        redis.call('EXPIRE', key, math.ceil(dead - clock + span))
        redis.call('EXPIRE', K[3], r['ittl'])
      end
    end
  end
end
buckets(4)
if r['cat'] then
  local at = 4 + nb
  bump(K[at], decayed, r['pcap'])
  redis.call('ZADD', K[at + 1], 'GT', ts, r['cat'])
  buckets(at + 2)
end
return 0
"""


class TrendingPart:
    """The popularity-and-trending share of the per-event script."""

    name = "r"
    lua = _TRENDING_LUA

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def encode(
        self, event: Event, context: BatchContext
    ) -> tuple[list[str], dict[str, Any] | None]:
        s = self.settings
        keys = Keys(event.namespace)
        weight = max(0.0, s.weight(event.event_type))
        if event.item_id is None or weight <= 0:
            return [keys.trend_clock], {"pw": 0.0}
        category = context.facts(event).category
        starts = [w.bucket(event.timestamp) for w in WINDOWS]
        out = [keys.trend_clock, keys.popularity_decayed, keys.counts_index]
        out += [keys.counts_bucket(w.span_s, b) for w, b in zip(WINDOWS, starts, strict=True)]
        doc: dict[str, Any] = {
            "pw": weight,
            "epoch": s.popularity_epoch_s,
            "hl": s.popularity_half_life_s,
            "xmax": EXPONENT_LIMIT,
            "pcap": s.popularity_cap,
            "bcap": s.bucket_cap,
            "ittl": INDEX_TTL_S,
            "b": [[w.dead_at(b), w.span_s] for w, b in zip(WINDOWS, starts, strict=True)],
        }
        if category is not None:
            doc["cat"] = category
            out += [keys.popularity_category(category), keys.categories]
            out += [
                keys.counts_bucket(w.span_s, b, category)
                for w, b in zip(WINDOWS, starts, strict=True)
            ]
        return out, doc


# --- the materializer ------------------------------------------------------------------


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(raw: Sequence[Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for member, score in raw:
        out[member.decode() if isinstance(member, bytes) else str(member)] = float(score)
    return out


def scores_of(
    recent: dict[str, float], previous: dict[str, float], gamma: float, cap: int
) -> dict[str, float]:
    """The trend of each item with a count in either window, top ``cap`` (ties by id)."""
    items = sorted(set(recent) | set(previous))
    if not items:
        return {}
    r = np.array([recent.get(i, 0.0) for i in items])
    p = np.array([previous.get(i, 0.0) for i in items])
    trend = trend_scores(r, p, gamma)
    ranked = sorted(
        ((items[k], float(trend[k])) for k in range(len(items)) if np.isfinite(trend[k])),
        key=lambda kv: (-kv[1], kv[0]),
    )
    return dict(ranked[:cap])


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
        pipe = redis.pipeline(transaction=False)
        targets: list[tuple[str, str | None]] = []
        for category in categories:
            for window in WINDOWS:
                recent, previous = window.starts(clock)
                pipe.zunion(
                    [keys.counts_bucket(window.span_s, s, category) for s in recent],
                    withscores=True,
                )
                pipe.zunion(
                    [keys.counts_bucket(window.span_s, s, category) for s in previous],
                    withscores=True,
                )
                targets.append((window.name, category))
        replies = await pipe.execute()
        write = redis.pipeline(transaction=True)
        for n, (name, category) in enumerate(targets):
            top = scores_of(
                _pairs(replies[2 * n]),
                _pairs(replies[2 * n + 1]),
                settings.trend_gamma,
                settings.trend_cap,
            )
            key = keys.trending(name, category)
            write.delete(key)
            if top:
                write.zadd(key, top)
                # a category that stops getting events loses its lists with its buckets
                write.expire(key, INDEX_TTL_S)
        await write.execute()
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


@dataclass(frozen=True)
class RebuildStats:
    events: int
    duplicates: int


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
    part = TrendingPart(settings)
    # The same part, without the seen check: the archive's ids are deduplicated here,
    # and the agents' seen sets are left alone.
    script = redis.register_script(compose([part], dedup=False))
    try:
        stale = await trending_keys(redis, namespace)
        if stale:
            await redis.delete(*stale)
    except RedisError as exc:
        raise redis_failure(f"clearing the trends of {namespace!r}", exc) from exc
    ids: set[str] = set()
    applied = duplicates = 0
    batch: list[Event] = []

    async def flush() -> None:
        context = await load_context(redis, batch, settings)
        pipe = redis.pipeline(transaction=False)
        for event in batch:
            part_keys, doc = part.encode(event, context)
            body = {"id": event.event_id, "ts": event.timestamp, "item": event.item_id or ""}
            body.update({"r": doc, "_k": [len(part_keys)]})
            await script(
                keys=[part_keys[0], *part_keys], args=[orjson.dumps(body), b"{}"], client=pipe
            )
        try:
            await pipe.execute()
        except RedisError as exc:
            raise redis_failure(f"rebuilding the trends of {namespace!r}", exc) from exc
        batch.clear()

    for event in events:
        if event.namespace != namespace:
            continue
        if event.event_id in ids:
            duplicates += 1
            continue
        ids.add(event.event_id)
        batch.append(event)
        applied += 1
        if len(batch) >= batch_size:
            await flush()
    if batch:
        await flush()
    await materialize(redis, settings, namespace, lock=False)
    return RebuildStats(events=applied, duplicates=duplicates)
