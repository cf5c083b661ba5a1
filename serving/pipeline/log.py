"""Stage 8: record what was served, for attribution, off the request path but bounded.

Each answer is written as ``rs:{ns}:served:{recommendation_id}``: a STRING holding
``{"actor", "strategy", "variant", "items": [ids], "ts", "context"}`` (the agreed format,
docs/architecture.md) with a TTL of ``Settings.attribution_window_s``. agents/attribution
reads it when a click carries the ``recommendation_id``.

The write runs in a background task so the answer does not wait for it; at most
``MAX_IN_FLIGHT`` writes are pending at once, and beyond that (Redis slow or down) a
record is dropped and counted in ``recstream_served_log_dropped_total`` rather than
queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from recstream.keys import Keys
from serving.metrics import SERVED_LOG_DROPPED

__all__ = ["ServedLog"]

MAX_IN_FLIGHT = 1000
WRITE_TIMEOUT_S = 1.0


class ServedLog:
    def __init__(self, redis: aioredis.Redis, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
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
        body = orjson.dumps(
            {
                "actor": actor,
                "strategy": strategy,
                "variant": variant,
                "items": list(items),
                "ts": time.time(),
                "context": dict(context),
            }
        )
        key = Keys(namespace).served(recommendation_id)
        task = asyncio.create_task(self._write(key, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, key: str, body: bytes) -> None:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await self.redis.set(key, body, ex=self.ttl_s)
        except (TimeoutError, RedisError, OSError):
            SERVED_LOG_DROPPED.inc()

    async def drain(self) -> None:
        """Wait for the pending writes (shutdown, tests)."""
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)
