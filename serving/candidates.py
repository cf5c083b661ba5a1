"""Candidates from trained models, read from the version that serving currently points at.

Training publishes each model version under ``rs:{ns}:model:{name}:{version}:…`` and
then flips ``rs:{ns}:model:{name}:current`` (training/publish.py). Serving reads the
pointer, caches it for a couple of seconds (a promote or rollback is seen within that),
and reads the version's records in one pipelined round trip.

Item-to-item (``item2item``) publishes ``nbr:{item}``: a sorted set of the item's top-K
neighbours by similarity.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from recstream.keys import Keys

__all__ = ["ITEM2ITEM", "Neighbour", "PublishedModels"]

ITEM2ITEM = "item2item"


@dataclass(frozen=True, slots=True)
class Neighbour:
    item_id: str
    score: float
    because: str
    """The window item that contributed most, for the explanation."""


class PublishedModels:
    def __init__(self, redis: aioredis.Redis, pointer_ttl: float = 2.0) -> None:
        self.redis = redis
        self.pointer_ttl = pointer_ttl
        self._pointers: dict[tuple[str, str], tuple[float, str | None]] = {}

    async def version(self, namespace: str, model: str) -> str | None:
        key = (namespace, model)
        cached = self._pointers.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.pointer_ttl:
            return cached[1]
        raw = await self.redis.get(Keys(namespace).model_pointer(model))
        version = raw.decode() if isinstance(raw, bytes) else raw
        self._pointers[key] = (now, version)
        return version

    async def neighbours(
        self,
        namespace: str,
        sources: Sequence[tuple[str, float]],
        per_item: int = 20,
    ) -> list[Neighbour]:
        """Items similar to ``sources`` ((item, weight) pairs, e.g. recency weights),
        scored by the weighted sum of similarities; empty when no model is published."""
        if not sources:
            return []
        version = await self.version(namespace, ITEM2ITEM)
        if version is None:
            return []
        keys = Keys(namespace)
        pipe = self.redis.pipeline(transaction=False)
        for item, _ in sources:
            pipe.zrevrange(
                keys.model(ITEM2ITEM, version, f"nbr:{item}"), 0, per_item - 1, withscores=True
            )
        rows = await pipe.execute()
        scores: dict[str, float] = {}
        best: dict[str, tuple[float, str]] = {}
        for (source, weight), neighbours in zip(sources, rows, strict=True):
            for raw, similarity in neighbours:
                item = raw.decode() if isinstance(raw, bytes) else str(raw)
                contribution = weight * float(similarity)
                scores[item] = scores.get(item, 0.0) + contribution
                if item not in best or contribution > best[item][0]:
                    best[item] = (contribution, source)
        return [Neighbour(item, score, best[item][1]) for item, score in scores.items()]
