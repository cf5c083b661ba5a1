"""The filter store's contract, run against DynamoDB (moto server) and the in-memory store;
and the registry's validation, ARN resolution and cache."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from recstream.aws import async_client
from recstream.errors import ResourceNotFound, StoreUnavailable
from recstream.settings import Settings
from serving.filter_store import (
    DynamoFilterStore,
    FilterRecord,
    FilterRegistry,
    FilterStore,
    MemoryFilterStore,
    filter_name_from,
)
from serving.filters import FilterExists, FilterNameError, FilterNotFound, FilterSyntaxError

EXPR = 'EXCLUDE ItemID WHERE Interactions.EVENT_TYPE IN ("purchase")'
OTHER = "INCLUDE ItemID WHERE Items.CATEGORY IN ($CATEGORY)"


@pytest.fixture(params=["dynamodb", "memory"])
async def store(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[FilterStore]:
    if request.param == "memory":
        yield MemoryFilterStore()
        return
    async with async_client(settings, "dynamodb") as client:
        yield DynamoFilterStore(client, settings)


def rec(name: str, expression: str = EXPR, namespace: str = "ns", at: float = 1.5) -> FilterRecord:
    return FilterRecord(namespace, name, expression, at)


async def test_create_get_list_delete(store: FilterStore) -> None:
    assert await store.get("ns", "no-purchases") is None
    assert await store.create(rec("no-purchases")) == rec("no-purchases")
    assert await store.get("ns", "no-purchases") == rec("no-purchases")
    await store.create(rec("by-category", OTHER))
    await store.create(rec("elsewhere", namespace="other-ns"))
    assert [r.name for r in await store.list("ns")] == ["by-category", "no-purchases"]
    assert [r.name for r in await store.list("other-ns")] == ["elsewhere"]
    assert await store.delete("ns", "no-purchases") is True
    assert await store.delete("ns", "no-purchases") is False
    assert await store.get("ns", "no-purchases") is None
    assert [r.name for r in await store.list("ns")] == ["by-category"]


async def test_a_retried_create_returns_the_stored_filter(store: FilterStore) -> None:
    first = await store.create(rec("f", at=1.0))
    again = await store.create(rec("f", at=2.0))
    assert again == first
    assert again.created_at == 1.0


async def test_create_refuses_another_expression_under_a_taken_name(store: FilterStore) -> None:
    await store.create(rec("f"))
    with pytest.raises(FilterExists, match="delete it first"):
        await store.create(rec("f", OTHER))
    assert (await store.get("ns", "f")) == rec("f")


async def test_list_pages_through_many_filters(store: FilterStore) -> None:
    names = [f"f{n:03d}" for n in range(30)]
    for name in names:
        await store.create(rec(name, EXPR + " " * 900))  # big items force scan pages sooner
    assert [r.name for r in await store.list("ns")] == names


async def test_a_missing_table_says_how_to_fix_it(settings: Settings) -> None:
    missing = settings.model_copy(update={"table_prefix": "absent"})
    async with async_client(missing, "dynamodb") as client:
        with pytest.raises(ResourceNotFound, match="recstream up"):
            await DynamoFilterStore(client, missing).get("ns", "f")


# --- the registry -------------------------------------------------------------------------


class CountingStore(MemoryFilterStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.down = False

    async def get(self, namespace: str, name: str) -> FilterRecord | None:
        self.reads += 1
        if self.down:
            raise StoreUnavailable("the filter table is unreachable")
        return await super().get(namespace, name)


def registry(store: FilterStore, settings: Settings, ttl: float = 60.0) -> FilterRegistry:
    return FilterRegistry(store, settings.model_copy(update={"filter_cache_ttl_s": ttl}))


async def test_registry_validates_before_storing(settings: Settings) -> None:
    store = MemoryFilterStore()
    reg = registry(store, settings)
    with pytest.raises(FilterSyntaxError):
        await reg.create("ns", "bad", "EXCLUDE ItemID WHERE")
    with pytest.raises(FilterNameError, match="letters, digits"):
        await reg.create("ns", "bad name!", EXPR)
    assert await store.list("ns") == []
    record, created = await reg.create("ns", "good", EXPR)
    assert created
    assert (record.name, record.status) == ("good", "ACTIVE")
    assert (await reg.create("ns", "good", EXPR))[1] is False


async def test_registry_limits_filters_per_namespace(settings: Settings) -> None:
    reg = FilterRegistry(
        MemoryFilterStore(), settings.model_copy(update={"filters_per_namespace": 2})
    )
    await reg.create("ns", "a", EXPR)
    await reg.create("ns", "b", EXPR)
    with pytest.raises(FilterExists, match="FILTERS_PER_NAMESPACE"):
        await reg.create("ns", "c", EXPR)
    await reg.create("other", "c", EXPR)


async def test_registry_resolves_names_and_personalize_arns(settings: Settings) -> None:
    reg = registry(MemoryFilterStore(), settings)
    await reg.create("ns", "no-purchases", EXPR)
    by_name = await reg.compiled("ns", "no-purchases")
    by_arn = await reg.compiled(
        "ns", "arn:aws:personalize:us-east-1:123456789012:filter/no-purchases"
    )
    assert by_name is by_arn
    assert by_name.expression == EXPR
    with pytest.raises(FilterNotFound, match="POST /v1/ns/filters"):
        await reg.compiled("ns", "absent")
    assert filter_name_from("arn:aws:personalize:eu-west-1:1:filter/x") == "x"
    assert filter_name_from("plain") == "plain"


async def test_registry_caches_and_sees_other_processes_after_the_ttl(settings: Settings) -> None:
    store = CountingStore()
    cached = registry(store, settings, ttl=3600)
    fresh = registry(store, settings, ttl=0)  # another API process, without a cache
    await store.create(rec("f"))
    for _ in range(5):
        await cached.compiled("ns", "f")
    assert store.reads == 1
    await fresh.delete("ns", "f")
    await cached.compiled("ns", "f")  # still cached: TTL not over
    with pytest.raises(FilterNotFound):
        await fresh.compiled("ns", "f")
    # This process's own writes are seen at once.
    await cached.delete("ns", "f")
    with pytest.raises(FilterNotFound):
        await cached.compiled("ns", "f")


async def test_registry_serves_an_expired_filter_while_the_store_is_down(
    settings: Settings,
) -> None:
    store = CountingStore()
    reg = registry(store, settings, ttl=0)
    await store.create(rec("f"))
    first = await reg.compiled("ns", "f")
    store.down = True
    assert await reg.compiled("ns", "f") is first
    with pytest.raises(StoreUnavailable):
        await reg.compiled("ns", "never-seen")
