"""Published item-to-item neighbours reach the ranking, from the current version only."""

from __future__ import annotations

import redis.asyncio as aioredis

from agents.state import MemoryDurableWindows, RedisHotStore
from recstream.keys import Keys
from recstream.settings import Settings
from serving.candidates import ITEM2ITEM, PublishedModels
from serving.ranking import Ranker
from streams.schema import Event


async def publish_by_hand(
    client: aioredis.Redis, keys: Keys, version: str, nbrs: dict[str, dict[str, float]]
) -> None:
    for item, neighbours in nbrs.items():
        await client.zadd(keys.model(ITEM2ITEM, version, f"nbr:{item}"), neighbours)
    await client.set(keys.model_pointer(ITEM2ITEM), version)


async def test_neighbours_of_recent_items_are_recommended_and_explained(settings: Settings) -> None:
    ns, keys = settings.namespace, Keys(settings.namespace)
    client = aioredis.from_url(settings.redis_url)
    try:
        hot = RedisHotStore(client, settings)
        ranker = Ranker(hot, MemoryDurableWindows(), settings, PublishedModels(client))
        await publish_by_hand(
            client,
            keys,
            "v1",
            {"toy-story": {"toy-story-2": 0.9, "bugs-life": 0.5}, "alien": {"aliens": 0.8}},
        )
        await hot.apply(
            [Event(event_type="click", user_id="kid", item_id="toy-story", namespace=ns)]
        )
        result = await ranker.recommend(ns, "kid", 5)
        ranked = [r.item_id for r in result.items]
        assert ranked[:3] == ["toy-story", "toy-story-2", "bugs-life"]
        assert result.items[1].reasons == ("similar_to:toy-story",)
        assert "aliens" not in ranked

        # A rollback (pointer flip) changes the neighbours served.
        await publish_by_hand(client, keys, "v0", {"toy-story": {"cars": 0.7}})
        again = [r.item_id for r in (await ranker.recommend(ns, "kid", 5)).items]
        assert "cars" in again
        assert "toy-story-2" not in again
    finally:
        await client.aclose()


async def test_no_published_model_means_no_similar_candidates(settings: Settings) -> None:
    client = aioredis.from_url(settings.redis_url)
    try:
        models = PublishedModels(client)
        assert await models.neighbours(settings.namespace, [("x", 1.0)]) == []
    finally:
        await client.aclose()


async def test_a_zero_weight_source_is_explained_not_a_crash(settings: Settings) -> None:
    keys = Keys(settings.namespace)
    client = aioredis.from_url(settings.redis_url)
    try:
        await publish_by_hand(client, keys, "v1", {"seen": {"other": 0.5}})
        found = await PublishedModels(client).neighbours(settings.namespace, [("seen", 0.0)])
    finally:
        await client.aclose()
    assert [(n.item_id, n.score, n.because) for n in found] == [("other", 0.0, "seen")]
