"""Drill: redis-server restarts empty, and everything comes back by itself.

Real processes: a private redis-server (restarted with its data gone), moto, a `recstream
agents` worker (archive flushed every second), the API on uvicorn. Models are published
through training's real publish path; events go through the collector.

Before the loss the drill records, for several users, their recommendations (items and
why), the related items of an item, the 24 h trending list, every user's feature vector,
the decayed popularity and the serving version of every model. Then redis-server is
stopped and started again on the same port, empty. No operator command runs. Checked:

* the very first request for a user already answers from DynamoDB's copy of the window
  (``recently_interacted`` items, nothing degraded);
* every answer recorded before comes back identical, every feature vector comes back
  equal (from DynamoDB), the decayed popularity equals the one before (rebuilt from the
  S3 archive) and the trend counts are complete again (``since`` 0), and every model
  serves the version it served before (restored from S3).
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from agents.trending import WINDOWS
from recstream import stack
from recstream.aws import sync_client
from recstream.features import DynamoFeatures
from recstream.keys import Keys
from recstream.settings import Settings
from recstream.stores import open_stores
from recstream.windows import DynamoWindows
from serving.app import create_app
from tests.conftest import LocalStack, make_settings, serve_in_thread
from tests.reliability.drillkit import agents, applied_ids, private_redis, wait_for
from tests.serving.helpers import ROOMY, fitted, publish, two_clusters
from training.publish import open_registry

USERS = {
    # user: items viewed, in order (the published models know a*, b* and hit)
    "alice": ["a1", "a2"],
    "bob": ["b1", "b2", "b3"],
    "carol": ["hit", "a3"],
    "dave": ["b4", "a4", "b1"],
    "erin": ["a2"],
}
CROWD = 12
ROOMY_SETTINGS: dict[str, Any] = dict(ROOMY)
"""Budgets a loaded machine never misses: the drill is about recovery, not latency."""
MODELS = ("popularity", "trending", "item2item", "als", "sknn", "recently_viewed", "blend")


def category(item: str) -> str:
    return {"a": "u", "b": "v"}.get(item[0], "w")


def history() -> list[dict[str, Any]]:
    now = time.time()
    events: list[dict[str, Any]] = []
    for user, items in USERS.items():
        for k, item in enumerate(items):
            events.append(
                {
                    "event_id": f"{user}-{k}",
                    "event_type": "click" if k % 2 else "view",
                    "user_id": user,
                    "item_id": item,
                    "timestamp": now - 600 + 10 * len(events),
                    "properties": {"category": category(item)},
                }
            )
    for n in range(CROWD):
        item = ["hit", "a1", "b1"][n % 3]
        events.append(
            {
                "event_id": f"crowd-{n}",
                "event_type": "view",
                "user_id": f"crowd{n}",
                "item_id": item,
                "timestamp": now - 300 + n,
                "properties": {"category": category(item)},
            }
        )
    return events


async def answers(http: httpx.AsyncClient) -> dict[str, Any]:
    """What the API answers, without the parts that move with the clock (scores decay)."""
    out: dict[str, Any] = {}
    for user in USERS:
        body = (await http.get("/v1/recommendations", params={"user_id": user})).json()
        out[user] = (
            body["degraded"],
            [(i["item_id"], sorted(i["reasons"])) for i in body["items"]],
        )
    related = (await http.get("/v1/related-items", params={"item_id": "a1"})).json()
    out["related:a1"] = (related["degraded"], [i["item_id"] for i in related["items"]])
    trending = (await http.get("/v1/trending", params={"window": "24h"})).json()
    out["trending"] = (trending["degraded"], [i["item_id"] for i in trending["items"]])
    return out


async def features(client: aioredis.Redis, ns: str) -> dict[str, dict[Any, Any]]:
    keys = Keys(ns)
    return {u: dict(await client.hgetall(keys.features(u))) for u in USERS}


async def popularity(client: aioredis.Redis, ns: str) -> dict[str, float]:
    pairs: list[Any] = await client.zrange(Keys(ns).popularity_decayed, 0, -1, withscores=True)
    return {bytes(m).decode(): float(s) for m, s in pairs}


async def serving_versions(settings: Settings) -> dict[str, str | None]:
    async with open_registry(settings) as registry:
        return {name: await registry.current(name) for name in MODELS}


async def copied(settings: Settings, events: Sequence[dict[str, Any]]) -> bool:
    """Every user's window and feature vector is in DynamoDB with all of its ``events``."""
    counts = Counter(str(e["user_id"]) for e in events)
    actors = [(settings.namespace, user) for user in counts]
    async with open_stores(settings) as stores:
        windows = await DynamoWindows(stores.dynamodb, settings).get_many(actors)
        vectors = await DynamoFeatures(stores.dynamodb, settings).get_many(actors)
    return all(
        len(windows.get(actor, ())) == counts[actor[1]]
        and actor in vectors
        and int(vectors[actor].features.get("n", 0)) == counts[actor[1]]
        for actor in actors
    )


