"""The served log: what serving answered under each recommendation id, for attribution.

Serving logs every answer it gives with `ServedLog.log` (or `log_served`;
serving/pipeline/log.py packs `ServedLog.command` into its own round trips): the record
``rs:{ns}:served:{recommendation_id}`` (JSON ``{"actor","strategy","variant","items",
"ts","context"}``, TTL ``attribution_window_s``), the actor's index of recent
recommendation ids (``rs:{ns}:served_to:{actor}``), and the strategy's ``impressions``
(the number of items served) in the attribution counters, all in one Lua call that does
nothing if the id was logged before, so a recommendation's impressions count once
however often serving retries.

The attribution agent (agents/attribution.py) reads the records back and counts clicks,
carts and purchases in the same counters, through the same Lua (`COUNT_LUA`) and keys
(`counter_targets`). This is the contract between serving, which writes the log, and
the agent, which reads it; it lives in recstream/ so that neither imports the other.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from recstream.errors import StoreUnavailable
from recstream.keys import Keys
from recstream.settings import Settings

__all__ = [
    "COUNT_LUA",
    "MAX_SERVED_ITEMS",
    "Served",
    "ServedLog",
    "counter_targets",
    "log_served",
    "served_record",
]

MAX_SERVED_ITEMS: Final = 500


@dataclass(frozen=True, slots=True)
class Served:
    """What serving answered under one recommendation id (the served log's value)."""

    actor: str
    strategy: str
    items: tuple[str, ...]
    ts: float
    variant: str | None = None
    context: Mapping[str, str] = field(default_factory=dict)

    def dumps(self) -> bytes:
        return orjson.dumps(
            {
                "actor": self.actor,
                "strategy": self.strategy,
                "variant": self.variant,
                "items": list(self.items),
                "ts": self.ts,
                "context": dict(self.context),
            }
        )

    @classmethod
    def loads(cls, raw: bytes | str) -> Served:
        """Parse a served-log value; `ValueError` names what is wrong."""
        try:
            doc = orjson.loads(raw)
            items = doc["items"]
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError("items must be a list of item ids")
            strategy = doc["strategy"]
            if not isinstance(strategy, str) or not strategy:
                raise ValueError("strategy must be a non-empty string")
            return cls(
                actor=str(doc["actor"]),
                strategy=strategy,
                items=tuple(items),
                ts=float(doc["ts"]),
                variant=doc.get("variant") or None,
                context=doc.get("context") or {},
            )
        except (KeyError, TypeError, orjson.JSONDecodeError) as exc:
            raise ValueError(f"not a served-log record ({exc!r})") from exc


def served_record(
    actor: str,
    strategy: str,
    items: Sequence[str],
    *,
    variant: str | None = None,
    context: Mapping[str, str] | None = None,
    ts: float | None = None,
) -> Served:
    """The record serving logs for one answer; ``ts`` defaults to now."""
    if not strategy:
        raise ValueError("served_record: strategy must be a non-empty name, e.g. 'ranker'")
    if len(items) > MAX_SERVED_ITEMS:
        raise ValueError(f"served_record: at most {MAX_SERVED_ITEMS} items, got {len(items)}")
    return Served(
        actor=actor,
        strategy=strategy,
        items=tuple(items),
        ts=time.time() if ts is None else ts,
        variant=variant or None,
        context=dict(context or {}),
    )


def _day(ts: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(ts))


_TARGETS: dict[tuple[str, str, str | None, int, int], list[tuple[str, bytes, int]]] = {}
_MAX_TARGETS = 10_000
"""`counter_targets` by (namespace, strategy, variant, UTC day, day TTL): every answer
served logs one count, and its keys and notes (three JSON documents, a date) are the
same for every answer of a strategy and day. Emptied when full."""


def counter_targets(
    settings: Settings, namespace: str, strategy: str, variant: str | None, ts: float
) -> list[tuple[str, bytes, int]]:
    """(Redis key, dirty-note descriptor, TTL or 0) of every counter one count touches.
    The list is shared: read it, never change it."""
    cache = (namespace, strategy, variant, int(ts // 86_400), settings.attribution_day_ttl_s)
    found = _TARGETS.get(cache)
    if found is None:
        if len(_TARGETS) >= _MAX_TARGETS:
            _TARGETS.clear()
        found = _TARGETS[cache] = _make_counter_targets(settings, namespace, strategy, variant, ts)
    return found


def _make_counter_targets(
    settings: Settings, namespace: str, strategy: str, variant: str | None, ts: float
) -> list[tuple[str, bytes, int]]:
    keys = Keys(namespace)
    day = _day(ts)

    def note(key: str, kind: str, **extra: str) -> bytes:
        doc = {"k": key, "ns": namespace, "s": strategy, "kind": kind, **extra}
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)

    total = keys.attribution(strategy)
    daily = keys.attribution_day(strategy, day)
    targets = [
        (total, note(total, "total"), 0),
        (daily, note(daily, "day", d=day), settings.attribution_day_ttl_s),
    ]
    if variant:
        per_variant = keys.attribution_variant(strategy, variant)
        targets.append((per_variant, note(per_variant, "variant", v=variant), 0))
    return targets


# Shared by the two counting scripts: the served log's (below) and the attribution agent's
# (agents/attribution.py). Counters are created with a restore_pending field, so a counter
# Redis lost is restored from DynamoDB before DynamoDB is overwritten.
COUNT_LUA = """
local function count(first_key, first_arg, n, fieldname, amount, revenue, dirty)
  for i = 0, n - 1 do
    local key = KEYS[first_key + i]
    local note = ARGV[first_arg + 2 * i]
    local ttl = tonumber(ARGV[first_arg + 2 * i + 1])
    if redis.call('EXISTS', key) == 0 then
      redis.call('HSET', key, 'restore_pending', '1')
    end
    redis.call('HINCRBY', key, fieldname, amount)
    if revenue ~= '' then redis.call('HINCRBYFLOAT', key, 'revenue', revenue) end
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
    redis.call('HINCRBY', dirty, note, 1)
  end
end
"""

# KEYS: 1 served record, 2 the actor's served index, 3 dirty notes, 4.. counters.
# ARGV: 1 record JSON, 2 ttl, 3 recommendation id, 4 served time, 5 index cap,
#       6 items served, 7 number of counters, 8.. (note, ttl) per counter.
# Returns 1 if logged now, 0 if the id was logged before (nothing counted again).
_LOG_SERVED = (
    COUNT_LUA
    + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[5]) - 1)
redis.call('EXPIRE', KEYS[2], ARGV[2])
count(4, 8, tonumber(ARGV[7]), 'impressions', tonumber(ARGV[6]), '', KEYS[3])
return 1
"""
)


class ServedLog:
    """The served log: what serving answered under each recommendation id.

    Serving calls `log` once per answer; the attribution agent reads it back."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._log = redis.register_script(_LOG_SERVED)

    async def log(
        self,
        namespace: str,
        recommendation_id: str,
        served: Served,
        client: aioredis.Redis | None = None,
    ) -> bool:
        """Record ``served`` and count its impressions; False if the id was logged before.

        Pass a pipeline as ``client`` to batch it with other commands (the result is
        then that pipeline's): it queues a bare EVALSHA. redis-py's script objects make a
        pipeline ask ``SCRIPT EXISTS`` first, one more round trip for every batch the
        serving flusher sends; a server without the script answers that EVALSHA with
        NOSCRIPT, and the caller loads it (``script``) and sends the batch again, which
        logs nothing twice (an id already logged is skipped)."""
        script_keys, args = self._call(namespace, recommendation_id, served)
        if isinstance(client, Pipeline):
            client.evalsha(self._log.sha, len(script_keys), *script_keys, *args)
            return True
        try:
            done = await self._log(keys=script_keys, args=args, client=client)
        except RedisError as exc:
            raise StoreUnavailable(
                f"logging recommendation {recommendation_id!r} failed: {exc}"
            ) from exc
        return bool(done)

    def command(self, namespace: str, recommendation_id: str, served: Served) -> tuple[Any, ...]:
        """`log`'s call as one command's arguments (``"EVALSHA"``, the script's SHA, the
        number of keys, the keys, the arguments), for a caller that packs its own round
        trip (serving's flusher, `recstream.redisio`)."""
        script_keys, args = self._call(namespace, recommendation_id, served)
        return ("EVALSHA", self._log.sha, len(script_keys), *script_keys, *args)

    def _call(
        self, namespace: str, recommendation_id: str, served: Served
    ) -> tuple[list[str], list[Any]]:
        if not recommendation_id:
            raise ValueError("log_served: recommendation_id must be non-empty")
        s = self.settings
        keys = Keys(namespace)
        targets = counter_targets(s, namespace, served.strategy, served.variant, served.ts)
        args: list[Any] = [
            served.dumps(),
            s.attribution_window_s,
            recommendation_id,
            repr(served.ts),
            s.attribution_per_actor,
            len(served.items),
            len(targets),
        ]
        for _, note, ttl in targets:
            args += [note, ttl]
        script_keys = [
            keys.served(recommendation_id),
            keys.served_to(served.actor),
            keys.attribution_dirty,
            *[key for key, _, _ in targets],
        ]
        return script_keys, args

    @property
    def script(self) -> str:
        """The logging script's text, for ``SCRIPT LOAD`` after a NOSCRIPT."""
        return _LOG_SERVED

    async def get(self, namespace: str, recommendation_id: str) -> Served | None:
        raw = await self.redis.get(Keys(namespace).served(recommendation_id))
        return None if raw is None else Served.loads(raw)


async def log_served(
    redis: aioredis.Redis,
    settings: Settings,
    namespace: str,
    recommendation_id: str,
    served: Served,
) -> bool:
    """One-off `ServedLog.log` (keep a `ServedLog` to log many)."""
    return await ServedLog(redis, settings).log(namespace, recommendation_id, served)
