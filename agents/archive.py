"""The archive agent: raw events to S3, batched like Firehose, for training and export.

Every record of the stream is parsed with the one `Event` schema and buffered as one JSON
line. The buffer is written when it holds ``Settings.archive_flush_bytes`` bytes or its
oldest record waited ``Settings.archive_flush_s`` seconds: one gzip object per
(namespace, UTC date, hour) of the events' own timestamps, in the format of
`recstream.archive` (``s3://{bucket}/archive/{ns}/dt=YYYY-MM-DD/hour=HH/*.jsonl.gz``).

Nothing is checkpointed before it is in S3. The agent reads with faust's
``noack_take``, which hands over events without acknowledging them, and acks each event
only after the PutObject of its object succeeded (S3 checked the body's Content-MD5).
faust's checkpoint covers only acked offsets, so a crash loses the buffer but not the
events: they are read again from the last checkpoint. When faust rebalances or stops it
waits for every unacked event; the agent sees the stream paused and flushes at once, so a
lease handover or a SIGTERM does not wait for the age limit.

Object names are derived from their content (the first event's time and a digest of the
sorted event ids), so a batch written again, by a retried flush or after a crash that
regrouped the same events, overwrites its object instead of adding a copy. What can
still duplicate is a replay grouped differently (see docs/agents-archive.md); readers
drop those by event id (`recstream.archive.read_events`).

Records that do not parse are acked with the batch and not archived: the windows agent
sends them to the dead-letter queue with the reason.

A flush runs under the agents' failure policy (`agents.retry`): S3 unavailable or
throttling is retried without limit (the acks, so the checkpoint, wait); a write S3
refuses the same way every time is retried a bounded number of times, then the buffer is
written in halves down to the events that fail on their own, which are dead-lettered
(kind ``archive``; `recstream dlq replay` writes them later), and everything is acked.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError
from prometheus_client import Counter, Gauge

from agents.deadletter import DeadLetters, send_until_done
from agents.retry import Failure, RetryPolicy, process_bounded
from agents.windows import StreamRecord, event_records
from recstream.archive import encode_events, object_key, partition_prefix, read_events
from recstream.aws import async_client, sync_client, translate
from recstream.errors import ConfigurationError
from recstream.settings import Settings
from streams.schema import Event

if TYPE_CHECKING:
    import faust
    from faust.types import EventT
    from types_aiobotocore_s3 import S3Client

__all__ = [
    "INTERACTION_COLUMNS",
    "KIND",
    "ArchiveBuffer",
    "ArchiveSink",
    "ExportStats",
    "MemoryArchiveSink",
    "S3ArchiveSink",
    "batch_key",
    "export_interactions",
    "flush_until_done",
    "interaction_row",
    "run_archive",
]

log = logging.getLogger(__name__)

KIND = "archive"
"""The dead-letter kind of events S3 refused to archive (agents/deadletter.py)."""

T = TypeVar("T")

BUFFERED = Gauge("recstream_archive_buffered_events", "Events held by the archive agent")
ARCHIVED = Counter("recstream_archive_events_total", "Events written to the S3 archive")
OBJECTS = Counter("recstream_archive_objects_total", "Objects written to the S3 archive")


class ArchiveSink(Protocol):
    async def put(self, key: str, body: bytes) -> None:
        """Store ``body`` under ``key``; return only once it is durably stored."""


class S3ArchiveSink:
    """`ArchiveSink` on the settings' bucket. PutObject carries the body's MD5, so S3
    refuses a body damaged on the way; a 200 means the object is stored whole."""

    def __init__(self, client: S3Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    async def put(self, key: str, body: bytes) -> None:
        digest = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        try:
            await self.client.put_object(
                Bucket=self.settings.bucket,
                Key=key,
                Body=body,
                ContentMD5=digest,
                ContentType="application/x-ndjson",
                ContentEncoding="gzip",
            )
        except (BotoCoreError, ClientError) as exc:
            where = f"archive write to s3://{self.settings.bucket}/{key}"
            raise translate(exc, where, self.settings, "s3") from exc


class MemoryArchiveSink:
    """`ArchiveSink` in a dict (unit tests); ``puts`` counts writes, overwrites included."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts = 0

    async def put(self, key: str, body: bytes) -> None:
        self.puts += 1
        self.objects[key] = body


