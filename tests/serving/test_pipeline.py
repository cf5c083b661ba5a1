"""The ranking pipeline against real Redis and moto's DynamoDB, with models published
through training's real publish path: every source reaches the answer and scores as its
offline model does; seen policies, hooks, the durable fallback and degradation."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from recstream.aws import async_client
from recstream.keys import Keys
from recstream.model_restore import RegistryRestorer
from recstream.settings import Settings
from recstream.windows import DynamoWindows, MemoryDurableWindows, WindowEntry
from serving.pipeline import Ranker, Recommendations
from serving.pipeline.candidates import Sources
from serving.pipeline.models import Published
from streams.schema import Item
from tests.conftest import LocalStack, make_settings
from tests.serving.helpers import (
    WEIGHTS,
    apply,
    event,
    fitted,
    publish,
    ranker_for,
    roomy,
    two_clusters,
)
from training.models import Blend, ItemToItem, RecentlyViewed


async def test_every_published_source_is_served_and_scores_like_the_offline_blend(
    local_stack: LocalStack,
) -> None:
    settings = roomy(local_stack)
    ns, keys = settings.namespace, Keys(settings.namespace)
    log = two_clusters()
    models = fitted(log)
    await publish(settings, models.values(), log)
    await apply(settings, [event(1, "newbie", "b1", ns, "click"), event(2, "newbie", "b2", ns)])
    client = aioredis.from_url(settings.redis_url)
    try:
        # Live popularity would (rightly) outrank the published list; drop it so both
        # sides score the same data.
        await client.delete(keys.popularity)
    finally:
        await client.aclose()
    async with ranker_for(settings) as ranker:
        await ranker.warm(ns)
        result = await ranker.recommend(ns, "newbie", 20, debug=True)
    assert result.degraded == []
    assert result.debug is not None
    sources = result.debug["sources"]
    for name in WEIGHTS:
        assert sources[name]["candidates"] > 0, (name, sources[name])
    assert sources["sknn"]["origin"].startswith("published:")
    assert sources["trending"]["origin"].startswith("published:")
    assert result.debug["weights"] == WEIGHTS  # the published blend's, not the defaults

    blend = models["blend"]
    assert isinstance(blend, Blend)
    offline = blend.score_items(blend.codes(["b1", "b2"]))
    expected = {
        str(blend.item_ids[i]): float(offline[i]) for i in np.flatnonzero(np.isfinite(offline))
    }
    served = {r.item_id: r.score for r in result.items}
    assert served.keys() == expected.keys()
    for item, score in expected.items():
        assert math.isclose(served[item], score, rel_tol=1e-4, abs_tol=1e-6), item
    assert [r.item_id for r in result.items][:4] == [i for i, _ in blend.recommend(["b1", "b2"], 4)]


async def test_each_source_matches_its_offline_model(local_stack: LocalStack) -> None:
    settings = roomy(local_stack)
    ns = settings.namespace
    log = two_clusters()
    models = fitted(log)
    await publish(settings, models.values(), log)
    history = ["a1", "b2", "a1", "a3"]
    async with ranker_for(settings) as ranker:
        await ranker.warm(ns)
        versions = ranker.models.loaded_versions(ns)
        loaded = {
            name: await ranker.models.get(ns, name, versions.get(name), 5.0) for name in versions
        }
        repeat = Sources.repeat(history, loaded["recently_viewed"])
        i2i = await ranker.sources.item2item(
            ns, history, versions["item2item"], loaded["item2item"], None, 100
        )
        sknn = Sources.sknn(history, loaded["sknn"], None, 100)
        als = Sources.als(history, {}, loaded["als"], None, 100)

    def offline(name: str) -> dict[str, float]:
        return dict(models[name].recommend(history, 100))  # type: ignore[attr-defined]

    for name, served in (
        ("recently_viewed", repeat.scores),
        ("item2item", i2i.scores),
        ("sknn", sknn.scores),
        ("als", als.scores),
    ):
        want = offline(name)
        assert served.keys() == want.keys(), name
        for item, score in want.items():
            assert math.isclose(served[item], score, rel_tol=1e-4, abs_tol=1e-6), (name, item)
    assert i2i.because_of is not None
    assert i2i.because_of(["a2"])["a2"] in {"a1", "a3"}


async def test_recently_viewed_last_weight_is_applied(local_stack: LocalStack) -> None:
    model = RecentlyViewed(decay=0.5, last_weight=0.01).fit(two_clusters())
    published = Published("recently_viewed", "v", dict(model.params()))
    served = Sources.repeat(["a1", "a2", "a1", "a3"], published).scores
    assert served == dict(model.recommend(["a1", "a2", "a1", "a3"], 10))
    assert served["a3"] == 0.01


async def test_an_empty_install_answers_with_nothing_and_no_error(
    local_stack: LocalStack,
) -> None:
    settings = roomy(local_stack)
    ns = settings.namespace
    async with ranker_for(settings) as ranker:
        for result in (
            await ranker.recommend(ns, "anyone", 10),
            await ranker.recommend(ns, "session:abc", 10),
            await ranker.related(ns, "unknown-item", 10),
            await ranker.rerank(ns, "anyone", ["x", "y"]),
            await ranker.trending(ns, "1h", None, 10),
        ):
            assert result.degraded == []
    assert [r.item_id for r in (await _rerank(settings, ["x", "y", "x"])).items] == ["x", "y"]


async def _rerank(settings: Settings, items: Sequence[str]) -> Recommendations:
    async with ranker_for(settings) as ranker:
        return await ranker.rerank(settings.namespace, "anyone", items)


async def test_seen_policies(local_stack: LocalStack) -> None:
    log = two_clusters()
    answers: dict[str, list[str]] = {}
    for policy in ("keep", "demote", "exclude"):
        settings = roomy(local_stack, seen_policy={"other": "keep", "default": policy})
        ns = settings.namespace
        await publish(settings, [fitted(log)["item2item"]], log)
        await apply(settings, [event(1, "u", "a1", ns), event(2, "u", "a2", ns)])
        async with ranker_for(settings) as ranker:
            result = await ranker.recommend(ns, "u", 10)
            answers[policy] = [r.item_id for r in result.items]
            reranked = await ranker.rerank(ns, "u", ["a1", "a3", "zz"])
            assert sorted(r.item_id for r in reranked.items) == ["a1", "a3", "zz"]
            if policy != "keep":
                assert [r.item_id for r in reranked.items][-1] == "a1"
    assert answers["keep"][0] in {"a1", "a2"}
    assert set(answers["keep"]) >= {"a1", "a2", "a3", "a4"}
    assert answers["demote"][-2:] == sorted(answers["demote"][-2:], key=answers["keep"].index)
    assert set(answers["demote"][-2:]) == {"a1", "a2"}
    assert "a1" not in answers["exclude"]
    assert "a2" not in answers["exclude"]
    assert set(answers["exclude"]) >= {"a3", "a4"}


async def test_the_exclude_parameter_always_drops_items(local_stack: LocalStack) -> None:
    settings = roomy(local_stack)
    ns = settings.namespace
    await apply(settings, [event(n, f"c{n}", f"p{n % 4}", ns) for n in range(12)])
    async with ranker_for(settings) as ranker:
        result = await ranker.recommend(ns, "x", 10, frozenset({"p0", "p2"}))
    assert [r.item_id for r in result.items] == ["p1", "p3"]


class Catalog:
    """An in-memory `ItemCatalog` (the hook the catalog store plugs into)."""

    def __init__(self, items: Mapping[str, Item]) -> None:
        self.data = dict(items)
        self.calls = 0

    async def items(self, namespace: str, item_ids: Sequence[str]) -> Mapping[str, Item]:
        self.calls += 1
        return {i: self.data[i] for i in item_ids if i in self.data}

    def cached_items(self, namespace: str, item_ids: Sequence[str]) -> Mapping[str, Item] | None:
        return None  # nothing is cached: every read goes through `items`


class NotTheseTitles:
    """A `CandidateFilter`: EXCLUDE items whose title is among the filter value's."""

    def allows(
        self,
        item_id: str,
        item: Item | None,
        window: Sequence[WindowEntry],
        values: Mapping[str, str],
    ) -> bool:
        return item is None or item.title not in values["TITLES"].split(",")


