"""Shards as faust partitions: the shard map, and one polling reader per leased shard.

A shard ``shardId-000000000003`` is partition 3 of the topic named like the stream. The
`ShardMap` holds each shard's hash-key range, so a key can be routed to the partition
Kinesis would put it on (MD5 of the partition key, as a 128-bit integer).

A `ShardReader` owns one shard's GetRecords loop. It keeps to Kinesis's per-shard read
limits (5 calls/s and 2 MB/s), backs off when throttled, rebuilds an expired iterator
from the last record it handed on, and decodes each record's envelope into one
`KinesisRecord` per inner message, each with the dense offset faust needs (Kinesis
sequence numbers are sparse 56-digit integers and break faust's gap tracking).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from botocore.exceptions import BotoCoreError, ClientError

from recstream.aws import error_code
from streams.envelope import EnvelopeError, Message, decode

if TYPE_CHECKING:
    from types_aiobotocore_kinesis import KinesisClient

__all__ = [
    "AGGREGATED_HEADER",
    "MAX_BYTES_PER_SECOND",
    "MAX_CALLS_PER_SECOND",
    "KinesisRecord",
    "Position",
    "ShardInfo",
    "ShardMap",
    "ShardReader",
    "list_shards",
    "partition_of",
    "shard_id_of",
    "unpack",
]

log = logging.getLogger(__name__)

MAX_CALLS_PER_SECOND: Final = 5
"""Kinesis allows 5 GetRecords calls per second per shard."""
MAX_BYTES_PER_SECOND: Final = 2 * 1024 * 1024
"""... and 2 MB/s of reads per shard."""
GET_RECORDS_LIMIT: Final = 10_000
AGGREGATED_HEADER: Final = "recstream-aggregated"
"""Header of a message that is a whole aggregated record (its value: count of messages)."""
MAX_HASH_KEY: Final = 2**128 - 1
_THROTTLED = {
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "LimitExceededException",
}


def partition_of(shard_id: str) -> int:
    """``shardId-000000000003`` -> 3."""
    try:
        return int(shard_id.rsplit("-", 1)[1])
    except (IndexError, ValueError) as exc:
        raise ValueError(f"{shard_id!r} is not a Kinesis shard id (shardId-<digits>)") from exc


def shard_id_of(partition: int) -> str:
    """3 -> ``shardId-000000000003``."""
    return f"shardId-{partition:012d}"


def hash_key(partition_key: str | bytes) -> int:
    """The 128-bit hash Kinesis routes a partition key by."""
    raw = partition_key.encode() if isinstance(partition_key, str) else partition_key
    return int.from_bytes(hashlib.md5(raw, usedforsecurity=False).digest(), "big")


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """One shard as ListShards describes it."""

    shard_id: str
    parent_ids: tuple[str, ...]
    start_hash: int
    end_hash: int
    closed: bool
    """True once the shard was split or merged (it has an ending sequence number)."""

    @property
    def partition(self) -> int:
        return partition_of(self.shard_id)


class ShardMap:
    """The stream's shards and their hash-key ranges; routes keys to open shards."""

    def __init__(self, stream: str, shards: Sequence[ShardInfo]) -> None:
        self.stream = stream
        self.loaded_at = time.monotonic()
        self.shards = {s.shard_id: s for s in shards}
        self.open = sorted((s for s in shards if not s.closed), key=lambda s: s.start_hash)

    def __len__(self) -> int:
        return len(self.shards)

    def shard_for_key(self, partition_key: str | bytes) -> ShardInfo:
        return self.shard_for_hash(hash_key(partition_key))

    def shard_for_hash(self, value: int) -> ShardInfo:
        """The open shard whose hash-key range holds ``value`` (an ExplicitHashKey)."""
        for shard in self.open:
            if shard.start_hash <= value <= shard.end_hash:
                return shard
        raise LookupError(
            f"no open shard of stream {self.stream!r} covers hash key {value}; "
            "the shard map is stale, refresh it"
        )

    def partition_for_key(self, partition_key: str | bytes) -> int:
        return self.shard_for_key(partition_key).partition

    def get(self, shard_id: str) -> ShardInfo | None:
        return self.shards.get(shard_id)

    def has_live_parent(self, shard_id: str) -> bool:
        """True if one of the shard's parents is still in the stream (a reshard child)."""
        shard = self.shards.get(shard_id)
        return shard is not None and any(p in self.shards for p in shard.parent_ids)

    def partitions(self) -> int:
        """How many partitions faust must assume: the highest shard number plus one."""
        return max((s.partition for s in self.shards.values()), default=-1) + 1


