"""GET /v1/recommendations on a real server: live windows change the answer; slow or
missing stores degrade it instead of failing it."""

from __future__ import annotations

import asyncio

import httpx
import redis.asyncio as aioredis

from agents.state import (
    DynamoWindows,
    MemoryDurableWindows,
    MemoryHotStore,
    RedisHotStore,
    WindowEntry,
)
from recstream.aws import async_client
from recstream.keys import Keys
from recstream.settings import Settings
from serving.ranking import Ranker
from streams.schema import Event
from tests.conftest import RunningApi


def view(n: int, user: str, item: str, namespace: str, kind: str = "view") -> Event:
    return Event(
        event_id=f"{user}-{n}", event_type=kind, user_id=user, item_id=item, namespace=namespace
    )


async def recommend(api: RunningApi, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        return await client.get("/v1/recommendations", params=params)


async def test_a_click_changes_the_users_recommendations(api: RunningApi) -> None:
    ns = api.settings.namespace
    client = aioredis.from_url(api.settings.redis_url)
    try:
        hot = RedisHotStore(client, api.settings)
        crowd = [view(n, f"crowd{n}", f"pop{n % 3}", ns) for n in range(30)]
        await hot.apply(crowd)
        before = (await recommend(api, user_id="alice", num_results="5")).json()
        assert [i["item_id"] for i in before["items"]][:3] == ["pop0", "pop1", "pop2"]
        assert before["items"][0]["reasons"] == ["popular"]

        await hot.apply([view(1, "alice", "niche", ns, kind="click")])
        after = (await recommend(api, user_id="alice", num_results="5")).json()
    finally:
        await client.aclose()
    assert after["items"][0]["item_id"] == "niche"
    assert "recently_interacted" in after["items"][0]["reasons"]
    assert after["recommendation_id"] != before["recommendation_id"]
    assert after["degraded"] == []


async def test_purchased_items_are_not_recommended_again(settings: Settings) -> None:
    hot = MemoryHotStore(settings)
    ns = settings.namespace
    await hot.apply([view(1, "u", "bought", ns, "purchase"), view(2, "u", "looked", ns)])
    result = await Ranker(hot, MemoryDurableWindows(), settings).recommend(ns, "u", 10)
    assert [r.item_id for r in result.items] == ["looked"]


async def test_lost_redis_window_is_restored_from_dynamodb(settings: Settings) -> None:
    ns = settings.namespace
    client = aioredis.from_url(settings.redis_url)
    try:
        async with async_client(settings, "dynamodb") as dynamodb:
            hot, durable = RedisHotStore(client, settings), DynamoWindows(dynamodb, settings)
            await durable.put({(ns, "bob"): [WindowEntry("kept", "click", 1_700_000_000.0, "e1")]})
            assert await client.exists(Keys(ns).window("bob")) == 0
            result = await Ranker(hot, durable, settings).recommend(ns, "bob", 5)
            assert result.items[0].item_id == "kept"
            for _ in range(100):  # the repair runs in the background, off the request path
                if await client.exists(Keys(ns).window("bob")):
                    break
                await asyncio.sleep(0.02)
            assert [e.item_id for e in await hot.window(ns, "bob")] == ["kept"]
    finally:
        await client.aclose()


async def test_unreachable_redis_degrades_instead_of_failing(settings: Settings) -> None:
    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    client = aioredis.from_url(broken.redis_url, socket_connect_timeout=0.05)
    try:
        ranker = Ranker(RedisHotStore(client, broken), MemoryDurableWindows(), broken)
        result = await ranker.recommend(settings.namespace, "carol", 5)
    finally:
        await client.aclose()
    assert result.items == []
    assert set(result.degraded) >= {"window", "popularity"}


async def test_bad_requests_say_what_to_fix(api: RunningApi) -> None:
    missing = await recommend(api)
    assert missing.status_code == 422
    assert "user_id" in missing.json()["error"]["message"]
    bad = await recommend(api, user_id="u", num_results="lots")
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "bad_num_results"


class CountingDurable(MemoryDurableWindows):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get(self, namespace: str, actor: str) -> list[WindowEntry] | None:
        self.reads += 1
        return await super().get(namespace, actor)


async def test_new_visitors_cost_one_durable_read_not_one_per_request(settings: Settings) -> None:
    hot, durable = MemoryHotStore(settings), CountingDurable()
    ranker = Ranker(hot, durable, settings)
    ns = settings.namespace
    for _ in range(5):
        await ranker.recommend(ns, "newcomer", 5)
    assert durable.reads == 1
    await hot.apply([view(1, "newcomer", "first-click", ns, "click")])
    result = await ranker.recommend(ns, "newcomer", 5)
    assert result.items[0].item_id == "first-click"  # the hot store is still read first


async def test_excluded_items_are_never_returned(api: RunningApi) -> None:
    ns = api.settings.namespace
    client = aioredis.from_url(api.settings.redis_url)
    try:
        await RedisHotStore(client, api.settings).apply(
            [view(n, f"c{n}", f"p{n % 4}", ns) for n in range(12)]
        )
    finally:
        await client.aclose()
    body = (await recommend(api, user_id="x", exclude="p0,p2")).json()
    assert [i["item_id"] for i in body["items"]] == ["p1", "p3"]


class SlowDurable(MemoryDurableWindows):
    async def get(self, namespace: str, actor: str) -> list[WindowEntry] | None:
        await asyncio.sleep(0.04)
        return await super().get(namespace, actor)


class SlowHot(MemoryHotStore):
    async def window(
        self, namespace: str, actor: str, limit: int | None = None
    ) -> list[WindowEntry]:
        await asyncio.sleep(0.04)
        return await super().window(namespace, actor, limit)


async def test_the_request_budget_bounds_the_sum_of_store_calls(settings: Settings) -> None:
    # Each store call is within its own 45 ms deadline, but the window read leaves too
    # little of the 50 ms budget for the DynamoDB fallback: it is skipped and named.
    tight = settings.model_copy(update={"store_timeout_ms": 45.0, "ranking_budget_ms": 50.0})
    ranker = Ranker(SlowHot(tight), SlowDurable(), tight)
    result = await ranker.recommend(settings.namespace, "newcomer", 5)
    assert "durable_window" in result.degraded
