"""PutRecords for the transport's producer: batching, partial-failure retries, aggregation.

A PutRecords call carries at most 500 records and 5 MiB. ``FailedRecordCount > 0`` is
routine (a shard over its 1,000 records/s or 1 MB/s), so the failed entries are sent again
with exponential backoff and full jitter until they land or the attempts run out.

With ``aggregate=True`` the messages bound for one shard are packed into v2 envelopes of
up to ~1 MB (`streams.envelope.encode_aggregated`), each routed to its shard with the
shard's starting ExplicitHashKey, and each call carries at most one record per shard, so
a partial failure never reorders a key. That amortises Kinesis's per-record limits (and,
with ``whole_records``, faust's per-message cost on the reading side).

Without aggregation, a key with several records in one call can be reordered when only
some of them fail and are retried; send one record per key per call where order matters
(the collector's batches are what their clients sent).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from botocore.exceptions import BotoCoreError, ClientError

from recstream.aws import translate
from recstream.errors import RecstreamError, StoreUnavailable, ThroughputExceeded
from recstream.settings import Settings
from streams.envelope import Message, chunk_by_size, encode, encode_aggregated
from streams.kinesis.shards import ShardMap

if TYPE_CHECKING:
    from types_aiobotocore_kinesis import KinesisClient

__all__ = [
    "MAX_PARTITION_KEY_CHARS",
    "Accepted",
    "Entry",
    "Landed",
    "Refused",
    "aggregated_records",
    "partition_key_for",
    "put_messages",
    "put_records",
    "shard_rounds",
]

MAX_RECORDS_PER_CALL: Final = 500
MAX_BYTES_PER_CALL: Final = 5 * 1024 * 1024
MAX_RECORD_BYTES: Final = 1024 * 1024
# Room for the partition key inside the 1 MiB record limit.
AGGREGATE_BYTES: Final = MAX_RECORD_BYTES - 4096


@dataclass(frozen=True, slots=True)
class Entry:
    """One message to put, with the partition key that routes it (and optionally a shard)."""

    partition_key: str
    message: Message
    explicit_hash_key: str | None = None


@dataclass(frozen=True, slots=True)
class Landed:
    """Where one message landed: its shard, record sequence number and index inside it."""

    shard_id: str
    sequence_number: str
    sub_sequence: int


MAX_PARTITION_KEY_CHARS: Final = 256


def partition_key_for(key: bytes | None) -> str:
    """A valid Kinesis partition key (1-256 unicode chars) for a message key.

    Longer keys become their SHA-256 (64 hex chars): deterministic, so one key still maps
    to one shard. Every writer (the transport and the event producer) goes through here."""
    if not key:
        # No key, no ordering promise: spread over the shards.
        return f"{random.getrandbits(64):016x}"
    try:
        text = key.decode()
    except UnicodeDecodeError:
        text = key.hex()
    if len(text) > MAX_PARTITION_KEY_CHARS:
        return hashlib.sha256(key).hexdigest()
    return text


async def put_messages(
    client: KinesisClient,
    settings: Settings,
    stream: str,
    entries: Sequence[Entry],
    *,
    aggregate: bool = False,
    shard_map: ShardMap | None = None,
    max_attempts: int = 10,
    base_backoff: float = 0.05,
    max_backoff: float = 2.0,
) -> list[Landed]:
    """Put every entry on the stream, in order per partition key; one `Landed` per entry.

    Raises `ThroughputExceeded` or `StoreUnavailable` when entries still fail after
    ``max_attempts`` (the caller's at-least-once retry decides what next).
    """
    if not entries:
        return []
    # records[i] = (PutRecords entry, indexes of the messages inside it)
    records: list[tuple[dict[str, Any], list[int]]] = []
    if aggregate:
        if shard_map is None:
            raise ValueError("aggregate=True needs the stream's ShardMap to route records")
        records = aggregated_records(entries, shard_map)
    else:
        for index, entry in enumerate(entries):
            data = encode(entry.message)
            if len(data) > MAX_RECORD_BYTES:
                raise ValueError(
                    f"a message of {len(data)} bytes exceeds Kinesis's 1 MiB record limit"
                )
            record: dict[str, Any] = {"Data": data, "PartitionKey": entry.partition_key}
            if entry.explicit_hash_key is not None:
                record["ExplicitHashKey"] = entry.explicit_hash_key
            records.append((record, [index]))

    landed: list[Landed | None] = [None] * len(entries)
    if aggregate:
        rounds = shard_rounds([record for record, _ in records])
    else:
        rounds = [list(range(len(records)))]
    for round_ in rounds:
        outcomes = await put_records(
            client, settings, stream, [records[i][0] for i in round_],
            max_attempts=max_attempts, base_backoff=base_backoff, max_backoff=max_backoff,
        )  # fmt: skip
        for index, outcome in zip(round_, outcomes, strict=True):
            if isinstance(outcome, Refused):
                raise outcome.error
            for sub, member in enumerate(records[index][1]):
                landed[member] = Landed(outcome.shard_id, outcome.sequence_number, sub)
    return [x for x in landed if x is not None]


def aggregated_records(
    entries: Sequence[Entry], shard_map: ShardMap
) -> list[tuple[dict[str, Any], list[int]]]:
    """``entries`` packed per shard into aggregated (v2) records of up to ~1 MB, each
    routed to its shard by the shard's starting ExplicitHashKey: (the PutRecords entry,
    the indexes of the entries inside it), each shard's in the entries' order."""
    by_shard: dict[str, list[int]] = {}
    for index, entry in enumerate(entries):
        # An explicit partition (ExplicitHashKey) wins over the key's hash, as it does
        # for single records.
        shard = (
            shard_map.shard_for_hash(int(entry.explicit_hash_key))
            if entry.explicit_hash_key is not None
            else shard_map.shard_for_key(entry.partition_key)
        )
        by_shard.setdefault(shard.shard_id, []).append(index)
    records: list[tuple[dict[str, Any], list[int]]] = []
    for shard_id, indexes in by_shard.items():
        shard = shard_map.shards[shard_id]
        start = 0
        for group in chunk_by_size((entries[i].message for i in indexes), AGGREGATE_BYTES):
            members = indexes[start : start + len(group)]
            start += len(group)
            record = {
                "Data": encode_aggregated(group),
                "PartitionKey": entries[members[0]].partition_key,
                "ExplicitHashKey": str(shard.start_hash),
            }
            records.append((record, members))
    return records


def shard_rounds(records: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Aggregated ``records`` (indexes) in rounds of at most one record per shard: a
    record that fails is retried before its shard's next one is sent, so every key's
    order holds even when a call partially fails (each record is up to 1 MB, a shard's
    write limit per second)."""
    by_shard: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_shard.setdefault(record["ExplicitHashKey"], []).append(index)
    if not by_shard:
        return []
    return [
        [v[position] for v in by_shard.values() if position < len(v)]
        for position in range(max(len(v) for v in by_shard.values()))
    ]


