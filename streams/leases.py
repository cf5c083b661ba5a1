"""KCL-style shard leases in DynamoDB: who reads which shard, and where it got to.

Every shard of a stream has one lease item per consuming application::

    lease_key          "{app_id}#{stream}#{shardId}"   (hash key of {table_prefix}-leases)
    scope, shard_id    the two halves of the key, for reading it back
    owner              worker id of the holder; absent when nobody holds the lease
    counter            incremented by every write (take, renew, steal, release, checkpoint)
    checkpoint         TRIM_HORIZON, a sequence number, or SHARD_END
    sub_sequence       position inside an aggregated (v2) record
    parent_shard_ids   list of the shard's parents (after a split or merge)
    last_renewed       unix seconds of the last write by the holder (for status only)
    expires_at         last_renewed + lease duration (for status only)
    created_at         unix seconds when the lease was created
    start_here         true when the app met this shard with none of its parents leased
                       (the app's first start, or parents that aged out unread): the
                       app's start position applies to it, not TRIM_HORIZON

Every write is a conditional write on ``counter`` (and ``owner``), so of two workers that
race for a lease exactly one wins, and a worker whose lease was taken away learns it on
its next renew or checkpoint. Expiry is judged the way KCL judges it: a worker remembers
when it first saw each lease's counter, and a lease whose counter has not moved for the
lease duration *on this worker's own monotonic clock* is expired. Clock skew between hosts
therefore never expires a healthy lease, nor does a step of this host's wall clock (NTP, a
suspended laptop's catch-up); ``expires_at`` is only shown by `recstream streams status`.

The coordinator runs two tasks. The renewer renews held leases every lease duration / 3
(a refused renew means the lease was taken: it is revoked). The coordinator task, every
``take_interval_s`` (also lease duration / 3), reads the table and takes leases up to its
fair share, ``ceil(leasable leases / live workers)``, where the live workers are the
owners of unexpired leases. It takes expired or unowned leases first;
when there are none it steals at most one lease per cycle from the most-loaded worker, and
only when that worker holds at least two more than this one (so two workers never pass a
lease back and forth). A child shard is leasable once every parent's checkpoint is
SHARD_END, or the parent has aged out of the stream, so per-key order holds across splits
and merges. Assignment changes reach the transport through ``on_change(assigned,
revoked)``, awaited from the coordinator's own task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from recstream.aws import async_client, error_code, translate
from recstream.errors import RecstreamError
from recstream.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

__all__ = [
    "SHARD_END",
    "TRIM_HORIZON",
    "Checkpoint",
    "DynamoDBLeaseStore",
    "InMemoryLeaseStore",
    "KinesisShardSource",
    "LeaseCoordinator",
    "LeaseInfo",
    "LeaseLost",
    "LeaseStore",
    "OnChange",
    "ShardDescription",
    "ShardSource",
    "read_leases",
]

log = logging.getLogger(__name__)

SHARD_END: Final = "SHARD_END"
"""Checkpoint value of a closed shard that has been read to its end."""
TRIM_HORIZON: Final = "TRIM_HORIZON"
"""Checkpoint of a new lease: nothing has been read yet."""


class LeaseLost(RecstreamError):
    """This worker no longer holds the shard's lease; its checkpoint was refused.

    Another worker took or stole the lease (or this worker was paused for longer than the
    lease duration). Stop reading the shard; the new holder resumes from the last
    checkpoint that was accepted.
    """

    code = "lease_lost"


@dataclass(frozen=True)
class Checkpoint:
    """How far a shard has been processed."""

    sequence_number: str
    """Kinesis sequence number of the last processed record, SHARD_END or TRIM_HORIZON."""
    sub_sequence: int = 0
    """Position inside an aggregated (v2) record; 0 for single records."""


@dataclass(frozen=True)
class LeaseInfo:
    """One lease as stored; what `recstream streams status` shows per shard."""

    shard_id: str
    owner: str | None
    counter: int
    checkpoint: Checkpoint
    parent_shard_ids: tuple[str, ...]
    last_renewed: float
    """Unix seconds of the holder's last write."""
    expires_at: float
    """last_renewed + lease duration, as the holder saw it."""
    created_at: float = 0.0
    """Unix seconds when the lease was created."""
    start_here: bool = False
    """No lease of the shard's parents existed when its lease was created: the app never
    read them, so the app's start position (not TRIM_HORIZON) applies to this shard."""


OnChange = Callable[[frozenset[str], frozenset[str]], Awaitable[None]]
"""``on_change(assigned, revoked)``: handle ``revoked`` before reading ``assigned``."""