async def test_catalog_category_popularity_filters_and_metadata(local_stack: LocalStack) -> None:
    settings = roomy(local_stack)
    ns = settings.namespace
    log = two_clusters()
    models = fitted(log, {"recently_viewed": 1.0, "category_popularity": 1.0})
    await publish(settings, [models["popularity"], models["blend"]], log)
    catalog = Catalog(
        {
            **{f"a{i}": Item(item_id=f"a{i}", categories=["u"], title=f"A{i}") for i in range(5)},
            **{f"b{i}": Item(item_id=f"b{i}", categories=["v"], title=f"B{i}") for i in range(5)},
            "hit": Item(item_id="hit", categories=["w"], title="Hit"),
        }
    )
    await apply(settings, [event(1, "shopper", "b1", ns)])
    async with ranker_for(settings) as ranker:
        ranker.catalog = catalog
        result = await ranker.recommend(ns, "shopper", 10, debug=True)
        filtered = await ranker.recommend(
            ns, "shopper", 2, item_filter=NotTheseTitles(), filter_values={"TITLES": "B1,B2"}
        )
    assert result.degraded == []
    ranked = [r.item_id for r in result.items]
    assert ranked[:4] == ["b1", "b2", "b3", "b4"]
    by_id = {r.item_id: r for r in result.items}
    assert by_id["b2"].reasons[0] == "popular_in:v"
    assert by_id["b2"].item is not None
    assert by_id["b2"].as_json()["title"] == "B2"
    assert by_id["b2"].as_json()["categories"] == ["v"]
    # the filter applies before the list is cut: still two items
    assert [r.item_id for r in filtered.items] == ["b3", "b4"]


