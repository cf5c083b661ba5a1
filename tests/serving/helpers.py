"""Shared by the serving tests: a tiny two-cluster log, models published through
training's real publish path, live events applied through the agents' real HotStore."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import redis.asyncio as aioredis

from agents.state import RedisHotStore
from recstream.aws import async_client
from recstream.settings import Settings
from recstream.windows import DynamoWindows
from serving.pipeline import Ranker
from serving.pipeline.types import ItemCatalog
from streams.schema import Event
from tests.conftest import LocalStack, make_settings
from training.data import InteractionLog, LogBuilder
from training.models import (
    ALS,
    Blend,
    CategoryPopularity,
    ItemToItem,
    Popularity,
    RecentlyViewed,
    SessionKNN,
    Trending,
)
from training.publish import DataRange, RunInfo, open_registry

T0 = 1_700_000_000.0
ROOMY = {"ranking_budget_ms": 10_000.0, "store_timeout_ms": 5_000.0, "source_timeout_ms": 5_000.0}
"""Budgets no loaded test machine misses, so assertions on `degraded` are not timing bets."""


def roomy(local_stack: LocalStack, **overrides: Any) -> Settings:
    """Fresh settings (tests.conftest.make_settings) with the `ROOMY` budgets."""
    merged: dict[str, Any] = {**ROOMY, **overrides}
    return make_settings(local_stack, **merged)


WEIGHTS = {
    "recently_viewed": 1.0,
    "item2item": 1.0,
    "sknn": 1.0,
    "als": 0.5,
    "popularity": 0.1,
    "trending": 0.05,
}


def two_clusters() -> InteractionLog:
    """Users u* browse a1..a4 (category u), users v* browse b1..b4 (category v)."""
    builder = LogBuilder()
    t = T0
    for prefix, items in (("u", ["a1", "a2", "a3", "a4"]), ("v", ["b1", "b2", "b3", "b4"])):
        for n in range(6):
            for step in range(4):
                builder.add(f"{prefix}{n}", items[(n + step) % 4], t, category=prefix)
                t += 60
            t += 3600
    # a lone popular item, so popularity has a clear leader
    for n in range(8):
        builder.add(f"w{n}", "hit", t, category="w")
        t += 60
    return builder.build()


def fitted(log: InteractionLog, weights: Mapping[str, float] = WEIGHTS) -> dict[str, object]:
    return {
        "popularity": Popularity(half_life_days=None).fit(log),
        "trending": Trending(window_s=86400.0).fit(log),
        "item2item": ItemToItem(window=3).fit(log),
        "als": ALS(factors=8, regularization=0.01, iterations=10, alpha=5.0).fit(log),
        "sknn": SessionKNN(k=3, last_n=5).fit(log),
        "recently_viewed": RecentlyViewed(decay=0.7).fit(log),
        "category_popularity": CategoryPopularity().fit(log),
        "blend": Blend(
            weights=weights,
            components={
                "als": {"factors": 8, "regularization": 0.01, "iterations": 10, "alpha": 5.0},
                "sknn": {"k": 3, "last_n": 5},
                "item2item": {"window": 3},
                "recently_viewed": {"decay": 0.7},
                "popularity": {"half_life_days": None},
                "trending": {"window_s": 86400.0},
            },
        ).fit(log),
    }


async def publish(settings: Settings, models: Iterable[object], log: InteractionLog) -> None:
    run = RunInfo(data=DataRange(source="test", start=log.start, end=log.end, rows=len(log)))
    async with open_registry(settings) as registry:
        for model in models:
            await registry.publish(model, run)  # type: ignore[arg-type]


def event(n: int, actor: str, item: str, ns: str, kind: str = "view", **extra: object) -> Event:
    fields: dict[str, object] = {"event_id": f"{actor}-{n}", "event_type": kind, "item_id": item}
    if actor.startswith("session:"):
        fields["session_id"] = actor.removeprefix("session:")
    else:
        fields["user_id"] = actor
    return Event(namespace=ns, **fields, **extra)


async def apply(settings: Settings, events: list[Event]) -> None:
    """Events applied exactly as the window agent applies them (agents.state.HotStore)."""
    client = aioredis.from_url(settings.redis_url)
    try:
        await RedisHotStore(client, settings).apply(events)
    finally:
        await client.aclose()


@asynccontextmanager
async def ranker_for(
    settings: Settings, catalog: ItemCatalog | None = None
) -> AsyncIterator[Ranker]:
    client = aioredis.from_url(settings.redis_url)
    try:
        async with async_client(settings, "dynamodb") as dynamodb:
            ranker = Ranker(client, DynamoWindows(dynamodb, settings), settings, catalog=catalog)
            try:
                yield ranker
            finally:
                await ranker.aclose()
    finally:
        await client.aclose()


async def get(url: str, path: str, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await client.get(path, params=params)


async def post(url: str, path: str, body: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await client.post(path, json=body)