class LeaseStore(Protocol):
    """Conditional storage of lease items; the coordinator holds all the policy.

    A *scope* is ``"{app_id}#{stream}"``; leases are addressed by (scope, shard_id). Every
    mutating call is conditional and returns ``None``/``False`` when its condition failed
    (someone else wrote the lease since ``expected_counter`` was read). Store failures
    raise `recstream.errors.StoreUnavailable` (or a subclass), never botocore errors.
    """

    async def list_leases(self, scope: str) -> list[LeaseInfo]:
        """Every lease of the scope, read consistently."""
        ...

    async def get_lease(self, scope: str, shard_id: str) -> LeaseInfo | None: ...

    async def create_lease(
        self,
        scope: str,
        shard_id: str,
        *,
        parent_shard_ids: tuple[str, ...],
        now: float,
        start_here: bool = False,
    ) -> bool:
        """Create an unowned lease at TRIM_HORIZON; False when it already exists."""
        ...

    async def take_lease(
        self,
        scope: str,
        shard_id: str,
        *,
        owner: str,
        expected_owner: str | None,
        expected_counter: int,
        now: float,
        expires_at: float,
    ) -> LeaseInfo | None:
        """Become the owner (take or steal) if nobody wrote the lease since it was read."""
        ...

    async def renew_lease(
        self,
        scope: str,
        shard_id: str,
        *,
        owner: str,
        expected_counter: int,
        now: float,
        expires_at: float,
    ) -> LeaseInfo | None:
        """Bump the counter if ``owner`` still holds the lease at ``expected_counter``."""
        ...

    async def release_lease(
        self, scope: str, shard_id: str, *, owner: str, expected_counter: int, now: float
    ) -> bool:
        """Give the lease up (owner removed, checkpoint kept)."""
        ...

    async def update_checkpoint(
        self,
        scope: str,
        shard_id: str,
        checkpoint: Checkpoint,
        *,
        owner: str,
        expected_counter: int,
        now: float,
        expires_at: float,
    ) -> LeaseInfo | None:
        """Write the checkpoint (and bump the counter) if ``owner`` still holds the lease."""
        ...

    async def delete_lease(self, scope: str, shard_id: str) -> bool:
        """Delete a lease whose checkpoint is SHARD_END (a shard that aged out)."""
        ...

    async def aclose(self) -> None:
        """Release clients; the store may be reopened by using it again."""
        ...


# --- in memory ------------------------------------------------------------------------


class InMemoryLeaseStore:
    """A `LeaseStore` in a dict, with the same conditional semantics as DynamoDB.

    For unit and property tests of the coordinator, and for single-process demos. Several
    coordinators in one process may share one instance.
    """

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], LeaseInfo] = {}

    async def list_leases(self, scope: str) -> list[LeaseInfo]:
        return [lease for (s, _), lease in sorted(self._items.items()) if s == scope]

    async def get_lease(self, scope: str, shard_id: str) -> LeaseInfo | None:
        return self._items.get((scope, shard_id))

    async def create_lease(
        self,
        scope: str,
        shard_id: str,
        *,
        parent_shard_ids: tuple[str, ...],
        now: float,
        start_here: bool = False,
    ) -> bool:
        if (scope, shard_id) in self._items:
            return False
        self._items[scope, shard_id] = LeaseInfo(
            shard_id=shard_id,
            owner=None,
            counter=0,
            checkpoint=Checkpoint(TRIM_HORIZON),
            parent_shard_ids=tuple(parent_shard_ids),
            last_renewed=now,
            expires_at=now,
            created_at=now,
            start_here=start_here,
        )
        return True

    def _matching(
        self, scope: str, shard_id: str, owner: str | None, counter: int
    ) -> LeaseInfo | None:
        lease = self._items.get((scope, shard_id))
        if lease is None or lease.owner != owner or lease.counter != counter:
            return None
        return lease

    async def take_lease(
        self,
        scope: str,
        shard_id: str,
        *,
        owner: str,
        expected_owner: str | None,
        expected_counter: int,
        now: float,
        expires_at: float,
    ) -> LeaseInfo | None:
        lease = self._matching(scope, shard_id, expected_owner, expected_counter)
        if lease is None:
            return None
        new = replace(
            lease, owner=owner, counter=lease.counter + 1, last_renewed=now, expires_at=expires_at
        )
        self._items[scope, shard_id] = new
        return new

    async def renew_lease(
        self,
        scope: str,
        shard_id: str,
        *,
        owner: str,
        expected_counter: int,
        now: float,
        expires_at: float,
    ) -> LeaseInfo | None:
        lease = self._matching(scope, shard_id, owner, expected_counter)
        if lease is None:
            return None
        new = replace(lease, counter=lease.counter + 1, last_renewed=now, expires_at=expires_at)
        self._items[scope, shard_id] = new
        return new

    async def release_lease(
        self, scope: str, shard_id: str, *, owner: str, expected_counter: int, now: float
    ) -> bool:
        lease = self._matching(scope, shard_id, owner, expected_counter)
        if lease is None:
            return False
        self._items[scope, shard_id] = replace(
            lease, owner=None, counter=lease.counter + 1, expires_at=now
        )
        return True

    async def update_checkpoint(
        self,
        scope: str,
        shard_id: str,
        checkpoint: Checkpoint,
        *,
        owner: str,
        expected_counter: int,
        now: float,
        expires_at: float,
    ) -> LeaseInfo | None:
        lease = self._matching(scope, shard_id, owner, expected_counter)
        if lease is None:
            return None
        new = replace(
            lease,
            checkpoint=checkpoint,
            counter=lease.counter + 1,
            last_renewed=now,
            expires_at=expires_at,
        )
        self._items[scope, shard_id] = new
        return new

    async def delete_lease(self, scope: str, shard_id: str) -> bool:
        lease = self._items.get((scope, shard_id))
        if lease is None or lease.checkpoint.sequence_number != SHARD_END:
            return False
        del self._items[scope, shard_id]
        return True

    async def aclose(self) -> None:
        return None


