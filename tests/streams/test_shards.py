"""ShardReader and ShardMap: decoding, resume positions, throttling, expiry, shard end.

The reader's edge cases (a throttled call, an expired iterator) cannot be provoked on
demand in the emulators, so these unit tests drive it with a small scripted client; the
integration tests in this folder run the same reader against moto and kinesis-mock.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from botocore.exceptions import ClientError

from recstream.aws import async_client
from recstream.settings import Settings
from streams.envelope import Message, encode, encode_aggregated
from streams.kinesis.shards import Position, ShardReader, list_shards
from streams.kinesis.writer import Entry, put_messages
from tests.streams.kinesis_helpers import wait_until


class ScriptedKinesis:
    """GetShardIterator/GetRecords over a fixed list of records, with scripted errors."""

    def __init__(self, records: list[bytes], *, closed: bool) -> None:
        self.records = [
            {
                "SequenceNumber": f"{1000 + i}",
                "Data": data,
                "PartitionKey": "k",
                "ApproximateArrivalTimestamp": datetime(2024, 1, 1, tzinfo=UTC),
            }
            for i, data in enumerate(records)
        ]
        self.closed = closed
        self.errors: dict[int, str] = {}
        """GetRecords call number (1-based) -> the error code that call raises."""
        self.calls = 0
        self.iterator_requests: list[dict[str, Any]] = []
        self.limit = 2

    def _index(self, sequence_number: str) -> int:
        return [r["SequenceNumber"] for r in self.records].index(sequence_number)

    async def get_shard_iterator(self, **kwargs: Any) -> dict[str, Any]:
        self.iterator_requests.append(kwargs)
        kind = kwargs["ShardIteratorType"]
        if kind == "TRIM_HORIZON":
            index = 0
        elif kind == "AT_SEQUENCE_NUMBER":
            index = self._index(kwargs["StartingSequenceNumber"])
        elif kind == "AFTER_SEQUENCE_NUMBER":
            index = self._index(kwargs["StartingSequenceNumber"]) + 1
        else:
            raise AssertionError(kind)
        return {"ShardIterator": str(index)}

    async def get_records(self, *, ShardIterator: str, Limit: int) -> dict[str, Any]:
        self.calls += 1
        code = self.errors.get(self.calls)
        if code is not None:
            raise ClientError({"Error": {"Code": code, "Message": code}}, "GetRecords")
        index = int(ShardIterator)
        batch = self.records[index : index + self.limit]
        end = index + len(batch)
        response: dict[str, Any] = {
            "Records": batch,
            "MillisBehindLatest": 0 if end == len(self.records) else 1000,
        }
        if not (self.closed and end == len(self.records)):
            response["NextShardIterator"] = str(end)
        return response


def reader_for(kinesis: ScriptedKinesis, position: Position, next_offset: int = 0) -> ShardReader:
    return ShardReader(
        client=cast(Any, kinesis),
        stream="s",
        shard_id="shardId-000000000007",
        position=position,
        next_offset=next_offset,
        poll_interval_s=0.0,
        calls_per_second=1000.0,
    )


def msg(text: str) -> Message:
    return Message(key=b"k", value=text.encode())


async def run_to_end(reader: ShardReader) -> list[int]:
    ends: list[int] = []
    reader.on_end = ends.append
    reader.start()
    await wait_until(lambda: reader.ended, timeout=10, what="the end of the shard")
    await reader.stop()
    return ends


async def test_reader_decodes_single_and_aggregated_records_with_dense_offsets() -> None:
    kinesis = ScriptedKinesis(
        [encode(msg("a")), encode_aggregated([msg("b"), msg("c"), msg("d")]), encode(msg("e"))],
        closed=True,
    )
    reader = reader_for(kinesis, Position("TRIM_HORIZON"), next_offset=10)
    ends = await run_to_end(reader)
    records = list(reader.buffer)
    assert [r.value for r in records] == [b"a", b"b", b"c", b"d", b"e"]
    assert [r.offset for r in records] == [10, 11, 12, 13, 14]
    assert [(r.sequence_number, r.sub_sequence) for r in records] == [
        ("1000", 0), ("1001", 0), ("1001", 1), ("1001", 2), ("1002", 0),
    ]  # fmt: skip
    assert records[0].partition == 7
    # A closed shard read to its end reports the offset after its last message.
    assert ends == [15]


async def test_resuming_inside_an_aggregated_record_skips_what_was_processed() -> None:
    kinesis = ScriptedKinesis(
        [encode(msg("a")), encode_aggregated([msg("b"), msg("c"), msg("d")]), encode(msg("e"))],
        closed=True,
    )
    reader = reader_for(kinesis, Position.after_checkpoint("1001", 1))
    await run_to_end(reader)
    assert [r.value for r in reader.buffer] == [b"d", b"e"]
    # A single record checkpoint (sub-sequence 0) is not read again either.
    kinesis2 = ScriptedKinesis([encode(msg("a")), encode(msg("b"))], closed=True)
    reader2 = reader_for(kinesis2, Position.after_checkpoint("1000", 0))
    await run_to_end(reader2)
    assert [r.value for r in reader2.buffer] == [b"b"]


async def test_throttling_backs_off_and_an_expired_iterator_resumes_after_the_last_record() -> None:
    kinesis = ScriptedKinesis([encode(msg(str(i))) for i in range(6)], closed=True)
    # Call 1 is throttled; call 3 (after two records were read) finds its iterator
    # expired, so the reader asks for a new one after the last record it handed on.
    kinesis.errors = {1: "ProvisionedThroughputExceededException", 3: "ExpiredIteratorException"}
    reader = reader_for(kinesis, Position("TRIM_HORIZON"))
    await run_to_end(reader)
    assert [r.value for r in reader.buffer] == [str(i).encode() for i in range(6)]
    assert reader.stats.throttled == 1
    assert reader.stats.expired == 1
    assert kinesis.iterator_requests[1] == {
        "StreamName": "s",
        "ShardId": "shardId-000000000007",
        "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
        "StartingSequenceNumber": "1001",
    }
    assert reader.stats.millis_behind == 0


async def test_an_open_shard_never_ends_and_backpressure_pauses_the_reader() -> None:
    kinesis = ScriptedKinesis([encode(msg(str(i))) for i in range(10)], closed=False)
    reader = reader_for(kinesis, Position("TRIM_HORIZON"))
    reader.max_buffered = 4
    reader.start()
    await wait_until(lambda: len(reader.buffer) >= 4 and not reader.space.is_set(), what="a pause")
    assert len(reader.buffer) == 4  # paused at the cap
    drained = []

    def drain_all() -> bool:
        drained.extend(reader.drain(100))
        return reader.stats.messages == 10 and not reader.buffer

    await wait_until(drain_all, what="the rest, drained as it comes")
    await reader.stop()
    assert [r.offset for r in drained] == list(range(10))
    assert not reader.ended


async def test_the_shard_map_routes_keys_like_kinesis(stream_settings: Settings) -> None:
    settings = stream_settings
    keys = [f"user-{i}" for i in range(40)]
    async with async_client(settings, "kinesis") as kinesis:
        shard_map = await list_shards(kinesis, settings.stream_name)
        landed = await put_messages(
            kinesis,
            settings,
            settings.stream_name,
            [Entry(key, Message(key=key.encode(), value=b"{}")) for key in keys],
        )
    assert [where.shard_id for where in landed] == [
        shard_map.shard_for_key(key).shard_id for key in keys
    ]
    assert len({where.shard_id for where in landed}) == 2
