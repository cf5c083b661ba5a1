"""Async Kinesis producer for events: PutRecords batching, partial-failure retries, and a
bounded buffer for servers that produce events in the background.

Two ways to use it:

* ``await producer.put_events(events)`` sends now and returns, per event, whether Kinesis
  accepted it. The collector uses this, so a ``202`` means "on the stream". Concurrent
  callers share calls (group commit): up to ``max_in_flight`` (2) PutRecords calls run at
  once; a caller that finds them all busy waits for the next free one, which carries
  every caller waiting by then (≤ 500 records, ≤ 5 MiB) in one call, each caller answered
  with its own records' outcomes. An idle producer adds no delay; a busy one makes one
  call per few hundred events instead of one per request (64 clients posting single
  events spent most of the API's CPU on per-request calls: docs/local-stack.md).
* A call's events bound for one shard go as one aggregated record
  (``Settings.event_aggregation``, on by default; `streams.kinesis.writer.aggregated_records`,
  routed by the shard's ExplicitHashKey, the shards listed once and again after a
  reshard, which a record landing on another shard reveals), each event answered with
  its record's outcome: the agents read such a record as one faust message, so faust's
  per-message cost is paid per record (session 14 in docs/agents.md). A shard's records
  of one call go in turn, the next only once the one before landed, so a partial failure
  never reorders a key. Until the shards can be listed, one record per event.
* ``await producer.send(event)`` queues the event; a background task flushes every
  ``linger`` seconds or whenever 500 events are waiting. When ``max_buffered`` events are
  queued, ``send`` waits (back-pressure) instead of growing memory without bound.

``FailedRecordCount > 0`` is routine on Kinesis (per-shard throttling), so failed records
of a PutRecords call are retried with exponential backoff and jitter, in their original
relative order. Kinesis does not keep order across a partial failure (a later record of
the same key may land first); the agents therefore order each window by event time.

Every event gets an outcome: when retries run out, or the call itself keeps failing, the
events not yet on the stream are reported as failed (with their ids, to resend), never
raised past the ones that did land.

Every call is bounded by ``max_wait_s`` (5 s), retries included: when Kinesis does not
answer (the emulator restarting, a network partition) the collector answers 503 with
``Retry-After`` in time instead of holding its client for half a minute (the fault drill
``tests/reliability/test_drill_emulator.py`` measured 26 s per request before).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from recstream import tracing
from recstream.aws import async_client
from recstream.errors import RecstreamError, StoreUnavailable
from recstream.settings import Settings
from streams.envelope import Message, encode
from streams.kinesis.shards import ShardMap, list_shards
from streams.kinesis.writer import (
    MAX_BYTES_PER_CALL,
    MAX_RECORD_BYTES,
    MAX_RECORDS_PER_CALL,
    Accepted,
    Entry,
    Refused,
    aggregated_records,
    partition_key_for,
    put_records,
    shard_rounds,
)
from streams.schema import Event

if TYPE_CHECKING:
    from types_aiobotocore_kinesis import KinesisClient

__all__ = ["KinesisProducer", "PutResult", "RecordTooLarge", "record_for"]

log = logging.getLogger(__name__)

SHARDS_RETRY_S = 5.0
"""How long a producer whose stream's shards could not be listed sends single records
before it tries again."""


@dataclass(frozen=True, slots=True)
class PutResult:
    """What happened to one event: on the stream (with its shard and sequence) or not."""

    event_id: str
    ok: bool
    shard_id: str | None = None
    sequence_number: str | None = None
    error: str | None = None
    retriable: bool = True
    """For a failed event: whether resending later can succeed (throttling, an outage)
    or something must be fixed first (a missing stream)."""


@dataclass(slots=True)
class _Waiting:
    """One `put_events` caller's records, waiting for a shared PutRecords call."""

    records: list[dict[str, Any]]
    entries: list[Entry]
    """The same events as messages, for aggregated records."""
    size: int
    deadline: float | None
    """Loop time by which the caller must have its answer (``max_wait_s``)."""
    outcomes: asyncio.Future[list[Accepted | Refused]]


class RecordTooLarge(ValueError):
    """An event that cannot be one Kinesis record; only this event fails, never its batch."""


def record_for(event: Event, headers: Sequence[tuple[str, bytes]] = ()) -> dict[str, Any]:
    """The PutRecords entry of one event (see `entry_for`)."""
    return entry_for(event, headers)[1]


