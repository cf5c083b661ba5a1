"""The S3 archive of raw events: the format contract, its writer and its reader.

Format (the archive agent writes it, training reads it)::

    s3://{bucket}/archive/{namespace}/dt=YYYY-MM-DD/hour=HH/<anything>.jsonl.gz

- the partition is the event's own timestamp in UTC (``dt`` and ``hour``), so late events
  land where a time-range read looks for them;
- each object is gzip-compressed newline-delimited JSON, one `streams.schema.Event` per
  line exactly as `Event.to_json` writes it;
- ``<anything>`` is free (the writer uses the first event's time and a random suffix), so
  many writers can add objects to the same partition without coordination.

`write_events` is the writer (aiobotocore, for the agents); `read_events` reads a time
range back with boto3, synchronously, because training's data plans load synchronously
(`training.archive.load_archive` turns it into an `InteractionLog`). The format lives in
recstream/ because the agents write it and training reads it.
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import secrets
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from recstream.aws import async_client, sync_client, translate
from recstream.settings import Settings
from streams.schema import Event

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = [
    "ARCHIVE_PREFIX",
    "decode_events",
    "encode_events",
    "object_key",
    "partition_prefix",
    "read_events",
    "write_events",
]

log = logging.getLogger(__name__)

ARCHIVE_PREFIX: Final = "archive"
SUFFIX: Final = ".jsonl.gz"


def partition_prefix(namespace: str, timestamp: float) -> str:
    """``archive/{namespace}/dt=YYYY-MM-DD/hour=HH/`` of the hour holding ``timestamp``."""
    # by the hour's number: a flush asks for every buffered event, nearly all in one hour
    return _hour_prefix(namespace, math.floor(timestamp / 3600))


@functools.lru_cache(maxsize=4096)
def _hour_prefix(namespace: str, hour: int) -> str:
    moment = datetime.fromtimestamp(hour * 3600, tz=UTC)
    return f"{ARCHIVE_PREFIX}/{namespace}/dt={moment:%Y-%m-%d}/hour={moment:%H}/"


def object_key(namespace: str, timestamp: float, name: str | None = None) -> str:
    """A fresh object key in the partition of ``timestamp``."""
    if name is None:
        moment = datetime.fromtimestamp(timestamp, tz=UTC)
        name = f"{moment:%Y%m%dT%H%M%S}-{secrets.token_hex(6)}"
    return f"{partition_prefix(namespace, timestamp)}{name}{SUFFIX}"


def encode_events(events: Iterable[Event]) -> bytes:
    """gzip(newline-delimited `Event.to_json`)."""
    body = b"".join(event.to_json() + b"\n" for event in events)
    return gzip.compress(body, compresslevel=6, mtime=0)


def decode_events(blob: bytes, *, where: str = "archive object") -> Iterator[Event]:
    """The events of one archive object; an invalid line is logged and skipped (one bad
    producer must not stop training on the rest of the day)."""
    try:
        lines = gzip.decompress(blob).splitlines()
    except (OSError, EOFError, zlib.error) as exc:
        # A truncated or foreign object: skip it, say which, and train on the rest.
        log.warning("%s is not a gzip file of events (%s); skipped", where, exc)
        return
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield Event.from_json(line)
        except ValidationError as exc:
            log.warning("%s line %d is not a valid Event, skipped: %s", where, number, exc)


async def write_events(
    settings: Settings,
    events: Iterable[Event],
    *,
    s3: S3Client | None = None,
) -> list[str]:
    """Write ``events`` to the archive, one object per (namespace, hour); returns the keys.

    Pass an open aiobotocore ``s3`` client to reuse it (the archive agent does).
    """
    partitions: dict[tuple[str, str], list[Event]] = defaultdict(list)
    for event in events:
        partitions[(event.namespace, partition_prefix(event.namespace, event.timestamp))].append(
            event
        )
    if not partitions:
        return []

    async def put_all(client: S3Client) -> list[str]:
        keys: list[str] = []
        for (namespace, _), batch in sorted(partitions.items()):
            key = object_key(namespace, batch[0].timestamp)
            try:
                await client.put_object(
                    Bucket=settings.bucket,
                    Key=key,
                    Body=encode_events(batch),
                    ContentType="application/x-ndjson",
                    ContentEncoding="gzip",
                )
            except (BotoCoreError, ClientError) as exc:
                raise translate(
                    exc, f"archive write to s3://{settings.bucket}/{key}", settings
                ) from exc
            keys.append(key)
        return keys

    if s3 is not None:
        return await put_all(s3)
    async with async_client(settings, "s3") as client:
        return await put_all(client)


def _hours(start: float, end: float) -> Iterator[datetime]:
    moment = datetime.fromtimestamp(start, tz=UTC).replace(minute=0, second=0, microsecond=0)
    last = datetime.fromtimestamp(end, tz=UTC)
    while moment <= last:
        yield moment
        moment += timedelta(hours=1)


def read_events(
    settings: Settings,
    start: float,
    end: float,
    *,
    namespace: str | None = None,
    client: Any = None,
) -> Iterator[Event]:
    """Every archived event with ``start <= timestamp < end``, partition by partition in
    time order (within a partition, in key order then line order), each event id once:
    the archive is written at least once, and a replay may store an event twice."""
    if end <= start:
        return
    namespace = namespace or settings.namespace
    s3 = client if client is not None else sync_client(settings, "s3")
    wanted = {partition_prefix(namespace, hour.timestamp()) for hour in _hours(start, end)}
    # One listing per day rather than per hour: 30 calls, not 720, for a month.
    days = sorted({prefix.rsplit("hour=", 1)[0] for prefix in wanted})
    for day in days:
        try:
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=day)
            keys = sorted(
                obj["Key"]
                for page in pages
                for obj in page.get("Contents", ())
                if obj["Key"].endswith(SUFFIX)
            )
            by_hour: dict[str, list[str]] = defaultdict(list)
            for key in keys:
                prefix = key.rsplit("/", 1)[0] + "/"
                if prefix in wanted:
                    by_hour[prefix].append(key)
            for hour_prefix in sorted(by_hour):
                # A replayed event has its original timestamp, so all its copies share one
                # partition: remembering one hour's ids drops every duplicate.
                seen: set[str] = set()
                for key in by_hour[hour_prefix]:
                    blob = s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
                    for event in decode_events(blob, where=f"s3://{settings.bucket}/{key}"):
                        if start <= event.timestamp < end and event.event_id not in seen:
                            seen.add(event.event_id)
                            yield event
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, f"archive read of s3://{settings.bucket}/{day}", settings) from exc