async def test_category_popularity_from_feature_affinities(local_stack: LocalStack) -> None:
    settings = roomy(local_stack)
    ns, keys = settings.namespace, Keys(settings.namespace)
    log = two_clusters()
    models = fitted(log, {"category_popularity": 1.0})
    await publish(settings, [models["popularity"], models["blend"]], log)
    client = aioredis.from_url(settings.redis_url)
    try:
        now = time.time()
        # what agents/features writes: decayed affinities "score@ts"
        await client.hset(keys.features("fan"), mapping={"n": "3", "a:cat:v": f"2.5@{now}"})
    finally:
        await client.aclose()
    async with ranker_for(settings) as ranker:
        result = await ranker.recommend(ns, "fan", 4)
    assert {r.item_id for r in result.items} == {"b1", "b2", "b3", "b4"}
    assert all(r.reasons == ("popular_in:v",) for r in result.items)


async def test_diversity_cap_per_category(local_stack: LocalStack) -> None:
    settings = roomy(local_stack, diversity_category_cap=1)
    ns = settings.namespace
    await apply(
        settings,
        [event(n, f"c{n}", item, ns) for n, item in enumerate(["a1"] * 5 + ["a2"] * 4 + ["b1"])],
    )
    catalog = Catalog(
        {i: Item(item_id=i, categories=[i[0]]) for i in ("a1", "a2", "b1")},
    )
    async with ranker_for(settings) as ranker:
        ranker.catalog = catalog
        result = await ranker.recommend(ns, "x", 3)
    assert [r.item_id for r in result.items] == ["a1", "b1", "a2"]


async def test_a_click_changes_recommendations_and_is_measured_for_freshness(
    local_stack: LocalStack,
) -> None:
    settings = roomy(local_stack)
    ns = settings.namespace
    await apply(settings, [event(n, f"crowd{n}", f"pop{n % 3}", ns) for n in range(30)])

    def freshness_count() -> float:
        return REGISTRY.get_sample_value("recstream_freshness_seconds_count") or 0.0

    async with ranker_for(settings) as ranker:
        before = await ranker.recommend(ns, "alice", 5)
        assert [r.item_id for r in before.items][:3] == ["pop0", "pop1", "pop2"]
        assert before.items[0].reasons == ("popular",)
        counted = freshness_count()
        await apply(settings, [event(1, "alice", "niche", ns, "click")])
        after = await ranker.recommend(ns, "alice", 5)
        assert freshness_count() == counted + 1
        again = await ranker.recommend(ns, "alice", 5)
        assert freshness_count() == counted + 1  # only the first response that reflects it
        await ranker.served.drain()
        client = aioredis.from_url(settings.redis_url)
        try:
            raw = await client.get(Keys(ns).served(after.recommendation_id))
            ttl = await client.ttl(Keys(ns).served(after.recommendation_id))
        finally:
            await client.aclose()
    assert after.items[0].item_id == "niche"
    assert "recently_interacted" in after.items[0].reasons
    assert again.items[0].item_id == "niche"
    assert after.degraded == []
    assert raw is not None
    served = orjson.loads(raw)
    assert served["actor"] == "alice"
    assert served["items"] == [r.item_id for r in after.items]
    assert served["strategy"] == "recommendations"
    assert set(served) == {"actor", "strategy", "variant", "items", "ts", "context"}
    assert 0 < ttl <= settings.attribution_window_s


