"""Input hardening: every AWS limit a VALID input can reach, against real emulators.

Each test here fails without its fix: moto and kinesis-mock both refuse a partition key
over 256 characters (the whole PutRecords call), moto refuses a DynamoDB item over 400 KB
(the whole BatchWriteItem), and the byte counts are measured, not assumed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest
from pydantic import ValidationError

from recstream.archive import object_key
from recstream.aws import async_client
from recstream.settings import (
    NAMESPACE_PATTERN,
    Settings,
)
from recstream.windows import DynamoWindows, WindowEntry
from streams.envelope import decode
from streams.kinesis.writer import (
    MAX_BYTES_PER_CALL,
    MAX_RECORD_BYTES,
    _batches,
    partition_key_for,
)
from streams.producer import KinesisProducer, record_for
from streams.schema import MAX_CONTEXT, MAX_ID_LENGTH, MAX_IMPRESSION, Event
from tests.conftest import RunningApi
from tests.serving.test_collector import click, post, raw_records, read_stream

LONG_SESSION = "s" * MAX_ID_LENGTH
# The costliest character to encode: one that JSON escapes to six bytes.
WORST_CHAR = "\x01"
# The costliest in UTF-8 (four bytes) that JSON leaves alone.
WIDE_CHAR = "\U0001f600"


def anonymous(session: str, item: str = "i1") -> dict[str, Any]:
    return {"event_type": "click", "session_id": session, "item_id": item}


async def test_a_256_character_session_id_does_not_fail_its_neighbours(api: RunningApi) -> None:
    batch = [click(f"u{i}", f"i{i}") for i in range(5)] + [anonymous(LONG_SESSION)]
    response = await post(api, batch)
    assert response.status_code == 202, response.text
    assert len(response.json()["accepted"]) == 6
    on_stream = read_stream(api.settings)
    assert len(on_stream) == 6
    (key, event), *_ = [(k, e) for k, e in on_stream if e.session_id]
    # Routed by the hash of the actor (a valid partition key), while its message keeps
    # the full actor and the event its full id; every record's partition key is valid
    # (an aggregated record carries its first event's).
    assert len(partition_key_for(f"session:{LONG_SESSION}".encode())) == 64
    assert all(len(record["PartitionKey"]) <= 256 for record in raw_records(api.settings))
    assert key == f"session:{LONG_SESSION}"
    assert event.session_id == LONG_SESSION


async def test_long_keys_keep_one_actor_on_one_shard(kinesis_mock_settings: Settings) -> None:
    # kinesis-mock routes by the key's MD5 as Kinesis does: the hash must be stable.
    events = [Event(event_type="view", session_id=LONG_SESSION, item_id=f"i{n}") for n in range(20)]
    async with KinesisProducer(kinesis_mock_settings) as producer:
        results = await producer.put_events(events)
    assert all(r.ok for r in results)
    assert len({r.shard_id for r in results}) == 1


async def test_buffered_sends_from_concurrent_callers_never_fail_each_other(
    kinesis_mock_settings: Settings,
) -> None:
    """`send` batches events of concurrent callers into one PutRecords call; one caller's
    long key (or oversized event) must not fail the others' events in that call."""
    too_big = Event.model_construct(
        **{
            **Event(event_type="view", user_id="big", item_id="i").model_dump(),
            "properties": {"blob": "x" * (MAX_RECORD_BYTES + 1)},
        }
    )
    async with KinesisProducer(kinesis_mock_settings, linger=0.2) as producer:

        async def caller(n: int) -> list[Any]:
            events = [Event(event_type="view", user_id=f"u{n}", item_id=f"i{k}") for k in range(5)]
            if n == 3:
                events.append(Event(event_type="view", session_id=LONG_SESSION, item_id="x"))
            if n == 5:
                events.append(too_big)
            futures = [await producer.send(event) for event in events]
            return list(await asyncio.gather(*futures))

        outcomes = await asyncio.gather(*(caller(n) for n in range(8)))
    results = [r for per_caller in outcomes for r in per_caller]
    assert len(results) == 8 * 5 + 2
    failed = [r for r in results if not r.ok]
    assert [r.event_id for r in failed] == [too_big.event_id]
    assert not failed[0].retriable
    assert "1 MiB" in (failed[0].error or "")


