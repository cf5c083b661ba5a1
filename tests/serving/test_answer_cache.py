"""The answer cache (serving/pipeline/memo.py) against real Redis and moto: an unchanged
request is served again under its own recommendation id and logged; any change to the
actor's live state, the model versions or the parameters computes a new answer; debug,
filtered and degraded answers are never kept; a kept answer expires. And the served log
every answer writes: one round trip a batch, answers within its linger in one."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from recstream.keys import Keys
from recstream.settings import Settings
from recstream.windows import WindowEntry
from serving.pipeline import log as log_module
from serving.pipeline.memo import AnswerCache
from streams.schema import Item
from tests.conftest import LocalStack
from tests.serving.helpers import apply, event, fitted, publish, ranker_for, roomy, two_clusters
from training.data import InteractionLog
from training.models import ItemToItem


def counted(result: str) -> float:
    return REGISTRY.get_sample_value("recstream_answer_cache_total", {"result": result}) or 0.0


def ids(answer: Any) -> list[str]:
    return [r.item_id for r in answer.items]


async def published(
    local_stack: LocalStack, actor: str, *items: str
) -> tuple[Settings, InteractionLog]:
    """Fresh settings with every model fitted on `two_clusters` published, and ``actor``'s
    views of ``items`` applied."""
    settings = roomy(local_stack)
    log = two_clusters()
    await publish(settings, fitted(log).values(), log)
    await apply(
        settings, [event(n, actor, item, settings.namespace) for n, item in enumerate(items, 1)]
    )
    return settings, log


async def test_an_unchanged_request_is_served_again_under_its_own_id(
    local_stack: LocalStack,
) -> None:
    settings, _ = await published(local_stack, "ann", "a1", "a2")
    ns = settings.namespace
    async with ranker_for(settings) as ranker:
        hits, misses = counted("hit"), counted("miss")
        first = await ranker.recommend(ns, "ann", 5)
        second = await ranker.recommend(ns, "ann", 5)
        assert (counted("hit") - hits, counted("miss") - misses) == (1, 1)
        assert ids(first)
        assert ids(second) == ids(first)
        assert [r.reasons for r in second.items] == [r.reasons for r in first.items]
        assert second.recommendation_id != first.recommendation_id
        assert second.degraded == []
        await ranker.served.drain()
        client = aioredis.from_url(settings.redis_url)
        try:
            logged = [
                await client.get(Keys(ns).served(a.recommendation_id)) for a in (first, second)
            ]
        finally:
            await client.aclose()
        # attribution sees both answers, as two impressions
        assert all(raw is not None for raw in logged)

        # every parameter is part of the key
        hits = counted("hit")
        await ranker.recommend(ns, "ann", 4)
        await ranker.recommend(ns, "ann", 5, frozenset({ids(first)[0]}))
        await ranker.recommend(ns, "ann", 5, context={"device": "mobile"})
        await ranker.recommend(ns, "bob", 5)
        await ranker.rerank(ns, "ann", ["a3", "b1"])
        assert counted("hit") == hits
        await ranker.recommend(ns, "ann", 5, context={"device": "mobile"})
        assert counted("hit") == hits + 1


async def test_a_click_or_a_promote_computes_a_new_answer(local_stack: LocalStack) -> None:
    settings, log = await published(local_stack, "cat", "a1")
    ns = settings.namespace
    async with ranker_for(settings) as ranker:
        before = await ranker.recommend(ns, "cat", 5)
        assert "b1" not in ids(before)[:1]
        await apply(settings, [event(2, "cat", "b1", ns, "click")])
        hits = counted("hit")
        after = await ranker.recommend(ns, "cat", 5)
        assert counted("hit") == hits
        assert "b1" in ids(after)  # the click is in the very next answer

        # a new version of one model changes the pointers read with the state
        await publish(settings, [ItemToItem(window=2).fit(log)], log)
        promoted = await ranker.recommend(ns, "cat", 5)
        assert counted("hit") == hits
        again = await ranker.recommend(ns, "cat", 5)
        assert counted("hit") == hits + 1
        assert ids(again) == ids(promoted)


class RefuseAll:
    def allows(
        self,
        item_id: str,
        item: Item | None,
        window: Sequence[WindowEntry],
        values: Mapping[str, str],
    ) -> bool:
        return False


async def test_debug_filtered_and_degraded_answers_are_never_kept(
    local_stack: LocalStack,
) -> None:
    settings, _ = await published(local_stack, "dee", "a1")
    ns = settings.namespace
    async with ranker_for(settings) as ranker:
        hits = counted("hit")
        for _ in range(2):
            assert (await ranker.recommend(ns, "dee", 5, debug=True)).debug is not None
            assert (await ranker.recommend(ns, "dee", 5, item_filter=RefuseAll())).items == []
        assert counted("hit") == hits
        assert len(ranker.answers) == 0

    # a store that misses its deadline: the degraded answer is not kept
    tight = roomy(local_stack, source_timeout_ms=1e-6)
    async with ranker_for(tight) as ranker:
        first = await ranker.recommend(ns, "dee", 5)
        assert first.degraded
        assert len(ranker.answers) == 0


async def test_a_kept_answer_expires_and_zero_turns_the_cache_off(
    local_stack: LocalStack,
) -> None:
    settings = roomy(local_stack)
    ns = settings.namespace
    await apply(settings, [event(n, f"crowd{n}", f"pop{n % 3}", ns) for n in range(9)])
    now = [1000.0]
    async with ranker_for(settings) as ranker:
        ranker.answers = AnswerCache(1.0, 100, clock=lambda: now[0])
        await ranker.recommend(ns, "eve", 3)
        hits = counted("hit")
        now[0] += 0.5
        await ranker.recommend(ns, "eve", 3)
        assert counted("hit") == hits + 1
        now[0] += 1.0
        await ranker.recommend(ns, "eve", 3)
        assert counted("hit") == hits + 1

    off = roomy(local_stack, answer_cache_ttl_s=0)
    async with ranker_for(off) as ranker:
        assert not ranker.answers.enabled
        hits = counted("hit")
        for _ in range(3):
            await ranker.recommend(ns, "eve", 3)
        assert counted("hit") == hits
        assert len(ranker.answers) == 0


async def test_the_served_log_needs_no_script_check_and_survives_a_script_flush(
    local_stack: LocalStack,
) -> None:
    """Each batch of the served log is one round trip (no ``SCRIPT EXISTS`` before it), and
    a Redis that lost its scripts gets the batch again after one ``SCRIPT LOAD``."""
    settings = roomy(local_stack)
    ns, keys = settings.namespace, Keys(settings.namespace)
    await apply(settings, [event(n, f"crowd{n}", f"pop{n % 3}", ns) for n in range(9)])
    client = aioredis.from_url(settings.redis_url)

    async def checks() -> int:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))

    try:
        async with ranker_for(settings) as ranker:
            await client.script_flush()
            first = await ranker.recommend(ns, "fay", 3)
            await ranker.served.drain()
            before = await checks()
            answers = [await ranker.recommend(ns, f"guest{n}", 3) for n in range(5)]
            await ranker.served.drain()
            assert await checks() == before
            for answer in [first, *answers]:
                assert await client.get(keys.served(answer.recommendation_id)) is not None
            indexed = await client.zrange(keys.served_to("fay"), 0, -1)
            assert indexed == [first.recommendation_id.encode()]
    finally:
        await client.aclose()


async def test_answers_within_the_linger_share_one_round_trip(
    local_stack: LocalStack, monkeypatch: Any
) -> None:
    """The served log's flusher waits ``LINGER_S`` before its trip, so answers that follow
    within it are written with the first (without the wait, the first answer went alone
    as soon as the request yielded)."""
    monkeypatch.setattr(log_module, "LINGER_S", 1.0)  # (wide: the machine may be slow)
    settings = roomy(local_stack)
    ns, keys = settings.namespace, Keys(settings.namespace)
    await apply(settings, [event(n, f"crowd{n}", f"pop{n % 3}", ns) for n in range(9)])
    trips: list[int] = []
    async with ranker_for(settings) as ranker:
        write = ranker.served._write

        async def counting(batch: list[Any]) -> list[object]:
            trips.append(len(batch))
            return await write(batch)

        monkeypatch.setattr(ranker.served, "_write", counting)
        answers = [await ranker.recommend(ns, "ida", 3)]
        await asyncio.sleep(0.05)  # the flusher runs meanwhile: it lingers, then writes
        answers += [await ranker.recommend(ns, f"guest{n}", 3) for n in range(4)]
        await ranker.served.drain()
        client = aioredis.from_url(settings.redis_url)
        try:
            for answer in answers:
                assert await client.get(keys.served(answer.recommendation_id)) is not None
        finally:
            await client.aclose()
    # (a Redis that has not seen the script yet gets the batch a second time, after the
    # SCRIPT LOAD: the trip is the first one)
    assert trips[0] == 5


async def test_answers_during_a_trip_wait_for_the_next_linger_together(
    local_stack: LocalStack, monkeypatch: Any
) -> None:
    """The flusher lingers before every trip, not only its first: an answer given while
    a trip is in flight waits ``LINGER_S`` after that trip for company. (It went alone as
    soon as the trip ended, so under steady load almost every trip carried one record.)"""
    monkeypatch.setattr(log_module, "LINGER_S", 0.5)  # (wide: the machine may be slow)
    settings = roomy(local_stack)
    ns = settings.namespace
    await apply(settings, [event(n, f"crowd{n}", f"pop{n % 3}", ns) for n in range(9)])
    batches: list[list[str]] = []
    async with ranker_for(settings) as ranker:
        write = ranker.served._write

        async def slow(batch: list[Any]) -> list[object]:
            batches.append([e.recommendation_id for e in batch])
            await asyncio.sleep(0.5)  # a trip in flight for a while
            return await write(batch)

        monkeypatch.setattr(ranker.served, "_write", slow)
        first = await ranker.recommend(ns, "ida", 3)  # trip 1 leaves at ~0.5 s, ends ~1.0
        await asyncio.sleep(0.7)
        during = await ranker.recommend(ns, "guest1", 3)  # while trip 1 is in flight
        await asyncio.sleep(0.5)
        after = await ranker.recommend(ns, "guest2", 3)  # in the linger after trip 1
        await ranker.served.drain()
    ids = (first.recommendation_id, during.recommendation_id, after.recommendation_id)
    # (a Redis new to the script gets the first batch twice, after its SCRIPT LOAD)
    assert [ids[0]] in batches
    assert [ids[1], ids[2]] in batches
