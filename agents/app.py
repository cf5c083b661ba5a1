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
from agents.forwarder import Forwarder, open_personalize
from agents.identity import IdentityStitcher
from agents.state import DynamoWindows, RedisHotStore
from agents.windows import WindowAgent
from recstream.errors import RecstreamError
from recstream.settings import Settings
from recstream.stores import open_stores
from streams.kinesis import make_app

__all__ = ["APP_ID", "create_app", "until_done"]

APP_ID = "recstream-agents"

log = logging.getLogger(__name__)


async def until_done(
    process: Callable[[Sequence[bytes], str], Awaitable[object]],
    values: Sequence[bytes],
    source: str,
    max_delay: float = 5.0,
) -> None:
    """Process a batch, retrying with backoff until it succeeds.

    A failed batch must neither be skipped (events lost) nor crash the agent: faust
    would restart it without re-reading the un-acked messages, and the checkpoint would
    stall behind them. Retrying holds the stream back instead (back-pressure) and is
    safe because processing is idempotent.
    """
    attempt = 0
    while True:
        try:
            await process(values, source)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            attempt += 1
            delay = min(max_delay, 0.1 * 2 ** min(attempt, 10))
            hint = "" if isinstance(exc, RecstreamError) else " (unexpected; please report it)"
            log.error(
                "a batch of %d records failed (attempt %d), retrying in %.1fs: %s%s",
                len(values), attempt, delay, exc, hint,
            )  # fmt: skip
            await asyncio.sleep(delay)


def create_app(settings: Settings, app_id: str = APP_ID, **faust_kwargs: Any) -> faust.App:
    faust_kwargs.setdefault("datadir", str(settings.state_dir.resolve() / "faust"))
    app: faust.App = make_app(settings, app_id, **faust_kwargs)
    topic = app.topic(settings.stream_name, key_serializer="raw", value_serializer="raw")

    @app.agent(topic, name="windows")
    async def windows(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async with open_stores(settings) as stores:
            hot, durable = (
                RedisHotStore(stores.redis, settings),
                DynamoWindows(stores.dynamodb, settings),
            )
            agent = WindowAgent(
                hot,
                durable,
                SqsDeadLetters(stores.sqs, settings, stores.s3),
                identity=IdentityStitcher(stores.redis, hot, durable, settings),
            )
            async for values in stream.take(
                settings.agent_batch_size, within=settings.agent_batch_window_s
            ):
                await until_done(agent.process, values, settings.stream_name)
                yield None

    @app.agent(topic, name="attribution")
    async def attribution(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        """Counts clicks, carts, purchases and revenue per strategy (agents/attribution.py)."""
        async with open_stores(settings) as stores:
            agent = AttributionAgent(
                stores.redis, DynamoCounters(stores.dynamodb, settings), settings
            )
            async for values in stream.take(
                settings.agent_batch_size, within=settings.agent_batch_window_s
            ):
                await until_done(agent.process, values, settings.stream_name)
                yield None

    if settings.archive_enabled:

        @app.agent(topic, name="archive")
        async def archive(stream: faust.StreamT[bytes]) -> None:
            await run_archive(app, stream, settings)

    if settings.personalize_tracking_id:

        @app.agent(topic, name="personalize")
        async def personalize(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
            async with open_stores(settings) as stores, open_personalize(settings) as client:
                dead_letters = SqsDeadLetters(stores.sqs, settings, stores.s3)
                forwarder = Forwarder(client, settings, dead_letters)
                async for values in stream.take(
                    settings.agent_batch_size, within=settings.agent_batch_window_s
                ):
                    await until_done(forwarder.process, values, settings.stream_name)
                    yield None

    return app