async def list_shards(client: KinesisClient, stream: str) -> ShardMap:
    """Every shard of the stream (open and closed), through ListShards' pages."""
    shards: list[ShardInfo] = []
    kwargs: dict[str, Any] = {"StreamName": stream}
    while True:
        response = await client.list_shards(**kwargs)
        for shard in response["Shards"]:
            parents = tuple(
                p for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p
            )
            shards.append(
                ShardInfo(
                    shard_id=shard["ShardId"],
                    parent_ids=parents,
                    start_hash=int(shard["HashKeyRange"]["StartingHashKey"]),
                    end_hash=int(shard["HashKeyRange"]["EndingHashKey"]),
                    closed="EndingSequenceNumber" in shard["SequenceNumberRange"],
                )
            )
        token = response.get("NextToken")
        if not token:
            return ShardMap(stream, shards)
        # With NextToken, ListShards refuses StreamName.
        kwargs = {"NextToken": token}


def unpack(
    key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes]] | None = None
) -> list[Message]:
    """The messages a faust message carries: itself, or, for a whole aggregated record
    (``make_app(..., whole_records=True)``), every message inside it, in order.

    An agent that reads a topic of such an app should iterate ``stream.events()`` and
    ``unpack(event.key, event.value, event.headers)`` each event (raw serializers).
    """
    pairs = headers.items() if isinstance(headers, dict) else (headers or ())
    if any(name == AGGREGATED_HEADER for name, _ in pairs):
        return decode(value)
    return [Message(key=key, value=value, headers=tuple(headers or ()))]


@dataclass(slots=True)
class KinesisRecord:
    """One message for faust: an inner message of a record, with its dense offset."""

    topic: str
    partition: int
    offset: int
    timestamp: float
    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes]]
    sequence_number: str
    sub_sequence: int
    """Index inside its record of the (last) inner message this message carries: what a
    checkpoint after it names."""
    size: int
    first_sub_sequence: int | None = None
    """Index of the first inner message it carries when that differs from
    ``sub_sequence``: a whole aggregated record (``whole_records``) carries 0 to n-1, so
    seeking back to it must resume at 0, not after n-2."""

    @property
    def first(self) -> int:
        return self.sub_sequence if self.first_sub_sequence is None else self.first_sub_sequence


@dataclass(frozen=True, slots=True)
class Position:
    """Where a reader starts: an iterator type, and inner messages to skip.

    Checkpoints name (sequence number, sub-sequence). A reader resumes AT that sequence
    number and skips the inner messages up to and including the sub-sequence, so an
    aggregated record that was half processed is finished, not skipped nor repeated.
    """

    iterator_type: str
    sequence_number: str | None = None
    timestamp: float | None = None
    skip_through: int = -1

    @classmethod
    def after_checkpoint(cls, sequence_number: str, sub_sequence: int) -> Position:
        return cls("AT_SEQUENCE_NUMBER", sequence_number, skip_through=sub_sequence)

    def iterator_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"ShardIteratorType": self.iterator_type}
        if self.sequence_number is not None:
            args["StartingSequenceNumber"] = self.sequence_number
        if self.timestamp is not None:
            args["Timestamp"] = self.timestamp
        return args


@dataclass
class ReaderStats:
    """What a reader has seen, for `streams status`, metrics and the benchmarks."""

    millis_behind: int | None = None
    records: int = 0
    messages: int = 0
    calls: int = 0
    throttled: int = 0
    expired: int = 0
    first_call: float = 0.0
    """time.monotonic() of the first GetRecords call."""
    last_call: float = 0.0


