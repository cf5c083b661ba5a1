"""The emulator keeps no object it does not need, and its compact Kinesis records still
behave as moto's through every API that reads them (recstream.emulator, session 6).

Each test runs a real `python -m recstream.emulator` and talks to it with boto3; the last
one checks `ShardRecords` alone, in memory, as an extra unit test.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from recstream import stack
from recstream.aws import sync_client
from recstream.emulator import ShardRecords
from recstream.settings import Settings


@contextmanager
def running(tmp_path: Path, **options: Any) -> Iterator[Settings]:
    """An emulator started with ``options`` (`recstream.stack.start_moto`), its resources
    created, one shard."""
    server = stack.start_moto(stack.free_port(), tmp_path, **options)
    try:
        settings = Settings(aws_endpoint_url=server.url, stream_shards=1)
        stack.create_resources(settings)
        yield settings
    finally:
        server.stop()


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Settings]:
    with running(tmp_path, max_records_per_shard=1000) as settings:
        yield settings


def read_all(kinesis: Any, stream: str, shard_id: str, **start: Any) -> list[dict[str, Any]]:
    kind = start.pop("kind", "TRIM_HORIZON")
    iterator = kinesis.get_shard_iterator(
        StreamName=stream, ShardId=shard_id, ShardIteratorType=kind, **start
    )["ShardIterator"]
    records: list[dict[str, Any]] = []
    while iterator:
        page = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
        records += page["Records"]
        if not page["Records"]:
            break
        iterator = page.get("NextShardIterator")
    return records


def test_moto_keeps_no_instance_of_trimmed_records_or_replaced_items(
    emulator: Settings,
) -> None:
    """moto's BaseModel used to append every object it made to a class-wide list, so
    trimmed records and every DynamoDB item ever written stayed in memory; its own
    /moto-api/data.json lists that registry."""
    kinesis = sync_client(emulator, "kinesis")
    for start in range(0, 1500, 500):
        batch = [{"Data": b"x" * 200, "PartitionKey": f"k{n}"} for n in range(start, start + 500)]
        kinesis.put_records(StreamName=emulator.stream_name, Records=batch)
    dynamodb = sync_client(emulator, "dynamodb")
    for n in range(50):  # the same item replaced: one item in the table
        dynamodb.put_item(
            TableName=emulator.leases_table, Item={"lease_key": {"S": "a"}, "n": {"N": str(n)}}
        )
    registry = httpx.get(f"{emulator.aws_endpoint_url}/moto-api/data.json", timeout=30).json()
    assert registry["kinesis"]["Record"] == []
    assert registry["dynamodb"]["Item"] == []
    # ...and what the services hold is all still there.
    shard = kinesis.list_shards(StreamName=emulator.stream_name)["Shards"][0]["ShardId"]
    assert len(read_all(kinesis, emulator.stream_name, shard)) == 1000  # the trim's cap
    item = dynamodb.get_item(TableName=emulator.leases_table, Key={"lease_key": {"S": "a"}})
    assert item["Item"]["n"] == {"N": "49"}


def test_resharding_and_timestamp_iterators_read_the_compact_records(emulator: Settings) -> None:
    """moto's own split_shard, merge_shards and AT_TIMESTAMP code read the shard's records
    as Record objects; `ShardRecords` gives them those."""
    kinesis = sync_client(emulator, "kinesis")
    stream = emulator.stream_name
    first = [{"Data": f"a{n}".encode(), "PartitionKey": f"k{n}"} for n in range(40)]
    kinesis.put_records(StreamName=stream, Records=first)
    time.sleep(0.05)  # arrival times are the server's clock: leave a gap to aim between
    between = datetime.now(UTC)
    time.sleep(0.05)
    second = [{"Data": f"b{n}".encode(), "PartitionKey": f"k{n}"} for n in range(10)]
    kinesis.put_records(StreamName=stream, Records=second)
    parent = kinesis.list_shards(StreamName=stream)["Shards"][0]["ShardId"]

    after = read_all(kinesis, stream, parent, kind="AT_TIMESTAMP", Timestamp=between)
    assert [r["Data"] for r in after] == [f"b{n}".encode() for n in range(10)]

    def everything() -> list[bytes]:
        shards = [s["ShardId"] for s in kinesis.list_shards(StreamName=stream)["Shards"]]
        return sorted(r["Data"] for shard in shards for r in read_all(kinesis, stream, shard))

    put = sorted([f"a{n}".encode() for n in range(40)] + [f"b{n}".encode() for n in range(10)])
    # moto moves a split or merged shard's records by putting them again, through code
    # that reads them as Record objects (and, being moto, routes them by hash to the first
    # shard whose range matches, closed or not): nothing may be lost or fail on the way.
    kinesis.split_shard(StreamName=stream, ShardToSplit=parent, NewStartingHashKey=str(2**127))
    assert everything() == put
    children = [
        s["ShardId"]
        for s in kinesis.list_shards(StreamName=stream)["Shards"]
        if s["ShardId"] != parent
    ]
    kinesis.merge_shards(
        StreamName=stream, ShardToMerge=children[0], AdjacentShardToMerge=children[1]
    )
    assert everything() == put
    for record in read_all(kinesis, stream, parent):
        assert isinstance(record["ApproximateArrivalTimestamp"], datetime)


PERIOD_S = 6.0
"""The emulator's metrics period in this test (Kinesis's is a minute: a test would wait
for one to end)."""


@pytest.fixture
def short_periods(tmp_path: Path) -> Iterator[Settings]:
    with running(tmp_path, metrics_period_s=PERIOD_S) as settings:
        yield settings


def test_kinesis_metrics_are_one_data_point_a_period_per_stream(
    short_periods: Settings,
) -> None:
    """moto kept two CloudWatch data points per PutRecords call forever; the emulator adds
    the calls of a period (a minute, as Kinesis; 6 s here) up and publishes them when a
    call arrives in a later period."""
    emulator = short_periods
    kinesis = sync_client(emulator, "kinesis")
    if time.time() % PERIOD_S > PERIOD_S / 2:  # the three calls below must share a period
        time.sleep(PERIOD_S + 0.05 - time.time() % PERIOD_S)
    start = int(time.time() // PERIOD_S) * PERIOD_S
    for size in (2, 3, 5):
        records = [{"Data": b"x", "PartitionKey": f"k{n}"} for n in range(size)]
        kinesis.put_records(StreamName=emulator.stream_name, Records=records)
    assert time.time() < start + PERIOD_S, "the calls took longer than a period; rerun"
    time.sleep(start + PERIOD_S + 0.1 - time.time())
    kinesis.put_record(StreamName=emulator.stream_name, Data=b"y", PartitionKey="k")
    minute = int(start // 60) * 60
    cloudwatch = boto3.client(
        "cloudwatch",
        endpoint_url=emulator.aws_endpoint_url,
        region_name=emulator.aws_region,
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )  # not a recstream service (recstream.aws.Service): only this test reads it
    statistics = cloudwatch.get_metric_statistics(
        Namespace="AWS/Kinesis",
        MetricName="IncomingRecords",
        Dimensions=[{"Name": "StreamName", "Value": emulator.stream_name}],
        StartTime=datetime.fromtimestamp(minute - 120, tz=UTC),
        EndTime=datetime.fromtimestamp(minute + 120, tz=UTC),
        Period=60,
        Statistics=["SampleCount", "Sum", "Minimum", "Maximum"],
    )
    points = statistics["Datapoints"]
    assert len(points) == 1  # the later minute is not published yet
    assert (points[0]["SampleCount"], points[0]["Sum"]) == (3, 10)
    assert (points[0]["Minimum"], points[0]["Maximum"]) == (2, 5)


class FakeRecord:
    """Only for the unit test below: moto's Record is built with these attributes."""

    partition_key: str
    data: str
    sequence_number: int
    explicit_hash_key: str | None
    created_at: float
    created_at_datetime: datetime


