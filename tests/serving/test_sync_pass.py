"""The ranker's synchronous pass (serving/pipeline/ranker.py `_source_now`), against real
Redis and moto: once a request's inputs are in memory (models loaded, neighbour rows,
live lists and catalog entries cached) every source is computed without reading a store,
and the answer is exactly the one the concurrent, store-reading path gives; a source
whose inputs are not all cached goes the concurrent way alone."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from recstream.settings import Settings
from serving.pipeline import Ranker
from serving.pipeline.cache import TTLCache
from serving.pipeline.state import read_versions
from streams.schema import Item
from tests.conftest import LocalStack
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

AGED = ("age_s", "recency")
WITH_CATEGORIES = {**WEIGHTS, "category_popularity": 0.3}


class Catalog:
    """An `ItemCatalog` whose memory can be switched off (every read then awaits)."""

    def __init__(self, items: Mapping[str, Item]) -> None:
        self.data = dict(items)
        self.cold = False
        self.reads = 0

    async def items(self, namespace: str, item_ids: Sequence[str]) -> Mapping[str, Item]:
        self.reads += 1
        return {i: self.data[i] for i in item_ids if i in self.data}

    def cached_items(self, namespace: str, item_ids: Sequence[str]) -> Mapping[str, Item] | None:
        if self.cold:
            return None
        return {i: self.data[i] for i in item_ids if i in self.data}


@asynccontextmanager
async def ranker_with(settings: Settings, catalog: Catalog) -> AsyncIterator[Ranker]:
    async with ranker_for(settings, catalog) as ranker:
        # live lists are kept 1 s: long enough between two calls, not on a loaded test
        # machine
        ranker.sources.lists.ttl = ranker.sources.category_lists.ttl = 3600.0
        yield ranker


def count_reads(ranker: Ranker, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of every store read the sources and the model cache make from now on."""
    counts = {"zsets": 0, "neighbour_rows": 0, "_published_category_lists": 0, "_load": 0}

    def counting(owner: Any, name: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return await original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in ("zsets", "neighbour_rows", "_published_category_lists"):
        counting(ranker.sources, name)
    counting(ranker.models, "_load")
    return counts


def timeless(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The debug view's candidates without the features that are ages or decay with
    age (they change between two requests)."""
    return [
        {**c, "features": {k: v for k, v in c["features"].items() if not k.endswith(AGED)}}
        for c in candidates
    ]


def answer(result: Any) -> list[tuple[str, float, tuple[str, ...]]]:
    return [(r.item_id, r.score, r.reasons) for r in result.items]


async def setup(local_stack: LocalStack) -> tuple[Settings, Catalog]:
    settings = roomy(local_stack, answer_cache_ttl_s=0.0)  # every request computes
    log = two_clusters()
    await publish(settings, fitted(log, WITH_CATEGORIES).values(), log)
    ns = settings.namespace
    await apply(settings, [event(n, "ann", i, ns) for n, i in enumerate(["a1", "a2", "b1"], 1)])
    categories = {
        **{f"a{n}": "u" for n in range(1, 5)},
        **{f"b{n}": "v" for n in range(1, 5)},
        "hit": "w",
    }
    catalog = Catalog(
        {i: Item(item_id=i, categories=[c], title=f"title {i}") for i, c in categories.items()}
    )
    return settings, catalog


async def test_a_warm_request_reads_no_store_and_answers_as_the_concurrent_path(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, catalog = await setup(local_stack)
    ns = settings.namespace
    async with ranker_with(settings, catalog) as ranker:
        catalog.cold = True
        cold = await ranker.recommend(ns, "ann", 6, debug=True)
        assert catalog.reads > 0
        catalog.cold = False
        counts = count_reads(ranker, monkeypatch)
        reads = catalog.reads
        warm = await ranker.recommend(ns, "ann", 6, debug=True)
        assert counts == {
            "zsets": 0,
            "neighbour_rows": 0,
            "_published_category_lists": 0,
            "_load": 0,
        }
        assert catalog.reads == reads
    assert cold.degraded == warm.degraded == []
    assert answer(warm) == answer(cold)
    assert [r.item.title if r.item else None for r in warm.items] == [
        r.item.title if r.item else None for r in cold.items
    ]
    assert warm.debug is not None
    assert cold.debug is not None
    assert timeless(warm.debug["candidates"]) == timeless(cold.debug["candidates"])
    used = {name for name, seen in warm.debug["sources"].items() if seen["candidates"]}
    # every kind of source took the synchronous pass, the catalog's too
    assert {"recently_viewed", "item2item", "sknn", "als", "popularity"} <= used
    assert {"trending", "category_popularity"} <= used


async def test_a_source_with_an_uncached_input_reads_it_and_the_others_do_not(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, catalog = await setup(local_stack)
    ns = settings.namespace
    async with ranker_with(settings, catalog) as ranker:
        first = await ranker.recommend(ns, "ann", 6)
        # item2item's rows are dropped from memory: only that source reads them again
        version = (await read_versions(ranker.redis, ns))["item2item"]
        ranker.sources.vocabulary(ns, version).rows = TTLCache(3600.0)
        counts = count_reads(ranker, monkeypatch)
        again = await ranker.recommend(ns, "ann", 6)
        assert counts == {
            "zsets": 0,
            "neighbour_rows": 1,
            "_published_category_lists": 0,
            "_load": 0,
        }
    assert answer(again) == answer(first)
