"""The faust app of the stream agents, on recstream's ``kinesis://`` transport.

Agents are plain ``@app.agent`` coroutines. Each one opens the stores it needs for its
lifetime and processes records in batches (``stream.take``): faust costs about 100 µs
per message, so per-batch store round-trips are what keep one process fast.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import faust

from agents.archive import run_archive
from agents.attribution import AttributionAgent, DynamoCounters
from agents.deadletter import SqsDeadLetters
from agents.features import FeaturesPart, FeatureStage, SessionFeatures
from agents.forwarder import Forwarder, open_personalize
from agents.identity import IdentityStitcher
from agents.redrive import redrive_personalize
from agents.state import RedisHotStore, WindowsPart
from agents.trending import TrendingPart, TrendKeeper
from agents.windows import Pipeline, WindowAgent, stream_records
from recstream import tracing
from recstream.dynamo import BatchGets
from recstream.features import DynamoFeatures
from recstream.settings import Settings
from recstream.stores import Stores, open_redis, open_stores
from recstream.windows import DynamoWindows
from streams.kinesis import make_app

__all__ = ["APP_ID", "build_agent", "create_app", "stream_records"]

APP_ID = "recstream-agents"

log = logging.getLogger(__name__)

FEED_PART_EVENTS = 2_000
"""The windows agent feeds its pipeline at most this many events at once. The agents read
aggregated records whole, so a take of ``agent_batch_size`` records may hold tens of
thousands of events; unbounded, a batch could outlast a rebalance's wait. Measured on a
backlog (`bench.agents --only backlog`, session 14, before the larger parse cache):
parts of 2,000 events 8,606-8,641 events/s, of 500 7,226-7,909, unbounded 8,528-9,702;
a part applies in ~0.2 s."""


STREAM_BUFFER = 1_024
"""Messages faust queues for each agent (its ``stream_buffer_maxsize``, 4,096 by default).
The agents share each message's records and their parsed events (`event_records`), which
live while any agent still holds the message: the queue bounds how far the fastest agent
runs ahead of the slowest, so how many parsed events (~1.7 kB each) are kept. A whole
record carries up to a PutRecords call's events for its shard. Backlog (session 15):
1,024 and 4,096 alike within the noise, aggregated (10,279-10,372 events/s, peak RSS
~355 MB) or not (3,837-4,000 against 3,968); 256 cost a tenth without aggregation."""


def build_agent(stores: Stores, settings: Settings) -> WindowAgent:
    """The stream agent with every part on: windows, feature vectors, trending."""
    hot = RedisHotStore(
        stores.redis,
        settings,
        parts=(WindowsPart(settings), FeaturesPart(settings), TrendingPart(settings)),
    )
    # one reader for both tables: a batch's recovery reads of windows and feature
    # vectors, made concurrently, go out as one BatchGetItem
    reads = BatchGets(stores.dynamodb, settings)
    durable = DynamoWindows(stores.dynamodb, settings, reads)
    features = DynamoFeatures(stores.dynamodb, settings, reads)
    return WindowAgent(
        hot,
        durable,
        SqsDeadLetters(stores.sqs, settings, stores.s3),
        stages=[FeatureStage(stores.redis, features, settings)],
        identity=IdentityStitcher(
            stores.redis,
            hot,
            durable,
            settings,
            features=SessionFeatures(stores.redis, features, settings),
        ),
    )


def _acknowledge(
    stream: faust.StreamT[bytes], events: Sequence[Any]
) -> Callable[[], Awaitable[None]]:
    """A batch's acknowledgement, for when its durable copies are written."""

    async def acknowledge() -> None:
        for event in events:
            await stream.ack(event)

    return acknowledge