def batch_key(namespace: str, events: Sequence[Event]) -> str:
    """The object key of one (namespace, hour) batch, a function of its events only:
    ``{time of the first event}-{sha256 of the sorted event ids, 20 hex}``."""
    first = min(event.timestamp for event in events)
    digest = hashlib.sha256()
    for event_id in sorted(event.event_id for event in events):
        digest.update(event_id.encode())
        digest.update(b"\n")
    moment = datetime.fromtimestamp(first, tz=UTC)
    return object_key(namespace, first, name=f"{moment:%Y%m%dT%H%M%S}-{digest.hexdigest()[:20]}")


@dataclass
class ArchiveBuffer(Generic[T]):
    """The events waiting for their flush, and the acks that wait with them.

    ``T`` is whatever must be acknowledged once the events are stored (a faust event in
    the agent, anything in tests). A flush that fails keeps the buffer whole, so it can
    be retried; since object names follow from the content, a retry rewrites the same
    objects.
    """

    sink: ArchiveSink
    flush_bytes: int
    flush_s: float
    clock: Callable[[], float] = time.monotonic
    events: dict[str, Event] = field(default_factory=dict)
    """Buffered events by id (a record delivered twice within one buffer is kept once)."""
    records: dict[str, StreamRecord] = field(default_factory=dict)
    """Where each buffered event was read (for a dead letter)."""
    tokens: list[T] = field(default_factory=list)
    held: int = 0
    """Records buffered (an aggregated record's events each count)."""
    size: int = 0
    since: float | None = None
    """When the oldest buffered record arrived (the clock's time)."""
    invalid: int = 0

    @classmethod
    def of(cls, sink: ArchiveSink, settings: Settings) -> ArchiveBuffer[T]:
        return cls(sink, settings.archive_flush_bytes, settings.archive_flush_s)

    def add(self, records: Iterable[tuple[bytes | StreamRecord, T | None]]) -> None:
        """Buffer records, each with what to acknowledge once it is stored (None: nothing
        of its own, another record of the same message carries it)."""
        for raw, token in records:
            if self.since is None:
                self.since = self.clock()
            self.held += 1
            if token is not None:
                self.tokens.append(token)
            record = raw if isinstance(raw, StreamRecord) else StreamRecord(raw)
            event = record.event()
            if isinstance(event, str):
                # The windows agent dead-letters it with the reason; archiving it would
                # only make training skip it later.
                self.invalid += 1
                continue
            if event.event_id not in self.events:
                self.events[event.event_id] = event
                self.records[event.event_id] = record
                self.size += len(record.value) + 1
        BUFFERED.set(self.held)

    @property
    def pending(self) -> bool:
        return bool(self.tokens)

    @property
    def full(self) -> bool:
        return self.size >= self.flush_bytes

    def due(self) -> bool:
        """Full, or the oldest record waited ``flush_s``."""
        if self.since is None:
            return False
        return self.full or self.clock() - self.since >= self.flush_s

    def batches(self, events: Iterable[Event] | None = None) -> dict[str, list[Event]]:
        """The objects a flush writes now (or of ``events``): key -> events sorted by
        (time, id)."""
        groups: dict[tuple[str, str], list[Event]] = {}
        for event in self.events.values() if events is None else events:
            prefix = partition_prefix(event.namespace, event.timestamp)
            groups.setdefault((event.namespace, prefix), []).append(event)
        out: dict[str, list[Event]] = {}
        for (namespace, _), group in sorted(groups.items()):
            group.sort(key=lambda e: (e.timestamp, e.event_id))
            out[batch_key(namespace, group)] = group
        return out

    def encode(self, events: Sequence[Event]) -> list[tuple[str, bytes]]:
        """The objects of ``events``: (key, gzip body) each."""
        return [(key, encode_events(group)) for key, group in self.batches(events).items()]

    async def write(self, events: Sequence[Event]) -> int:
        """Write the objects of ``events`` (named after their content); how many.

        Grouping, serializing and compressing a full buffer (5 MiB) takes a few hundred
        ms of CPU: done in a thread (zlib lets go of the GIL while it compresses), so the
        worker's other agents, which share the event loop, go on meanwhile instead of
        stalling behind every flush."""
        objects = await asyncio.to_thread(self.encode, events)
        for key, body in objects:
            await self.sink.put(key, body)
        OBJECTS.inc(len(objects))
        return len(objects)

    def clear(self) -> list[T]:
        """Empty the buffer; return what to ack."""
        tokens = self.tokens
        if self.invalid:
            log.info(
                "archive: %d records did not parse; the dead-letter queue has them", self.invalid
            )
        ARCHIVED.inc(len(self.events))
        self.events, self.records, self.tokens = {}, {}, []
        self.size, self.since, self.invalid, self.held = 0, None, 0, 0
        BUFFERED.set(0)
        return tokens

    def ordered(self) -> list[Event]:
        """The buffered events in the order of their objects (for halving a flush)."""
        return [event for group in self.batches().values() for event in group]

    async def flush(self) -> list[T]:
        """Write every buffered event (one attempt), then empty the buffer; return what to
        ack. A failed flush keeps the buffer whole."""
        if not self.tokens:
            return []
        written = len(self.events)
        objects = await self.write(list(self.events.values()))
        log.debug("archive: wrote %d events in %d objects", written, objects)
        return self.clear()


