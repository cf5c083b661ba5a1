"""faust's ``kinesis://`` transport: a Transport, a Producer and a thread-free Consumer.

It mirrors the shape of faust's own aiokafka driver, with Kinesis underneath:

* a topic is a Kinesis stream of the same name, and shard ``shardId-000000000003`` is
  partition 3;
* partitions are assigned by `streams.leases.LeaseCoordinator` (KCL-style DynamoDB
  leases), whose ``on_change`` drives faust's ``on_partitions_revoked`` and
  ``on_partitions_assigned`` from the coordinator's own task (never from ``subscribe()``,
  where a rebalance would wait for itself), with ``app.consumer_generation_id`` bumped
  first;
* each leased shard has a `ShardReader` (GetRecords within the per-shard limits), and
  ``_getmany`` hands faust what the readers have buffered; the consumer owns its fetch
  loop, no thread involved;
* offsets are dense per shard (0, 1, 2, ... from the last checkpoint), because Kinesis
  sequence numbers are sparse 56-digit integers and faust's gap tracking does
  ``range(gap)`` on offsets. A map from offset to (sequence number, sub-sequence) turns
  the offset faust commits back into a checkpoint;
* a checkpoint is written only for offsets faust has acked (at-least-once), conditionally
  on still holding the lease; a closed shard read to its end is checkpointed SHARD_END,
  which lets the coordinator lease its children.

Settings faust cannot honour on Kinesis are refused with `ImproperlyConfigured`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Coroutine, Generator, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import aiobotocore
from botocore.exceptions import BotoCoreError, ClientError
from faust.exceptions import ImproperlyConfigured, ProducerSendError
from faust.transport import base
from faust.types import TP
from faust.types.tuples import ConsumerMessage, RecordMetadata
from mode import Service
from mode.services import WaitResults
from yarl import URL

from recstream.aws import async_client, translate
from recstream.errors import RecstreamError, ResourceNotFound
from recstream.settings import Settings
from streams.envelope import Message
from streams.kinesis.metrics import (
    CHECKPOINTS,
    MESSAGES,
    MILLIS_BEHIND,
    REBALANCES,
    SHARDS_OWNED,
)
from streams.kinesis.shards import (
    KinesisRecord,
    Position,
    ShardMap,
    ShardReader,
    list_shards,
    partition_of,
    shard_id_of,
)
from streams.kinesis.writer import Entry, partition_key_for, put_messages
from streams.leases import SHARD_END, TRIM_HORIZON, Checkpoint, LeaseCoordinator, LeaseLost

if TYPE_CHECKING:
    from faust.types import AppT
    from types_aiobotocore_kinesis import KinesisClient

    from streams.leases import LeaseStore

__all__ = [
    "Consumer",
    "EagerWaitFirst",
    "Producer",
    "Transport",
    "check_app_settings",
    "settings_for",
]

log = logging.getLogger(__name__)

SETTINGS_ATTRIBUTE = "_recstream_settings"
LEASE_STORE_ATTRIBUTE = "_recstream_lease_store"
MAX_RECORDS_PER_PARTITION_FETCH = 5000
SHARD_MAP_TTL_S = 30.0
"""How long the producer trusts its shard map before listing the shards again."""


def settings_for(app: AppT) -> Settings:
    """The recstream settings bound to a faust app by `make_app`, else from the env."""
    settings = getattr(app, SETTINGS_ATTRIBUTE, None)
    if settings is None:
        settings = Settings()
        setattr(app, SETTINGS_ATTRIBUTE, settings)
    return cast(Settings, settings)


def check_app_settings(app: AppT) -> None:
    """Refuse faust settings the Kinesis transport cannot honour, saying what to set."""
    conf = app.conf
    guarantee = getattr(conf.processing_guarantee, "value", conf.processing_guarantee)
    problems: list[str] = []
    if guarantee != "at_least_once":
        problems.append(
            f"processing_guarantee={guarantee!r}: Kinesis has no transactions; use "
            "processing_guarantee='at_least_once' and make agent state idempotent"
        )
    if conf.table_standby_replicas:
        problems.append(
            f"table_standby_replicas={conf.table_standby_replicas}: standby tables need "
            "changelog topics; set table_standby_replicas=0 (state lives in Redis/DynamoDB)"
        )
    if conf.producer_threaded:
        problems.append(
            "producer_threaded=True: the threaded producer is aiokafka-only; set "
            "producer_threaded=False"
        )
    if not conf.topic_disable_leader:
        problems.append(
            "topic_disable_leader=False: the leader election needs a Kafka consumer group; "
            "set topic_disable_leader=True (on_leader timers then do not run)"
        )
    if problems:
        raise ImproperlyConfigured(
            "the kinesis:// transport cannot run this app: " + "; ".join(problems)
        )


def worker_id(settings: Settings) -> str:
    """This process's lease owner name: ``RECSTREAM_WORKER_ID`` (default host:pid) plus a
    per-process suffix. Lease writes are conditional on the owner name, so two processes
    sharing a name would each accept the other's renewals as their own and both read every
    shard; the suffix makes a copied configuration harmless."""
    base = settings.worker_id or f"{socket.gethostname()}:{os.getpid()}"
    return f"{base}~{secrets.token_hex(3)}"


class Transport(base.Transport):
    """Kinesis transport for faust (``broker="kinesis://"``).

    ``kinesis://?aggregate=true`` makes the producer pack the messages of each shard into
    aggregated (v2) records; ``kinesis://?whole_records=true`` makes the consumer hand an
    aggregated record on as one message (see `streams.kinesis.shards.unpack`).
    """

    Consumer: ClassVar[type[Consumer]]
    Producer: ClassVar[type[Producer]]
    driver_version = f"aiobotocore={aiobotocore.__version__}"

    def __init__(
        self, url: list[URL], app: AppT, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        super().__init__(url, app, loop=loop)
        check_app_settings(app)
        self.settings = settings_for(app)
        query = url[0].query if url else {}
        self.aggregate = query.get("aggregate", "").lower() in ("1", "true", "yes")
        self.whole_records = query.get("whole_records", "").lower() in ("1", "true", "yes")
        self.shard_maps: dict[str, ShardMap] = {}

    async def load_shard_map(self, client: KinesisClient, stream: str) -> ShardMap:
        """List the stream's shards now and remember them for key routing."""
        try:
            shard_map = await list_shards(client, stream)
        except (BotoCoreError, ClientError) as exc:
            raise translate(
                exc, f"Kinesis stream {stream!r} (the faust topic of that name)", self.settings
            ) from exc
        self.shard_maps[stream] = shard_map
        return shard_map

    def shard_map(self, stream: str) -> ShardMap:
        shard_map = self.shard_maps.get(stream)
        if shard_map is None:
            raise ImproperlyConfigured(
                f"the shards of Kinesis stream {stream!r} are not known yet; declare the "
                "topic (app.topic(...).maybe_declare()) or start the app first"
            )
        return shard_map

    def key_partition(self, topic: str, key: bytes | None) -> int:
        return self.shard_map(topic).partition_for_key(partition_key_for(key))


