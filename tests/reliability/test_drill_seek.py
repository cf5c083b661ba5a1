"""Drill (runtime open item): seeking to an in-flight offset with ``whole_records``.

With ``make_app(..., whole_records=True)`` one faust message is a whole aggregated record
of many events. Faust seeks a partition to an offset it handed out and has not committed
(an agent restarted after a crash, a stream recovery). The consumer resumes
``AT_SEQUENCE_NUMBER`` of that record and skips the inner messages *before* the sought
message; it used to compute that from the record's *last* sub-sequence, so it skipped
all but the last event of the record: every other event of it was lost.

Real parts: moto's Kinesis and DynamoDB leases, the faust app on the kinesis:// transport.
"""

from __future__ import annotations

import pytest

from recstream.settings import Settings
from streams.kinesis import consumer_of, make_app, running, unpack
from streams.schema import Event
from tests.conftest import LocalStack, make_settings
from tests.streams.kinesis_helpers import make_events, put_events, wait_until

RECORDS, PER_RECORD = 3, 10


@pytest.fixture
def one_shard(local_stack: LocalStack) -> Settings:
    settings = make_settings(local_stack, stream_shards=1)
    return settings.model_copy(update={"poll_interval_s": 0.05, "lease_duration_s": 3.0})


async def test_seeking_to_an_in_flight_whole_record_delivers_every_event_of_it(
    one_shard: Settings,
) -> None:
    settings = one_shard
    events = make_events(RECORDS * PER_RECORD, prefix="w")
    for n in range(RECORDS):  # one aggregated record per call on a one-shard stream
        await put_events(settings, events[n * PER_RECORD : (n + 1) * PER_RECORD], aggregate=True)
    delivered: list[tuple[int, list[str]]] = []
    # No commit while the test runs: every handed record stays in flight, seekable.
    app = make_app(settings, "t-seek", whole_records=True, broker_commit_interval=3600.0)

    @app.agent(app.topic(settings.stream_name, key_serializer="raw", value_serializer="raw"))
    async def collect(stream):  # type: ignore[no-untyped-def]
        async for event in stream.events():
            ids = [
                Event.from_json(m.value).event_id
                for m in unpack(event.key, event.value, event.headers)
            ]
            delivered.append((event.message.offset, ids))

    async with running(app):
        await wait_until(lambda: len(delivered) >= RECORDS, what="the three whole records")
        first_pass = list(delivered)
        assert [len(ids) for _, ids in first_pass] == [PER_RECORD] * RECORDS
        (tp,) = consumer_of(app).assignment()
        offset, ids_at_offset = first_pass[1]
        await consumer_of(app).seek(tp, offset)
        await wait_until(
            lambda: len(delivered) >= RECORDS + (RECORDS - 1), what="the re-read records"
        )
    again = delivered[RECORDS:]
    # The sought record comes back whole, then the one after it; nothing before it.
    assert again[0] == (offset, ids_at_offset)
    assert again[1] == first_pass[2]
    assert sorted(i for _, ids in again for i in ids) == sorted(
        e.event_id for e in events[PER_RECORD:]
    )
