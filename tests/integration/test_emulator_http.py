"""The emulator's request path (recstream.emulator, session 7): many requests per
connection, and the hot answers written faster with the same bytes and the same refusals.

werkzeug's server closed every connection after one response, so each AWS call paid for a
new TCP connection and a new server thread, in the emulator and in every client.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError

from recstream.aws import sync_client
from recstream.settings import Settings
from tests.integration.test_emulator_memory import running

AUTH = (
    "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kinesis/aws4_request, "
    "SignedHeaders=host, Signature=0"
)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Settings]:
    with running(tmp_path) as settings:
        yield settings


def kinesis_call(
    connection: http.client.HTTPConnection, action: str, body: dict[str, object]
) -> http.client.HTTPResponse:
    connection.request(
        "POST",
        "/",
        body=orjson.dumps(body),
        headers={
            "X-Amz-Target": f"Kinesis_20131202.{action}",
            "Content-Type": "application/x-amz-json-1.1",
            "Authorization": AUTH,
        },
    )
    return connection.getresponse()


def test_one_connection_carries_many_calls(emulator: Settings) -> None:
    assert emulator.aws_endpoint_url is not None
    port = int(emulator.aws_endpoint_url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        kinesis_call(connection, "ListStreams", {}).read()
        sock = connection.sock
        assert sock is not None  # http.client drops the socket of a closed connection
        for n in range(20):
            response = kinesis_call(
                connection,
                "PutRecord",
                {"StreamName": emulator.stream_name, "Data": "eA==", "PartitionKey": f"k{n}"},
            )
            payload = orjson.loads(response.read())
            assert response.status == 200, payload
            assert response.getheader("Connection") != "close"
            assert int(response.getheader("Content-Length") or -1) > 0
            assert payload["ShardId"] == "shardId-000000000000"
            assert connection.sock is sock  # the same connection, not a new one
    finally:
        connection.close()
    records = sync_client(emulator, "kinesis").describe_stream_summary(
        StreamName=emulator.stream_name
    )
    assert records["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE"


def test_a_body_the_service_does_not_read_is_not_taken_for_the_next_request(
    emulator: Settings,
) -> None:
    # moto's own /moto-api/ pages ignore any body; left in the socket, it would be read
    # as the next request's first line.
    assert emulator.aws_endpoint_url is not None
    port = int(emulator.aws_endpoint_url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/moto-api/data.json", body=b"GET /nothing HTTP/1.1\r\n\r\n")
        first = connection.getresponse()
        first.read()
        assert first.status == 200
        sock = connection.sock
        assert sock is not None
        response = kinesis_call(connection, "ListStreams", {})
        assert response.status == 200
        assert emulator.stream_name in orjson.loads(response.read())["StreamNames"]
        assert connection.sock is sock
    finally:
        connection.close()


def test_many_clients_calls_through_pooled_connections(emulator: Settings) -> None:
    """botocore's pool reuses its connections: every call still answered in full."""
    kinesis = sync_client(emulator, "kinesis")
    for n in range(50):
        kinesis.put_record(StreamName=emulator.stream_name, Data=b"x" * 2000, PartitionKey=f"{n}")
    shard = kinesis.list_shards(StreamName=emulator.stream_name)["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(
        StreamName=emulator.stream_name, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    records = kinesis.get_records(ShardIterator=iterator, Limit=100)["Records"]
    assert [r["Data"] for r in records] == [b"x" * 2000] * 50


def test_fast_kinesis_answers_are_byte_for_byte_moto_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """`patch_kinesis_responses` writes PutRecords and GetRecords without moto's
    serializer; the bytes must be the ones moto's serializer writes (in this process, on
    moto's own models: two streams given the same calls, one answered each way)."""
    from moto.kinesis.responses import KinesisResponse
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.test import Client

    from recstream.emulator import patch_kinesis_responses

    for name in ("put_records", "get_records"):  # restored after the test
        monkeypatch.setattr(KinesisResponse, name, getattr(KinesisResponse, name))
    original = {name: getattr(KinesisResponse, name) for name in ("put_records", "get_records")}
    patch_kinesis_responses()
    fast = {name: getattr(KinesisResponse, name) for name in ("put_records", "get_records")}
    client = Client(DomainDispatcherApplication(create_backend_app))

    def call(action: str, body: dict[str, object]) -> bytes:
        response = client.post(
            "/",
            data=orjson.dumps(body),
            headers={
                "X-Amz-Target": f"Kinesis_20131202.{action}",
                "Content-Type": "application/x-amz-json-1.1",
                "Authorization": AUTH,
            },
        )
        assert response.status_code == 200, response.data
        assert response.headers["Content-Type"] == "application/x-amz-json-1.1"
        return bytes(response.data)

    records = [
        {"Data": "aGVsbG8=", "PartitionKey": "a"},
        {"Data": "", "PartitionKey": "b"},
        {"Data": "eHh4eA==", "PartitionKey": "c", "ExplicitHashKey": "1"},
    ]
    answers: dict[str, list[bytes]] = {}
    stream = "fast-answers"
    for way, methods in (("moto", original), ("fast", fast)):
        for name, method in methods.items():
            setattr(KinesisResponse, name, method)
        # The same name for both (shard iterators name their stream), so one after the other.
        call("CreateStream", {"StreamName": stream, "ShardCount": 1})
        put = call("PutRecords", {"StreamName": stream, "Records": records})
        shard = {"StreamName": stream, "ShardId": "shardId-000000000000"}
        iterator = orjson.loads(
            call("GetShardIterator", {**shard, "ShardIteratorType": "TRIM_HORIZON"})
        )["ShardIterator"]
        first = call("GetRecords", {"ShardIterator": iterator, "Limit": 2})
        rest = call("GetRecords", {"ShardIterator": orjson.loads(first)["NextShardIterator"]})
        call("DeleteStream", {"StreamName": stream})
        answers[way] = [put, first, rest]
    # Only the arrival times differ (each milliseconds in moto's own format).
    arrival = re.compile(rb'"ApproximateArrivalTimestamp": [0-9]+(\.[0-9]{1,3})?,')
    for answer in answers["fast"][1:]:
        assert len(arrival.findall(answer)) == len(orjson.loads(answer)["Records"])
    assert [arrival.sub(b"T,", a) for a in answers["fast"]] == [
        arrival.sub(b"T,", a) for a in answers["moto"]
    ]


def test_items_are_refused_over_the_size_limit_as_before(emulator: Settings) -> None:
    """`patch_dynamodb_items` sizes an item once; the limit is moto's (405,000 bytes of
    names and values), through PutItem and BatchWriteItem alike."""
    dynamodb = sync_client(emulator, "dynamodb")
    table = emulator.windows_table

    def item(pk: str, extra: int) -> dict[str, Any]:
        """An item of 405,000 bytes plus ``extra``: names and values, as moto counts."""
        payload = 405_000 + extra - (2 + len(pk)) - (1 + 1000) - 1
        return {"pk": {"S": pk}, "a": {"S": "x" * 1000}, "b": {"S": "y" * payload}}

    dynamodb.put_item(TableName=table, Item=item("ok", 0))
    dynamodb.batch_write_item(RequestItems={table: [{"PutRequest": {"Item": item("ok2", 0)}}]})
    with pytest.raises(ClientError) as refused:
        dynamodb.put_item(TableName=table, Item=item("no", 1))
    with pytest.raises(ClientError) as refused_in_batch:
        dynamodb.batch_write_item(RequestItems={table: [{"PutRequest": {"Item": item("no", 1)}}]})
    for error in (refused.value, refused_in_batch.value):
        assert error.response["Error"]["Code"] == "ValidationException"
        assert "Item size has exceeded" in error.response["Error"]["Message"]
    stored = dynamodb.get_item(TableName=table, Key={"pk": {"S": "ok2"}}, ConsistentRead=True)
    assert stored["Item"]["b"]["S"] == item("ok2", 0)["b"]["S"]
    assert "Item" not in dynamodb.get_item(TableName=table, Key={"pk": {"S": "no"}})