async def flush_until_done(
    buffer: ArchiveBuffer[T],
    max_delay: float = 5.0,
    *,
    policy: RetryPolicy | None = None,
    dead_letters: DeadLetters | None = None,
    source: str = "stream",
) -> list[T]:
    """Flush under the agents' failure policy (see the module docstring): transient
    failures are retried until S3 takes the objects (the acks wait, so the checkpoint
    waits too: back-pressure rather than a skipped or lost batch); events S3 refuses
    deterministically are dead-lettered (to ``dead_letters``; without one, the error is
    raised). Returns what to ack."""
    if not buffer.tokens:
        return []
    policy = policy or RetryPolicy(max_delay=max_delay)

    async def give_up(failures: Sequence[Failure[Event]]) -> None:
        if dead_letters is None:
            raise failures[0].error
        letters = []
        for f in failures:
            record = buffer.records.get(f.item.event_id) or StreamRecord(f.item.to_json())
            letters.append(
                record.letter(f.reason, source, attempts=f.attempts, error=f.error_name, kind=KIND)
            )
        await send_until_done(dead_letters, letters, policy.max_delay)

    # (sorting a full buffer takes a while too: in a thread, as `write`)
    ordered = await asyncio.to_thread(buffer.ordered)
    await process_bounded(ordered, buffer.write, give_up, policy, "archived events")
    return buffer.clear()


def acknowledged_once(
    app: Any, events: Sequence[EventT[bytes]]
) -> Iterator[tuple[StreamRecord, EventT[bytes] | None]]:
    """Each record of ``events`` (`ArchiveBuffer.add`'s pairs), each faust event
    acknowledged once, with the first of its records: a whole aggregated record carries
    several, and the buffer is flushed whole, so they are stored together."""
    for event in events:
        for n, record in enumerate(event_records(app, event)):
            yield record, event if n == 0 else None


