"""User feature vectors, decayed popularity and trending from real events (Taobao), through
the real agent into real Redis and DynamoDB (moto), against a recomputation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from agents.app import build_agent
from agents.features import read_user_state
from agents.trending import WINDOWS, materialize
from agents.windows import WindowAgent, deliver
from recstream.decay import ForwardDecay
from recstream.features import parse_score
from recstream.keys import Keys
from recstream.settings import Settings
from recstream.stores import open_stores
from serving.pipeline.candidates import Sources
from streams.schema import Event
from tests.agents.streamdata import (
    SPANS,
    Expected,
    expected_trend,
    factors_of,
    hash_of,
    publish_als,
    recompute,
    snapshot,
    taobao,
    write_catalog,
    zscores,
)
from tests.conftest import LocalStack, make_settings

REL, ABS = 1e-9, 1e-12


@pytest.fixture
def roomy(local_stack: LocalStack) -> Settings:
    """Caps that the test data does not reach, so the recomputation needs no eviction."""
    return make_settings(local_stack, feature_cap=1000, window_size=20)


@asynccontextmanager
async def agent_of(settings: Settings) -> AsyncIterator[tuple[WindowAgent, aioredis.Redis]]:
    async with open_stores(settings) as stores:
        yield build_agent(stores, settings), stores.redis


async def feed(agent: WindowAgent, events: Sequence[Event], batch: int) -> None:
    for start in range(0, len(events), batch):
        chunk = [e.to_json() for e in events[start : start + batch]]
        await deliver(agent, chunk, "stream", max_attempts=2, max_delay=0.01)


async def check_against(
    redis: aioredis.Redis, settings: Settings, expected: Expected, embedding: bool
) -> None:
    ns = settings.namespace
    keys = Keys(ns)
    assert expected.features
    for actor, f in expected.features.items():
        state = await read_user_state(redis, settings, ns, actor, now=expected.clock)
        raw = await hash_of(redis, keys.features(actor))
        assert state.events == f.n
        assert dict(state.counts) == dict(f.counts)
        assert (state.first_ts, state.last_ts) == (f.first, f.last)
        assert state.session is not None
        assert (state.session.session_id, state.session.started, state.session.events) == (
            f.session,
            f.session_ts,
            f.session_n,
        )
        stored = {
            tuple(name.split(":", 2)[1:]): parse_score(value)
            for name, value in raw.items()
            if name.startswith("a:")
        }
        assert set(stored) == set(f.affinity), actor
        for key, (score, at) in f.affinity.items():
            assert stored[key][1] == at
            assert stored[key][0] == pytest.approx(score, rel=REL, abs=ABS)
            now = score * 2 ** (-(expected.clock - at) / settings.half_life(key[0]))
            assert state.affinities[key[0]][key[1]] == pytest.approx(now, rel=REL, abs=ABS)
        # the window: newest first, with context and impression
        entries = expected.windows.get(actor, [])
        assert [e.event_id for e in state.window] == [e.event_id for e in entries]
        for entry, event in zip(state.window, entries, strict=True):
            assert entry.impression == (tuple(event.impression) or None)
            assert entry.context == (dict(event.context) or None)
        if embedding and f.emb is not None:
            assert state.embedding is not None
            np.testing.assert_allclose(state.embedding, f.emb, rtol=1e-5, atol=1e-6)
            assert state.embedding_version == "v1"
        elif embedding:
            assert state.embedding is None
    # popularity: all-time, forward-decayed, per category
    pop = await zscores(redis, keys.popularity)
    assert pop == pytest.approx(dict(expected.popularity))
    decayed = await zscores(redis, keys.popularity_decayed)
    assert decayed == pytest.approx(dict(expected.decayed), rel=REL, abs=ABS)
    for main, counts in expected.decayed_cat.items():
        got = await zscores(redis, keys.popularity_category(main))
        assert got == pytest.approx(dict(counts), rel=REL, abs=ABS)
    # time buckets and the clock
    assert float((await hash_of(redis, keys.trend_clock))["t"]) == expected.clock
    window_of = {span: length for length, span in SPANS}
    for (span, start, cat), counts in expected.buckets.items():
        got = await zscores(redis, keys.counts_bucket(span, start, cat))
        if expected.clock >= start + 2 * window_of[span]:
            assert got == {}  # swept: no window reads it any more
        else:
            assert got == pytest.approx(dict(counts))
    # the materialized trends
    for window in WINDOWS:
        for category in [None, *expected.decayed_cat]:
            everything = expected_trend(
                expected, window.length_s, window.span_s, category, settings.trend_gamma
            )
            # at the cut, equal scores keep the larger ids (the sorted set's own order)
            ranked = sorted(everything.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
            want = dict(ranked[: settings.trend_cap])
            got = await zscores(redis, keys.trending(window.name, category))
            assert got == pytest.approx(want), (window, category)


async def test_every_piece_of_state_equals_a_recomputation(
    roomy: Settings, shared_data: Path
) -> None:
    events, catalog = taobao(shared_data, roomy.namespace, 1000)
    factors = factors_of([i.item_id for i in catalog])
    async with agent_of(roomy) as (agent, redis):
        await write_catalog(redis, roomy.namespace, catalog)
        await publish_als(redis, roomy.namespace, "v1", factors)
        await feed(agent, events, 500)
        assert await materialize(redis, roomy, roomy.namespace, lock=False)
        expected = recompute(events, {i.item_id: i for i in catalog}, roomy, factors)
        assert agent.totals.applied == expected.applied == len(events)
        await check_against(redis, roomy, expected, embedding=True)
        # negatives were really there and pulled affinities down
        negatives = [
            (actor, key)
            for actor, f in expected.features.items()
            for key, (score, _) in f.affinity.items()
            if score < 0
        ]
        assert negatives


async def test_live_trending_is_training_s_trending(roomy: Settings, shared_data: Path) -> None:
    """One trending score: the live lists rank as training's `Trending` at the window end,
    and the decayed popularity is training's `Popularity` times one constant."""
    from training.data import LogBuilder
    from training.models.popularity import Popularity
    from training.models.trending import Trending

    events, catalog = taobao(shared_data, roomy.namespace, 1000)
    async with agent_of(roomy) as (agent, redis):
        await write_catalog(redis, roomy.namespace, catalog)
        await feed(agent, events, 500)
        await materialize(redis, roomy, roomy.namespace, lock=False)
        builder = LogBuilder(roomy.event_weights)
        for event in events:
            assert event.item_id is not None
            builder.add(event.actor, event.item_id, event.timestamp, event.event_type)
        log = builder.build()
        clock = max(e.timestamp for e in events)
        for window in WINDOWS:
            offline = Trending(window_s=window.length_s, gamma=roomy.trend_gamma).fit(log)
            scores = offline.score_items(np.zeros(0, np.int32), now=window.end(clock))
            live = await zscores(redis, Keys(roomy.namespace).trending(window.name))
            assert live
            for item, score in live.items():
                code = int(np.flatnonzero(log.item_ids == item)[0])
                # training adds a tie-break of at most 1e-6
                assert scores[code] == pytest.approx(score, abs=2e-6)
        popularity = Popularity(half_life_days=roomy.popularity_half_life_s / 86400).fit(log)
        scale = 2 ** ((clock - roomy.popularity_epoch_s) / roomy.popularity_half_life_s)
        live_pop = await zscores(redis, Keys(roomy.namespace).popularity_decayed)
        for item, score in live_pop.items():
            code = int(np.flatnonzero(log.item_ids == item)[0])
            assert popularity.counts[code] * scale == pytest.approx(score, rel=1e-6)
        # and serving hands the ranker training's scale at the request's time (a learned
        # ranker splits on it; the forward-decayed one is ~1e-30 here, for 2017's clicks)
        sources = Sources(redis, 60.0, decay=ForwardDecay.of(roomy))
        served = await sources.popular(roomy.namespace, None, None, 50, clock)
        assert served.origin == "live:pop:decayed"
        assert len(served.scores) == 50
        for item, score in served.scores.items():
            code = int(np.flatnonzero(log.item_ids == item)[0])
            # the factor's minute: at most 2^(60 s / 30 days) apart
            assert popularity.counts[code] == pytest.approx(score, rel=2e-5)