@dataclass
class ShardReader:
    """The GetRecords loop of one shard; feeds `buffer` until the shard ends or is stopped.

    ``next_offset`` is the dense offset the next message gets. ``on_end`` is called once
    the shard is closed and fully read (GetRecords returned no NextShardIterator).
    """

    client: KinesisClient
    stream: str
    shard_id: str
    position: Position
    next_offset: int
    poll_interval_s: float
    max_buffered: int = 20_000
    whole_records: bool = False
    """Hand an aggregated record on as one message (see `unpack`), not one per message."""
    calls_per_second: float = MAX_CALLS_PER_SECOND
    """Kinesis's per-shard GetRecords limit; only an emulator-only bench may raise it."""
    on_end: Callable[[int], None] | None = None
    buffer: deque[KinesisRecord] = field(default_factory=deque)
    stats: ReaderStats = field(default_factory=ReaderStats)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever messages are appended (the consumer waits on it)."""
    space: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by the consumer when it drains the buffer (backpressure)."""
    ended: bool = False
    _task: asyncio.Task[None] | None = None
    _last_bytes: int = 0

    def __post_init__(self) -> None:
        self.partition = partition_of(self.shard_id)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kinesis-reader-{self.shard_id}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                # Our own cancellation only; re-raise if someone cancels the stopper.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def drain(self, limit: int) -> list[KinesisRecord]:
        out: list[KinesisRecord] = []
        buffer = self.buffer
        while buffer and len(out) < limit:
            out.append(buffer.popleft())
        self.space.set()
        return out

    async def _iterator(self) -> str | None:
        response = await self.client.get_shard_iterator(
            StreamName=self.stream, ShardId=self.shard_id, **self.position.iterator_args()
        )
        return response.get("ShardIterator")

    async def _pace(self, caught_up: bool) -> None:
        # 5 calls/s, and no more than 2 MB/s on average: after reading B bytes, the next
        # call waits B / 2 MB/s. When caught up there is nothing to hurry for, so the
        # configured poll interval applies.
        gap = max(1.0 / self.calls_per_second, self._last_bytes / MAX_BYTES_PER_SECOND)
        if caught_up:
            gap = max(gap, self.poll_interval_s)
        delay = self.stats.last_call + gap - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _run(self) -> None:
        # A bug or an unexpected reply must not silently stall the shard: log it, wait,
        # and read on from the last record handed on.
        while True:
            try:
                await self._read()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reader of %s/%s failed; restarting it", self.stream, self.shard_id)
                await asyncio.sleep(1.0)

    async def _read(self) -> None:
        backoff = 0.0
        iterator: str | None = None
        caught_up = False
        while True:
            while len(self.buffer) >= self.max_buffered:
                self.space.clear()
                await self.space.wait()
            await self._pace(caught_up)
            try:
                if iterator is None:
                    iterator = await self._iterator()
                    if iterator is None:
                        self._finish()
                        return
                self.stats.last_call = time.monotonic()
                if not self.stats.calls:
                    self.stats.first_call = self.stats.last_call
                self.stats.calls += 1
                response = await self.client.get_records(
                    ShardIterator=iterator, Limit=GET_RECORDS_LIMIT
                )
            except ClientError as exc:
                code = error_code(exc)
                if code == "ExpiredIteratorException":
                    # Rebuilt from the last record handed on (self.position), so nothing
                    # is skipped and nothing is delivered twice.
                    self.stats.expired += 1
                    iterator = None
                    continue
                if code in _THROTTLED:
                    self.stats.throttled += 1
                else:
                    log.warning("GetRecords on %s/%s failed: %s", self.stream, self.shard_id, exc)
                backoff = min(5.0, max(0.2, backoff * 2))
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                continue
            except (BotoCoreError, OSError) as exc:
                log.warning("GetRecords on %s/%s failed: %s", self.stream, self.shard_id, exc)
                backoff = min(5.0, max(0.2, backoff * 2))
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                continue
            backoff = 0.0
            records = response.get("Records", [])
            self.stats.millis_behind = response.get("MillisBehindLatest")
            self._last_bytes = self._take(records)
            caught_up = not records or self.stats.millis_behind == 0
            iterator = response.get("NextShardIterator")
            if iterator is None:
                self._finish()
                return

    def _take(self, records: Sequence[Any]) -> int:
        size = 0
        skip = self.position
        for record in records:
            data: bytes = record["Data"]
            size += len(data)
            sequence_number: str = record["SequenceNumber"]
            arrival = record.get("ApproximateArrivalTimestamp")
            timestamp = arrival.timestamp() if arrival is not None else time.time()
            try:
                messages = decode(data)
            except EnvelopeError as exc:
                # Not written by recstream: hand it on raw, keyed by its partition key,
                # so a raw-value agent can still see (and dead-letter) it.
                log.warning(
                    "record %s on %s/%s is not a recstream envelope (%s); passing it raw",
                    sequence_number, self.stream, self.shard_id, exc,
                )  # fmt: skip
                messages = None
            skip_through = -1
            if skip.skip_through >= 0 and sequence_number == skip.sequence_number:
                skip_through = skip.skip_through
            self.stats.records += 1
            if messages is None:
                if skip_through < 0:
                    self._append(
                        record["PartitionKey"].encode(), data, (), sequence_number, 0,
                        timestamp, len(data),
                    )  # fmt: skip
            elif self.whole_records and len(messages) > 1 and skip_through < 0:
                # One faust message for the whole aggregated record: faust's per-message
                # cost is paid once per record. Its checkpoint covers every message in it.
                self._append(
                    record["PartitionKey"].encode(), data,
                    ((AGGREGATED_HEADER, str(len(messages)).encode()),),
                    sequence_number, len(messages) - 1, timestamp, len(data), first=0,
                )  # fmt: skip
            else:
                for index, message in enumerate(messages):
                    if index <= skip_through:
                        continue
                    self._append(
                        message.key, message.value, message.headers, sequence_number, index,
                        timestamp, len(message.value),
                    )  # fmt: skip
            # From here on an iterator rebuilt after expiry starts after this record.
            self.position = Position("AFTER_SEQUENCE_NUMBER", sequence_number)
            skip = self.position
        if records:
            self.wakeup.set()
        return size

    def _append(
        self,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]],
        sequence_number: str,
        sub_sequence: int,
        timestamp: float,
        size: int,
        first: int | None = None,
    ) -> None:
        self.buffer.append(
            KinesisRecord(
                topic=self.stream,
                partition=self.partition,
                offset=self.next_offset,
                timestamp=timestamp,
                key=key,
                value=value,
                headers=headers,
                sequence_number=sequence_number,
                sub_sequence=sub_sequence,
                size=size,
                first_sub_sequence=first,
            )
        )
        self.next_offset += 1
        self.stats.messages += 1

    def _finish(self) -> None:
        self.ended = True
        self.wakeup.set()
        if self.on_end is not None:
            self.on_end(self.next_offset)
