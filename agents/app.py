"""The faust app of the stream agents, on recstream's ``kinesis://`` transport.

Agents are plain ``@app.agent`` coroutines. Each one opens the stores it needs for its
lifetime and processes records in batches (``stream.take``): faust costs about 100 µs
per message, so per-batch store round-trips are what keep one process fast.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import faust

from agents.deadletter import SqsDeadLetters
from agents.state import DynamoWindows, RedisHotStore
from agents.windows import WindowAgent
from recstream.settings import Settings
from recstream.stores import open_stores
from streams.kinesis import make_app

__all__ = ["APP_ID", "create_app"]

APP_ID = "recstream-agents"


def create_app(settings: Settings, app_id: str = APP_ID, **faust_kwargs: Any) -> faust.App:
    faust_kwargs.setdefault("datadir", str(settings.state_dir.resolve() / "faust"))
    app: faust.App = make_app(settings, app_id, **faust_kwargs)
    topic = app.topic(settings.stream_name, key_serializer="raw", value_serializer="raw")

    @app.agent(topic, name="windows")
    async def windows(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async with open_stores(settings) as stores:
            agent = WindowAgent(
                RedisHotStore(stores.redis, settings),
                DynamoWindows(stores.dynamodb, settings),
                SqsDeadLetters(stores.sqs, settings),
            )
            async for values in stream.take(
                settings.agent_batch_size, within=settings.agent_batch_window_s
            ):
                await agent.process(values, source=settings.stream_name)
                yield None

    return app
