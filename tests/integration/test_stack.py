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
    # Every test creates its own tables, so the shared moto soon holds more than one
    # ListTables page (100 names): ask for each table instead.
    for table in (settings.windows_table, settings.leases_table, settings.attribution_table):
        assert dynamodb.describe_table(TableName=table)["Table"]["TableStatus"] == "ACTIVE"
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
