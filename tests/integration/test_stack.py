"""The local stack starts, and the init script creates every resource, idempotently."""

from __future__ import annotations

from recstream import stack
from recstream.aws import sync_client
from recstream.settings import Settings


def test_resources_exist_and_init_is_idempotent(settings: Settings) -> None:
    stack.create_resources(settings)  # a second run changes nothing and does not fail
    kinesis = sync_client(settings, "kinesis")
    summary = kinesis.describe_stream_summary(StreamName=settings.stream_name)
    assert summary["StreamDescriptionSummary"]["OpenShardCount"] == settings.stream_shards
    dynamodb = sync_client(settings, "dynamodb")
    tables = dynamodb.list_tables()["TableNames"]
    assert settings.windows_table in tables
    assert settings.leases_table in tables
    s3 = sync_client(settings, "s3")
    assert settings.bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    sqs = sync_client(settings, "sqs")
    assert sqs.get_queue_url(QueueName=settings.dlq_name)["QueueUrl"]


def test_kinesis_mock_issues_real_style_sequence_numbers(kinesis_mock_settings: Settings) -> None:
    kinesis = sync_client(kinesis_mock_settings, "kinesis")
    result = kinesis.put_record(
        StreamName=kinesis_mock_settings.stream_name, Data=b"x", PartitionKey="u1"
    )
    assert len(result["SequenceNumber"]) >= 50
