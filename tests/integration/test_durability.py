"""`recstream down && recstream up` keeps everything; `down --wipe` starts clean.

The whole life of a user's data, through the real commands and processes: events posted
through the API and applied by a real `recstream agents`, archive objects written with
`recstream.archive.write_events`, an item-to-item model trained from that archive and
published by `recstream train`. After `down` and `up` the same user gets the same
recommendations, the archive lists the same objects, the stream's checkpoints are where
they were, and a restarted worker resumes from them: a malformed record it had already
dead-lettered is not dead-lettered a second time.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from recstream import stack
from recstream.archive import write_events
from recstream.aws import sync_client
from recstream.keys import Keys
from recstream.settings import Settings
from streams.envelope import Message, encode
from streams.kinesis.status import shard_status
from streams.leases import TRIM_HORIZON
from streams.schema import Event
from tests.conftest import serve_in_thread
from tests.integration.test_spine import agent_worker, eventually, tail

USERS = 24


def recstream(args: list[str], settings: Settings) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "recstream.cli", *args],
        env={**os.environ, **settings.to_env(), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"recstream {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def history() -> list[dict[str, Any]]:
    """Each user views three items of one of four groups, so item-to-item has neighbours;
    the last view falls in the last day, which training holds out."""
    now = time.time()
    return [
        {
            "event_type": "view",
            "user_id": f"u{user}",
            "item_id": f"g{user % 4}-{k}",
            "timestamp": (now - 3 * 86400 if k < 2 else now - 7200) + user * 10 + k,
        }
        for user in range(USERS)
        for k in range(3)
    ]


def archive_keys(settings: Settings) -> list[str]:
    s3 = sync_client(settings, "s3")
    listing = s3.list_objects_v2(Bucket=settings.bucket, Prefix="archive/")
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


def dead_letters(settings: Settings) -> int:
    sqs = sync_client(settings, "sqs")
    url = sqs.get_queue_url(QueueName=settings.dlq_name)["QueueUrl"]
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


async def checkpoints(settings: Settings) -> dict[str, str]:
    return {row.shard_id: row.checkpoint for row in await shard_status(settings)}


async def caught_up(settings: Settings) -> bool:
    rows = await shard_status(settings)
    # (a checkpoint still at TRIM_HORIZON can show lag 0 when one batch holds every record)
    return bool(rows) and all(row.lag_ms == 0 and row.checkpoint != TRIM_HORIZON for row in rows)


async def windows_applied(settings: Settings) -> bool:
    """Every user's window is in Redis: the agents applied every posted event."""
    client = aioredis.from_url(settings.redis_url)
    try:
        keys = Keys(settings.namespace)
        found = await client.exists(*(keys.window(f"u{user}") for user in range(USERS)))
    finally:
        await client.aclose()
    return int(found) == USERS


async def recommendations(settings: Settings, user: str) -> list[tuple[str, list[str]]]:
    from serving.app import create_app

    port = stack.free_port()
    with serve_in_thread(create_app(settings), port):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            response = await c.get("/v1/recommendations", params={"user_id": user})
    assert response.status_code == 200, response.text
    assert not response.json().get("degraded"), response.text
    # Scores decay with the clock; what must survive is what is recommended and why.
    return [(item["item_id"], sorted(item["reasons"])) for item in response.json()["items"]]


async def post(settings: Settings, events: list[dict[str, Any]]) -> None:
    from serving.app import create_app

    port = stack.free_port()
    with serve_in_thread(create_app(settings), port):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            response = await c.post("/v1/events", json=events)
    assert response.status_code == 202, response.text
    assert not response.json()["rejected"]
    assert not response.json()["failed"]


@pytest.mark.timeout(900)  # three `up`s, a training run and two workers on a busy machine
async def test_down_and_up_keep_everything_and_wipe_starts_clean(tmp_path: Path) -> None:
    ports = [stack.free_port() for _ in range(2)]
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{ports[0]}/0",
        aws_endpoint_url=f"http://127.0.0.1:{ports[1]}",
        state_dir=tmp_path / "state",
        # Durability, not latency, is under test: on a loaded machine the default 20 ms
        # store deadline would degrade answers to nothing.
        store_timeout_ms=5000,
        source_timeout_ms=5000,
        ranking_budget_ms=10000,
        # a checkpoint waits for the archive agent's S3 object: flush it within seconds,
        # not the default minute (that minute was most of this test's time)
        archive_flush_s=2.0,
    )
    log = tmp_path / "agents.log"
    try:
        recstream(["up"], settings)
        events = history()
        await post(settings, events)
        # A record no agent can parse, on the probe user's shard: dead-lettered once.
        kinesis = sync_client(settings, "kinesis")
        probe_key = "u0"
        kinesis.put_record(
            StreamName=settings.stream_name,
            Data=encode(Message(key=probe_key.encode(), value=b"not an event")),
            PartitionKey=probe_key,
        )
        with agent_worker(settings, log):
            await eventually(lambda: caught_up(settings), "the agents catching up", log, within=300)

            async def one_dead_letter() -> bool:
                return dead_letters(settings) == 1

            await eventually(
                one_dead_letter, "the dead letter of the malformed record", log, within=300
            )
        await write_events(settings, [Event.model_validate(e) for e in events])
        recstream(["train", "--models", "item2item"], settings)

        before = await recommendations(settings, "u1")
        assert any(reason.startswith("similar_to:") for _, why in before for reason in why), before
        archive_before = archive_keys(settings)
        checkpoints_before = await checkpoints(settings)
        assert archive_before
        assert checkpoints_before

        down = recstream(["down"], settings)
        assert "moto-server" in down.stdout
        assert not stack.port_open(ports[0])
        assert not stack.port_open(ports[1])
        status = recstream(["status"], settings)
        assert "stopped" in status.stdout
        assert "running" not in status.stdout
        recstream(["up"], settings)
        assert "running" in recstream(["status"], settings).stdout

        assert await recommendations(settings, "u1") == before
        assert archive_keys(settings) == archive_before
        assert await checkpoints(settings) == checkpoints_before
        assert dead_letters(settings) == 1

        # The worker resumes after its checkpoints: a new event is applied, and the old
        # malformed record (before the checkpoint) is not read, so not dead-lettered again.
        with agent_worker(settings, log):
            await post(settings, [{"event_type": "click", "user_id": probe_key, "item_id": "new"}])

            async def moved(settings: Settings) -> bool:
                now = await checkpoints(settings)
                return now != checkpoints_before and await caught_up(settings)

            await eventually(
                lambda: moved(settings), "the checkpoint moving past the new event", log, within=300
            )
            await asyncio.sleep(0.5)  # let a re-read, if any, reach the dead-letter queue
        assert dead_letters(settings) == 1, tail(log)

        recstream(["down", "--wipe"], settings)
        recstream(["up"], settings)
        assert archive_keys(settings) == []
        assert await checkpoints(settings) == {}
    finally:
        subprocess.run(  # noqa: ASYNC221 (clean-up; nothing else runs)
            [sys.executable, "-m", "recstream.cli", "down"],
            env={**os.environ, **settings.to_env()},
            capture_output=True,
            timeout=120,
            check=False,
        )