# --- DynamoDB -------------------------------------------------------------------------


def _n(value: float | int) -> dict[str, str]:
    return {"N": repr(value) if isinstance(value, float) else str(value)}


class DynamoDBLeaseStore:
    """A `LeaseStore` on the DynamoDB table ``settings.leases_table`` (hash key lease_key).

    Several applications and streams share the table: the key is ``"{scope}#{shard_id}"``.
    The aiobotocore client is opened on first use and closed by `aclose`.
    """

    def __init__(
        self, settings: Settings, table: str | None = None, *, page_size: int | None = None
    ) -> None:
        self._settings = settings
        self.table = table or settings.leases_table
        self._page_size = page_size  # items per Scan page; DynamoDB's 1 MB pages if None
        self._stack: AsyncExitStack | None = None
        self._client: DynamoDBClient | None = None
        self._opening = asyncio.Lock()

    async def _db(self) -> DynamoDBClient:
        if self._client is None:
            async with self._opening:
                if self._client is None:
                    stack = AsyncExitStack()
                    # A worker cut off from DynamoDB must learn it within about one lease
                    # duration, not after botocore's default 30 s x 3 attempts: until
                    # then it keeps reading shards others may have taken.
                    timeout = max(2.0, self._settings.lease_duration_s / 2)
                    self._client = await stack.enter_async_context(
                        async_client(
                            self._settings,
                            "dynamodb",
                            connect_timeout=timeout,
                            read_timeout=timeout,
                            max_attempts=2,
                        )
                    )
                    self._stack = stack
        return self._client

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> DynamoDBLeaseStore:
        await self._db()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @staticmethod
    def _key(scope: str, shard_id: str) -> dict[str, Any]:
        return {"lease_key": {"S": f"{scope}#{shard_id}"}}

    def _error(self, exc: Exception, what: str) -> RecstreamError:
        return translate(exc, f"{what} in lease table {self.table!r}", self._settings)

    @staticmethod
    def _parse(item: dict[str, Any]) -> LeaseInfo:
        parents = item.get("parent_shard_ids", {}).get("L", [])
        return LeaseInfo(
            shard_id=item["shard_id"]["S"],
            owner=item["owner"]["S"] if "owner" in item else None,
            counter=int(item["counter"]["N"]),
            checkpoint=Checkpoint(
                item["checkpoint"]["S"], int(item.get("sub_sequence", {"N": "0"})["N"])
            ),
            parent_shard_ids=tuple(p["S"] for p in parents),
            last_renewed=float(item["last_renewed"]["N"]),
            expires_at=float(item["expires_at"]["N"]),
            created_at=float(item.get("created_at", {"N": "0"})["N"]),
            start_here=bool(item.get("start_here", {"BOOL": False})["BOOL"]),
        )

    async def list_leases(self, scope: str) -> list[LeaseInfo]:
        db = await self._db()
        leases: list[LeaseInfo] = []
        try:
            paginator = db.get_paginator("scan")
            pages = paginator.paginate(
                TableName=self.table,
                ConsistentRead=True,
                FilterExpression="#scope = :scope",
                ExpressionAttributeNames={"#scope": "scope"},
                ExpressionAttributeValues={":scope": {"S": scope}},
                PaginationConfig={"PageSize": self._page_size} if self._page_size else {},
            )
            async for page in pages:
                leases.extend(self._parse(item) for item in page.get("Items", []))
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, f"listing leases of {scope!r}") from exc
        return sorted(leases, key=lambda lease: lease.shard_id)

    async def get_lease(self, scope: str, shard_id: str) -> LeaseInfo | None:
        db = await self._db()
        try:
            response = await db.get_item(
                TableName=self.table, Key=self._key(scope, shard_id), ConsistentRead=True
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, f"reading lease {scope}#{shard_id}") from exc
        item = response.get("Item")
        return None if item is None else self._parse(item)

    async def create_lease(
        self,
        scope: str,
        shard_id: str,
        *,
        parent_shard_ids: tuple[str, ...],
        now: float,
        start_here: bool = False,
    ) -> bool:
        db = await self._db()
        item = {
            **self._key(scope, shard_id),
            "scope": {"S": scope},
            "shard_id": {"S": shard_id},
            "counter": _n(0),
            "checkpoint": {"S": TRIM_HORIZON},
            "sub_sequence": _n(0),
            "parent_shard_ids": {"L": [{"S": p} for p in parent_shard_ids]},
            "last_renewed": _n(now),
            "expires_at": _n(now),
            "created_at": _n(now),
            "start_here": {"BOOL": start_here},
        }
        try:
            await db.put_item(
                TableName=self.table,
                Item=item,
                ConditionExpression="attribute_not_exists(lease_key)",
            )
        except (BotoCoreError, ClientError) as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                return False
            raise self._error(exc, f"creating lease {scope}#{shard_id}") from exc
        return True

    async def _update(
        self,
        what: str,
        scope: str,
        shard_id: str,
        *,
        update: str,
        condition: str,
        values: dict[str, Any],
    ) -> LeaseInfo | None:
        db = await self._db()
        try:
            response = await db.update_item(
                TableName=self.table,
                Key=self._key(scope, shard_id),
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames={"#owner": "owner", "#counter": "counter"},
                ExpressionAttributeValues={":one": _n(1), **values},
                ReturnValues="ALL_NEW",
            )
        except (BotoCoreError, ClientError) as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                return None
            raise self._error(exc, f"{what} lease {scope}#{shard_id}") from exc
        return self._parse(response["Attributes"])

    async def take_lease(
        self,
        scope: str,
        shard_id: str,
        *,
        owner: str,
        expected_owner: str | None,
        expected_counter: int,
        now: float,
        expires_at: float,
    ) -> LeaseInfo | None:
        values: dict[str, Any] = {
            ":me": {"S": owner},
            ":counter": _n(expected_counter),
            ":now": _n(now),
            ":expires": _n(expires_at),
        }
        if expected_owner is None:
            owner_condition = "attribute_not_exists(#owner)"
        else:
            owner_condition = "#owner = :previous"
            values[":previous"] = {"S": expected_owner}
        return await self._update(
            "taking",
            scope,
            shard_id,
            update="SET #owner = :me, #counter = #counter + :one, "
            "last_renewed = :now, expires_at = :expires",
            condition=f"#counter = :counter AND {owner_condition}",
            values=values,
        )

    async def renew_lease(
        self,
        scope: str,
        shard_id: str,
        *,
        owner: str,
        expected_counter: int,
        now: float,
        expires_at: float,
    ) -> LeaseInfo | None:
        return await self._update(
            "renewing",
            scope,
            shard_id,
            update="SET #counter = #counter + :one, last_renewed = :now, expires_at = :expires",
            condition="#owner = :me AND #counter = :counter",
            values={
                ":me": {"S": owner},
                ":counter": _n(expected_counter),
                ":now": _n(now),
                ":expires": _n(expires_at),
            },
        )

    async def release_lease(
        self, scope: str, shard_id: str, *, owner: str, expected_counter: int, now: float
    ) -> bool:
        released = await self._update(
            "releasing",
            scope,
            shard_id,
            update="REMOVE #owner SET #counter = #counter + :one, expires_at = :now",
            condition="#owner = :me AND #counter = :counter",
            values={":me": {"S": owner}, ":counter": _n(expected_counter), ":now": _n(now)},
        )
        return released is not None

    async def update_checkpoint(
        self,
        scope: str,
        shard_id: str,
        checkpoint: Checkpoint,
        *,
        owner: str,
        expected_counter: int,
        now: float,
        expires_at: float,
    ) -> LeaseInfo | None:
        return await self._update(
            "checkpointing",
            scope,
            shard_id,
            update="SET checkpoint = :checkpoint, sub_sequence = :sub, "
            "#counter = #counter + :one, last_renewed = :now, expires_at = :expires",
            condition="#owner = :me AND #counter = :counter",
            values={
                ":me": {"S": owner},
                ":counter": _n(expected_counter),
                ":checkpoint": {"S": checkpoint.sequence_number},
                ":sub": _n(checkpoint.sub_sequence),
                ":now": _n(now),
                ":expires": _n(expires_at),
            },
        )

    async def delete_lease(self, scope: str, shard_id: str) -> bool:
        db = await self._db()
        try:
            await db.delete_item(
                TableName=self.table,
                Key=self._key(scope, shard_id),
                ConditionExpression="checkpoint = :end",
                ExpressionAttributeValues={":end": {"S": SHARD_END}},
            )
        except (BotoCoreError, ClientError) as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                return False
            raise self._error(exc, f"deleting lease {scope}#{shard_id}") from exc
        return True