# --- consumer ---------------------------------------------------------------------------


def _hand(handed: deque[tuple[int, str, int, int]], records: Sequence[KinesisRecord]) -> None:
    """Add what is handed to faust to ``handed``, which stays ordered by offset.

    After a restart the reader hands offsets that are there already: the same record
    at the same offset is skipped; an offset below the first kept is already
    checkpointed; one that now names another record (a retention trim under a
    TRIM_HORIZON restart) replaces what was known from there on."""
    if not records:
        return
    if not handed or records[0].offset > handed[-1][0]:
        handed.extend((r.offset, r.sequence_number, r.sub_sequence, r.first) for r in records)
        return
    for r in records:
        entry = (r.offset, r.sequence_number, r.sub_sequence, r.first)
        if handed and r.offset <= handed[-1][0]:
            index = r.offset - handed[0][0]
            if index < 0 or handed[index] == entry:
                continue
            while handed and handed[-1][0] >= r.offset:
                handed.pop()
        handed.append(entry)


class _Resumed:
    """The rest of a coroutine that already ran up to its first suspension (``waiting``:
    what it yielded to the event loop), as an awaitable a task can run to its end."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, waiting = self.coro, self.waiting
        while True:
            try:
                sent = yield waiting
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation, thrown in where it waits
                try:
                    waiting = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    waiting = coro.send(sent)
                except StopIteration as done:
                    return done.value


def _close(awaitables: Iterable[Any]) -> None:
    """Close coroutines that will not be awaited (or Python warns that they never were)."""
    for awaitable in awaitables:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()


@dataclass
class _Partition:
    """One leased shard as the consumer sees it."""

    tp: TP
    shard_id: str
    coordinator: LeaseCoordinator
    checkpoint: Checkpoint
    """The last checkpoint stored (where a restart resumes)."""
    has_parents: bool
    follows_parents: bool
    """A reshard child whose parents this app reads: it starts at TRIM_HORIZON, right
    after them. Children the app met without their parents follow the start position."""
    created_at: float
    """When the shard's lease was created (unix seconds)."""
    committed_offset: int = 0
    """The dense offset that corresponds to ``checkpoint`` (the next one to read)."""
    reader: ShardReader | None = None
    handed: deque[tuple[int, str, int, int]] = field(default_factory=deque)
    """(offset, sequence number, sub-sequence, first sub-sequence) of messages handed to
    faust, uncommitted: a checkpoint after one names its sub-sequence (its last inner
    message), a seek back to it resumes at its first (`KinesisRecord.first`).

    Kept when the reader restarts: a restart reads the same records at the same offsets
    again (`Consumer._start_position`), and faust still commits offsets acked before it.
    """
    end_offset: int | None = None
    """Set when the shard is closed and read to its end: the offset after the last one."""
    finished: bool = False
    lost: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class EagerWaitFirst(Service):
    """A mode `Service` whose `wait_first` runs the first awaitable at once, and creates
    mode's four tasks and `asyncio.wait` only when it suspends.

    faust's fetch loop (`Consumer._drain_messages`) waits this way for every message: the
    callback that puts it in each agent's queue, against a pause of the flow. The callback
    almost never suspends, and the tasks cost ~28 µs a message, about 5 % of the agents'
    CPU (session 8, docs/local-stack.md). When it does suspend (a queue full, the flow
    paused), the rest of it is waited for by mode's own `wait_first`, so a pause still
    interrupts it."""

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:  # noqa: ASYNC109 (mode's signature)
        """mode's `Service.wait_first`; the same results, the same exceptions."""
        first = coros[0] if coros else None
        if asyncio.iscoroutine(first) and not (self._stopped.is_set() or self._crashed.is_set()):
            try:
                waiting = first.send(None)
            except StopIteration as done:
                _close(coros[1:])
                return WaitResults([first], [done.value], False)
            except BaseException:
                _close(coros[1:])
                raise
            coros = (_Resumed(first, waiting), *coros[1:])
        return await super().wait_first(*coros, timeout=timeout)


