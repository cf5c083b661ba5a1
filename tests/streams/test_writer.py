"""PutRecords batching and partial-failure retries (scripted client), and the producer's
aggregation keeping each key's order."""

from __future__ import annotations

from typing import Any, cast

import pytest

from recstream.errors import ThroughputExceeded
from recstream.settings import Settings
from streams.envelope import Message, decode
from streams.kinesis.shards import MAX_HASH_KEY, ShardInfo, ShardMap
from streams.kinesis.writer import Entry, put_messages


class FlakyKinesis:
    """PutRecords that refuses the records listed in ``refuse`` (by call and position)."""

    def __init__(self, refuse: dict[int, set[int]]) -> None:
        self.refuse = refuse
        self.calls: list[list[dict[str, Any]]] = []
        self.accepted: list[dict[str, Any]] = []

    async def put_records(self, *, StreamName: str, Records: list[dict[str, Any]]) -> Any:
        self.calls.append(Records)
        refused = self.refuse.get(len(self.calls), set())
        out = []
        for position, record in enumerate(Records):
            if position in refused:
                out.append(
                    {"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "x"}
                )
            else:
                self.accepted.append(record)
                out.append(
                    {"ShardId": "shardId-000000000000", "SequenceNumber": str(len(self.accepted))}
                )
        return {"FailedRecordCount": len(refused), "Records": out}


def entries(count: int, keys: int = 3) -> list[Entry]:
    return [
        Entry(f"k{i % keys}", Message(key=f"k{i % keys}".encode(), value=f"{i}".encode()))
        for i in range(count)
    ]


async def test_only_refused_records_are_sent_again() -> None:
    kinesis = FlakyKinesis({1: {1, 3}})
    landed = await put_messages(cast(Any, kinesis), Settings(), "s", entries(5), base_backoff=0.001)
    assert [len(call) for call in kinesis.calls] == [5, 2]
    assert [decode(r["Data"])[0].value for r in kinesis.calls[1]] == [b"1", b"3"]
    assert len(landed) == 5
    assert len(kinesis.accepted) == 5


async def test_records_refused_every_time_raise_a_retriable_error() -> None:
    kinesis = FlakyKinesis({n: {0} for n in range(1, 20)})
    with pytest.raises(ThroughputExceeded, match="refused 3 times"):
        await put_messages(
            cast(Any, kinesis), Settings(), "s", entries(2), max_attempts=3, base_backoff=0.001
        )


async def test_aggregated_records_keep_each_keys_order_through_partial_failures() -> None:
    half = MAX_HASH_KEY // 2
    shard_map = ShardMap(
        "s",
        [
            ShardInfo("shardId-000000000000", (), 0, half, closed=False),
            ShardInfo("shardId-000000000001", (), half + 1, MAX_HASH_KEY, closed=False),
        ],
    )
    big = [
        Entry(f"k{i % 7}", Message(key=f"k{i % 7}".encode(), value=b"x" * 2000 + b"%d" % i))
        for i in range(2000)
    ]
    # The first record of the first call is refused twice.
    kinesis = FlakyKinesis({1: {0}, 2: {0}})
    landed = await put_messages(
        cast(Any, kinesis), Settings(), "s", big, aggregate=True, shard_map=shard_map,
        base_backoff=0.001,
    )  # fmt: skip
    assert len(landed) == 2000
    # No call carries two records for one shard, so a retry never overtakes.
    for call in kinesis.calls:
        hash_keys = [r["ExplicitHashKey"] for r in call]
        assert len(hash_keys) == len(set(hash_keys))
    order: dict[bytes, list[int]] = {}
    for record in kinesis.accepted:
        for message in decode(record["Data"]):
            assert message.key is not None
            order.setdefault(message.key, []).append(int(message.value[2000:]))
    for key, values in order.items():
        assert values == sorted(values), f"{key!r} reordered"
    assert sum(len(v) for v in order.values()) == 2000


async def test_aggregated_records_honour_an_explicit_partition() -> None:
    half = MAX_HASH_KEY // 2
    shard_map = ShardMap(
        "s",
        [
            ShardInfo("shardId-000000000000", (), 0, half, closed=False),
            ShardInfo("shardId-000000000001", (), half + 1, MAX_HASH_KEY, closed=False),
        ],
    )
    # Keys that hash to both shards, all asked for shard 0 explicitly.
    wanted = [Entry(e.partition_key, e.message, explicit_hash_key="0") for e in entries(20, 9)]
    kinesis = FlakyKinesis({})
    await put_messages(
        cast(Any, kinesis), Settings(), "s", wanted, aggregate=True, shard_map=shard_map
    )
    assert {r["ExplicitHashKey"] for r in kinesis.accepted} == {"0"}
