"""`recstream.dynamo.BatchGets` on moto: the reads of several tables made at the same moment
go out as one BatchGetItem (the windows agent's recovery of a batch's new actors: their
windows and feature vectors), each caller gets its own table's items, and a failure
reaches every caller."""

from __future__ import annotations

import asyncio
from typing import Any

from agents.app import build_agent
from recstream.dynamo import BatchGets
from recstream.errors import RecstreamError
from recstream.features import DynamoFeatures, FeatureCopy
from recstream.settings import Settings
from recstream.stores import open_stores
from recstream.windows import DynamoWindows, WindowEntry
from streams.schema import Event


def counting(client: Any) -> list[int]:
    """The number of keys of each BatchGetItem call ``client`` makes from now on."""
    calls: list[int] = []

    def count(params: dict[str, Any], **_: Any) -> None:
        calls.append(sum(len(t["Keys"]) for t in params["RequestItems"].values()))

    client.meta.events.register("provide-client-params.dynamodb.BatchGetItem", count)
    return calls


async def test_reads_of_two_tables_at_once_are_one_call(settings: Settings) -> None:
    ns = settings.namespace
    async with open_stores(settings) as stores:
        reads = BatchGets(stores.dynamodb, settings)
        windows = DynamoWindows(stores.dynamodb, settings, reads)
        features = DynamoFeatures(stores.dynamodb, settings, reads)
        entry = WindowEntry("i1", "click", 1.0, "e1")
        await windows.put({(ns, f"w{n}"): [entry] for n in range(70)})
        await features.put({(ns, f"f{n}"): FeatureCopy({"n": str(n)}, {}) for n in range(60)})
        calls = counting(stores.dynamodb)
        asked_w = [(ns, f"w{n}") for n in range(0, 90, 3)]  # some absent
        asked_f = [(ns, f"f{n}") for n in range(0, 80, 4)]
        got_w, got_f = await asyncio.gather(windows.get_many(asked_w), features.get_many(asked_f))
        assert calls == [len(asked_w) + len(asked_f)]  # 50 keys: one call
        assert got_w == {a: [entry] for a in asked_w if int(a[1][1:]) < 70}
        assert {a: c.features for a, c in got_f.items()} == {
            a: {"n": a[1][1:]} for a in asked_f if int(a[1][1:]) < 60
        }
        # more than 100 keys across the two tables: calls of up to 100 keys
        calls.clear()
        all_w = [(ns, f"w{n}") for n in range(70)]
        all_f = [(ns, f"f{n}") for n in range(60)]
        got_w, got_f = await asyncio.gather(windows.get_many(all_w), features.get_many(all_f))
        assert calls == [100, 30]
        assert set(got_w) == set(all_w)
        assert set(got_f) == set(all_f)
        # one after the other: a call each (nothing waits for a partner)
        calls.clear()
        assert set(await windows.get_many(all_w[:5])) == set(all_w[:5])
        assert set(await features.get_many(all_f[:5])) == set(all_f[:5])
        assert calls == [5, 5]


async def test_a_failed_read_fails_every_caller(settings: Settings) -> None:
    async with open_stores(settings) as stores:
        reads = BatchGets(stores.dynamodb, settings)
        outcomes = await asyncio.gather(
            reads.get(settings.windows_table, ["a#1"]),
            reads.get(f"{settings.table_prefix}-no-such-table", ["a#2"]),
            return_exceptions=True,
        )
        assert all(isinstance(o, RecstreamError) for o in outcomes)
        assert outcomes[0] is outcomes[1]
        # and the reader goes on
        assert await reads.get(settings.windows_table, ["a#1"]) == {}


async def test_the_agent_recovers_a_batch_s_new_actors_with_one_read(
    settings: Settings,
) -> None:
    """Each actor of the batch is new to Redis: its window and feature vector are looked
    for in DynamoDB (none there), with ONE BatchGetItem for both tables."""
    ns = settings.namespace
    events = [
        Event(
            event_id=f"e{n}",
            event_type="view",
            user_id=f"u{n % 20}",
            item_id=f"i{n}",
            timestamp=1_700_000_000.0 + n,
            namespace=ns,
        )
        for n in range(60)
    ]
    async with open_stores(settings) as stores:
        agent = build_agent(stores, settings)
        calls = counting(stores.dynamodb)
        stats = await agent.apply(events)
        assert stats.applied == 60
        assert calls == [40]  # 20 windows and 20 feature vectors, one call