class Consumer(EagerWaitFirst, base.Consumer):
    """Kinesis consumer: shard leases, per-shard readers, dense offsets, checkpoints."""

    consumer_stopped_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    transport: Transport

    def __init__(self, transport: Transport, **kwargs: Any) -> None:
        super().__init__(transport, **kwargs)
        self.settings = transport.settings
        self.worker_id = worker_id(self.settings)
        self._topics: set[str] = set()
        self._subscribed = asyncio.Event()
        self._assignment: set[TP] = set()
        self._partitions: dict[TP, _Partition] = {}
        self._coordinators: dict[str, LeaseCoordinator] = {}
        self._wakeup = asyncio.Event()
        self._rebalance_lock = asyncio.Lock()
        self._generation = 0
        self._assigned_once = False
        self._closing = False
        self._stack = AsyncExitStack()
        self._client: KinesisClient | None = None
        self._coordinate_task: asyncio.Task[None] | None = None
        self.refused_checkpoints = 0
        """Checkpoints refused because another worker took the lease (LeaseLost)."""
        self.rebalances = 0

    # --- lifecycle ----------------------------------------------------------------------

    async def on_start(self) -> None:
        await super().on_start()
        self._client = await self._stack.enter_async_context(
            async_client(self.settings, "kinesis", max_pool_connections=100)
        )
        self._coordinate_task = asyncio.create_task(
            self._coordinate(), name=f"kinesis-coordinate[{self.worker_id}]"
        )

    async def on_stop(self) -> None:
        self._closing = True
        task, self._coordinate_task = self._coordinate_task, None
        if task is not None:
            task.cancel()
            # A coordinator that already failed crashed the app with its error; stopping
            # must still commit and release the leases.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Commit what was acked while the leases are still ours ...
        await super().on_stop()
        for partition in list(self._partitions.values()):
            if partition.reader is not None:
                await partition.reader.stop()
        # ... then hand the leases back so other workers take over at once.
        for coordinator in self._coordinators.values():
            await coordinator.stop()
        self._coordinators.clear()
        await self._stack.aclose()
        self._client = None

    def _kinesis(self) -> KinesisClient:
        if self._client is None:
            raise RuntimeError("the Kinesis consumer is not started")
        return self._client

    # --- assignment -----------------------------------------------------------------------

    async def subscribe(self, topics: Iterable[str]) -> None:
        # Only record the wish: the coordinator task does the rebalance. Rebalancing in
        # here would hang, because faust's on_partitions_assigned waits for subscribe().
        self._topics = set(topics)
        self._subscribed.set()

    async def _coordinate(self) -> None:
        await self._subscribed.wait()
        # A safety net: reconcile faust's assignment with the leases now and then, in
        # case a change was announced while a rebalance was running.
        interval = max(0.5, self.settings.lease_duration_s / 2)
        while not self._closing:
            self._subscribed.clear()
            try:
                for topic in sorted(self._topics - set(self._coordinators)):
                    await self._start_coordinator(topic)
                await self._reconcile()
            except ResourceNotFound as exc:
                # A missing stream or lease table will not appear by waiting: stop the
                # worker with the error, which says how to create it.
                await self.crash(exc)
                return
            except RecstreamError as exc:
                log.warning("kinesis worker %s: %s; retrying", self.worker_id, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Never die silently: a dead coordinator would leave the worker hanging
                # with its leases renewed and nothing read.
                log.exception("kinesis worker %s: coordinator failed", self.worker_id)
                await self.crash(exc)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), interval)

    async def _start_coordinator(self, stream: str) -> None:
        await self.transport.load_shard_map(self._kinesis(), stream)
        store = cast("LeaseStore | None", getattr(self.app, LEASE_STORE_ATTRIBUTE, None))

        async def on_change(assigned: frozenset[str], revoked: frozenset[str]) -> None:
            await self._reconcile()

        coordinator = LeaseCoordinator(
            self.settings,
            app_id=self.app.conf.id,
            stream_name=stream,
            worker_id=self.worker_id,
            on_change=on_change,
            store=store,
        )
        await coordinator.start()
        self._coordinators[stream] = coordinator

    async def _reconcile(self) -> None:
        """Make faust's assignment equal the leases held: revoke, then assign."""
        async with self._rebalance_lock:
            if self._closing or self.should_stop:
                return
            wanted = {
                TP(stream, partition_of(shard_id))
                for stream, coordinator in self._coordinators.items()
                for shard_id in coordinator.owned()
            }
            # A shard whose lease was lost and taken back quickly is still "wanted" but
            # no longer read: hand it to faust again as revoked plus assigned.
            stale = {
                tp
                for tp in wanted & self._assignment
                if (p := self._partitions.get(tp)) is not None and p.lost
            }
            if wanted == self._assignment and self._assigned_once and not stale:
                return
            revoked = (self._assignment - wanted) | stale
            added = (wanted - self._assignment) | stale
            # Until on_partitions_assigned returns, a failure must make the next reconcile
            # redo the whole round (faust has paused everything by then).
            self._assigned_once = False
            log.info(
                "kinesis worker %s: rebalance, +%s -%s",
                self.worker_id,
                sorted(tp.partition for tp in added),
                sorted(tp.partition for tp in revoked),
            )
            if revoked:
                # faust forgets the acks of revoked partitions before its revoke callback
                # commits, so checkpoint them first: a released lease then hands over
                # without repeats, and a stolen one is refused (LeaseLost), as it must be.
                # commit() does nothing when faust's timer is mid-commit (it waits for
                # that one instead), so force what is still pending afterwards.
                await self.commit(set(revoked))
                await self.force_commit(set(revoked))
                # Stop reading them now: faust's revoke below waits for in-flight messages
                # (seconds with a slow agent), and a reader left running meanwhile spends
                # GetRecords calls (5/s per shard, shared with the new holder) on records
                # nobody will process here. What it buffered is dropped; the new holder
                # reads from the checkpoint just written.
                for tp in revoked:
                    partition = self._partitions.get(tp)
                    if partition is not None and partition.reader is not None:
                        await partition.reader.stop()
                        partition.reader.buffer.clear()
            self.app.on_rebalance_start()
            # faust pauses everything, waits for in-flight messages and commits the
            # partitions it keeps.
            await self.on_partitions_revoked(revoked)
            for tp in revoked:
                partition = self._partitions.pop(tp, None)
                if partition is not None and partition.reader is not None:
                    await partition.reader.stop()
            for tp in added:
                self._partitions[tp] = await self._new_partition(tp)
            self._assignment = wanted
            for stream in {tp.topic for tp in added}:
                try:
                    await self.transport.load_shard_map(self._kinesis(), stream)
                except RecstreamError as exc:
                    # Only the producer's key routing uses the map; reading must go on.
                    log.warning("refreshing the shard map of %s failed: %s", stream, exc)
            self._generation += 1
            self.rebalances += 1
            REBALANCES.inc()
            for tp in revoked:
                with contextlib.suppress(KeyError):
                    MILLIS_BEHIND.remove(tp.topic, shard_id_of(tp.partition))
            for stream in self._coordinators:
                SHARDS_OWNED.labels(stream).set(sum(1 for tp in wanted if tp.topic == stream))
            # Must be set before on_partitions_assigned, or faust's recovery thinks
            # another rebalance started and never resumes the streams.
            self.app.consumer_generation_id = self._generation
            await self.on_partitions_assigned(set(wanted), self._generation)
            self._assigned_once = True

    async def _new_partition(self, tp: TP) -> _Partition:
        coordinator = self._coordinators[tp.topic]
        shard_id = shard_id_of(tp.partition)
        lease = await coordinator.lease(shard_id)
        checkpoint = Checkpoint(TRIM_HORIZON) if lease is None else lease.checkpoint
        return _Partition(
            tp=tp,
            shard_id=shard_id,
            coordinator=coordinator,
            checkpoint=checkpoint,
            has_parents=lease is not None and bool(lease.parent_shard_ids),
            follows_parents=lease is not None
            and bool(lease.parent_shard_ids)
            and not lease.start_here,
            created_at=0.0 if lease is None else lease.created_at,
            finished=checkpoint.sequence_number == SHARD_END,
        )

    def assignment(self) -> set[TP]:
        return set(self._assignment)

    def owned_shards(self) -> dict[str, frozenset[str]]:
        """Shard ids leased by this worker, per stream."""
        return {stream: c.owned() for stream, c in self._coordinators.items()}

    def lag(self) -> dict[TP, int | None]:
        """MillisBehindLatest of each assigned shard's last GetRecords (None: not read yet)."""
        return {
            tp: (p.reader.stats.millis_behind if p.reader is not None else None)
            for tp, p in self._partitions.items()
        }

    def readers(self) -> dict[TP, ShardReader]:
        return {tp: p.reader for tp, p in self._partitions.items() if p.reader is not None}

    async def wait_empty(self) -> None:
        """faust's wait for every unacked message (before a rebalance or a stop goes on),
        bounded by one lease duration.

        faust can leave a message unacked for ever: an event a `take` stream skips while
        flow is suspended is neither acked (such streams do not ack by themselves) nor
        released. Unbounded, the wait then stops every shard this worker holds (seen
        against LocalStack, whose slower calls leave more events in flight at a
        rebalance). Giving up is safe: a checkpoint covers only acked offsets, so what
        was not acked is read again by whoever holds the shard next, and the agents
        apply each event once."""
        deadline = time.monotonic() + self.settings.lease_duration_s
        while not self.should_stop and self._unacked_messages:
            if time.monotonic() > deadline:
                log.warning(
                    "%d messages still unacked after %.0f s; going on without them (they "
                    "are not checkpointed, so they are read again)",
                    len(self._unacked_messages),
                    self.settings.lease_duration_s,
                )
                break
            gc.collect()  # as faust does: messages dropped from the agents' queues go
            await self.commit()
            if not self._unacked_messages:
                break
            await self._wait_for_ack(timeout=1)
            self._clean_unacked_messages()
        await self.commit_and_end_transactions()

    # --- positions --------------------------------------------------------------------

    def _start_position(self, partition: _Partition) -> Position:
        checkpoint = partition.checkpoint
        if checkpoint.sequence_number != TRIM_HORIZON:
            return Position.after_checkpoint(checkpoint.sequence_number, checkpoint.sub_sequence)
        # A reshard child of parents this app read is read from its start, right after them.
        if partition.follows_parents:
            return Position("TRIM_HORIZON")
        start = self.settings.start_position.strip().lower()
        if start == "trim_horizon":
            return Position("TRIM_HORIZON")
        if start == "latest" and partition.handed:
            # Read from LATEST before, nothing checkpointed yet: read the same records
            # again. LATEST now would name other records by the offsets faust has acked.
            offset, sequence_number, _, first = partition.handed[0]
            if offset == partition.committed_offset:
                return Position("AT_SEQUENCE_NUMBER", sequence_number, skip_through=first - 1)
        if start == "latest":
            if partition.has_parents and partition.created_at:
                # Its parents are read (from LATEST) first, which takes a moment; LATEST at
                # that later time would skip what the child received meanwhile.
                return Position("AT_TIMESTAMP", timestamp=partition.created_at)
            return Position("LATEST")
        try:
            return Position("AT_TIMESTAMP", timestamp=float(start))
        except ValueError:
            raise ImproperlyConfigured(
                f"RECSTREAM_START_POSITION={self.settings.start_position!r} is not "
                "trim_horizon, latest or unix seconds"
            ) from None

    def _restart(self, partition: _Partition, position: Position, next_offset: int) -> None:
        # `handed` is kept: the reader reads the same records at the same offsets again,
        # and a commit of offsets acked before the restart (faust seeks after every
        # rebalance, with acks still to commit) needs their sequence numbers before the
        # new reader has got that far: on LocalStack it often had not.
        if partition.finished or partition.lost:
            partition.handed.clear()
            partition.reader = None
            return

        def on_end(end_offset: int) -> None:
            partition.end_offset = end_offset
            if partition.committed_offset >= end_offset:
                self.add_future(self._finish_shard(partition))

        reader = ShardReader(
            client=self._kinesis(),
            stream=partition.tp.topic,
            shard_id=partition.shard_id,
            position=position,
            next_offset=next_offset,
            poll_interval_s=self.settings.poll_interval_s,
            on_end=on_end,
            wakeup=self._wakeup,
            whole_records=self.transport.whole_records,
        )
        partition.reader = reader
        partition.end_offset = None
        reader.start()

    async def seek_to_committed(self) -> Mapping[TP, int]:
        offsets: dict[TP, int] = {}
        for tp, partition in list(self._partitions.items()):
            if partition.reader is not None:
                await partition.reader.stop()
            if self._partitions.get(tp) is not partition:
                continue  # revoked by a rebalance while we waited: do not read it again
            self._restart(partition, self._start_position(partition), partition.committed_offset)
            offsets[tp] = partition.committed_offset
        return offsets

    async def _seek(self, partition: TP, offset: int) -> None:
        state = self._partitions.get(partition)
        if state is None:
            return
        if state.reader is not None:
            await state.reader.stop()
        for handed_offset, sequence_number, _, first in state.handed:
            if handed_offset == offset:
                # Resume at the message's first inner message: for a whole aggregated
                # record that is 0, not its last sub-sequence (which lost all but one).
                position = Position("AT_SEQUENCE_NUMBER", sequence_number, skip_through=first - 1)
                self._restart(state, position, offset)
                return
        if offset != state.committed_offset:
            log.warning(
                "seek %s to offset %d: Kinesis offsets are local to this worker and only "
                "the committed one (%d) or in-flight ones can be sought; using the committed",
                partition, offset, state.committed_offset,
            )  # fmt: skip
        self._restart(state, self._start_position(state), state.committed_offset)

    async def seek_wait(self, partitions: Mapping[TP, int]) -> None:
        for tp, offset in partitions.items():
            await self._seek(tp, offset)

    async def position(self, tp: TP) -> int | None:
        partition = self._partitions.get(tp)
        if partition is None:
            return None
        return partition.reader.next_offset if partition.reader else partition.committed_offset

    def highwater(self, tp: TP) -> int:
        partition = self._partitions.get(tp)
        if partition is None:
            return 0
        return partition.reader.next_offset if partition.reader else partition.committed_offset

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        return {tp: self.highwater(tp) for tp in partitions}

    async def earliest_offsets(self, *partitions: TP) -> Mapping[TP, int]:
        # Offsets restart at the checkpoint on every assignment; nothing earlier exists.
        return {
            tp: (self._partitions[tp].committed_offset if tp in self._partitions else 0)
            for tp in partitions
        }

    def topic_partitions(self, topic: str) -> int | None:
        shard_map = self.transport.shard_maps.get(topic)
        return shard_map.partitions() if shard_map is not None else None

    def key_partition(
        self, topic: str, key: bytes | None, partition: int | None = None
    ) -> int | None:
        if partition is not None:
            return partition
        return self.transport.key_partition(topic, key)

    async def create_topic(
        self,
        topic: str,
        partitions: int,
        replication: int,
        *,
        config: Mapping[str, Any] | None = None,
        timeout: Any = 30.0,  # noqa: ASYNC109 (faust's signature)
        retention: Any = None,
        compacting: bool | None = None,
        deleting: bool | None = None,
        ensure_created: bool = False,
    ) -> None:
        await self.transport.load_shard_map(self._kinesis(), topic)

    def _new_topicpartition(self, topic: str, partition: int) -> TP:
        return TP(topic, partition)

    # --- fetching -----------------------------------------------------------------------

    async def _getmany(
        self,
        active_partitions: set[TP] | None,
        timeout: float,  # noqa: ASYNC109 (faust's signature)
    ) -> Mapping[TP, list[KinesisRecord]]:
        deadline = time.monotonic() + timeout
        while True:
            self._wakeup.clear()
            out: dict[TP, list[KinesisRecord]] = {}
            tps = self._partitions.keys() if active_partitions is None else active_partitions
            for tp in tps:
                partition = self._partitions.get(tp)
                if partition is None or partition.reader is None or not partition.reader.buffer:
                    continue
                records = partition.reader.drain(MAX_RECORDS_PER_PARTITION_FETCH)
                _hand(partition.handed, records)
                out[tp] = records
                MESSAGES.labels(tp.topic).inc(len(records))
                behind = partition.reader.stats.millis_behind
                if behind is not None:
                    MILLIS_BEHIND.labels(tp.topic, partition.shard_id).set(behind)
            if out:
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.should_stop:
                return out
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def record_position(self, tp: TP, offset: int) -> tuple[str, str, int] | None:
        """(shard id, sequence number, sub-sequence) of a message handed to faust and not
        yet committed, e.g. for a dead letter to name where its record came from; None
        when the shard is no longer held here."""
        partition = self._partitions.get(tp)
        if partition is None or not partition.handed:
            return None
        handed = partition.handed
        # Offsets are dense, so the message is usually at offset - first; scan otherwise.
        index = offset - handed[0][0]
        if 0 <= index < len(handed) and handed[index][0] == offset:
            return partition.shard_id, handed[index][1], handed[index][2]
        for handed_offset, sequence_number, sub_sequence, _ in handed:
            if handed_offset == offset:
                return partition.shard_id, sequence_number, sub_sequence
        return None

    def _to_message(self, tp: TP, record: KinesisRecord) -> ConsumerMessage:
        return ConsumerMessage(
            record.topic,
            record.partition,
            record.offset,
            record.timestamp,
            0,
            list(record.headers),
            record.key,
            record.value,
            None,
            len(record.key) if record.key else 0,
            record.size,
            tp,
            generation_id=self.app.consumer_generation_id,
        )

    # --- committing -----------------------------------------------------------------------

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        """Checkpoint, per shard, the last message below each offset faust committed.

        The shards' checkpoints are written at the same time: one after the other, a
        commit of 12 shards to a DynamoDB that does not answer took over a minute (each
        write waits for its timeouts), and a worker told to stop waits for the commit
        under way (tests/reliability/test_drill_sigterm.py). Each shard has its own lock
        and lease, so the writes are independent."""
        done = await asyncio.gather(
            *(self._commit_shard(tp, offset) for tp, offset in offsets.items())
        )
        return any(done)

    async def _commit_shard(self, tp: TP, offset: int) -> bool:
        partition = self._partitions.get(tp)
        if partition is None or partition.lost or offset <= partition.committed_offset:
            return False
        last: tuple[int, str, int, int] | None = None
        for entry in partition.handed:
            if entry[0] >= offset:
                break
            last = entry
        if last is None or last[0] != offset - 1:
            # No longer expected: `handed` survives reader restarts. Left are offsets
            # this reader never handed: renumbered by a retention trim under a re-read,
            # or faust committing past what it was given. Skipping is safe
            # (at-least-once): the checkpoint only stays behind.
            log.warning(
                "commit %s@%d: no record is known at offset %d (not handed to faust since "
                "the checkpoint at offset %d); no checkpoint written. The next commit of "
                "this shard writes one; until then a restart or the shard's next holder "
                "reads these records again, and the agents skip what they applied. "
                "Nothing to do; if it repeats, report it with this worker's log",
                tp, offset, offset - 1, partition.committed_offset,
            )  # fmt: skip
            return False
        checkpoint = Checkpoint(last[1], last[2])
        try:
            async with partition.lock:
                # Re-checked under the lock: two commits racing must never move a
                # checkpoint backwards.
                if offset <= partition.committed_offset:
                    return False
                await partition.coordinator.checkpoint(partition.shard_id, checkpoint)
        except LeaseLost as exc:
            # Another worker holds the shard now and resumes from the last accepted
            # checkpoint; stop reading it. The coordinator revokes it next cycle.
            self.refused_checkpoints += 1
            CHECKPOINTS.labels(tp.topic, "refused").inc()
            log.warning("%s", exc)
            await self._lose(partition)
            return False
        except RecstreamError as exc:
            CHECKPOINTS.labels(tp.topic, "failed").inc()
            # faust counts this offset as committed and will not offer it again, so
            # retry it ourselves: an idle or closed shard has no "next commit".
            log.warning("checkpoint of %s failed, retrying in 1 s: %s", tp, exc)
            self.add_future(self._retry_commit(tp, offset))
            return False
        CHECKPOINTS.labels(tp.topic, "written").inc()
        while partition.handed and partition.handed[0][0] < offset:
            partition.handed.popleft()
        partition.checkpoint = checkpoint
        partition.committed_offset = offset
        if partition.end_offset is not None and offset >= partition.end_offset:
            await self._finish_shard(partition)
        return True

    async def _retry_commit(self, tp: TP, offset: int) -> None:
        await asyncio.sleep(1.0)
        partition = self._partitions.get(tp)
        if self._closing or partition is None or partition.lost:
            return
        if offset > partition.committed_offset:
            await self._commit({tp: offset})

    async def _lose(self, partition: _Partition) -> None:
        partition.lost = True
        if partition.reader is not None:
            await partition.reader.stop()
            partition.reader.buffer.clear()

    async def _finish_shard(self, partition: _Partition) -> None:
        """The shard is closed and everything in it processed: checkpoint SHARD_END."""
        async with partition.lock:
            if partition.finished or partition.lost:
                return
            try:
                await partition.coordinator.checkpoint(partition.shard_id, Checkpoint(SHARD_END))
            except LeaseLost as exc:
                log.warning("%s", exc)
                partition.lost = True
                return
            except RecstreamError as exc:
                log.warning("SHARD_END of %s not written, retrying: %s", partition.shard_id, exc)
                self.add_future(self._retry_finish(partition))
                return
            partition.finished = True
            partition.checkpoint = Checkpoint(SHARD_END)
            log.info("shard %s/%s read to its end", partition.tp.topic, partition.shard_id)
        # Children of this shard now take over its keys: route new keys to them.
        with contextlib.suppress(RecstreamError):
            await self.transport.load_shard_map(self._kinesis(), partition.tp.topic)

    async def _retry_finish(self, partition: _Partition) -> None:
        await asyncio.sleep(1.0)
        await self._finish_shard(partition)

    def close(self) -> None:
        """Nothing to close synchronously; `on_stop` releases the leases."""