async def test_trending_reads_the_agents_lists(local_stack: LocalStack) -> None:
    settings = roomy(local_stack)
    ns, keys = settings.namespace, Keys(settings.namespace)
    client = aioredis.from_url(settings.redis_url)
    try:
        await client.zadd(keys.trending("1h"), {"hot": 9.0, "warm": 3.0, "cool": -1.0})
        await client.zadd(keys.trending("24h"), {"steady": 5.0})
        await client.zadd(keys.trending("1h", "shoes"), {"boot": 4.0})
    finally:
        await client.aclose()
    async with ranker_for(settings) as ranker:
        hour = await ranker.trending(ns, "1h", None, 2)
        day = await ranker.trending(ns, "24h", None, 5)
        shoes = await ranker.trending(ns, "1h", "shoes", 5)
        # trending is also a candidate source of recommendations (default weights)
        rec = await ranker.recommend(ns, "someone", 5)
    assert [(r.item_id, r.reasons) for r in hour.items] == [
        ("hot", ("trending",)),
        ("warm", ("trending",)),
    ]
    assert [r.item_id for r in day.items] == ["steady"]
    assert [r.item_id for r in shoes.items] == ["boot"]
    assert "trending" in rec.items[0].reasons


async def test_related_items(local_stack: LocalStack) -> None:
    settings = roomy(local_stack)
    ns = settings.namespace
    log = two_clusters()
    models = fitted(log)
    await publish(settings, models.values(), log)
    async with ranker_for(settings) as ranker:
        await ranker.warm(ns)
        related = await ranker.related(ns, "a1", 3, debug=True)
        unknown = await ranker.related(ns, "never-seen", 3)
    i2i = models["item2item"]
    assert isinstance(i2i, ItemToItem)
    assert {r.item_id for r in related.items} == {"a2", "a3", "a4"}
    assert "similar_to:a1" in related.items[0].reasons
    assert related.debug is not None
    assert "a1" not in {c["item_id"] for c in related.debug["candidates"]}
    assert unknown.items
    assert all(r.reasons == ("popular",) for r in unknown.items)
    assert unknown.items[0].item_id == "hit"


async def test_a_lost_redis_window_is_restored_from_dynamodb(local_stack: LocalStack) -> None:
    settings = roomy(local_stack)
    ns, keys = settings.namespace, Keys(settings.namespace)
    client = aioredis.from_url(settings.redis_url)
    try:
        async with async_client(settings, "dynamodb") as dynamodb:
            durable = DynamoWindows(dynamodb, settings)
            await durable.put({(ns, "bob"): [WindowEntry("kept", "click", 1_700_000_000.0, "e1")]})
            ranker = Ranker(client, durable, settings)
            try:
                result = await ranker.recommend(ns, "bob", 5)
                assert result.items[0].item_id == "kept"
                assert result.degraded == []
                for _ in range(200):  # the repair runs in the background
                    if await client.exists(keys.window("bob")):
                        break
                    await asyncio.sleep(0.02)
                assert await client.llen(keys.window("bob")) == 1
            finally:
                await ranker.aclose()
    finally:
        await client.aclose()


class CountingDurable(MemoryDurableWindows):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get(self, namespace: str, actor: str) -> list[WindowEntry] | None:
        self.reads += 1
        return await super().get(namespace, actor)


