"""The local stack starts, and the init script creates every resource, idempotently."""

from __future__ import annotations

import json
import urllib.request

import pytest

from recstream import stack
from recstream.aws import sync_client
from recstream.settings import Settings
from tests.conftest import LocalStack, unique


def test_resources_exist_and_init_is_idempotent(settings: Settings) -> None:
    stack.create_resources(settings)  # a second run changes nothing and does not fail
    assert_resources_exist(settings)


def assert_resources_exist(settings: Settings) -> None:
    kinesis = sync_client(settings, "kinesis")
    summary = kinesis.describe_stream_summary(StreamName=settings.stream_name)
    assert summary["StreamDescriptionSummary"]["OpenShardCount"] == settings.stream_shards
    dynamodb = sync_client(settings, "dynamodb")
    # Every test creates its own tables, so the shared moto soon holds more than one
    # ListTables page (100 names): ask for each table instead.
    for table in (
        settings.windows_table,
        settings.leases_table,
        settings.attribution_table,
        settings.features_table,
        settings.catalog_table,
        settings.filters_table,
        settings.apikeys_table,
    ):
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


def test_init_script_runs_the_way_localstack_runs_a_ready_hook(
    local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LocalStack's Python hook runner is `exec(source, {})`: no `__name__`, no arguments,
    # the settings from the environment. Run the script exactly so, against this tier.
    name = unique("hook")
    settings = Settings(
        aws_endpoint_url=local_stack.moto_url,
        redis_url=local_stack.redis_url,
        stream_name=f"{name}-events",
        table_prefix=name,
        bucket=f"{name}-archive",
        dlq_name=f"{name}-dlq",
    )
    for key, value in stack.resource_env(settings).items():
        monkeypatch.setenv(key, value)
    exec(stack.INIT_SCRIPT.read_bytes(), {})
    assert_resources_exist(settings)


def test_localstack_ran_the_init_script_as_its_ready_hook(local_stack: LocalStack) -> None:
    if local_stack.engine != "localstack":
        pytest.skip("LocalStack tier only: RECSTREAM_EMULATOR=localstack")
    # conftest started LocalStack with its ready hooks in localstack/init/ready.d and the
    # default resource names in its environment; nothing else creates these.
    defaults = Settings(aws_endpoint_url=local_stack.moto_url, redis_url=local_stack.redis_url)
    with urllib.request.urlopen(f"{local_stack.moto_url}/_localstack/init/ready") as response:
        report = json.loads(response.read())
    assert report["completed"] is True
    states = {(hook["stage"], hook["name"]): hook["state"] for hook in report["scripts"]}
    assert states == {("READY", stack.INIT_SCRIPT.name): "SUCCESSFUL"}
    assert_resources_exist(defaults)