def archived(settings: Settings) -> int:
    s3 = sync_client(settings, "s3")
    listing = s3.list_objects_v2(Bucket=settings.bucket, Prefix=f"archive/{settings.namespace}/")
    return len(listing.get("Contents", []))


@pytest.mark.timeout(300)
async def test_redis_restarted_empty_comes_back_by_itself(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    port = stack.free_port()
    with private_redis(tmp_path / "first", port) as first:
        settings = make_settings(
            local_stack,
            redis_url=f"redis://127.0.0.1:{first.port}/0",
            archive_flush_s=1.0,
            trend_interval_s=0.5,
            **ROOMY_SETTINGS,
        )
        ns = settings.namespace
        log = tmp_path / "worker" / "agents.log"
        log.parent.mkdir()
        events = history()
        everyone = sorted({e["user_id"] for e in events})
        client = aioredis.from_url(settings.redis_url)
        api_port = stack.free_port()
        try:
            data = two_clusters()
            await publish(settings, fitted(data).values(), data)
            with serve_in_thread(create_app(settings), api_port), agents(settings, log):
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{api_port}", timeout=30
                ) as http:
                    response = await http.post("/v1/events", json=events)
                    assert response.status_code == 202, response.text

                    async def settled() -> bool:
                        ids = await applied_ids(client, ns, everyone)
                        trend = await client.exists(Keys(ns).trending("24h"))
                        # the archive holds every event, so a rebuild has what it needs
                        return len(ids) == len(events) and bool(trend)

                    await wait_for(settled, "every event applied and trending", 90, log)
                    before = await answers(http)
                    feats, pop = await features(client, ns), await popularity(client, ns)
                    versions = await serving_versions(settings)
                    assert all(versions.values()), versions
                    assert all(not degraded for degraded, _ in before.values()), before
                    # every kind of state is in the answers: windows, models, live lists
                    reasons = {r for u in USERS for _, why in before[u][1] for r in why}
                    assert {"recently_interacted", "als", "trending"} <= reasons, reasons
                    assert any(r.startswith("similar_to:") for r in reasons), reasons
                    assert before["trending"][1], "a trending list to compare"

                    async def all_archived() -> bool:
                        return archived(settings) > 0 and await _archive_complete(settings, events)

                    await wait_for(all_archived, "every event archived", 60, log)
                    # The durable copies follow Redis by up to one copy interval
                    # (agent_copy_interval_s): what a Redis that loses its data had applied
                    # since is in neither store (docs/agents.md). The loss comes after them.
                    await wait_for(lambda: copied(settings, events), "the copies written", 60, log)

                    # --- the loss: redis-server stops and comes back empty ---------------
                    first.stop()
                    with private_redis(tmp_path / "second", port):
                        await client.aclose()
                        client = aioredis.from_url(settings.redis_url)
                        # (the worker's next tick may already write its clock: not dbsize)
                        lost = (
                            Keys(ns).window("alice"),
                            Keys(ns).features("alice"),
                            Keys(ns).popularity_decayed,
                            Keys(ns).model_pointer("als"),
                        )
                        assert await client.exists(*lost) == 0
                        alice = (
                            await http.get("/v1/recommendations", params={"user_id": "alice"})
                        ).json()
                        assert alice["degraded"] == [], alice
                        recent = {
                            i["item_id"]
                            for i in alice["items"]
                            if "recently_interacted" in i["reasons"]
                        }
                        assert recent == set(USERS["alice"]), alice

                        async def recovered() -> bool:
                            return await answers(http) == before

                        await wait_for(recovered, "the same answers as before the loss", 90, log)
                        after_feats = await features(client, ns)
                        after_pop = await popularity(client, ns)
                        since = await client.hget(Keys(ns).trend_clock, "since")
                        after_versions = await serving_versions(settings)
        finally:
            await client.aclose()
    assert after_versions == versions
    assert after_feats == feats
    assert after_pop == pytest.approx(pop, rel=1e-9)
    assert since == b"0"
    assert [w.name for w in WINDOWS] == ["1h", "24h"]
    print(
        f"\nDRILL redis-loss: {len(events)} events, {len(USERS)} users' answers, related and "
        f"trending identical after recovery; {len(feats)} feature vectors, "
        f"{len(pop)} popularity counts and {len(versions)} model versions back, no command"
    )