async def test_sparse_live_traffic_equals_bulk_replay(
    local_stack: LocalStack, shared_data: Path
) -> None:
    """metarank#1620: single events, one batch each, with the materializer ticking in
    between, leave exactly the state a bulk replay leaves."""
    bulk = make_settings(local_stack, feature_cap=4)
    live = make_settings(local_stack, feature_cap=4)
    results = []
    for settings, batch in ((bulk, 80), (live, 1)):
        events, catalog = taobao(shared_data, settings.namespace, 80)
        async with agent_of(settings) as (agent, redis):
            await write_catalog(redis, settings.namespace, catalog)
            await publish_als(
                redis, settings.namespace, "v1", factors_of([i.item_id for i in catalog])
            )
            for start in range(0, len(events), batch):
                await feed(agent, events[start : start + batch], batch)
                if start % 20 == 0:
                    await materialize(redis, settings, settings.namespace, lock=False)
            await materialize(redis, settings, settings.namespace, lock=False)
            state = await snapshot(redis, settings.namespace)
            # eviction bookkeeping by wall-clock time: not part of the state's content
            state.pop("pop:touched")
            results.append(state)
    assert results[0] == results[1]
    assert any(key.startswith("feat:") for key in results[0])
    assert any(key.startswith("emb:") for key in results[0])