async def run_archive(
    app: faust.App,
    stream: faust.StreamT[bytes],
    settings: Settings,
    dead_letters: DeadLetters | None = None,
) -> None:
    """The body of the ``archive`` faust agent (see the module docstring)."""
    async with async_client(settings, "s3") as s3:
        buffer: ArchiveBuffer[EventT[bytes]] = ArchiveBuffer.of(
            S3ArchiveSink(s3, settings), settings
        )
        lock = asyncio.Lock()
        policy = RetryPolicy.of(settings)

        async def flush() -> None:
            async with lock:
                events = await flush_until_done(
                    buffer, policy=policy, dead_letters=dead_letters, source=settings.stream_name
                )
                for event in events:
                    await stream.ack(event)

        async def tick() -> None:
            # Checked often, so that a rebalance or a stop (faust pauses the stream, then
            # waits for every unacked event) is answered at once, not at the age limit.
            interval = min(0.25, settings.archive_flush_s / 4)
            while True:
                await asyncio.sleep(interval)
                try:
                    if buffer.due() or (buffer.pending and not app.flow_control.is_active()):
                        await flush()
                except Exception:
                    # flush() retries S3 itself; anything else must not end the ticker,
                    # or the buffer would wait for the size limit alone.
                    log.exception("archive: the age flush failed; trying again")

        ticker = asyncio.create_task(tick(), name="archive-flush")
        try:
            # noack_take yields the events themselves and never acks them: flush() does,
            # after the upload. (faust types it as yielding values.)
            batches: Any = stream.noack_take(  # type: ignore[attr-defined]
                settings.agent_batch_size, within=settings.agent_batch_window_s
            )
            async for events in batches:
                async with lock:
                    buffer.add(acknowledged_once(app, events))
                # Hold no reference to a batch while waiting for the next: faust drops the
                # messages it clears from the agents' queues in a rebalance and relies on
                # their being garbage-collected; one kept alive here makes its wait for
                # unacked messages hang for ever (seen against LocalStack).
                del events
                if buffer.full:
                    await flush()
        finally:
            ticker.cancel()


# --- export: Personalize's interactions CSV -----------------------------------------------

INTERACTION_COLUMNS = (
    "USER_ID",
    "ITEM_ID",
    "TIMESTAMP",
    "EVENT_TYPE",
    "EVENT_VALUE",
    "IMPRESSION",
    "RECOMMENDATION_ID",
)
"""Personalize's interactions dataset: USER_ID, ITEM_ID, TIMESTAMP (long, unix seconds)
are required; EVENT_TYPE, EVENT_VALUE (float), IMPRESSION (item ids joined with ``|``)
and RECOMMENDATION_ID are its reserved optional fields (empty when absent)."""


def interaction_row(event: Event) -> dict[str, str] | None:
    """One CSV row of an event, or None for an event without an item (Personalize's
    interactions need one). Anonymous events use ``session:{session_id}`` as USER_ID, as
    training does."""
    if event.item_id is None:
        return None
    return {
        "USER_ID": event.actor,
        "ITEM_ID": event.item_id,
        "TIMESTAMP": str(int(event.timestamp)),
        "EVENT_TYPE": event.event_type,
        "EVENT_VALUE": "" if event.event_value is None else repr(event.event_value),
        "IMPRESSION": "|".join(event.impression),
        "RECOMMENDATION_ID": event.recommendation_id or "",
    }


@dataclass
class ExportStats:
    rows: int = 0
    without_item: int = 0
    anonymous: int = 0


def _write_csv(events: Iterator[Event], out: IO[str], stats: ExportStats) -> None:
    writer = csv.DictWriter(out, fieldnames=INTERACTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for event in events:
        row = interaction_row(event)
        if row is None:
            stats.without_item += 1
            continue
        stats.anonymous += event.user_id is None
        writer.writerow(row)
        stats.rows += 1


def export_interactions(
    settings: Settings,
    start: float,
    end: float,
    out: str,
    *,
    namespace: str | None = None,
) -> ExportStats:
    """Write the archived events of ``[start, end)`` as Personalize's interactions CSV to
    ``out``, a local path or ``s3://bucket/key`` (what a dataset import job reads)."""
    stats = ExportStats()
    events = read_events(settings, start, end, namespace=namespace)
    if not out.startswith("s3://"):
        with Path(out).open("w", newline="", encoding="utf-8") as handle:
            _write_csv(events, handle, stats)
        return stats
    bucket, _, key = out.removeprefix("s3://").partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ConfigurationError(f"--out {out!r} is not s3://bucket/key.csv; name the object")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "interactions.csv"
        with local.open("w", newline="", encoding="utf-8") as handle:
            _write_csv(events, handle, stats)
        try:
            sync_client(settings, "s3").upload_file(
                str(local), bucket, key, ExtraArgs={"ContentType": "text/csv"}
            )
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise translate(exc, f"writing {out}", settings, "s3") from exc
    return stats