def create_app(settings: Settings, app_id: str = APP_ID, **faust_kwargs: Any) -> faust.App:
    faust_kwargs.setdefault("datadir", str(settings.state_dir.resolve() / "faust"))
    # An aggregated record (the API's producer packs a call's events per shard) reaches
    # the agents as one faust message, split by `stream_records`: faust's per-message
    # cost (streams/kinesis) is paid per record, not per event (session 14 in
    # docs/agents.md). A single record is a message of its own either way.
    faust_kwargs.setdefault("whole_records", True)
    faust_kwargs.setdefault("stream_buffer_maxsize", STREAM_BUFFER)
    app: faust.App = make_app(settings, app_id, **faust_kwargs)
    topic = app.topic(settings.stream_name, key_serializer="raw", value_serializer="raw")
    namespaces: set[str] = {settings.namespace, *settings.namespaces}
    """Namespaces whose trends this worker materializes: configured and seen."""

    @app.agent(topic, name="windows")
    async def windows(stream: faust.StreamT[bytes]) -> None:
        async with open_stores(settings) as stores:
            agent = build_agent(stores, settings)
            pipeline = Pipeline(
                agent,
                settings.stream_name,
                interval_s=settings.agent_copy_interval_s,
                max_attempts=settings.agent_max_attempts,
            )

            async def hurry() -> None:
                # A rebalance or a stop pauses the streams and waits for every unacked
                # event (bounded by the lease duration): write the pending copies now,
                # not at the end of their interval (as the archive agent flushes).
                while True:
                    await asyncio.sleep(0.25)
                    if pipeline.pending and not app.flow_control.is_active():
                        try:
                            await pipeline.flush()
                        except Exception:
                            log.exception("writing the durable copies early failed")

            hurrying = asyncio.create_task(hurry(), name="windows: copies before a pause")
            try:
                # noack_take, not take_events: a batch is acknowledged (so checkpointed)
                # only once its durable copies are written, which happens while the next
                # batch is applied to Redis (agents/windows.py, `Pipeline`). It yields
                # the events themselves (faust types it as yielding values), each with
                # the message that says where it was read.
                batches: Any = stream.noack_take(  # type: ignore[attr-defined]
                    settings.agent_batch_size, within=settings.agent_batch_window_s
                )
                async for events in batches:
                    # Each event's trace (started by the request that posted it) goes on.
                    with tracing.consuming(
                        "windows process",
                        [event.message.headers or () for event in events],
                        {
                            "messaging.system": "aws_kinesis",
                            "messaging.consumer.group.name": app_id,
                        },
                    ):
                        # Parsed now, applied once the previous batch's calls have run
                        # (the next batch is taken and parsed meanwhile). Aggregated
                        # records carry many events each: fed in parts (`FEED_PART_EVENTS`),
                        # the messages acknowledged with the last part (its group is
                        # written after the others').
                        records = stream_records(app, events)
                        size = max(FEED_PART_EVENTS, settings.agent_batch_size)
                        for start in range(0, len(records), size):
                            last = start + size >= len(records)
                            await pipeline.feed(
                                records[start : start + size],
                                _acknowledge(stream, events) if last else None,
                            )
                    # No reference to the batch while waiting for the next (agents/archive.py
                    # says why: a rebalance would wait for ever); the pipeline holds it
                    # until it is acknowledged.
                    del events
                    namespaces.update(agent.namespaces)
            finally:
                hurrying.cancel()
                # bounded, as every step of a stop is (agents/worker.py)
                await pipeline.aclose(settings.lease_duration_s)

    # Every agent runs its batches under the one failure policy (agents/retry.py):
    # transient failures wait, deterministic ones dead-letter the records at fault.
    @app.agent(topic, name="attribution")
    async def attribution(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        """Counts clicks, carts, purchases and revenue per strategy (agents/attribution.py)."""
        async with open_stores(settings) as stores:
            agent = AttributionAgent(
                stores.redis,
                DynamoCounters(stores.dynamodb, settings),
                settings,
                SqsDeadLetters(stores.sqs, settings, stores.s3),
            )
            async for events in stream.take_events(  # type: ignore[attr-defined]
                settings.agent_batch_size, within=settings.agent_batch_window_s
            ):
                await agent.process(stream_records(app, events), settings.stream_name)
                yield None

    if settings.archive_enabled:

        @app.agent(topic, name="archive")
        async def archive(stream: faust.StreamT[bytes]) -> None:
            async with open_stores(settings) as stores:
                dead_letters = SqsDeadLetters(stores.sqs, settings, stores.s3)
                await run_archive(app, stream, settings, dead_letters)

    if settings.personalize_tracking_id:

        @app.agent(topic, name="personalize")
        async def personalize(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
            async with open_stores(settings) as stores, open_personalize(settings) as client:
                dead_letters = SqsDeadLetters(stores.sqs, settings, stores.s3)
                # (its own session: the stores' clients are timed by recstream.aws)
                forwarder = Forwarder(tracing.instrument_aws(client), settings, dead_letters)
                async for events in stream.take_events(  # type: ignore[attr-defined]
                    settings.agent_batch_size, within=settings.agent_batch_window_s
                ):
                    await forwarder.process(stream_records(app, events), settings.stream_name)
                    yield None

        @app.timer(settings.personalize_redrive_s, name="personalize-redrive")  # type: ignore[untyped-decorator]
        async def personalize_redrive() -> None:
            # What the tracker did not take went to the DLQ; send it again (agents/redrive.py).
            try:
                await redrive_personalize(settings)
            except Exception as exc:  # the next tick retries
                log.warning("re-driving Personalize dead letters failed: %s", exc)

    keeper = TrendKeeper(open_redis(settings), settings)

    @app.timer(settings.trend_interval_s, name="trends")  # type: ignore[untyped-decorator]
    async def trends() -> None:
        # Every worker ticks; a short lock in Redis lets one of them do each namespace's
        # work, and the work is idempotent anyway. The keeper also rebuilds the trends
        # from the archive after a Redis loss (agents/trending.py).
        for namespace in sorted(namespaces):
            try:
                await keeper.tick(namespace)
            except Exception as exc:  # the next tick retries
                log.warning("materializing the trends of %s failed: %s", namespace, exc)

    return app