async def test_a_replayed_batch_changes_nothing(roomy: Settings, shared_data: Path) -> None:
    events, catalog = taobao(shared_data, roomy.namespace, 400)
    async with agent_of(roomy) as (agent, redis):
        await write_catalog(redis, roomy.namespace, catalog)
        await publish_als(redis, roomy.namespace, "v1", factors_of([i.item_id for i in catalog]))
        await feed(agent, events, 300)
        await materialize(redis, roomy, roomy.namespace, lock=False)
        before = await snapshot(redis, roomy.namespace)
        await feed(agent, events[100:300], 200)  # a crash replays from the last checkpoint
        await feed(agent, events, 600)
        await materialize(redis, roomy, roomy.namespace, lock=False)
        assert await snapshot(redis, roomy.namespace) == before
        assert agent.totals.duplicates == 200 + len(events)


async def test_features_redis_lost_are_merged_back_from_dynamodb(
    roomy: Settings, shared_data: Path
) -> None:
    events, catalog = taobao(shared_data, roomy.namespace, 900)
    events.sort(key=lambda e: e.timestamp)  # users interleave: most act before and after
    factors = factors_of([i.item_id for i in catalog])
    async with agent_of(roomy) as (agent, redis):
        await write_catalog(redis, roomy.namespace, catalog)
        await publish_als(redis, roomy.namespace, "v1", factors)
        await feed(agent, events[:500], 250)
        both = {e.actor for e in events[:500]} & {e.actor for e in events[500:]}
        lost = sorted(both)[::2]
        assert len(lost) > 10
        keys = Keys(roomy.namespace)
        for actor in lost:  # a TTL, an eviction, a failover to a stale replica
            await redis.delete(keys.features(actor), keys.embedding(actor), keys.window(actor))
        await feed(agent, events[500:], 250)
        expected = recompute(events, {i.item_id: i for i in catalog}, roomy, factors)
        for actor in lost:
            f = expected.features[actor]
            state = await read_user_state(redis, roomy, roomy.namespace, actor, now=expected.clock)
            assert (state.events, dict(state.counts)) == (f.n, dict(f.counts))
            assert (state.first_ts, state.last_ts) == (f.first, f.last)
            for (attr, value), (score, at) in f.affinity.items():
                now = score * 2 ** (-(expected.clock - at) / roomy.half_life(attr))
                assert state.affinities[attr][value] == pytest.approx(now, rel=1e-9, abs=1e-12)
            if f.emb is not None:
                assert state.embedding is not None
                np.testing.assert_allclose(state.embedding, f.emb, rtol=1e-4, atol=1e-5)


async def test_capped_affinities_and_counts_equal_a_recomputation(
    local_stack: LocalStack, shared_data: Path
) -> None:
    """With a cap of 3 values per attribute (and 3 event types), what stays is what the
    recomputation keeps: the weakest value as of each new one is evicted."""
    settings = make_settings(local_stack, feature_cap=3, window_size=20)
    events, catalog = taobao(shared_data, settings.namespace, 1000)
    async with agent_of(settings) as (agent, redis):
        await write_catalog(redis, settings.namespace, catalog)
        await feed(agent, events, 500)
        await materialize(redis, settings, settings.namespace, lock=False)
        expected = recompute(events, {i.item_id: i for i in catalog}, settings)
        assert any("_other" in f.counts for f in expected.features.values())
        assert any(sum(k[0] == "cat" for k in f.affinity) == 3 for f in expected.features.values())
        await check_against(redis, settings, expected, embedding=False)
        for actor in expected.features:
            raw = await hash_of(redis, Keys(settings.namespace).features(actor))
            for attr in ("cat", "brand", "type"):
                values = [k for k in raw if k.startswith(f"a:{attr}:")]
                assert len(values) <= 3
                assert int(raw.get(f"k:{attr}", 0)) == len(values)