async def read_leases(
    settings: Settings, *, app_id: str, stream_name: str, store: LeaseStore | None = None
) -> list[LeaseInfo]:
    """Every lease of one app and stream, without joining as a worker (for
    `recstream streams status`); the lease age is ``time.time() - info.last_renewed``."""
    if store is not None:
        return await store.list_leases(f"{app_id}#{stream_name}")
    async with DynamoDBLeaseStore(settings) as dynamodb:
        return await dynamodb.list_leases(f"{app_id}#{stream_name}")


# --- shard discovery ------------------------------------------------------------------


@dataclass(frozen=True)
class ShardDescription:
    """One shard as ListShards reports it."""

    shard_id: str
    parent_shard_ids: tuple[str, ...] = ()
    starting_hash_key: int = 0
    ending_hash_key: int = 2**128 - 1
    closed: bool = False
    """True once the shard has an ending sequence number (it was split or merged)."""


ShardSource = Callable[[], Awaitable[list[ShardDescription]]]
"""Returns every shard of the stream that has not aged out (open and closed)."""


class KinesisShardSource:
    """Lists a stream's shards with ListShards, following NextToken."""

    def __init__(self, settings: Settings, stream_name: str, *, page_size: int = 10_000) -> None:
        self._settings = settings
        self._stream = stream_name
        # 10,000 is ListShards' largest page, so one call lists nearly every stream. That
        # also spares moto's paginated path, which (unlike Kinesis and kinesis-mock) wants
        # StreamName beside NextToken; the NextToken path below follows Kinesis.
        self._page_size = page_size

    async def __call__(self) -> list[ShardDescription]:
        shards: list[ShardDescription] = []
        try:
            async with async_client(self._settings, "kinesis") as kinesis:
                limit = {"MaxResults": self._page_size}
                kwargs: dict[str, Any] = {"StreamName": self._stream, **limit}
                while True:
                    page = await kinesis.list_shards(**kwargs)
                    for shard in page.get("Shards", []):
                        parents = (
                            shard.get("ParentShardId"),
                            shard.get("AdjacentParentShardId"),
                        )
                        ranges = shard["HashKeyRange"]
                        shards.append(
                            ShardDescription(
                                shard_id=shard["ShardId"],
                                parent_shard_ids=tuple(p for p in parents if p),
                                starting_hash_key=int(ranges["StartingHashKey"]),
                                ending_hash_key=int(ranges["EndingHashKey"]),
                                closed="EndingSequenceNumber"
                                in shard.get("SequenceNumberRange", {}),
                            )
                        )
                    token = page.get("NextToken")
                    if not token:
                        break
                    # With NextToken, ListShards refuses StreamName.
                    kwargs = {"NextToken": token, **limit}
        except (BotoCoreError, ClientError) as exc:
            raise translate(
                exc, f"listing shards of Kinesis stream {self._stream!r}", self._settings
            ) from exc
        return shards


