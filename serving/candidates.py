"""Candidates from trained models, read from the version that serving currently points at.

Training publishes each model version under ``rs:{ns}:model:{name}:{version}:…`` and
then flips ``rs:{ns}:model:{name}:current`` (training/publish.py). Serving reads the
pointer and the version's records in one Lua call (`recstream.published.read_current_many`),
so a request never mixes two versions nor reads one that garbage collection is deleting,
and a promote or rollback is seen by the very next request.

Item-to-item (``item2item``) publishes ``nbr:{item}``: a sorted set of the item's top-K
neighbours by similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from recstream.keys import Keys
from recstream.published import read_current_many

__all__ = ["ITEM2ITEM", "Neighbour", "PublishedModels"]

ITEM2ITEM = "item2item"


@dataclass(frozen=True, slots=True)
class Neighbour:
    item_id: str
    score: float
    because: str
    """The window item that contributed most, for the explanation."""


class PublishedModels:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

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
        found = await read_current_many(
            self.redis,
            Keys(namespace),
            ITEM2ITEM,
            [f"nbr:{item}" for item, _ in sources],
            limit=per_item,
        )
        if found is None:
            return []
        rows = [found[f"nbr:{item}"] for item, _ in sources]
        scores: dict[str, float] = {}
        best: dict[str, tuple[float, str]] = {}
        for (source, weight), record in zip(sources, rows, strict=True):
            if record.kind != "zset" or not isinstance(record.value, list):
                continue
            for item, similarity in record.value:
                contribution = weight * float(similarity)
                scores[item] = scores.get(item, 0.0) + contribution
                if item not in best or contribution > best[item][0]:
                    best[item] = (contribution, source)
        return [Neighbour(item, score, best[item][1]) for item, score in scores.items()]