def worst_case_event() -> Event:
    """The largest event the schema accepts, in encoded bytes."""
    worst_id = WORST_CHAR * MAX_ID_LENGTH
    return Event(
        event_id=worst_id,
        event_type="a" * 64,
        user_id="u" + worst_id[1:],
        session_id=worst_id,
        item_id=worst_id,
        recommendation_id=worst_id,
        event_value=-1.2345678901234567e-300,
        impression=[f"{n:02d}" + worst_id[2:] for n in range(MAX_IMPRESSION)],
        # properties are bounded by their serialized size (1 KiB) already
        context={f"{n:02d}" + WIDE_CHAR * 62: worst_id for n in range(MAX_CONTEXT)},
    )


def test_the_largest_valid_event_fits_one_kinesis_record() -> None:
    record = record_for(worst_case_event())
    assert len(record["Data"]) < MAX_RECORD_BYTES
    assert 1 <= len(record["PartitionKey"]) <= 256


def test_a_putrecords_call_is_sized_in_bytes_including_partition_keys() -> None:
    # 500 records whose keys are 256 four-byte characters: 1 KiB each on the wire.
    key = WIDE_CHAR * 256
    data = b"x" * (MAX_BYTES_PER_CALL // 500 - 300)
    records = [{"Data": data, "PartitionKey": key} for _ in range(500)]
    for batch in _batches(records):
        wire = sum(len(records[i]["Data"]) + len(key.encode()) for i in batch)
        assert wire <= MAX_BYTES_PER_CALL
        assert len(batch) <= 500


async def test_the_largest_window_of_worst_events_is_stored_by_dynamodb(
    settings: Settings,
) -> None:
    """A window of valid events with the longest (escaped) ids would pass DynamoDB's 400 KB
    item limit; the durable copy keeps the newest entries that fit instead of failing the
    whole BatchWriteItem (and with it every other actor of the batch)."""
    largest = settings.model_copy(update={"window_size": 1000})
    entry = WindowEntry.of(worst_case_event())
    actor = "session:" + WIDE_CHAR * MAX_ID_LENGTH  # the largest partition key value
    async with async_client(settings, "dynamodb") as client:
        durable = DynamoWindows(client, largest)
        await durable.put({(settings.namespace, actor): [entry] * largest.window_size})
        stored = await durable.get(settings.namespace, actor)
        assert stored is not None
        assert 0 < len(stored) < largest.window_size


def test_archive_keys_stay_under_s3s_1024_bytes() -> None:
    namespace = "n" * 64  # the longest NAMESPACE_PATTERN allows
    assert NAMESPACE_PATTERN.endswith("{0,63}$")
    assert len(object_key(namespace, time.time()).encode()) < 1024


def test_event_value_refuses_booleans() -> None:
    with pytest.raises(ValidationError) as info:
        Event.model_validate(
            {"event_type": "view", "user_id": "u", "item_id": "i", "event_value": True}
        )
    (error,) = info.value.errors()
    assert error["loc"] == ("event_value",)
    assert "not a boolean" in error["msg"]
    ok = Event.model_validate(
        {"event_type": "view", "user_id": "u", "item_id": "i", "event_value": 1}
    )
    assert ok.event_value == 1.0


def test_nested_properties_are_refused_with_one_clear_problem() -> None:
    with pytest.raises(ValidationError) as info:
        Event.model_validate(
            {"event_type": "view", "user_id": "u", "item_id": "i", "properties": {"p": {"q": 1}}}
        )
    (error,) = info.value.errors()
    assert error["loc"] == ("properties",)
    assert "flatten" in error["msg"]


async def test_a_deeply_nested_body_is_a_422_not_a_crash(api: RunningApi) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    response = await post(api, deep)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "malformed_body"
    # and the server still answers
    assert (await post(api, click())).status_code == 202


async def test_concurrent_requests_with_a_bad_event_do_not_fail_the_others(
    api: RunningApi,
) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        bodies = [[click(f"u{n}", "i1")] for n in range(10)]
        bodies[4] = [anonymous(LONG_SESSION), {"event_type": "view", "user_id": "u"}]
        responses = await asyncio.gather(*(client.post("/v1/events", json=b) for b in bodies))
    for n, response in enumerate(responses):
        assert response.status_code == 202, (n, response.text)
    assert responses[4].json()["rejected"][0]["errors"][0]["field"] == "item_id"
    keys = [key for key, _ in read_stream(api.settings)]
    assert len(keys) == 10  # nine clicks and the long session; the invalid one rejected


def test_a_record_decodes_to_the_full_actor() -> None:
    event = Event(event_type="view", session_id=LONG_SESSION, item_id="i")
    (message,) = decode(record_for(event)["Data"])
    assert message.key == f"session:{LONG_SESSION}".encode()
    assert orjson.loads(message.value)["session_id"] == LONG_SESSION
