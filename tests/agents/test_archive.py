"""The archive agent's buffer and flush, its S3 objects on moto, and the Personalize
interactions export."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import pytest

from agents.archive import (
    INTERACTION_COLUMNS,
    ArchiveBuffer,
    MemoryArchiveSink,
    S3ArchiveSink,
    batch_key,
    export_interactions,
    flush_until_done,
)
from recstream.archive import read_events, write_events
from recstream.aws import async_client, sync_client
from recstream.cli import main
from recstream.errors import StoreUnavailable
from recstream.settings import Settings
from streams.schema import Event, Interaction

HOUR = 3600.0
T0 = 1_763_856_000.0  # 2025-11-23 00:00:00 UTC


def event(n: int, ns: str = "shop", t: float | None = None, **extra: object) -> Event:
    return Event(
        event_id=f"e{n}",
        event_type="view",
        user_id=f"u{n % 3}",
        item_id=f"i{n}",
        timestamp=T0 + n if t is None else t,
        namespace=ns,
        **extra,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def buffer(
    sink: MemoryArchiveSink, flush_bytes: int = 10**6, clock: Clock | None = None
) -> ArchiveBuffer[int]:
    return ArchiveBuffer(sink, flush_bytes=flush_bytes, flush_s=60.0, clock=clock or Clock())


def lines(blob: bytes) -> list[Event]:
    return [Event.from_json(line) for line in gzip.decompress(blob).splitlines()]


async def test_flush_writes_one_object_per_namespace_and_hour_then_acks() -> None:
    sink = MemoryArchiveSink()
    buf = buffer(sink)
    events = [event(1), event(2, t=T0 + HOUR + 5), event(3, ns="blog"), event(4)]
    buf.add((e.to_json(), n) for n, e in enumerate(events))
    assert buf.pending
    assert not buf.due()
    acks = await buf.flush()
    assert acks == [0, 1, 2, 3]  # every record, acked only after the writes
    assert sorted(sink.objects) == sorted(
        [
            batch_key("blog", [events[2]]),
            batch_key("shop", [events[0], events[3]]),
            batch_key("shop", [events[1]]),
        ]
    )
    key = batch_key("shop", [events[0], events[3]])
    assert key.startswith("archive/shop/dt=2025-11-23/hour=00/20251123T000001-")
    assert key.endswith(".jsonl.gz")
    assert lines(sink.objects[key]) == [events[0], events[3]]
    assert not buf.pending
    assert await buf.flush() == []


async def test_size_and_age_decide_the_flush() -> None:
    clock = Clock()
    sink = MemoryArchiveSink()
    buf = buffer(sink, flush_bytes=1000, clock=clock)
    assert not buf.due()
    buf.add([(event(0).to_json(), 0)])
    clock.now = 59.0
    assert not buf.due()
    clock.now = 60.0
    assert buf.due()
    assert not buf.full
    await buf.flush()
    buf.add((event(n).to_json(), n) for n in range(1, 8))
    assert buf.full
    assert buf.due()


async def test_a_replayed_batch_overwrites_its_object() -> None:
    sink = MemoryArchiveSink()
    events = [event(n) for n in range(20)]
    first = buffer(sink)
    first.add((e.to_json(), 0) for e in events)
    await first.flush()
    # the same events again, delivered in another order and with a repeat inside
    again = buffer(sink)
    again.add((e.to_json(), 0) for e in [*reversed(events), events[3]])
    await again.flush()
    assert sink.puts == 2
    assert len(sink.objects) == 1
    assert [e.event_id for e in lines(next(iter(sink.objects.values())))] == [
        f"e{n}" for n in range(20)
    ]


async def test_invalid_records_are_acked_but_not_archived() -> None:
    sink = MemoryArchiveSink()
    buf = buffer(sink)
    buf.add([(b"{not json", 0), (event(1).to_json(), 1), (b'{"event_type": "view"}', 2)])
    assert await buf.flush() == [0, 1, 2]
    assert [lines(blob) for blob in sink.objects.values()] == [[event(1)]]


class FlakySink(MemoryArchiveSink):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def put(self, key: str, body: bytes) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("S3 is down")
        await super().put(key, body)


async def test_a_failed_flush_keeps_the_buffer_and_its_acks() -> None:
    sink = FlakySink(failures=2)
    buf = buffer(sink)
    buf.add((event(n).to_json(), n) for n in range(3))
    with pytest.raises(StoreUnavailable):
        await buf.flush()
    assert buf.pending
    assert await flush_until_done(buf, max_delay=0.01) == [0, 1, 2]
    assert len(sink.objects) == 1


async def test_s3_objects_read_back_once_each(settings: Settings) -> None:
    ns = settings.namespace
    events = [event(n, ns=ns, t=T0 + n * 600) for n in range(12)]  # two hours
    async with async_client(settings, "s3") as s3:
        buf: ArchiveBuffer[int] = ArchiveBuffer.of(S3ArchiveSink(s3, settings), settings)
        buf.add((e.to_json(), 0) for e in events)
        await buf.flush()
        # the same events written again in another grouping (a replay after a lease
        # handover): the objects differ, the reader still yields each event once
        await write_events(settings, events[3:9], s3=s3)
    keys = [
        obj["Key"]
        for obj in sync_client(settings, "s3").list_objects_v2(
            Bucket=settings.bucket, Prefix=f"archive/{ns}/"
        )["Contents"]
    ]
    assert len(keys) == 4
    got = list(read_events(settings, T0, T0 + 2 * HOUR, namespace=ns))
    assert [e.event_id for e in got] == [f"e{n}" for n in range(12)]


async def test_export_writes_personalizes_interactions_csv(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = settings.namespace
    events = [
        event(1, ns=ns, event_value=3.5, recommendation_id="rec-9", impression=["i1", "i7"]),
        event(2, ns=ns, t=T0 + HOUR),
        Event(event_type="search", user_id="u1", timestamp=T0 + 3, namespace=ns),
        Event(event_type="click", session_id="s1", item_id="i5", timestamp=T0 + 4, namespace=ns),
    ]
    await write_events(settings, events)
    out = tmp_path / "interactions.csv"
    stats = export_interactions(settings, T0, T0 + 2 * HOUR, str(out), namespace=ns)
    assert (stats.rows, stats.without_item, stats.anonymous) == (3, 1, 1)
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert tuple(rows[0]) == INTERACTION_COLUMNS
    parsed = [Interaction.from_csv_row(row) for row in rows]
    assert [(p.user_id, p.item_id, p.timestamp, p.event_type) for p in parsed] == [
        ("u1", "i1", T0 + 1, "view"),
        ("session:s1", "i5", T0 + 4, "click"),
        ("u2", "i2", T0 + HOUR, "view"),
    ]
    assert parsed[0].event_value == 3.5
    assert (rows[0]["IMPRESSION"], rows[0]["RECOMMENDATION_ID"]) == ("i1|i7", "rec-9")
    assert rows[1]["EVENT_VALUE"] == rows[1]["IMPRESSION"] == ""

    # the command, to S3, where a dataset import job reads it
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    target = f"s3://{settings.bucket}/exports/interactions.csv"
    argv = ["archive", "export", "--start", str(T0), "--end", str(T0 + 2 * HOUR), "--out", target]
    # main runs its own event loop: call it off this test's loop
    import asyncio

    assert await asyncio.to_thread(main, argv) == 0
    body = (
        sync_client(settings, "s3")
        .get_object(Bucket=settings.bucket, Key="exports/interactions.csv")["Body"]
        .read()
    )
    assert body.decode() == out.read_text()
    assert len(list(csv.DictReader(io.StringIO(body.decode())))) == 3