# --- the coordinator ------------------------------------------------------------------


@dataclass
class _Held:
    """A lease this worker holds, as this worker last wrote it."""

    counter: int
    renewed_at: float
    """This worker's monotonic timer at the last successful write."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    finished: bool = False
    """SHARD_END was checkpointed: release at the next cycle."""


class LeaseCoordinator:
    """Takes, renews, steals and releases this worker's shard leases; writes checkpoints.

    ``start()`` discovers the shards, takes a first share and starts the coordinator task.
    Assignment changes are delivered as ``await on_change(assigned, revoked)`` from that
    task only. ``checkpoint()`` may be called from any task of the same event loop.

    Beyond the lease contract, optional keyword arguments make it testable and tunable:
    ``clock`` (unix seconds, written into the lease items for status), ``timer`` (the
    monotonic clock that expiry, renewal deadlines and pacing are judged on; defaults to
    ``time.monotonic``, or to ``clock`` when a test injects only that), ``shard_source``
    (defaults to ListShards on the stream), ``renew_interval_s`` (default: lease duration / 3),
    ``take_interval_s`` (default: lease duration / 3; at most one steal per take),
    ``shard_sync_interval_s`` (ListShards; also after every SHARD_END and on
    `refresh_shards`) and ``rng`` (which expired lease to take first).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        app_id: str,
        stream_name: str,
        worker_id: str,
        on_change: OnChange,
        store: LeaseStore | None = None,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] | None = None,
        shard_source: ShardSource | None = None,
        renew_interval_s: float | None = None,
        take_interval_s: float | None = None,
        shard_sync_interval_s: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        if "#" in app_id or "#" in stream_name:
            raise ValueError("app_id and stream_name must not contain '#' (the key separator)")
        self.settings = settings
        self.app_id = app_id
        self.stream_name = stream_name
        self.worker_id = worker_id
        self.scope = f"{app_id}#{stream_name}"
        self._on_change = on_change
        self._owns_store = store is None
        self._store: LeaseStore = store if store is not None else DynamoDBLeaseStore(settings)
        self._clock = clock
        # Wall-clock time may jump (NTP steps, a resumed VM); judging expiry on it would
        # steal healthy leases or keep dead ones. Only stored timestamps use `clock`.
        self._timer = (
            timer if timer is not None else (time.monotonic if clock is time.time else clock)
        )
        self._shard_source: ShardSource = shard_source or KinesisShardSource(settings, stream_name)
        self.lease_duration = settings.lease_duration_s
        self.renew_interval = (
            self.lease_duration / 3 if renew_interval_s is None else renew_interval_s
        )
        # Taking often costs one Scan per interval, and buys a quick pickup of released
        # leases and a finer judgement of expiry (observations are this far apart).
        self.take_interval = self.lease_duration / 3 if take_interval_s is None else take_interval_s
        self.shard_sync_interval = shard_sync_interval_s
        self._rng = rng or random.Random()

        self._held: dict[str, _Held] = {}
        self._reported: frozenset[str] = frozenset()
        # lease counter -> when this worker first saw it (KCL's expiry by observation)
        self._seen: dict[str, tuple[int, float]] = {}
        self._shards: dict[str, ShardDescription] | None = None
        # Parents found missing from a shard list fetched after they were first missed:
        # really aged out of the stream, so their children need not wait for them.
        self._gone: set[str] = set()
        self._next_take = 0.0
        self._next_sync = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._stopped = False
        # Shards whose take was sent and not yet answered. A take cut off by stop()'s
        # cancellation (or a lost response) may still have been written: stop() looks
        # these up and releases the ones that turn out to be ours, which would otherwise
        # stay owned by a stopped worker for a lease duration.
        self._taking: set[str] = set()

    # --- public surface ---------------------------------------------------------------

    def owned(self) -> frozenset[str]:
        """Shard ids whose lease this worker holds right now (finished ones excluded)."""
        return frozenset(s for s, held in self._held.items() if not held.finished)

    def shards(self) -> list[ShardDescription]:
        """The stream's shards as last discovered (with hash ranges, for key routing)."""
        return sorted((self._shards or {}).values(), key=lambda s: s.shard_id)

    async def start(self) -> None:
        """Discover shards, take a first share, and start the coordinator task.

        Returns once the first pass is done, so `owned()` is already filled in; the
        matching ``on_change`` runs right after, from the coordinator task.
        """
        if self._task is not None:
            raise RuntimeError("LeaseCoordinator.start() was already called")
        self._stopped = False
        try:
            await self._sync_shards()
            await self._take()
        except BaseException:
            await self.stop()  # hand back whatever the failed pass took
            raise
        self._task = asyncio.create_task(self._run(), name=f"leases[{self.worker_id}]")
        self._renewer = asyncio.create_task(
            self._renew_loop(), name=f"lease-renewer[{self.worker_id}]"
        )

    async def stop(self) -> None:
        """Stop renewing and release every held lease, so other workers take over at once.

        Does not call ``on_change``: checkpoint what you processed *before* calling stop,
        because checkpoints after it raise LeaseLost. Idempotent.
        """
        self._stopped = True
        tasks = [t for t in (self._task, self._renewer) if t is not None]
        self._task = self._renewer = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            if task is not asyncio.current_task():  # stop() called from on_change
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        held, self._held = self._held, {}
        taking, self._taking = self._taking - set(held), set()
        self._reported = frozenset()
        now = self._clock()

        async def release(shard_id: str, lease: _Held) -> None:
            try:
                async with lease.lock:
                    await self._release(shard_id, lease, now)
            except RecstreamError as exc:
                # It expires on its own; others then take it after one lease duration.
                log.warning("could not release lease %s: %s", shard_id, exc)

        async def release_if_taken(shard_id: str) -> None:
            try:
                lease = await self._store.get_lease(self.scope, shard_id)
            except RecstreamError as exc:
                log.warning("could not look up lease %s taken while stopping: %s", shard_id, exc)
                return
            if lease is not None and lease.owner == self.worker_id:
                await release(shard_id, _Held(counter=lease.counter, renewed_at=0.0))

        # All at once and for one lease duration at most: a worker cut off from DynamoDB
        # waited for each release's read timeouts in turn (about 9 s a lease), so a worker
        # of 8 shards outlived a minute after SIGTERM (tests/reliability/
        # test_drill_sigterm.py). A lease not released by then expires by itself.
        try:
            async with asyncio.timeout(self.lease_duration):
                await asyncio.gather(
                    *(release(s, lease) for s, lease in held.items()),
                    *(release_if_taken(s) for s in taking),
                )
        except TimeoutError:
            log.warning(
                "worker %s: releasing %d leases took over %.0f s; left to expire",
                self.worker_id,
                len(held),
                self.lease_duration,
            )
        if self._owns_store:
            await self._store.aclose()

    async def checkpoint(self, shard_id: str, checkpoint: Checkpoint) -> None:
        """Record how far ``shard_id`` is processed, if this worker still holds its lease.

        Raises LeaseLost when the lease was taken away (the shard is then revoked through
        ``on_change`` at the coordinator's next cycle). Writing SHARD_END marks the shard
        finished: its lease is released and revoked at the next cycle, and the shards are
        re-listed so its children become leasable.
        """
        held = self._held.get(shard_id)
        if held is None or held.finished:
            raise LeaseLost(
                f"worker {self.worker_id!r} does not hold the lease of shard {shard_id!r} "
                f"({self.scope}); stop reading it, its new holder resumes from the last "
                "accepted checkpoint"
            )
        async with held.lock:
            now, tick = self._clock(), self._timer()
            new = None
            for _ in range(2):
                new = await self._store.update_checkpoint(
                    self.scope,
                    shard_id,
                    checkpoint,
                    owner=self.worker_id,
                    expected_counter=held.counter,
                    now=now,
                    expires_at=now + self.lease_duration,
                )
                if new is not None or not await self._still_mine(shard_id, held):
                    break
            if new is None:
                self._lose(shard_id, held)
                raise LeaseLost(
                    f"worker {self.worker_id!r} lost the lease of shard {shard_id!r} "
                    f"({self.scope}) to another worker; checkpoint {checkpoint} was refused"
                )
            held.counter = new.counter
            held.renewed_at = tick
            if checkpoint.sequence_number == SHARD_END:
                held.finished = True
                self._next_sync = 0.0
                self._next_take = 0.0
                self._wake.set()

    async def get_checkpoint(self, shard_id: str) -> Checkpoint:
        """The stored checkpoint of ``shard_id`` (TRIM_HORIZON when it has no lease yet)."""
        lease = await self._store.get_lease(self.scope, shard_id)
        return Checkpoint(TRIM_HORIZON) if lease is None else lease.checkpoint

    async def parent_shard_ids(self, shard_id: str) -> tuple[str, ...]:
        """The shard's parents (a child shard must be read from TRIM_HORIZON)."""
        lease = await self._store.get_lease(self.scope, shard_id)
        return () if lease is None else lease.parent_shard_ids

    async def lease(self, shard_id: str) -> LeaseInfo | None:
        """The shard's lease as stored (None before it was created)."""
        return await self._store.get_lease(self.scope, shard_id)

    async def snapshot(self) -> list[LeaseInfo]:
        """Every lease of this app and stream, sorted by shard id."""
        return await self._store.list_leases(self.scope)

    async def refresh_shards(self) -> None:
        """List the stream's shards now (e.g. after a reshard) and take new leases soon."""
        await self._sync_shards()
        self._next_take = 0.0
        self._wake.set()

    async def run_cycle(self) -> None:
        """One renew pass, and a shard sync and take pass when they are due, then
        ``on_change``. The coordinator task calls this; tests may call it directly
        instead of `start()` to step a coordinator deterministically."""
        await self._renew()
        now = self._timer()
        if now >= self._next_sync:
            await self._sync_shards()
        if now >= self._next_take:
            await self._take()
        await self._report()

    # --- the coordinator task ---------------------------------------------------------

    async def _run(self) -> None:
        """The coordinator task: shard sync, taking, and every ``on_change`` call."""
        await self._report()
        while not self._stopped:
            now = self._timer()
            due = min(self._next_take, self._next_sync) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, due))
            self._wake.clear()
            try:
                now = self._timer()
                if now >= self._next_sync:
                    await self._sync_shards()
                if now >= self._next_take:
                    await self._take()
            except RecstreamError as exc:
                # A store or Kinesis outage: retry at the next take interval. Held leases
                # are dropped by the renewer once they may have expired for the others.
                self._next_take = self._timer() + self.take_interval
                self._next_sync = min(self._next_sync, self._next_take)
                log.warning("lease cycle of %s failed: %s", self.worker_id, exc)
            except Exception:
                self._next_take = self._timer() + self.take_interval
                log.exception("lease cycle of %s failed", self.worker_id)
            await self._report()

    async def _renew_loop(self) -> None:
        """The renewer task. It is separate so that a slow ``on_change`` (faust waiting for
        in-flight messages during a rebalance) never delays renewals past expiry."""
        while not self._stopped:
            await asyncio.sleep(self.renew_interval)
            before = self.owned()
            try:
                await self._renew()
            except Exception:
                log.exception("renewing the leases of %s failed", self.worker_id)
            if self.owned() != before:
                self._wake.set()  # the coordinator task reports the revocation

    async def _report(self) -> None:
        owned = self.owned()
        assigned = owned - self._reported
        revoked = self._reported - owned
        if not assigned and not revoked:
            return
        self._reported = owned
        log.info(
            "worker %s: assigned %s, revoked %s", self.worker_id, sorted(assigned), sorted(revoked)
        )
        try:
            await self._on_change(frozenset(assigned), frozenset(revoked))
        except Exception:
            log.exception("on_change(%s, %s) failed", sorted(assigned), sorted(revoked))

    def _lose(self, shard_id: str, held: _Held) -> None:
        # Only the holding that failed: if the shard was taken again meanwhile (another
        # task awaited), the new holding is ours and must stay.
        if self._held.get(shard_id) is held:
            del self._held[shard_id]
            log.info("worker %s lost the lease of %s", self.worker_id, shard_id)
            self._wake.set()

    async def _renew(self) -> None:
        for shard_id, held in list(self._held.items()):
            async with held.lock:
                if self._held.get(shard_id) is not held:
                    continue
                now, tick = self._clock(), self._timer()
                if held.finished:
                    await self._release_finished(shard_id, held, now)
                    continue
                try:
                    new = None
                    for _ in range(2):
                        new = await self._store.renew_lease(
                            self.scope,
                            shard_id,
                            owner=self.worker_id,
                            expected_counter=held.counter,
                            now=now,
                            expires_at=now + self.lease_duration,
                        )
                        if new is not None or not await self._still_mine(shard_id, held):
                            break
                except RecstreamError as exc:
                    if tick - held.renewed_at >= self.lease_duration:
                        # Others may already consider it expired: stop reading it.
                        log.warning("dropping lease %s, not renewed in time: %s", shard_id, exc)
                        self._lose(shard_id, held)
                    else:
                        log.warning("renewing lease %s failed, will retry: %s", shard_id, exc)
                    continue
                if new is None:
                    self._lose(shard_id, held)
                else:
                    held.counter = new.counter
                    held.renewed_at = tick

    async def _still_mine(self, shard_id: str, held: _Held) -> bool:
        """After a refused write: is the lease still ours? Then adopt its counter.

        Only the owner's own writes move the counter of a lease it owns, so this happens
        when a write succeeded but its response was lost (a timeout, or a task cancelled
        mid-request); the write may then be retried at the stored counter.
        """
        lease = await self._store.get_lease(self.scope, shard_id)
        if lease is None or lease.owner != self.worker_id or lease.counter == held.counter:
            return False
        held.counter = lease.counter
        return True

    async def _release(self, shard_id: str, held: _Held, now: float) -> None:
        for _ in range(2):
            released = await self._store.release_lease(
                self.scope, shard_id, owner=self.worker_id, expected_counter=held.counter, now=now
            )
            if released or not await self._still_mine(shard_id, held):
                return

    async def _release_finished(self, shard_id: str, held: _Held, now: float) -> None:
        try:
            await self._release(shard_id, held, now)
        except RecstreamError as exc:
            log.warning("could not release finished lease %s: %s", shard_id, exc)
            return
        # pop: the coordinator task may already have dropped it on seeing it unowned
        self._held.pop(shard_id, None)

    async def _sync_shards(self) -> None:
        """Create lease items for new shards; delete finished leases of aged-out shards."""
        now = self._clock()
        tick = self._timer()
        shards = {s.shard_id: s for s in await self._shard_source()}
        existing = {lease.shard_id: lease for lease in await self._store.list_leases(self.scope)}
        for shard in shards.values():
            if shard.shard_id not in existing:
                # A child met together with its parents (the app's first start) or after
                # they aged out unread follows the app's start position; a child of
                # parents this app reads follows them from TRIM_HORIZON.
                await self._store.create_lease(
                    self.scope,
                    shard.shard_id,
                    parent_shard_ids=shard.parent_shard_ids,
                    now=now,
                    start_here=not any(p in existing for p in shard.parent_shard_ids),
                )
        for shard_id, lease in existing.items():
            if shard_id not in shards and lease.checkpoint.sequence_number == SHARD_END:
                await self._store.delete_lease(self.scope, shard_id)
        self._shards = shards
        self._next_sync = tick + self.shard_sync_interval

    def _leasable(self, lease: LeaseInfo, leases: dict[str, LeaseInfo]) -> bool:
        if lease.checkpoint.sequence_number == SHARD_END:
            return False
        for parent_id in lease.parent_shard_ids:
            parent = leases.get(parent_id)
            if parent is not None and parent.checkpoint.sequence_number == SHARD_END:
                continue
            if parent_id in self._gone:
                continue  # aged out of the stream: nothing left to read before the child
            return False
        return True

    async def _confirm_aged_out(self, leases: dict[str, LeaseInfo]) -> None:
        """Decide which missing parents have aged out, on a shard list fetched now.

        The list kept between syncs may predate a reshard (two splits within one sync
        interval): a parent absent from it may simply be newer than the list, and a child
        leased on that evidence would be read before its parent, breaking per-key order.
        """
        known = self._shards or {}
        referenced = {
            parent
            for lease in leases.values()
            if lease.checkpoint.sequence_number != SHARD_END
            for parent in lease.parent_shard_ids
        }
        self._gone &= referenced  # bounded by the parents still referenced
        unsure = {p for p in referenced - self._gone if p not in known}
        if not unsure:
            return
        await self._sync_shards()
        fresh = self._shards or {}
        self._gone |= {p for p in unsure if p not in fresh}

    def _expired(self, lease: LeaseInfo, now: float) -> bool:
        if lease.owner is None:
            return True
        _, since = self._seen[lease.shard_id]
        return now - since >= self.lease_duration

    async def _take(self) -> None:
        now = self._timer()
        self._next_take = now + self.take_interval
        leases = {lease.shard_id: lease for lease in await self._store.list_leases(self.scope)}
        for shard_id, lease in leases.items():
            seen = self._seen.get(shard_id)
            if seen is None or seen[0] != lease.counter:
                self._seen[shard_id] = (lease.counter, now)
            held = self._held.get(shard_id)
            if held is not None and not held.finished and lease.owner != self.worker_id:
                self._lose(shard_id, held)  # stolen; the renewer would find out at its next pass
        for shard_id in set(self._seen) - set(leases):
            del self._seen[shard_id]
        await self._confirm_aged_out(leases)

        candidates = [lease for lease in leases.values() if self._leasable(lease, leases)]
        if not candidates:
            return
        mine = {s for s, held in self._held.items() if not held.finished}
        loads: dict[str, list[LeaseInfo]] = {}
        available: list[LeaseInfo] = []
        for lease in candidates:
            if lease.shard_id in mine:
                continue
            if self._expired(lease, now):
                available.append(lease)
            elif lease.owner is not None and lease.owner != self.worker_id:
                loads.setdefault(lease.owner, []).append(lease)
        workers = len(loads) + 1
        target = math.ceil(len(candidates) / workers)
        needed = target - len(mine & {lease.shard_id for lease in candidates})
        if needed <= 0:
            return
        self._rng.shuffle(available)
        to_take = available[:needed]
        if not to_take and loads:
            # Steal one lease from the most-loaded worker, but only when that narrows the
            # gap; otherwise two workers would pass a lease back and forth.
            victim, victim_leases = max(loads.items(), key=lambda kv: (len(kv[1]), kv[0]))
            if len(victim_leases) >= len(mine) + 2:
                to_take = [self._rng.choice(victim_leases)]
                log.info("worker %s steals %s from %s", self.worker_id, to_take[0].shard_id, victim)
        for lease in to_take:
            now, tick = self._clock(), self._timer()
            # left in the set if the write raises or is cancelled: it may have landed
            self._taking.add(lease.shard_id)
            new = await self._store.take_lease(
                self.scope,
                lease.shard_id,
                owner=self.worker_id,
                expected_owner=lease.owner,
                expected_counter=lease.counter,
                now=now,
                expires_at=now + self.lease_duration,
            )
            self._taking.discard(lease.shard_id)
            if new is not None:
                self._held[lease.shard_id] = _Held(counter=new.counter, renewed_at=tick)
                self._seen[lease.shard_id] = (new.counter, tick)
