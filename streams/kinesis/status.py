"""What `recstream streams status` shows: per app and shard, the lease and the lag.

Everything comes from the lease table and from Kinesis, not from the workers, so it
works while workers are down (that is when it is most useful). The lag of a shard is
Kinesis's MillisBehindLatest for a one-record read just after the shard's checkpoint:
how far behind the tip of the shard the committed position is.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from recstream.aws import async_client, error_code, translate
from recstream.settings import Settings
from streams.leases import SHARD_END, TRIM_HORIZON, DynamoDBLeaseStore, LeaseInfo

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_kinesis import KinesisClient

__all__ = ["ShardStatus", "app_ids", "shard_status"]


@dataclass(frozen=True)
class ShardStatus:
    """One row of `recstream streams status`."""

    app_id: str
    shard_id: str
    owner: str | None
    checkpoint: str
    sub_sequence: int
    lag_ms: int | None
    """MillisBehindLatest after the checkpoint; None when the shard is finished or gone."""
    lease_age_s: float
    """Seconds since the owner last wrote the lease."""
    expired: bool
    parents: tuple[str, ...]


async def app_ids(settings: Settings, dynamodb: DynamoDBClient | None = None) -> list[str]:
    """Every app with leases on ``settings.stream_name`` in the lease table (through
    ``dynamodb`` when given: a caller that asks every few seconds keeps one client)."""
    suffix = f"#{settings.stream_name}"
    found: set[str] = set()
    try:
        async with contextlib.AsyncExitStack() as stack:
            if dynamodb is None:
                dynamodb = await stack.enter_async_context(async_client(settings, "dynamodb"))
            paginator = dynamodb.get_paginator("scan")
            async for page in paginator.paginate(
                TableName=settings.leases_table,
                ProjectionExpression="#scope",
                ExpressionAttributeNames={"#scope": "scope"},
            ):
                for item in page.get("Items", []):
                    scope = item.get("scope", {}).get("S", "")
                    if scope.endswith(suffix):
                        found.add(scope[: -len(suffix)])
    except (BotoCoreError, ClientError) as exc:
        raise translate(exc, f"lease table {settings.leases_table!r}", settings) from exc
    return sorted(found)


async def _lag(
    kinesis: KinesisClient, stream: str, lease: LeaseInfo, settings: Settings
) -> int | None:
    checkpoint = lease.checkpoint
    if checkpoint.sequence_number == SHARD_END:
        return None
    args: dict[str, Any] = {"ShardIteratorType": "TRIM_HORIZON"}
    if checkpoint.sequence_number != TRIM_HORIZON:
        args = {
            "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
            "StartingSequenceNumber": checkpoint.sequence_number,
        }
    try:
        iterator = await kinesis.get_shard_iterator(
            StreamName=stream, ShardId=lease.shard_id, **args
        )
        response = await kinesis.get_records(ShardIterator=iterator["ShardIterator"], Limit=1)
    except ClientError as exc:
        if error_code(exc) in ("ResourceNotFoundException", "InvalidArgumentException"):
            # The shard aged out, or the checkpoint is older than the retention period.
            return None
        raise translate(exc, f"reading the lag of {lease.shard_id}", settings, "kinesis") from exc
    except BotoCoreError as exc:
        raise translate(exc, f"reading the lag of {lease.shard_id}", settings, "kinesis") from exc
    return response.get("MillisBehindLatest")


async def shard_status(settings: Settings, app_id: str | None = None) -> list[ShardStatus]:
    """The rows for one app, or for every app consuming ``settings.stream_name``."""
    apps = [app_id] if app_id else await app_ids(settings)
    rows: list[ShardStatus] = []
    now = time.time()
    async with DynamoDBLeaseStore(settings) as store, async_client(settings, "kinesis") as kinesis:
        for app in apps:
            for lease in await store.list_leases(f"{app}#{settings.stream_name}"):
                rows.append(
                    ShardStatus(
                        app_id=app,
                        shard_id=lease.shard_id,
                        owner=lease.owner,
                        checkpoint=lease.checkpoint.sequence_number,
                        sub_sequence=lease.checkpoint.sub_sequence,
                        lag_ms=await _lag(kinesis, settings.stream_name, lease, settings),
                        lease_age_s=max(0.0, now - lease.last_renewed),
                        expired=lease.owner is None or now > lease.expires_at,
                        parents=lease.parent_shard_ids,
                    )
                )
    return rows
