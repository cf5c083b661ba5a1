"""Helpers for the transport tests: events on a stream, single or aggregated."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from recstream.aws import async_client
from recstream.settings import Settings
from streams.envelope import Message
from streams.kinesis.shards import list_shards
from streams.kinesis.writer import Entry, Landed, put_messages
from streams.schema import Event


def make_events(count: int, users: int = 20, prefix: str = "e") -> list[Event]:
    """``count`` view events spread over ``users`` users; event ids carry their order."""
    return [
        Event(
            event_id=f"{prefix}-{i:06d}",
            event_type="view",
            user_id=f"user-{i % users}",
            item_id=f"item-{i % 97}",
            timestamp=1_700_000_000 + i,
        )
        for i in range(count)
    ]


def entry_for(event: Event) -> Entry:
    """The collector's record format: envelope(key=partition key, value=event JSON)."""
    return Entry(
        event.partition_key, Message(key=event.partition_key.encode(), value=event.to_json())
    )


async def put_events(
    settings: Settings, events: Sequence[Event], *, aggregate: bool = False
) -> list[Landed]:
    """Put the events as the collector does; where each one landed, in order."""
    landed: list[Landed] = []
    async with async_client(settings, "kinesis") as kinesis:
        shard_map = await list_shards(kinesis, settings.stream_name) if aggregate else None
        for start in range(0, len(events), 500):
            landed += await put_messages(
                kinesis,
                settings,
                settings.stream_name,
                [entry_for(e) for e in events[start : start + 500]],
                aggregate=aggregate,
                shard_map=shard_map,
            )
    return landed


async def wait_until(
    predicate: object,
    timeout: float = 30.0,  # noqa: ASYNC109 (a polling deadline, not a cancel scope)
    what: str = "condition",
) -> None:
    """Poll ``predicate()`` until true; fail (not by timing assertions) after ``timeout``."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


def owner_name(owner: str | None) -> str | None:
    """A lease owner without the per-process suffix `streams.kinesis.transport.worker_id`
    adds to RECSTREAM_WORKER_ID."""
    return owner.rsplit("~", 1)[0] if owner is not None else None