async def test_new_visitors_cost_one_durable_read_and_are_not_degraded(
    local_stack: LocalStack,
) -> None:
    settings = roomy(local_stack)
    ns = settings.namespace
    durable = CountingDurable()
    client = aioredis.from_url(settings.redis_url)
    ranker = Ranker(client, durable, settings)
    try:
        for _ in range(5):
            result = await ranker.recommend(ns, "newcomer", 5)
            assert result.degraded == []
        assert durable.reads == 1
        await apply(settings, [event(1, "newcomer", "first-click", ns, "click")])
        result = await ranker.recommend(ns, "newcomer", 5)
        assert result.items[0].item_id == "first-click"  # Redis is still read first
    finally:
        await ranker.aclose()
        await client.aclose()


class SlowDurable(MemoryDurableWindows):
    async def get(self, namespace: str, actor: str) -> list[WindowEntry] | None:
        await asyncio.sleep(5)
        return await super().get(namespace, actor)


async def test_a_slow_durable_store_is_skipped_and_named(local_stack: LocalStack) -> None:
    settings = make_settings(
        local_stack, ranking_budget_ms=2000.0, store_timeout_ms=1000.0, source_timeout_ms=300.0
    )
    client = aioredis.from_url(settings.redis_url)
    ranker = Ranker(client, SlowDurable(), settings)
    try:
        result = await ranker.recommend(settings.namespace, "newcomer", 5)
    finally:
        await ranker.aclose()
        await client.aclose()
    assert "durable_window" in result.degraded


async def test_unreachable_redis_degrades_instead_of_failing(local_stack: LocalStack) -> None:
    settings = make_settings(local_stack)
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.05)
    ranker = Ranker(client, MemoryDurableWindows(), settings)
    try:
        result = await ranker.recommend(settings.namespace, "carol", 5)
        related = await ranker.related(settings.namespace, "x", 5)
        trending = await ranker.trending(settings.namespace, "1h", None, 5)
    finally:
        await ranker.aclose()
        await client.aclose()
    assert result.items == []
    assert "window" in result.degraded
    assert "popularity" in result.degraded
    assert related.degraded
    assert trending.degraded


async def test_warm_makes_the_store_calls_a_first_request_would_wait_for(
    local_stack: LocalStack,
) -> None:
    """A start makes the first DynamoDB and S3 calls (which hold the event loop while
    botocore resolves endpoints) before any request: a read of an actor no event names,
    and the check for lost model pointers that a request finding one missing starts."""
    settings = make_settings(local_stack)
    ns = settings.namespace
    asked: list[tuple[str, str]] = []
    checked: list[str] = []

    class Recording(MemoryDurableWindows):
        async def get(self, namespace: str, actor: str) -> list[WindowEntry] | None:
            asked.append((namespace, actor))
            return await super().get(namespace, actor)

    class Counting(RegistryRestorer):
        async def check(self, namespace: str) -> dict[str, str]:
            checked.append(namespace)
            return await super().check(namespace)

    client = aioredis.from_url(settings.redis_url)
    try:
        async with async_client(settings, "s3") as s3:
            ranker = Ranker(client, Recording(), settings)
            ranker.models.restorer = Counting(client, s3, settings)
            try:
                served: list[str | None] = []
                record = ranker.served.record

                def recording(namespace: str, rid: str, *, actor: str | None, **kw: Any) -> None:
                    served.append(actor)
                    record(namespace, rid, actor=actor, **kw)

                ranker.served.record = recording  # type: ignore[method-assign,assignment]
                assert not ranker.warmed
                await ranker.warm(ns)
                assert ranker.warmed
                # the direct read, then the warm-up answer's own (its window is empty)
                assert asked == [(ns, "recstream:warm-up")] * 2
                assert checked == [ns]
                # the warm-up made a whole answer and logged none: nobody was shown it.
                # The live lists it found empty are not kept: an event now is served now.
                assert served == []
                assert len(ranker.sources.lists) == 0
                await client.zadd(Keys(ns).popularity, {"just-clicked": 1.0})
                # no model is published, so every pointer is missing: the first request
                # does not start the check again
                result = await ranker.recommend(ns, "someone", 5)
                assert result.degraded == []
                assert [r.item_id for r in result.items] == ["just-clicked"]
                assert served == ["someone"]
                await asyncio.sleep(0.05)
                assert checked == [ns]
            finally:
                await ranker.aclose()
    finally:
        await client.aclose()
