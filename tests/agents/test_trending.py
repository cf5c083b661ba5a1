"""Trending and decayed popularity survive a Redis loss: rebuilt from the S3 archive, the
state comes back equal; feature vectors and windows come back from DynamoDB."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.features import read_user_state
from agents.trending import WINDOWS, materialize, rebuild
from recstream.archive import read_events, write_events
from recstream.keys import Keys
from recstream.scoring import trend_scores
from recstream.settings import Settings
from streams.schema import Event
from tests.agents.streamdata import (
    factors_of,
    hash_of,
    publish_als,
    recompute,
    snapshot,
    taobao,
    write_catalog,
    zscores,
)
from tests.agents.test_features import agent_of, feed
from tests.conftest import LocalStack, make_settings

TRENDING = ("pop:decayed", "pop:cat:", "cnt:", "cats", "trend:")


def trending_part(state: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in state.items() if k.startswith(TRENDING)}


def assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        if isinstance(value, dict) and key != "trend:clock":
            # sums in another order: equal up to rounding
            assert after[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
        else:
            assert after[key] == value, key


@pytest.fixture
def own_db(local_stack: LocalStack) -> Settings:
    """A Redis database of its own, so flushing it touches no other test."""
    return make_settings(
        local_stack, redis_url=local_stack.redis_url.rsplit("/", 1)[0] + "/7", feature_cap=1000
    )


async def test_after_a_flush_everything_comes_back(own_db: Settings, shared_data: Path) -> None:
    settings, ns = own_db, own_db.namespace
    events, catalog = taobao(shared_data, ns, 1000)
    # the slice's last day (a few stray rows reach months back: hours of archive)
    newest = max(e.timestamp for e in events)
    events = sorted(
        (e for e in events if e.timestamp > newest - 2 * 86400), key=lambda e: e.timestamp
    )
    early, late = events[:-200], events[-200:]
    factors = factors_of([i.item_id for i in catalog])
    # the archive holds what the stream carried, some of it twice (at-least-once writer)
    await write_events(settings, early)
    await write_events(settings, early[:100])
    async with agent_of(settings) as (agent, redis):
        await write_catalog(redis, ns, catalog)
        await publish_als(redis, ns, "v1", factors)
        await feed(agent, early, 500)
        await materialize(redis, settings, ns, lock=False)
        before = trending_part(await snapshot(redis, ns))
        assert any(k.startswith("trend:1h:cat:") for k in before)

        await redis.flushdb()
        # the catalog and the published model come back first (their owners restore them)
        await write_catalog(redis, ns, catalog)
        await publish_als(redis, ns, "v1", factors)
        start, end = early[0].timestamp, early[-1].timestamp + 1
        archived = read_events(settings, start, end, namespace=ns)
        stats = await asyncio.to_thread(list, archived)
        result = await rebuild(redis, settings, ns, stats)
        # recstream.archive.read_events already drops the repeated ids; the rebuild's own
        # check finds none left, and the state must equal the single-pass one regardless
        assert (result.events, result.duplicates) == (len(early), 0)
        assert_same(before, trending_part(await snapshot(redis, ns)))

        # windows and feature vectors come back from DynamoDB with the actors' next events
        await feed(agent, late, 100)
        expected = recompute(events, {i.item_id: i for i in catalog}, settings, factors)
        returning = {e.actor for e in late} & {e.actor for e in early}
        assert len(returning) > 5
        for actor in returning:
            f = expected.features[actor]
            state = await read_user_state(redis, settings, ns, actor, now=expected.clock)
            assert (state.events, dict(state.counts)) == (f.n, dict(f.counts))
            assert (state.first_ts, state.last_ts) == (f.first, f.last)
            assert [e.event_id for e in state.window] == [
                e.event_id for e in expected.windows[actor]
            ]
            for (attr, value), (score, at) in f.affinity.items():
                now = score * 2 ** (-(expected.clock - at) / settings.half_life(attr))
                assert state.affinities[attr][value] == pytest.approx(now, rel=1e-9, abs=1e-12)
            if f.emb is not None:
                assert state.embedding is not None
                np.testing.assert_allclose(state.embedding, f.emb, rtol=1e-4, atol=1e-5)


async def test_one_worker_materializes_a_namespace_at_a_time(
    settings: Settings, shared_data: Path
) -> None:
    events, _ = taobao(shared_data, settings.namespace, 300)
    async with agent_of(settings) as (agent, redis):
        await feed(agent, events, 300)
        first, second = await asyncio.gather(
            materialize(redis, settings, settings.namespace),
            materialize(redis, settings, settings.namespace),
        )
        assert sorted([first, second]) == [False, True]
        assert await redis.zcard(Keys(settings.namespace).trending("24h")) > 0


def test_the_rebuild_command_reads_the_archive(local_stack: LocalStack, shared_data: Path) -> None:
    """`recstream trending rebuild` as a user runs it, on recent events."""
    import time

    settings = make_settings(local_stack)
    events, _ = taobao(shared_data, settings.namespace, 200)
    shift = time.time() - 3600 - max(e.timestamp for e in events)
    recent = [e.model_copy(update={"timestamp": e.timestamp + shift}) for e in events]
    asyncio.run(write_events(settings, recent))
    done = subprocess.run(
        [sys.executable, "-m", "recstream.cli", "trending", "rebuild", "--half-lives", "0.1"],
        env={**settings.to_env(), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"from {len(recent)} archived events" in done.stdout

    async def top() -> dict[str, str]:
        import redis.asyncio as aioredis

        client = aioredis.from_url(settings.redis_url)
        try:
            return await hash_of(client, Keys(settings.namespace).trend_clock)
        finally:
            await client.aclose()

    assert float(asyncio.run(top())["t"]) == max(e.timestamp for e in recent)


async def test_busy_sorted_sets_are_skiplists_with_the_same_members(
    local_stack: LocalStack,
) -> None:
    """The per-category popularity and the global buckets are kept as skiplists (the
    script's `t_wide`: faster increments), with exactly the members and scores of the
    compact encoding: no trace of the converting member, the same TTLs; the small
    per-category buckets and the seen sets stay compact; a set that came back compact
    (a restart loads small sets so) is converted again by the next chunk."""
    settings = make_settings(local_stack)
    ns = settings.namespace
    keys = Keys(ns)
    ts = 1_700_000_000.0

    def view(n: int, item: str) -> Event:
        return Event(
            event_id=f"e{n}",
            event_type="view",
            user_id=f"u{n % 2}",
            item_id=item,
            timestamp=ts + n,
            properties={"category": "shoes"},
            namespace=ns,
        )

    async with agent_of(settings) as (agent, redis):
        await feed(agent, [view(n, f"i{n % 3}") for n in range(6)], 100)
        busy = [
            keys.popularity_category("shoes"),
            *(keys.counts_bucket(w.span_s, w.bucket(ts)) for w in WINDOWS),
        ]
        small = [
            keys.seen("u0"),
            *(keys.counts_bucket(w.span_s, w.bucket(ts), "shoes") for w in WINDOWS),
        ]
        for key in busy:
            assert await redis.object("encoding", key) in ("skiplist", b"skiplist"), key
            assert await redis.zrange(key, 0, -1) == [b"i0", b"i1", b"i2"], key
        for key in small:
            assert await redis.object("encoding", key) in ("listpack", b"listpack"), key
        # the counts: 2 views of each item, whatever the encoding
        assert await redis.zrange(busy[1], 0, -1, withscores=True) == [
            (b"i0", 2.0),
            (b"i1", 2.0),
            (b"i2", 2.0),
        ]
        assert 0 < await redis.ttl(busy[1]) <= 2 * 3600 + 300
        # a compact copy (as a restart would load it) is converted again
        dumped = await redis.dump(busy[0])
        assert dumped is not None
        ttl = await redis.pttl(busy[0])
        await redis.delete(busy[0])
        await redis.restore(busy[0], max(ttl, 0), dumped)
        assert await redis.object("encoding", busy[0]) in ("listpack", b"listpack")
        before = await redis.zscore(busy[0], "i0")
        await feed(agent, [view(6, "i0")], 100)
        assert await redis.object("encoding", busy[0]) in ("skiplist", b"skiplist")
        assert await redis.zrange(busy[0], 0, -1) == [b"i1", b"i2", b"i0"]
        now = await redis.zscore(busy[0], "i0")
        assert now is not None
        assert before is not None
        assert now > before


async def test_redis_computes_a_trend_list_and_its_cut(local_stack: LocalStack) -> None:
    """Redis computes each list (a weighted ZUNIONSTORE of the buckets, session 15): the
    scores are `trend_scores`' (an item seen only in the previous window scores below
    zero and stays, as in training), the list is cut at ``trend_cap``, and at the cut
    equal scores keep the larger ids, the order serving reads them in."""
    settings = make_settings(local_stack, trend_cap=10, trend_gamma=0.5)
    ns = settings.namespace
    now = 1_700_000_000.0
    earlier = now - 3_700  # in the 1 h trend's previous window
    plan = [("a", earlier), ("a", earlier), ("z", earlier)]
    plan += [("a", now)] * 3 + [(f"r{n:02d}", now) for n in range(1, 13)]
    views = [
        Event(event_id=f"e{n}", event_type="view", user_id=f"u{n}", item_id=item,
              timestamp=ts + n / 1000, namespace=ns)
        for n, (item, ts) in enumerate(plan)
    ]  # fmt: skip
    w = settings.weight("view")
    async with agent_of(settings) as (agent, redis):
        await feed(agent, views, 100)
        assert await materialize(redis, settings, ns, lock=False)
        key = Keys(ns).trending("1h")
        cut: list[Any] = await redis.zrevrange(key, 0, -1, withscores=True)
        got = [(m.decode(), s) for m, s in cut]
        roomy = settings.model_copy(update={"trend_cap": 20})
        assert await materialize(redis, roomy, ns, lock=False)
        uncut = await zscores(redis, key)
    recent = np.array([3 * w] + [w] * 12 + [0.0])
    previous = np.array([2 * w] + [0.0] * 12 + [w])
    scores = trend_scores(recent, previous, 0.5)
    assert scores[-1] < 0  # "z": the previous window only
    items = ["a", *(f"r{n:02d}" for n in range(1, 13)), "z"]
    ranked = sorted(zip(items, scores.tolist(), strict=True), key=lambda p: (p[1], p[0]))
    assert got == ranked[::-1][:10]
    assert uncut == dict(ranked)
    assert [m for m, _ in got[1:]] == [f"r{n:02d}" for n in range(12, 3, -1)]