async def _archive_complete(settings: Settings, events: list[dict[str, Any]]) -> bool:
    from recstream.archive import read_events

    stamps = [float(e["timestamp"]) for e in events]
    found = await asyncio.to_thread(
        lambda: {e.event_id for e in read_events(settings, min(stamps), max(stamps) + 1)}
    )
    return found >= {str(e["event_id"]) for e in events}


def weighed(settings: Settings, events: list[dict[str, Any]]) -> dict[str, float]:
    """The decayed popularity of ``events`` counted once each (agents/trending.py)."""
    out: dict[str, float] = {}
    for e in events:
        weight = max(0.0, settings.weight(str(e["event_type"])))
        exponent = float(e["timestamp"]) - settings.popularity_epoch_s
        exponent /= settings.popularity_half_life_s
        out[str(e["item_id"])] = out.get(str(e["item_id"]), 0.0) + weight * 2**exponent
    return out


@pytest.mark.timeout(300)
async def test_a_flushall_under_traffic_counts_every_event_once(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """FLUSHALL between two batches: the first batch comes back from the archive and
    DynamoDB, the second is applied live, and nothing counts twice or not at all.

    The second batch is newest first on a one-shard stream, so every event after its
    first is older than the rebuilt clock's ``since``: the archive replay reads them and
    must skip them (the agents applied them live). The drill holds the rebuild lease
    until they are archived, so the replay certainly meets them."""
    with private_redis(tmp_path) as server:
        settings = make_settings(
            local_stack,
            redis_url=f"redis://127.0.0.1:{server.port}/0",
            archive_flush_s=1.0,
            trend_interval_s=0.5,
            stream_shards=1,
        )
        ns, keys = settings.namespace, Keys(settings.namespace)
        log = tmp_path / "worker" / "agents.log"
        log.parent.mkdir()
        now = time.time()
        users = [f"u{n}" for n in range(8)]

        def batch(prefix: str, count: int, start: float, step: float) -> list[dict[str, Any]]:
            return [
                {
                    "event_id": f"{prefix}{n}",
                    "event_type": ["view", "click", "add_to_cart"][n % 3],
                    "user_id": users[n % len(users)],
                    "item_id": f"i{n % 7}",
                    "timestamp": start + step * n,
                    "properties": {"category": f"c{n % 3}"},
                }
                for n in range(count)
            ]

        # the second batch newest first: all but its first event are "late"
        first, second = batch("a", 60, now - 900, 1.0), batch("b", 40, now - 100, -1.0)
        client = aioredis.from_url(settings.redis_url)
        api_port = stack.free_port()
        try:
            with serve_in_thread(create_app(settings), api_port), agents(settings, log):
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{api_port}", timeout=30
                ) as http:
                    assert (await http.post("/v1/events", json=first)).status_code == 202

                    async def first_settled() -> bool:
                        done = await applied_ids(client, ns, users)
                        complete = await client.hget(keys.trend_clock, "since") == b"0"
                        return (
                            len(done) == len(first)
                            and complete
                            and (await _archive_complete(settings, first))
                        )

                    await wait_for(first_settled, "the first batch applied and archived", 90, log)
                    # the flush comes after the first batch's durable copies (which follow
                    # Redis by up to one copy interval, agent_copy_interval_s)
                    await wait_for(lambda: copied(settings, first), "the copies written", 60, log)
                    assert await popularity(client, ns) == pytest.approx(
                        weighed(settings, first), rel=1e-9
                    )
                    await client.flushall()
                    # as if another worker held the rebuild: the replay waits for the lease
                    await client.set(keys.trend_rebuild, "drill", px=120_000)
                    assert (await http.post("/v1/events", json=second)).status_code == 202

                    async def second_settled() -> bool:
                        done = await applied_ids(client, ns, users)
                        return len(done) == len(second) and await _archive_complete(
                            settings, second
                        )

                    await wait_for(second_settled, "the second batch live and archived", 90, log)
                    since = float(await client.hget(keys.trend_clock, "since") or 0)
                    assert since == second[0]["timestamp"]
                    late = [e for e in second if e["timestamp"] < since]
                    assert len(late) == len(second) - 1
                    await client.delete(keys.trend_rebuild)

                    async def recovered() -> bool:
                        done = await applied_ids(client, ns, users)
                        complete = await client.hget(keys.trend_clock, "since") == b"0"
                        return len(done) == len(second) and complete

                    await wait_for(recovered, "the trends rebuilt after the flush", 90, log)
                    pop = await popularity(client, ns)
                    windows = {
                        u: {
                            orjson.loads(raw)["e"]
                            for raw in await client.lrange(keys.window(u), 0, -1)
                        }
                        for u in users
                    }
                    counts = {u: await client.hget(keys.features(u), "n") for u in users}
        finally:
            await client.aclose()
    everything = first + second
    assert pop == pytest.approx(weighed(settings, everything), rel=1e-9)
    for user in users:
        mine = {str(e["event_id"]) for e in everything if e["user_id"] == user}
        assert windows[user] == mine, user
        assert counts[user] == str(len(mine)).encode(), user
    print(
        f"\nDRILL flushall-under-traffic: {len(first)} events before the flush, "
        f"{len(second)} after; popularity of {len(pop)} items counted each event once, "
        f"{len(users)} windows and feature counts whole"
    )


