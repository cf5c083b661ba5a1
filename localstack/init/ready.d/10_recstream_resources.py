#!/usr/bin/env python3
"""Create recstream's AWS resources, idempotently: stream, tables, bucket, dead-letter queue.

The same file runs unchanged in three places:

* against moto server: `recstream up` runs it with the project's settings in the env;
* inside LocalStack: `localstack/docker-compose.yml` mounts this folder as LocalStack's
  ready hooks (/etc/localstack/init/ready.d), whose Python has boto3;
* against real AWS: leave RECSTREAM_AWS_ENDPOINT_URL empty and run it with credentials.

It imports nothing from recstream on purpose, so it works inside LocalStack's container.
Its defaults must equal `recstream.settings.Settings`; tests/unit/test_settings.py
checks that they do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

DEFAULTS = {
    "RECSTREAM_AWS_ENDPOINT_URL": "http://127.0.0.1:4566",
    "RECSTREAM_KINESIS_ENDPOINT_URL": "",
    "RECSTREAM_AWS_REGION": "us-east-1",
    "RECSTREAM_STREAM_NAME": "recstream-events",
    "RECSTREAM_STREAM_SHARDS": "2",
    "RECSTREAM_TABLE_PREFIX": "recstream",
    "RECSTREAM_BUCKET": "recstream-archive",
    "RECSTREAM_DLQ_NAME": "recstream-dlq",
}


def client(service: str, endpoint: str, region: str) -> Any:
    kwargs: dict[str, Any] = {
        "region_name": region,
        "config": Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5),
    }
    if endpoint:
        kwargs.update(
            endpoint_url=endpoint,
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
        )
    return boto3.client(service, **kwargs)


def code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def wait(what: str, check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"recstream init: {what} did not become ready within {timeout:.0f}s")
        time.sleep(0.1)


def create_stream(kinesis: Any, name: str, shards: int) -> None:
    try:
        kinesis.create_stream(StreamName=name, ShardCount=shards)
        print(f"recstream init: created Kinesis stream {name} ({shards} shards)")
    except ClientError as exc:
        if code(exc) != "ResourceInUseException":
            raise
    wait(
        f"stream {name}",
        lambda: (
            kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"][
                "StreamStatus"
            ]
            == "ACTIVE"
        ),
    )


def create_table(dynamodb: Any, name: str, key: str, ttl_attribute: str | None) -> None:
    try:
        dynamodb.create_table(
            TableName=name,
            KeySchema=[{"AttributeName": key, "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
            # Encrypted at rest with the AWS-managed KMS key (docs/security.md).
            SSESpecification={"Enabled": True, "SSEType": "KMS"},
        )
        print(f"recstream init: created DynamoDB table {name}")
    except ClientError as exc:
        if code(exc) != "ResourceInUseException":
            raise
    wait(
        f"table {name}",
        lambda: dynamodb.describe_table(TableName=name)["Table"]["TableStatus"] == "ACTIVE",
    )
    if ttl_attribute:
        try:
            dynamodb.update_time_to_live(
                TableName=name,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": ttl_attribute},
            )
        except ClientError as exc:
            # Already enabled: real DynamoDB refuses to enable it twice.
            if code(exc) != "ValidationException":
                raise


def create_bucket(s3: Any, name: str, region: str) -> None:
    try:
        if region == "us-east-1":
            s3.create_bucket(Bucket=name)
        else:
            s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
        print(f"recstream init: created S3 bucket {name}")
    except ClientError as exc:
        if code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def encrypt_bucket(s3: Any, name: str) -> None:
    # Default encryption: every object put without its own ServerSideEncryption (the
    # archive, models, dead letters) is stored encrypted (SSE-S3). Idempotent.
    s3.put_bucket_encryption(
        Bucket=name,
        ServerSideEncryptionConfiguration={
            "Rules": [
                {
                    "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"},
                    "BucketKeyEnabled": True,
                }
            ]
        },
    )


def create_queue(sqs: Any, name: str) -> None:
    # CreateQueue is idempotent when the attributes match.
    sqs.create_queue(QueueName=name, Attributes={"MessageRetentionPeriod": "1209600"})


def main(env: Mapping[str, str] = os.environ) -> None:
    def setting(name: str) -> str:
        return env.get(name, DEFAULTS[name]).strip()

    endpoint = setting("RECSTREAM_AWS_ENDPOINT_URL")
    kinesis_endpoint = setting("RECSTREAM_KINESIS_ENDPOINT_URL") or endpoint
    prefix = setting("RECSTREAM_TABLE_PREFIX")
    region = setting("RECSTREAM_AWS_REGION")
    create_stream(
        client("kinesis", kinesis_endpoint, region),
        setting("RECSTREAM_STREAM_NAME"),
        int(setting("RECSTREAM_STREAM_SHARDS")),
    )
    dynamodb = client("dynamodb", endpoint, region)
    create_table(dynamodb, f"{prefix}-windows", "pk", ttl_attribute="expires_at")
    create_table(dynamodb, f"{prefix}-leases", "lease_key", ttl_attribute=None)
    # The item/user catalog (recstream/catalog.py): pk = {ns}#item#{id} / {ns}#user#{id}.
    create_table(dynamodb, f"{prefix}-catalog", "pk", ttl_attribute=None)
    # Named recommendation filters (serving/filter_store.py): pk "{namespace}#{name}".
    create_table(dynamodb, f"{prefix}-filters", "pk", ttl_attribute=None)
    # agents/attribution.py: durable copy of the attribution counters (pk = Redis key).
    create_table(dynamodb, f"{prefix}-attribution", "pk", ttl_attribute="expires_at")
    # user feature vectors (agents/features.py), expiring like windows
    create_table(dynamodb, f"{prefix}-features", "pk", ttl_attribute="expires_at")
    create_bucket(client("s3", endpoint, region), setting("RECSTREAM_BUCKET"), region)
    # API keys (recstream/apikeys.py): salted hashes only, one item per key id.
    create_table(dynamodb, f"{prefix}-apikeys", "key_id", ttl_attribute=None)
    s3 = client("s3", endpoint, region)
    create_bucket(s3, setting("RECSTREAM_BUCKET"), region)
    encrypt_bucket(s3, setting("RECSTREAM_BUCKET"))
    create_queue(client("sqs", endpoint, region), setting("RECSTREAM_DLQ_NAME"))
    print(f"recstream init: resources ready at {endpoint or 'AWS ' + region}")


# LocalStack runs a ready hook with `exec(source, {})`: no `__name__` in those globals, so
# the name resolves to the builtins module's, "builtins". Without this second test the
# hook would do nothing and still be reported SUCCESSFUL.
if __name__ in ("__main__", "builtins"):
    main()