def test_shard_records_are_rows_the_garbage_collector_does_not_walk() -> None:
    records = ShardRecords(FakeRecord)
    for n in range(1, 101):
        record = FakeRecord()
        record.partition_key, record.data, record.sequence_number = f"k{n}", "eA==", n
        record.explicit_hash_key, record.created_at = None, 1_700_000_000.0 + n
        records[n] = record
    gc.collect()
    assert not any(gc.is_tracked(row) for row in records.rows.values())
    assert list(records) == list(range(1, 101))
    assert next(reversed(records)) == 100
    back = records[7]
    assert (back.partition_key, back.data, back.sequence_number) == ("k7", "eA==", 7)
    assert back.created_at_datetime == datetime(2023, 11, 14, 22, 13, 27)
    del records[1]
    assert 1 not in records
    assert len(records) == 99


def snapshot_taken(state: Path, kinesis: Any) -> None:
    """Wait until a snapshot has begun and ended after this call: two rewrites of the
    pickle, as one that began before the call may not hold what was just put. (A snapshot
    is taken only after a request; a ListStreams is one.)"""
    pickle_file = state / "moto-state.pickle"
    for _ in range(2):
        before = pickle_file.stat().st_mtime_ns if pickle_file.exists() else 0
        kinesis.list_streams()
        deadline = time.monotonic() + 60
        while (pickle_file.stat().st_mtime_ns if pickle_file.exists() else 0) == before:
            assert time.monotonic() < deadline, f"no snapshot written to {state} in 60 s"
            time.sleep(0.05)


