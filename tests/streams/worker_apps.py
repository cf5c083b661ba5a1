"""Faust apps for the transport tests that run workers as subprocesses.

``python -m streams.kinesis tests.streams.worker_apps:recording_app`` with RECSTREAM_*
set runs a worker whose agent appends ``"{worker} {partition} {event_id}"`` to a Redis
list per processed event, so a test can count what every worker processed, in order.
"""

from __future__ import annotations

import faust
import redis.asyncio as aioredis

from recstream.settings import Settings
from streams.kinesis import make_app
from streams.schema import Event

APP_ID = "test-workers"


def processed_key(settings: Settings) -> str:
    return f"rs:{settings.namespace}:test:processed"


def recording_app(settings: Settings) -> faust.App:
    app = make_app(settings, APP_ID)
    redis = aioredis.from_url(settings.redis_url)
    key = processed_key(settings)
    worker = settings.worker_id or "?"

    @app.agent(app.topic(settings.stream_name, value_serializer="raw"))
    async def record(stream):  # type: ignore[no-untyped-def]
        async for event in stream.events():
            event_id = Event.from_json(event.value).event_id
            async with redis.pipeline(transaction=False) as pipe:
                pipe.rpush(key, f"{worker} {event.message.partition} {event_id}")
                pipe.expire(key, 3600)
                await pipe.execute()

    return app