def _batches(records: Sequence[dict[str, Any]]) -> list[list[int]]:
    batches: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index, record in enumerate(records):
        # Kinesis counts the 5 MiB of a call in bytes, partition keys included; a key is
        # at most 256 characters but up to 1 KiB of UTF-8, so count its bytes, not its
        # characters (500 such keys would otherwise hide 384 KiB and the whole call fails).
        record_size = len(record["Data"]) + len(record["PartitionKey"].encode())
        if current and (
            len(current) == MAX_RECORDS_PER_CALL or size + record_size > MAX_BYTES_PER_CALL
        ):
            batches.append(current)
            current, size = [], 0
        current.append(index)
        size += record_size
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True, slots=True)
class Accepted:
    """A record Kinesis accepted."""

    shard_id: str
    sequence_number: str


@dataclass(frozen=True, slots=True)
class Refused:
    """A record still refused when the attempts ran out, or whose call kept failing."""

    error: RecstreamError

    @property
    def retriable(self) -> bool:
        return self.error.retriable


async def put_records(
    client: KinesisClient,
    settings: Settings,
    stream: str,
    records: Sequence[dict[str, Any]],
    *,
    max_attempts: int = 10,
    base_backoff: float = 0.05,
    max_backoff: float = 2.0,
    max_wait_s: float | None = None,
) -> list[Accepted | Refused]:
    """PutRecords for any number of records: calls of ≤500 records / 5 MiB, refused
    records retried with backoff. One outcome per record, in order; never raises for an
    AWS error, so a caller always knows which records landed. The collector's producer
    and the transport's both send through here.

    ``max_wait_s`` bounds the whole call, retries and backoff included: what has not
    landed by then is refused (retriable), so a caller that must answer someone (the
    collector) answers in time even when Kinesis does not answer at all. A call cut off
    may still have landed; its records are reported refused, and resending them only
    repeats event ids the agents apply once."""
    outcomes: list[Accepted | Refused | None] = [None] * len(records)
    deadline = None if max_wait_s is None else asyncio.get_running_loop().time() + max_wait_s
    for batch in _batches(records):
        await _put_batch(
            client, settings, stream, records, batch, outcomes,
            max_attempts, base_backoff, max_backoff, deadline,
        )  # fmt: skip
    return [o for o in outcomes if o is not None]


