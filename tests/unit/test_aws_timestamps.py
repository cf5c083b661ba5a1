"""`recstream.aws.parse_timestamp`, the clients' timestamp parser: the instants botocore's
own parser gives, without dateutil for the epoch seconds of every Kinesis record."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from botocore.utils import parse_timestamp as botocore_parse_timestamp

from recstream.aws import _aio_session, parse_timestamp


@pytest.mark.parametrize(
    "value",
    [
        1764506178.123,
        1764506178,
        0,
        "1764506178.5",
        "2026-11-30T12:00:00Z",
        "2026-11-30T12:00:00.250+02:00",
        "Mon, 30 Nov 2026 12:00:00 GMT",
    ],
)
def test_the_same_instant_as_botocore(value: float | str) -> None:
    # (botocore's stubs say str; it parses epoch numbers too)
    assert parse_timestamp(value) == botocore_parse_timestamp(value)  # type: ignore[arg-type]


async def test_get_records_arrival_times_are_parsed_in_utc() -> None:
    """The process's clients parse with it (a GetRecords answer, as Kinesis sends it)."""
    session = _aio_session()
    model = await session.get_service_model("kinesis")
    shape = model.operation_model("GetRecords").output_shape
    parser = session.get_component("response_parser_factory").create_parser("json")
    body = orjson.dumps(
        {
            "Records": [
                {
                    "SequenceNumber": "1",
                    "ApproximateArrivalTimestamp": 1764506178.123,
                    "Data": "aGk=",
                    "PartitionKey": "u",
                }
            ],
            "MillisBehindLatest": 0,
        }
    )
    parsed = await parser.parse({"body": body, "headers": {}, "status_code": 200}, shape)
    arrival = parsed["Records"][0]["ApproximateArrivalTimestamp"]
    assert arrival == datetime.fromtimestamp(1764506178.123, UTC)
    assert arrival.tzinfo is UTC  # botocore's own: dateutil's tzlocal(), 20 µs a record
