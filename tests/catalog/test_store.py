"""One contract for `CatalogStore`, run against Redis + DynamoDB (moto) and in memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis

from recstream import stack
from recstream.aws import async_client, sync_client
from recstream.catalog import CatalogStore, MemoryCatalog, RedisDynamoCatalog
from recstream.keys import Keys
from recstream.settings import Settings
from streams.schema import Item, User


def item(n: int | str, **kw: object) -> Item:
    return Item.model_validate({"item_id": f"i{n}", **kw})


@pytest.fixture(params=["redis+dynamodb", "memory"])
async def catalog(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[CatalogStore]:
    if request.param == "memory":
        yield MemoryCatalog()
        return
    redis = aioredis.from_url(settings.redis_url)
    try:
        async with async_client(settings, "dynamodb") as dynamodb:
            yield RedisDynamoCatalog(redis, dynamodb, settings)
    finally:
        await redis.aclose()


async def test_items_round_trip_and_absent_ids_are_left_out(
    catalog: CatalogStore, settings: Settings
) -> None:
    ns = settings.namespace
    a = item(1, categories="Comedy|Drama", title="Toy Story (1995)", price=9.5)
    b = item(2, brand="acme")
    await catalog.put_items(ns, [a, b])
    assert await catalog.items(ns, ["i1", "i2", "nope", "i1"]) == {"i1": a, "i2": b}
    assert (await catalog.items(ns, ["i1"]))["i1"].categories == ["Comedy", "Drama"]
    assert await catalog.items(ns, []) == {}


async def test_users_round_trip(catalog: CatalogStore, settings: Settings) -> None:
    ns = settings.namespace
    u = User(user_id="u1", attributes={"membership": "gold"})
    await catalog.put_users(ns, [u])
    assert await catalog.users(ns, ["u1", "u2"]) == {"u1": u}
    # Items and users are separate: an item with the same id is not a user.
    assert await catalog.items(ns, ["u1"]) == {}


async def test_a_later_put_replaces_and_the_last_in_a_batch_wins(
    catalog: CatalogStore, settings: Settings
) -> None:
    ns = settings.namespace
    await catalog.put_items(ns, [item(1, title="old")])
    await catalog.put_items(ns, [item(1, title="first"), item(1, title="second")])
    assert (await catalog.items(ns, ["i1"]))["i1"].title == "second"


async def test_delete(catalog: CatalogStore, settings: Settings) -> None:
    ns = settings.namespace
    await catalog.put_items(ns, [item(1), item(2)])
    await catalog.put_users(ns, [User(user_id="u1")])
    await catalog.delete_items(ns, ["i1", "never-existed"])
    await catalog.delete_users(ns, ["u1"])
    assert set(await catalog.items(ns, ["i1", "i2"])) == {"i2"}
    assert await catalog.users(ns, ["u1"]) == {}


async def test_namespaces_are_isolated(catalog: CatalogStore, settings: Settings) -> None:
    ns = settings.namespace
    await catalog.put_items(f"{ns}-a", [item(1, title="a")])
    await catalog.put_items(f"{ns}-b", [item(1, title="b")])
    assert (await catalog.items(f"{ns}-a", ["i1"]))["i1"].title == "a"
    assert (await catalog.items(f"{ns}-b", ["i1"]))["i1"].title == "b"
    assert await catalog.items(ns, ["i1"]) == {}


async def test_batches_larger_than_dynamodb_limits(
    catalog: CatalogStore, settings: Settings
) -> None:
    # 260 puts = 11 BatchWriteItem calls; 260 reads = 3 BatchGetItem calls.
    ns = settings.namespace
    records = [item(n, title=f"t{n}") for n in range(260)]
    await catalog.put_items(ns, records)
    found = await catalog.items(ns, [r.item_id for r in records])
    assert found == {r.item_id: r for r in records}


# --- the real tiers -----------------------------------------------------------------


@pytest.fixture
async def real(settings: Settings) -> AsyncIterator[tuple[aioredis.Redis, RedisDynamoCatalog]]:
    redis = aioredis.from_url(settings.redis_url)
    try:
        async with async_client(settings, "dynamodb") as dynamodb:
            # No process cache: these tests watch Redis and DynamoDB.
            yield redis, RedisDynamoCatalog(redis, dynamodb, settings, cache_size=0)
    finally:
        await redis.aclose()


async def test_hot_and_durable_copies_use_the_agreed_layout(
    real: tuple[aioredis.Redis, RedisDynamoCatalog], settings: Settings
) -> None:
    redis, catalog = real
    ns = settings.namespace
    a = item(7, categories="Action", title="Heat")
    await catalog.put_items(ns, [a])
    await catalog.put_users(ns, [User(user_id="u7", attributes={"age": "30"})])
    hot = await redis.get(Keys(ns).item("i7"))
    assert hot is not None
    assert Item.model_validate_json(hot) == a
    assert orjson.loads(await redis.get(Keys(ns).user("u7")) or b"{}")["attributes"] == {
        "age": "30"
    }
    dynamodb = sync_client(settings, "dynamodb")
    row = dynamodb.get_item(TableName=settings.catalog_table, Key={"pk": {"S": f"{ns}#item#i7"}})
    assert Item.model_validate_json(row["Item"]["doc"]["S"]) == a
    row = dynamodb.get_item(TableName=settings.catalog_table, Key={"pk": {"S": f"{ns}#user#u7"}})
    assert User.model_validate_json(row["Item"]["doc"]["S"]).user_id == "u7"


async def test_a_redis_miss_is_read_from_dynamodb_and_restored(
    real: tuple[aioredis.Redis, RedisDynamoCatalog], settings: Settings
) -> None:
    redis, catalog = real
    ns = settings.namespace
    records = [item(n, title=f"t{n}") for n in range(150)]
    await catalog.put_items(ns, records)
    lost = [Keys(ns).item(f"i{n}") for n in range(0, 150, 2)]
    await redis.delete(*lost)  # Redis lost half of them (eviction, a restart without AOF)
    found = await catalog.items(ns, [r.item_id for r in records])
    assert found == {r.item_id: r for r in records}
    assert await redis.exists(*lost) == len(lost)


async def test_unreadable_hot_copy_falls_back_to_the_durable_copy(
    real: tuple[aioredis.Redis, RedisDynamoCatalog], settings: Settings
) -> None:
    redis, catalog = real
    ns = settings.namespace
    await catalog.put_items(ns, [item(1, title="real")])
    await redis.set(Keys(ns).item("i1"), b"not json")
    assert (await catalog.items(ns, ["i1"]))["i1"].title == "real"


async def test_redis_down_reads_dynamodb(settings: Settings) -> None:
    ns = settings.namespace
    good = aioredis.from_url(settings.redis_url)
    dead = aioredis.from_url(f"redis://127.0.0.1:{stack.free_port()}/0", socket_connect_timeout=1)
    try:
        async with async_client(settings, "dynamodb") as dynamodb:
            await RedisDynamoCatalog(good, dynamodb, settings).put_items(ns, [item(1)])
            catalog = RedisDynamoCatalog(dead, dynamodb, settings)
            assert set(await catalog.items(ns, ["i1", "i2"])) == {"i1"}
    finally:
        await good.aclose()
        await dead.aclose()


async def test_the_process_cache_remembers_records_and_absences(settings: Settings) -> None:
    ns = settings.namespace
    redis = aioredis.from_url(settings.redis_url)
    try:
        async with async_client(settings, "dynamodb") as dynamodb:
            reader = RedisDynamoCatalog(redis, dynamodb, settings, cache_ttl_s=3600)
            writer = RedisDynamoCatalog(redis, dynamodb, settings, cache_size=0)
            await writer.put_items(ns, [item(1, title="v1")])
            assert (await reader.items(ns, ["i1", "i2"]))["i1"].title == "v1"
            # Another process changes both; this one keeps serving its cached view until
            # the TTL, without touching Redis or DynamoDB...
            await writer.put_items(ns, [item(1, title="v2"), item(2)])
            assert set(await reader.items(ns, ["i1", "i2"])) == {"i1"}
            assert (await reader.items(ns, ["i1"]))["i1"].title == "v1"
            # ...while its own writes are visible at once, and a fresh cache sees the rest.
            await reader.put_items(ns, [item(3)])
            assert set(await reader.items(ns, ["i3"])) == {"i3"}
            fresh = RedisDynamoCatalog(redis, dynamodb, settings, cache_ttl_s=0)
            assert (await fresh.items(ns, ["i1", "i2"]))["i1"].title == "v2"
    finally:
        await redis.aclose()


async def test_an_expired_record_is_served_while_one_background_read_refreshes_it(
    settings: Settings,
) -> None:
    """Stale-while-revalidate: past its TTL a cached record is still answered at once (the
    request path reads no store) and read again in the background, once however many
    requests ask; after that read, the change is served. Past ``max_stale`` it is read
    on the request path again."""
    ns = settings.namespace
    redis = aioredis.from_url(settings.redis_url)
    stale_ok = settings.model_copy(update={"catalog_cache_max_stale_s": 60.0})
    try:
        async with async_client(settings, "dynamodb") as dynamodb:
            reader = RedisDynamoCatalog(redis, dynamodb, stale_ok, cache_ttl_s=0.2)
            writer = RedisDynamoCatalog(redis, dynamodb, settings, cache_size=0)
            await writer.put_items(ns, [item(1, title="v1")])
            assert (await reader.items(ns, ["i1"]))["i1"].title == "v1"
            await writer.put_items(ns, [item(1, title="v2")])
            await asyncio.sleep(0.3)  # past the TTL
            # answered from memory at once, expired or not; one re-read started
            cached = reader.cached_items(ns, ["i1"])
            assert cached is not None
            assert cached["i1"].title == "v1"
            assert (await reader.items(ns, ["i1"]))["i1"].title in {"v1", "v2"}
            assert len(reader._refreshes) <= 1
            for _ in range(100):
                if (reader.cached_items(ns, ["i1"]) or {})["i1"].title == "v2":
                    break
                await asyncio.sleep(0.02)
            assert (reader.cached_items(ns, ["i1"]) or {})["i1"].title == "v2"
            await reader.aclose()

            # with no stale window, an expired record is not served from memory
            strict = RedisDynamoCatalog(
                redis,
                dynamodb,
                settings.model_copy(update={"catalog_cache_max_stale_s": 0.0}),
                cache_ttl_s=0.2,
            )
            await strict.items(ns, ["i1"])
            await writer.put_items(ns, [item(1, title="v3")])
            await asyncio.sleep(0.3)
            assert strict.cached_items(ns, ["i1"]) is None
            assert (await strict.items(ns, ["i1"]))["i1"].title == "v3"
    finally:
        await redis.aclose()


async def test_a_failed_refresh_keeps_serving_the_stale_record(settings: Settings) -> None:
    ns = settings.namespace
    good = aioredis.from_url(settings.redis_url)
    dead = aioredis.from_url(f"redis://127.0.0.1:{stack.free_port()}/0", socket_connect_timeout=1)
    stale_ok = settings.model_copy(update={"catalog_cache_max_stale_s": 60.0})
    try:
        async with async_client(settings, "dynamodb") as dynamodb:
            await RedisDynamoCatalog(good, dynamodb, settings).put_items(ns, [item(1)])
            # Redis unreachable and DynamoDB pointed at a table that does not exist: every
            # re-read fails
            catalog = RedisDynamoCatalog(dead, dynamodb, stale_ok, cache_ttl_s=0.2)
            catalog.table = "no-such-table"
            catalog.cache.put((ns, "item", "i1"), item(1, title="kept"))
            await asyncio.sleep(0.3)
            assert (await catalog.items(ns, ["i1"]))["i1"].title == "kept"
            await asyncio.gather(*catalog._refreshes)  # the re-read failed, logged
            assert (await catalog.items(ns, ["i1"]))["i1"].title == "kept"
            await catalog.aclose()
    finally:
        await good.aclose()
        await dead.aclose()


async def test_an_absent_id_is_remembered_in_redis_until_a_put(settings: Settings) -> None:
    """A miss leaves an expiring marker in Redis: a fresh process (no cache) does not read
    DynamoDB for that id again, and a put through the store replaces the marker at once."""
    ns = settings.namespace
    redis = aioredis.from_url(settings.redis_url)
    try:
        async with async_client(settings, "dynamodb") as dynamodb:
            first = RedisDynamoCatalog(redis, dynamodb, settings, cache_size=0)
            assert await first.items(ns, ["i9"]) == {}
            key = Keys(ns).item("i9")
            assert await redis.get(key) == b""
            assert 0 < await redis.ttl(key) <= settings.catalog_absent_ttl_s
            # Behind the store's back (a raw DynamoDB write): the marker still answers, so
            # the fresh reader did not go to DynamoDB.
            sync_client(settings, "dynamodb").put_item(
                TableName=settings.catalog_table,
                Item={"pk": {"S": f"{ns}#item#i9"}, "doc": {"S": item(9).model_dump_json()}},
            )
            fresh = RedisDynamoCatalog(redis, dynamodb, settings, cache_size=0)
            assert await fresh.items(ns, ["i9"]) == {}
            await redis.delete(key)
            assert set(await fresh.items(ns, ["i9"])) == {"i9"}
            # a put replaces a marker at once
            assert await fresh.items(ns, ["i10"]) == {}
            await fresh.put_items(ns, [item(10, title="new")])
            assert (await fresh.items(ns, ["i10"]))["i10"].title == "new"
            assert await redis.ttl(Keys(ns).item("i10")) == -1
    finally:
        await redis.aclose()


def test_the_cache_is_bounded() -> None:
    from recstream.catalog import TtlLru

    cache: TtlLru[str, int] = TtlLru(size=2, ttl_s=60)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == (True, 1)  # a is now the most recent
    cache.put("c", 3)
    assert len(cache) == 2
    assert cache.get("b") == (False, None)
    assert cache.get("a") == (True, 1)


def test_the_cache_keeps_expired_entries_only_for_its_stale_window() -> None:
    from recstream.catalog import TtlLru

    cache: TtlLru[str, int] = TtlLru(size=10, ttl_s=10, max_stale_s=5)
    cache.put("a", 1)
    put_at = cache._entries["a"][0]
    assert cache.lookup("a", put_at + 1) == (True, True, 1)
    assert cache.lookup("a", put_at + 12) == (False, True, 1)  # expired, still served
    assert cache.get("a", put_at + 12) == (False, None)  # not by `get`
    assert cache.lookup("a", put_at + 16) == (False, False, None)  # past the window: gone
    assert len(cache) == 0
    # a TTL of 0 caches nothing, stale window or not
    off: TtlLru[str, int] = TtlLru(size=10, ttl_s=0, max_stale_s=5)
    off.put("a", 1)
    assert off.lookup("a") == (False, False, None)