# --- producer ---------------------------------------------------------------------------


@dataclass
class _Pending:
    topic: str
    entry: Entry
    future: asyncio.Future[RecordMetadata]


class Producer(base.Producer):
    """Kinesis producer: PutRecords batches, partial-failure retries, optional aggregation.

    ``send()`` queues; a background task puts what is queued every ``producer_linger``
    seconds (at least as one PutRecords call of up to 500 records or 5 MiB per stream).
    """

    allow_headers: bool = True
    transport: Transport

    def __init__(self, transport: Transport, **kwargs: Any) -> None:
        super().__init__(transport, **kwargs)
        self.settings = transport.settings
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()
        self._stack = AsyncExitStack()
        self._client: KinesisClient | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.max_queued = 50_000

    async def on_start(self) -> None:
        await super().on_start()
        self._client = await self._stack.enter_async_context(async_client(self.settings, "kinesis"))
        self._flusher = asyncio.create_task(self._flush_loop(), name="kinesis-producer")

    async def on_stop(self) -> None:
        await self.flush()
        task, self._flusher = self._flusher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stack.aclose()
        self._client = None
        await super().on_stop()

    def _kinesis(self) -> KinesisClient:
        if self._client is None:
            raise ProducerSendError("the Kinesis producer is not started")
        return self._client

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
        *,
        transactional_id: str | None = None,
    ) -> asyncio.Future[RecordMetadata]:
        if transactional_id:
            raise ProducerSendError(
                "Kinesis has no transactions; use processing_guarantee='at_least_once'"
            )
        if headers is None:
            header_list: Sequence[tuple[str, bytes]] = ()
        elif isinstance(headers, Mapping):
            header_list = [(str(k), bytes(v)) for k, v in headers.items()]
        else:
            header_list = [(str(k), bytes(v)) for k, v in headers]
        explicit_hash_key: str | None = None
        if partition is not None:
            if topic not in self.transport.shard_maps:
                await self.transport.load_shard_map(self._kinesis(), topic)
            shard = self.transport.shard_map(topic).get(shard_id_of(partition))
            if shard is None:
                raise ProducerSendError(f"stream {topic!r} has no shard for partition {partition}")
            explicit_hash_key = str(shard.start_hash)
        entry = Entry(
            partition_key=partition_key_for(key),
            message=Message(key=key, value=value or b"", headers=tuple(header_list)),
            explicit_hash_key=explicit_hash_key,
        )
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(topic, entry, future))
        self._idle.clear()
        self._wake.set()
        if len(self._queue) > self.max_queued:
            # Back-pressure: a producer faster than the stream waits instead of growing.
            self._room.clear()
            await self._room.wait()
        return future

    async def send_and_wait(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
        *,
        transactional_id: str | None = None,
    ) -> RecordMetadata:
        future = await self.send(
            topic, key, value, partition, timestamp, headers, transactional_id=transactional_id
        )
        return await future

    async def flush(self) -> None:
        await self.buffer.flush()
        if self._flusher is None:
            return
        self._wake.set()
        await self._idle.wait()

    async def _flush_loop(self) -> None:
        linger = float(self.app.conf.producer_linger or 0.0)
        while True:
            await self._wake.wait()
            self._wake.clear()
            if linger:
                await asyncio.sleep(linger)
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(5000, len(self._queue)))]
                if len(self._queue) <= self.max_queued:
                    self._room.set()
                await self._put(batch)
            self._room.set()
            self._idle.set()

    async def _put(self, batch: list[_Pending]) -> None:
        by_topic: dict[str, list[_Pending]] = {}
        for pending in batch:
            by_topic.setdefault(pending.topic, []).append(pending)
        for topic, items in by_topic.items():
            try:
                shard_map = self.transport.shard_maps.get(topic)
                if self.transport.aggregate and (
                    shard_map is None or time.monotonic() - shard_map.loaded_at > SHARD_MAP_TTL_S
                ):
                    # Aggregated records are routed by hash key to one shard, so after a
                    # reshard the map must follow, or a record would mix two children's keys.
                    shard_map = await self.transport.load_shard_map(self._kinesis(), topic)
                landed = await put_messages(
                    self._kinesis(),
                    self.settings,
                    topic,
                    [p.entry for p in items],
                    aggregate=self.transport.aggregate,
                    shard_map=shard_map,
                )
            except Exception as exc:
                # Whatever went wrong belongs to these messages' senders; the flusher must
                # live on, or flush() and stop() would wait forever.
                error = ProducerSendError(f"PutRecords to stream {topic!r} failed: {exc}")
                for pending in items:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            now = time.time()
            for pending, where in zip(items, landed, strict=True):
                tp = TP(topic, partition_of(where.shard_id))
                if not pending.future.done():
                    pending.future.set_result(
                        RecordMetadata(
                            topic=topic,
                            partition=tp.partition,
                            topic_partition=tp,
                            offset=int(where.sequence_number),
                            timestamp=now,
                        )
                    )

    def key_partition(self, topic: str, key: bytes) -> TP:
        return TP(topic, self.transport.key_partition(topic, key))

    async def create_topic(
        self,
        topic: str,
        partitions: int,
        replication: int,
        *,
        config: Mapping[str, Any] | None = None,
        timeout: Any = 1000.0,  # noqa: ASYNC109 (faust's signature)
        retention: Any = None,
        compacting: bool | None = None,
        deleting: bool | None = None,
        ensure_created: bool = False,
    ) -> None:
        # Streams are created by `recstream up` / the init script, never by faust: a
        # missing one raises ResourceNotFound saying so.
        await self.transport.load_shard_map(self._kinesis(), topic)

    def supports_headers(self) -> bool:
        return True


Transport.Consumer = Consumer
Transport.Producer = Producer
