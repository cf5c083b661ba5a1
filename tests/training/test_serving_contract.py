"""What serving will do with the published records, against real Redis and moto's S3:
publish real models through the registry, read their records back the way serving reads
them, and score with the request-time functions (ALS fold-in, session kNN, neighbours)."""

from __future__ import annotations

import numpy as np
import redis.asyncio as aioredis

from recstream.keys import Keys
from recstream.settings import Settings
from training.data import LogBuilder
from training.models import (
    ALS,
    ItemToItem,
    Popularity,
    SessionIndex,
    SessionKNN,
    fold_in,
    score_session,
)
from training.publish import DataRange, RunInfo, open_registry, read_current

T0 = 1_700_000_000.0


def two_clusters() -> LogBuilder:
    builder = LogBuilder()
    t = T0
    for prefix, items in (("u", ["a1", "a2", "a3", "a4"]), ("v", ["b1", "b2", "b3", "b4"])):
        for n in range(6):
            for step in range(4):
                builder.add(f"{prefix}{n}", items[(n + step) % 4], t, category=prefix)
                t += 60
            t += 3600
    return builder


async def test_published_records_serve_requests(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    log = two_clusters().build()
    als = ALS(factors=8, regularization=0.01, iterations=10, alpha=5.0).fit(log)
    sknn = SessionKNN(k=3, last_n=5).fit(log)
    i2i = ItemToItem(window=3).fit(log)
    popularity = Popularity(half_life_days=None).fit(log)
    run = RunInfo(data=DataRange(source="test", start=log.start, end=log.end, rows=len(log)))
    async with open_registry(settings) as registry:
        for model in (als, sknn, i2i, popularity):
            await registry.publish(model, run)
    keys = Keys(settings.namespace)

    # ALS: a brand-new visitor with two live clicks in cluster B, folded in at request time
    factors = await read_current(redis_client, keys, "als", "factors", fields=["b1", "b2"])
    yty = await read_current(redis_client, keys, "als", "yty")
    every = await read_current(redis_client, keys, "als", "factors")
    assert factors is not None
    assert isinstance(factors.value, dict)
    assert yty is not None
    assert isinstance(yty.value, bytes)
    assert every is not None
    assert isinstance(every.value, dict)
    f = 8
    window = np.stack([np.frombuffer(factors.value[i], "<f4") for i in ("b1", "b2")])
    gram = np.frombuffer(yty.value, "<f4").reshape(f, f)
    user = fold_in(window, np.arange(2, dtype=np.int32), np.full(2, 5.0), 0.01, gram)
    candidates = sorted(every.value)
    matrix = np.stack([np.frombuffer(every.value[i], "<f4") for i in candidates])
    ranked = [candidates[i] for i in np.argsort(-(matrix @ user), kind="stable")[:4]]
    assert set(ranked) == {"b1", "b2", "b3", "b4"}
    # the published factors fold in exactly like the fitted model does
    expected = als.recommend(["b1", "b2"], 4)
    assert ranked == [item for item, _ in expected]

    # session kNN: the published index answers for live session items
    blob = await read_current(redis_client, keys, "sknn", "index")
    assert blob is not None
    assert isinstance(blob.value, bytes)
    index = SessionIndex.from_bytes(blob.value)
    assert score_session(index, ["a1", "a2"], 10, neighbours=3, last_n=5) == sknn.recommend(
        ["a1", "a2"], 10
    )

    # item-to-item: an item's neighbours are a sorted set, best first
    neighbours = await read_current(redis_client, keys, "item2item", "nbr:a1", limit=3)
    assert neighbours is not None
    assert isinstance(neighbours.value, list)
    assert {item for item, _ in neighbours.value} <= {"a2", "a3", "a4"}
    # (equal similarities come back in Redis's member order, so compare as a mapping)
    assert dict(neighbours.value) == dict(i2i.neighbours_of("a1", 3))

    # popularity per category, the fallback
    top = await read_current(redis_client, keys, "popularity", "top:cat:v", limit=2)
    assert top is not None
    assert isinstance(top.value, list)
    assert {item for item, _ in top.value} <= {"b1", "b2", "b3", "b4"}