def test_the_records_log_survives_a_crash_compacts_and_forgets_deleted_streams(
    tmp_path: Path,
) -> None:
    """Snapshots append new records to a log instead of pickling them all again; a crash
    after a snapshot loses nothing it held, compaction keeps one log of the records kept,
    and a deleted stream's records never come back into a new stream of the same name."""
    state = tmp_path / "moto-state"
    port = stack.free_port()
    settings = Settings(aws_endpoint_url=f"http://127.0.0.1:{port}", stream_shards=1)

    def start() -> stack.Server:
        return stack.start_moto(
            port, tmp_path, state_dir=state, snapshot_every_s=0.2,
            max_records_per_shard=1000, log_slack=500,
        )  # fmt: skip

    def put(kinesis: Any, start: int, count: int) -> list[int]:
        batch = [
            {"Data": f"r{n}".encode(), "PartitionKey": f"k{n}"} for n in range(start, start + count)
        ]
        result = kinesis.put_records(StreamName=settings.stream_name, Records=batch)
        return [int(r["SequenceNumber"]) for r in result["Records"]]

    def stored(kinesis: Any) -> list[bytes]:
        shard = kinesis.list_shards(StreamName=settings.stream_name)["Shards"][0]["ShardId"]
        return [r["Data"] for r in read_all(kinesis, settings.stream_name, shard)]

    server = start()
    try:
        stack.create_resources(settings)
        kinesis = sync_client(settings, "kinesis")
        numbers: list[int] = []
        for batch in range(6):  # 3,000 records through a 1,000-record shard
            numbers += put(kinesis, batch * 500, 500)
            snapshot_taken(state, kinesis)
        # The server deletes the old log just after the snapshot's child has written the
        # new pickle; a crash in between leaves both (the next start deletes the one the
        # pickle does not name), so wait for that step before crashing.
        deadline = time.monotonic() + 30
        while len(list(state.glob("kinesis-records.*.log"))) > 1:
            assert time.monotonic() < deadline, "the compacted-away log was never deleted"
            time.sleep(0.05)
    finally:
        server.process.kill()  # a crash: no final save
        server.process.wait(30)
    # The log held more than 2 x 1,000 + 500 records at some snapshot: it was compacted
    # into a new one and the old one deleted.
    logs = sorted(state.glob("kinesis-records.*.log"))
    assert len(logs) == 1

    server = start()
    try:
        kinesis = sync_client(settings, "kinesis")
        assert stored(kinesis) == [f"r{n}".encode() for n in range(2000, 3000)]
        assert put(kinesis, 3000, 1) == [numbers[-1] + 1]  # numbering continues
        kinesis.delete_stream(StreamName=settings.stream_name)
        stack.create_resources(settings)  # the stream again, empty, same name
        put(kinesis, 5000, 3)
    finally:
        server.stop()  # clean: the final save

    server = start()
    try:
        kinesis = sync_client(settings, "kinesis")
        assert stored(kinesis) == [b"r5000", b"r5001", b"r5002"]
    finally:
        server.stop()
