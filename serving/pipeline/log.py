"""Stage 8: record what was served, for attribution, off the request path but bounded.

Each answer is written through `agents.attribution.ServedLog`: one Lua call sets
``rs:{ns}:served:{recommendation_id}`` (``{"actor", "strategy", "variant", "items": [ids],
"ts", "context"}``, TTL ``Settings.attribution_window_s``), indexes it under the actor (so
a click on a served item that carries no recommendation id is attributed too) and counts
the strategy's impressions once per recommendation id. Answers with no actor (related
items and trending asked without a user) are written as the bare record: nothing to index.

The write runs in a background task so the answer does not wait for it; at most
``MAX_IN_FLIGHT`` writes are pending at once, and beyond that (Redis slow or down) a
record is dropped and counted in ``recstream_served_log_dropped_total`` rather than
queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Mapping, Sequence

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agents.attribution import MAX_SERVED_ITEMS, served_record
from agents.attribution import ServedLog as AttributionLog
from recstream.errors import RecstreamError
from recstream.keys import Keys
from recstream.settings import Settings
from serving.metrics import SERVED_LOG_DROPPED

__all__ = ["ServedLog"]

MAX_IN_FLIGHT = 1000
WRITE_TIMEOUT_S = 1.0


class ServedLog:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.ttl_s = settings.attribution_window_s
        self._log = AttributionLog(redis, settings)
        self._tasks: set[asyncio.Task[None]] = set()

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
        if len(self._tasks) >= MAX_IN_FLIGHT:
            SERVED_LOG_DROPPED.inc()
            return
        items = list(items)[:MAX_SERVED_ITEMS]
        if actor is None:
            body = orjson.dumps(
                {
                    "actor": actor,
                    "strategy": strategy,
                    "variant": variant,
                    "items": items,
                    "ts": time.time(),
                    "context": dict(context),
                }
            )
            key = Keys(namespace).served(recommendation_id)
            call = self.redis.set(key, body, ex=self.ttl_s)
        else:
            served = served_record(actor, strategy, items, variant=variant, context=dict(context))
            call = self._log.log(namespace, recommendation_id, served)
        task = asyncio.create_task(self._write(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, call: Awaitable[object]) -> None:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await call
        except (TimeoutError, RedisError, RecstreamError, OSError):
            SERVED_LOG_DROPPED.inc()

    async def drain(self) -> None:
        """Wait for the pending writes (shutdown, tests)."""
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)