@pytest.mark.parametrize("max_records", [1000])
def test_the_emulator_trims_old_records_and_keeps_numbering(
    tmp_path: Path, max_records: int
) -> None:
    server = stack.start_moto(stack.free_port(), tmp_path, max_records_per_shard=max_records)
    try:
        settings = Settings(aws_endpoint_url=server.url, stream_shards=1)
        stack.create_resources(settings)
        kinesis = sync_client(settings, "kinesis")
        numbers = []
        for start in range(0, 1500, 500):
            batch = [{"Data": b"x", "PartitionKey": f"k{n}"} for n in range(start, start + 500)]
            result = kinesis.put_records(StreamName=settings.stream_name, Records=batch)
            numbers += [int(r["SequenceNumber"]) for r in result["Records"]]
        assert numbers == list(range(numbers[0], numbers[0] + 1500))  # no number repeats
        shard = kinesis.list_shards(StreamName=settings.stream_name)["Shards"][0]["ShardId"]
        iterator = kinesis.get_shard_iterator(
            StreamName=settings.stream_name, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        records = kinesis.get_records(ShardIterator=iterator, Limit=10_000)["Records"]
        # The oldest 500 were trimmed; the rest come back in order, from the oldest kept.
        assert [int(r["SequenceNumber"]) for r in records] == numbers[500:]
        after = kinesis.get_shard_iterator(
            StreamName=settings.stream_name,
            ShardId=shard,
            ShardIteratorType="AFTER_SEQUENCE_NUMBER",
            StartingSequenceNumber=str(numbers[1200]),
        )["ShardIterator"]
        tail_records = kinesis.get_records(ShardIterator=after, Limit=50)
        assert [int(r["SequenceNumber"]) for r in tail_records["Records"]] == numbers[1201:1251]
        assert tail_records["MillisBehindLatest"] >= 0
    finally:
        server.stop()


def test_the_emulator_keeps_objects_messages_items_and_records_across_a_restart(
    tmp_path: Path,
) -> None:
    state = tmp_path / "moto-state"
    port = stack.free_port()
    settings = Settings(aws_endpoint_url=f"http://127.0.0.1:{port}", stream_shards=1)

    def start() -> stack.Server:
        return stack.start_moto(port, tmp_path, state_dir=state)

    server = start()
    try:
        stack.create_resources(settings)
        s3 = sync_client(settings, "s3")
        for n in range(3):
            s3.put_object(Bucket=settings.bucket, Key=f"archive/k{n}", Body=b"x" * (n + 1))
        sqs = sync_client(settings, "sqs")
        url = sqs.get_queue_url(QueueName=settings.dlq_name)["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="dead")
        dynamodb = sync_client(settings, "dynamodb")
        dynamodb.put_item(TableName=settings.leases_table, Item={"lease_key": {"S": "a"}})
        kinesis = sync_client(settings, "kinesis")
        put = kinesis.put_record(StreamName=settings.stream_name, Data=b"r", PartitionKey="k")
    finally:
        server.stop()
    server = start()
    try:
        stack.create_resources(settings)  # as `recstream up` does: must not empty anything
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=settings.bucket)["Contents"]]
        assert keys == ["archive/k0", "archive/k1", "archive/k2"]
        assert s3.get_object(Bucket=settings.bucket, Key="archive/k2")["Body"].read() == b"xxx"
        assert sqs.receive_message(QueueUrl=url)["Messages"][0]["Body"] == "dead"
        item = dynamodb.get_item(TableName=settings.leases_table, Key={"lease_key": {"S": "a"}})
        assert "Item" in item
        after = kinesis.put_record(StreamName=settings.stream_name, Data=b"s", PartitionKey="k")
        # numbering continues: a checkpoint taken before the restart still means the same
        assert int(after["SequenceNumber"]) == int(put["SequenceNumber"]) + 1
    finally:
        server.stop()