async def test_serving_restores_the_version_that_served_not_the_newest(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """A rollback is what serves: after a loss, S3's pointer brings back that version,
    and a record dump that does not match its manifest is not restored."""
    from recstream.aws import async_client
    from recstream.model_restore import RegistryRestorer
    from recstream.published import REDIS_RECORDS
    from tests.training.test_publish import LOG, run_info
    from tests.training.tinymodel import TinyModel

    with private_redis(tmp_path) as server:
        settings = make_settings(local_stack, redis_url=f"redis://127.0.0.1:{server.port}/0")
        client = aioredis.from_url(settings.redis_url)
        try:
            async with open_registry(settings) as registry:
                v1 = (await registry.publish(TinyModel().fit(LOG), run_info())).version
                await registry.publish(TinyModel().fit(LOG[:2]), run_info())
                assert await registry.rollback("tiny") == v1
                top = await registry.redis.zrange(
                    Keys(settings.namespace).model("tiny", v1, "top"), 0, -1, withscores=True
                )
            await client.flushall()
            async with async_client(settings, "s3") as s3:
                restorer = RegistryRestorer(client, s3, settings)
                assert await restorer.check(settings.namespace) == {"tiny": v1}
                assert await restorer.check(settings.namespace) == {}  # nothing left to do
                async with open_registry(settings) as registry:
                    assert [(i.version, i.current) for i in await registry.versions("tiny")] == [
                        (v1, True)
                    ]
                keys = Keys(settings.namespace)
                assert (
                    await client.zrange(keys.model("tiny", v1, "top"), 0, -1, withscores=True)
                    == top
                )
                # a dump that does not match its manifest's SHA-256 is left alone
                await client.flushall()
                sync_client(settings, "s3").put_object(
                    Bucket=settings.bucket,
                    Key=f"models/tiny/{v1}/{REDIS_RECORDS}",
                    Body=gzip.compress(b'{"s":"top","k":"zset","v":[["evil",1.0]]}\n'),
                )
                assert await restorer.check(settings.namespace) == {}
                assert await client.dbsize() == 0
        finally:
            await client.aclose()
