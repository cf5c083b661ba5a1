"""Stage 8: record what was served, for attribution, off the request path but bounded.

Each answer is written through `recstream.served.ServedLog`: one Lua call sets
``rs:{ns}:served:{recommendation_id}`` (``{"actor", "strategy", "variant", "items": [ids],
"ts", "context"}``, TTL ``Settings.attribution_window_s``), indexes it under the actor (so
a click on a served item that carries no recommendation id is attributed too) and counts
the strategy's impressions once per recommendation id. Answers with no actor (related
items and trending asked without a user) are written as the bare record: nothing to index.

The writes leave the request path: an answer queues its record, and one background
flusher per process sends whatever is queued in one pipelined round trip (at most
``BATCH`` records a trip). At 1,000 answers a second a task and a round trip per answer
cost the server more CPU than the records themselves (docs/serving-speed.md). The
flusher waits ``LINGER_S`` (10 ms) before each trip, as a Kafka producer's ``linger.ms``
does, so the answers of the next few milliseconds share it: a record alone in its trip
costs ~220 µs of CPU, one of ten ~55 µs (session 9), and at 500 answers a second per
process a trip without the wait carried about one. Attribution reads a record when a
later event names it, which comes through the stream a hundred milliseconds later at
the soonest. At most ``MAX_PENDING`` records wait; beyond that (Redis slow or down) a
record is dropped and counted in ``recstream_served_log_dropped_total`` rather than
queueing without bound, and a batch Redis refuses is counted the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from recstream.errors import RecstreamError
from recstream.keys import Keys
from recstream.redisio import pack, send_packed
from recstream.served import MAX_SERVED_ITEMS, served_record
from recstream.served import ServedLog as AttributionLog
from recstream.settings import Settings
from serving.metrics import SERVED_LOG_DROPPED

__all__ = ["ServedLog"]

MAX_PENDING = 1000
BATCH = 200
LINGER_S = 0.01
WRITE_TIMEOUT_S = 1.0


class _Entry(NamedTuple):
    namespace: str
    recommendation_id: str
    actor: str | None
    strategy: str
    variant: str
    items: list[str]
    ts: float
    context: dict[str, str]


class ServedLog:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.ttl_s = settings.attribution_window_s
        self._log = AttributionLog(redis, settings)
        self._pending: list[_Entry] = []
        self._flusher: asyncio.Task[None] | None = None

    def record(
        self,
        namespace: str,
        recommendation_id: str,
        *,
        actor: str | None,
        strategy: str,
        variant: str,
        items: Sequence[str],
        context: Mapping[str, str],
    ) -> None:
        if len(self._pending) >= MAX_PENDING:
            SERVED_LOG_DROPPED.inc()
            return
        self._pending.append(
            _Entry(
                namespace,
                recommendation_id,
                actor,
                strategy,
                variant,
                list(items)[:MAX_SERVED_ITEMS],
                time.time(),
                dict(context),
            )
        )
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        # Runs while there is something queued, and lingers before every trip, not only
        # the first: under steady load the flusher never finds the queue empty, so a wait
        # at its start alone was one wait per busy spell, and each later trip carried the
        # one or two records answered during the trip before it (0.92 trips a request).
        while self._pending:
            if len(self._pending) < BATCH:
                await asyncio.sleep(LINGER_S)
            batch, self._pending = self._pending[:BATCH], self._pending[BATCH:]
            try:
                async with asyncio.timeout(WRITE_TIMEOUT_S):
                    replies = await self._write(batch)
                    if any(isinstance(r, NoScriptError) for r in replies):
                        # A fresh (or flushed) Redis: load the script once and send the
                        # batch again; ids the first attempt logged are skipped.
                        await self.redis.script_load(self._log.script)
                        await self._write(batch)
            except (TimeoutError, RedisError, RecstreamError, OSError):
                SERVED_LOG_DROPPED.inc(len(batch))

    async def _write(self, batch: list[_Entry]) -> list[object]:
        # One write of commands packed by hiredis (recstream/redisio.py): a redis-py
        # pipeline packed the ~20 arguments of each record in Python, ~10 % of a
        # request's CPU at 1,000 answers a second (docs/serving-speed.md, session 12).
        packed = []
        for e in batch:
            if e.actor is None:
                body = orjson.dumps(
                    {
                        "actor": None,
                        "strategy": e.strategy,
                        "variant": e.variant,
                        "items": e.items,
                        "ts": e.ts,
                        "context": e.context,
                    }
                )
                key = Keys(e.namespace).served(e.recommendation_id)
                packed.append(pack("SET", key, body, "EX", self.ttl_s))
                continue
            served = served_record(
                e.actor, e.strategy, e.items, variant=e.variant, context=e.context, ts=e.ts
            )
            packed.append(pack(*self._log.command(e.namespace, e.recommendation_id, served)))
        return await send_packed(
            self.redis, [(b"".join(packed), len(packed))], raise_on_error=False
        )

    async def drain(self) -> None:
        """Wait for the queued writes (shutdown, tests)."""
        while self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flusher)