def entry_for(
    event: Event, headers: Sequence[tuple[str, bytes]] = ()
) -> tuple[Entry, dict[str, Any]]:
    """One event as a message (for an aggregated record) and as its own PutRecords
    entry; ``headers`` go in its envelope (the trace context, recstream/tracing.py).

    The envelope keeps the full actor as the message key (agents group by it); the
    Kinesis ``PartitionKey`` goes through `partition_key_for`, which hashes keys over
    Kinesis's 256-character limit. A longer key would make Kinesis refuse the whole
    PutRecords call, failing every valid event sent with it (a 256-character session id
    makes ``session:…`` 264 characters). Hashing is deterministic, so one actor's events
    still share a shard and keep their order.
    """
    key = event.partition_key
    message = Message(key=key.encode(), value=event.to_json(), headers=tuple(headers))
    data = encode(message)
    if len(data) > MAX_RECORD_BYTES:
        raise RecordTooLarge(
            f"event {event.event_id} encodes to {len(data)} bytes; Kinesis allows 1 MiB a "
            "record; send smaller properties or context"
        )
    partition_key = partition_key_for(key.encode())
    return Entry(partition_key, message), {"Data": data, "PartitionKey": partition_key}


class KinesisProducer:
    """Puts events on ``settings.stream_name``. Use as ``async with KinesisProducer(s) as p``."""

    def __init__(
        self,
        settings: Settings,
        *,
        max_attempts: int = 8,
        base_backoff: float = 0.05,
        max_backoff: float = 2.0,
        linger: float = 0.05,
        max_buffered: int = 10_000,
        max_wait_s: float | None = 5.0,
        max_in_flight: int = 2,
        client: KinesisClient | None = None,
    ) -> None:
        """``client``: an open aiobotocore Kinesis client to share; by default the producer
        opens (and later closes) its own from ``settings``. ``max_wait_s``: the longest one
        `put_events` retries before reporting what has not landed as failed, counted from
        the call (waiting for a free call included). ``max_in_flight``: concurrent
        PutRecords calls `put_events` callers share. Two, not more: a call costs about the
        same here and in the emulator whatever it carries, and the fewer calls in flight,
        the more callers each carries (64 clients posting single events, session 7: API
        0.49 -> 0.37-0.40 ms and emulator 0.21 -> 0.13 ms of CPU per event from 4 to 2, at
        a higher rate). One saves a little more, but a call held up (a snapshot or a
        collection in the emulator) would then hold every caller; with two the other goes
        on."""
        self.settings = settings
        self.stream = settings.stream_name
        self.max_attempts = max_attempts
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.linger = linger
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[tuple[Event, asyncio.Future[PutResult]]] = asyncio.Queue(
            maxsize=max_buffered
        )
        self._client_cm: Any = None
        self._client: KinesisClient | None = client
        self._flusher: asyncio.Task[None] | None = None
        self._sending = asyncio.Lock()
        self._closed = False
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self._waiting: deque[_Waiting] = deque()
        self._calls: set[asyncio.Task[None]] = set()
        self._shard_map: ShardMap | None = None
        self._shards_retry_at = 0.0

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("a closed KinesisProducer cannot be reopened; create a new one")
        if self._flusher is not None:
            return
        if self._client is None:
            # Our own loop retries (within max_wait_s); botocore's retries would only
            # stack their backoff on top of it.
            self._client_cm = async_client(self.settings, "kinesis", max_attempts=1)
            self._client = await self._client_cm.__aenter__()
        self._flusher = asyncio.create_task(self._flush_loop(), name="kinesis-producer-flush")

    async def close(self) -> None:
        """Flush what is buffered, then release the client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            await self.flush()
        if self._calls:
            # callers' shared calls still in flight: let them answer before the client goes
            await asyncio.gather(*self._calls, return_exceptions=True)
        if self._client_cm is not None:
            await self._client_cm.__aexit__(None, None, None)
            self._client = None

    # --- immediate -------------------------------------------------------------------

    async def put_events(self, events: Sequence[Event]) -> list[PutResult]:
        """Put every event on the stream now; one result per event, in the same order."""
        if not events:
            return []
        with tracing.span(
            f"{self.stream} publish",
            tracing.SpanKind.PRODUCER,
            {
                "messaging.system": "aws_kinesis",
                "messaging.destination.name": self.stream,
                "messaging.batch.message_count": len(events),
            },
        ):
            return await self._put_events(events, tracing.envelope_headers())

    async def _put_events(
        self, events: Sequence[Event], headers: Sequence[tuple[str, bytes]]
    ) -> list[PutResult]:
        # An event that cannot become a record fails alone; its neighbours still go out.
        # Every record carries the publishing span's context, so the agent that reads it
        # continues the trace of the request that posted it.
        records: list[tuple[Entry, dict[str, Any]] | RecordTooLarge] = []
        for event in events:
            try:
                records.append(entry_for(event, headers))
            except RecordTooLarge as exc:
                records.append(exc)
        sendable = [r for r in records if not isinstance(r, RecordTooLarge)]
        outcomes = iter(await self._shared_call(sendable) if sendable else [])
        results: list[PutResult] = []
        for event, record in zip(events, records, strict=True):
            if isinstance(record, RecordTooLarge):
                results.append(PutResult(event.event_id, False, error=str(record), retriable=False))
                continue
            outcome = next(outcomes)
            results.append(
                PutResult(event.event_id, True, outcome.shard_id, outcome.sequence_number)
                if isinstance(outcome, Accepted)
                else PutResult(
                    event.event_id, False, error=str(outcome.error), retriable=outcome.retriable
                )
            )
        return results

    async def _shared_call(
        self, sendable: list[tuple[Entry, dict[str, Any]]]
    ) -> list[Accepted | Refused]:
        """The records' outcomes, sent in a PutRecords call shared with the other callers
        waiting at the same time (group commit; the module's docstring)."""
        self._require_client()
        loop = asyncio.get_running_loop()
        records = [record for _, record in sendable]
        waiting = _Waiting(
            records,
            [entry for entry, _ in sendable],
            sum(len(r["Data"]) + len(r["PartitionKey"]) for r in records),
            None if self.max_wait_s is None else loop.time() + self.max_wait_s,
            loop.create_future(),
        )
        self._waiting.append(waiting)
        self._start_calls()
        return await waiting.outcomes

    def _start_calls(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
            group = [self._waiting.popleft()]
            count, size = len(group[0].records), group[0].size
            while self._waiting:
                nxt = self._waiting[0]
                if (
                    count + len(nxt.records) > MAX_RECORDS_PER_CALL
                    or size + nxt.size > MAX_BYTES_PER_CALL
                ):
                    break
                group.append(self._waiting.popleft())
                count, size = count + len(nxt.records), size + nxt.size
            self._in_flight += 1
            task = asyncio.create_task(self._call(group), name="kinesis-producer-call")
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _call(self, group: list[_Waiting]) -> None:
        try:
            deadlines = [w.deadline for w in group if w.deadline is not None]
            # the earliest caller's bound holds for the whole call: nobody waits longer
            # than max_wait_s, however long they queued for a free call
            wait = (
                max(0.0, min(deadlines) - asyncio.get_running_loop().time()) if deadlines else None
            )
            shard_map = await self._shards() if self.settings.event_aggregation else None
            entries = [e for w in group for e in w.entries]
            packed = self._pack(entries, shard_map)
            if shard_map is not None and packed is not None:
                outcomes = await self._put_aggregated(len(entries), packed, shard_map, wait)
            else:
                outcomes = await put_records(
                    self._require_client(),
                    self.settings,
                    self.stream,
                    [r for w in group for r in w.records],
                    max_attempts=self.max_attempts,
                    base_backoff=self.base_backoff,
                    max_backoff=self.max_backoff,
                    max_wait_s=wait,
                )
            start = 0
            for w in group:
                if not w.outcomes.done():
                    w.outcomes.set_result(outcomes[start : start + len(w.records)])
                start += len(w.records)
        except BaseException as exc:
            for w in group:
                if not w.outcomes.done():
                    w.outcomes.set_exception(
                        exc if isinstance(exc, Exception) else StoreUnavailable(repr(exc))
                    )
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            self._start_calls()

    def _pack(
        self, entries: list[Entry], shard_map: ShardMap | None
    ) -> list[tuple[dict[str, Any], list[int]]] | None:
        """``entries`` as aggregated records by ``shard_map``; None when there is no map or
        it has no open shard for a key (it is dropped, to be listed again)."""
        if shard_map is None:
            return None
        try:
            return aggregated_records(entries, shard_map)
        except LookupError as exc:
            self._forget_shards(shard_map, str(exc))
            return None

    def _forget_shards(self, shard_map: ShardMap, why: str) -> None:
        """The next call lists the shards again (this one goes as it is)."""
        if self._shard_map is shard_map:
            self._shard_map = None
            log.info("the shards of %s changed (%s); listing them again", self.stream, why)

    async def _put_aggregated(
        self,
        entries: int,
        packed: list[tuple[dict[str, Any], list[int]]],
        shard_map: ShardMap,
        wait: float | None,
    ) -> list[Accepted | Refused]:
        """``packed`` (``entries`` events as aggregated records, one per shard and ~1 MB)
        sent; each event's outcome is its record's. A shard's later record is not sent
        once an earlier one of the call was refused (refused too, to resend), so a key's
        events never land out of order within a call.

        A record that lands on another shard than the one it was packed for means the
        stream was resharded since the shards were listed: a split's parent is closed and
        its start hash key now belongs to one child, which need not own every key inside
        the record. The record is on the stream, so it stays (the agents order a window by
        event time and apply each event once, whichever shard carried it); the shards are
        listed again before the next call, so only this call's records can straddle the
        new ranges, as with the KPL, which also learns of a reshard from where its records
        land."""
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        record_outcomes: list[Accepted | Refused | None] = [None] * len(packed)
        refused_shards: dict[str, Refused] = {}
        for round_ in shard_rounds([record for record, _ in packed]):
            held = [i for i in round_ if packed[i][0]["ExplicitHashKey"] in refused_shards]
            for i in held:
                record_outcomes[i] = refused_shards[packed[i][0]["ExplicitHashKey"]]
            sent = [i for i in round_ if i not in held]
            if not sent:
                continue
            outcomes = await put_records(
                self._require_client(),
                self.settings,
                self.stream,
                [packed[i][0] for i in sent],
                max_attempts=self.max_attempts,
                base_backoff=self.base_backoff,
                max_backoff=self.max_backoff,
                max_wait_s=None if deadline is None else max(0.0, deadline - loop.time()),
            )
            for i, outcome in zip(sent, outcomes, strict=True):
                record_outcomes[i] = outcome
                if isinstance(outcome, Refused):
                    refused_shards[packed[i][0]["ExplicitHashKey"]] = outcome
                    continue
                meant = shard_map.shard_for_hash(int(packed[i][0]["ExplicitHashKey"]))
                if outcome.shard_id != meant.shard_id:
                    self._forget_shards(
                        shard_map,
                        f"a record for {meant.shard_id} landed on {outcome.shard_id}",
                    )
        per_entry: list[Accepted | Refused | None] = [None] * entries
        for (_, members), landed in zip(packed, record_outcomes, strict=True):
            for member in members:
                per_entry[member] = landed
        return [o for o in per_entry if o is not None]

    async def _shards(self) -> ShardMap | None:
        """The stream's shards (to route aggregated records), listed once and again after
        a reshard (`_forget_shards`); None while they cannot be listed (then one record per
        event), tried again a few seconds on."""
        if self._shard_map is not None:
            return self._shard_map
        loop = asyncio.get_running_loop()
        if loop.time() < self._shards_retry_at:
            return None
        try:
            self._shard_map = await list_shards(self._require_client(), self.stream)
        except Exception as exc:  # (any failure: single records meanwhile)
            self._shards_retry_at = loop.time() + SHARDS_RETRY_S
            log.info("listing the shards of %s failed (%s); one record per event", self.stream, exc)
        return self._shard_map

    def _require_client(self) -> KinesisClient:
        if self._client is None:
            raise RuntimeError(
                "KinesisProducer is not started; use `async with KinesisProducer(...)`"
            )
        return self._client

    # --- buffered ----------------------------------------------------------------------

    async def send(self, event: Event) -> asyncio.Future[PutResult]:
        """Queue an event; returns a future resolved when Kinesis accepts (or refuses) it.

        Waits while the buffer is full, so a producer faster than the stream slows down
        instead of exhausting memory.
        """
        if self._closed:
            raise RuntimeError("KinesisProducer is closed")
        self._require_client()
        future: asyncio.Future[PutResult] = asyncio.get_running_loop().create_future()
        await self._queue.put((event, future))
        return future

    async def flush(self) -> None:
        """Send everything queued so far and wait for it."""
        while not self._queue.empty():
            batch: list[tuple[Event, asyncio.Future[PutResult]]] = []
            while len(batch) < MAX_RECORDS_PER_CALL and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            async with self._sending:
                await self._send_batch(batch)
        # Wait for a batch the background task may have in flight.
        async with self._sending:
            pass

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[tuple[Event, asyncio.Future[PutResult]]] = []
        try:
            while True:
                batch = [await self._queue.get()]
                deadline = loop.time() + self.linger
                while len(batch) < MAX_RECORDS_PER_CALL:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                    except TimeoutError:
                        break
                async with self._sending:
                    await self._send_batch(batch)
                batch = []
        except asyncio.CancelledError:
            # Closing while a batch lingers: send it rather than strand its futures.
            if batch:
                async with self._sending:
                    await self._send_batch(batch)
            raise

    async def _send_batch(self, batch: list[tuple[Event, asyncio.Future[PutResult]]]) -> None:
        events = [event for event, _ in batch]
        try:
            results = await self.put_events(events)
        except RecstreamError as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception as exc:  # keep the flusher alive; the callers see the error
            wrapped = StoreUnavailable(f"PutRecords failed: {exc!r}")
            for _, future in batch:
                if not future.done():
                    future.set_exception(wrapped)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