async def _put_batch(
    client: KinesisClient,
    settings: Settings,
    stream: str,
    records: Sequence[dict[str, Any]],
    pending: list[int],
    outcomes: list[Accepted | Refused | None],
    max_attempts: int,
    base_backoff: float,
    max_backoff: float,
    deadline: float | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    attempt = 0
    last_error = ""
    while pending:
        attempt += 1
        if deadline is not None and loop.time() >= deadline:
            _give_up(pending, outcomes, stream, last_error or "no answer")
            return
        try:
            async with asyncio.timeout_at(deadline):
                response = await client.put_records(
                    StreamName=stream,
                    Records=[records[i] for i in pending],  # type: ignore[misc]
                )
        except TimeoutError:
            _give_up(pending, outcomes, stream, "the call did not return in time")
            return
        except (BotoCoreError, ClientError) as exc:
            error = translate(exc, f"PutRecords to stream {stream!r}", settings, "kinesis")
            if not error.retriable or attempt >= max_attempts:
                for index in pending:
                    outcomes[index] = Refused(error)
                return
            last_error = str(error)
            await _backoff(attempt, base_backoff, max_backoff, deadline)
            continue
        retry: list[int] = []
        for index, outcome in zip(pending, response["Records"], strict=True):
            if "SequenceNumber" in outcome and not outcome.get("ErrorCode"):
                outcomes[index] = Accepted(outcome["ShardId"], outcome["SequenceNumber"])
            else:
                last_error = f"{outcome.get('ErrorCode')}: {outcome.get('ErrorMessage')}"
                retry.append(index)
        if retry and attempt >= max_attempts:
            refused = ThroughputExceeded(
                f"{len(retry)} records to stream {stream!r} were refused {attempt} times "
                f"({last_error}); add shards or slow the producer, then resend them"
            )
            for index in retry:
                outcomes[index] = Refused(refused)
            return
        if retry:
            await _backoff(attempt, base_backoff, max_backoff, deadline)
        pending = retry


def _give_up(
    pending: Sequence[int], outcomes: list[Accepted | Refused | None], stream: str, last: str
) -> None:
    error = StoreUnavailable(
        f"PutRecords to stream {stream!r} did not succeed within the time allowed ({last}); "
        "the events were not acknowledged, resend them"
    )
    for index in pending:
        outcomes[index] = Refused(error)


async def _backoff(attempt: int, base: float, cap: float, deadline: float | None = None) -> None:
    # Full jitter keeps producers from retrying in lock-step against one hot shard.
    delay = random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
    if deadline is not None:
        delay = max(0.0, min(delay, deadline - asyncio.get_running_loop().time()))
    await asyncio.sleep(delay)
