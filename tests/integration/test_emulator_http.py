"""The emulator answers many requests per connection (recstream.emulator, session 7).

werkzeug's server closed every connection after one response, so each AWS call paid for a
new TCP connection and a new server thread, in the emulator and in every client.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from recstream import stack
from recstream.aws import sync_client
from recstream.settings import Settings

AUTH = (
    "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/kinesis/aws4_request, "
    "SignedHeaders=host, Signature=0"
)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Settings]:
    server = stack.start_moto(stack.free_port(), tmp_path)
    try:
        settings = Settings(aws_endpoint_url=server.url, stream_shards=1)
        stack.create_resources(settings)
        yield settings
    finally:
        server.stop()


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
