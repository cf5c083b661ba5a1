"""Opening the stores one process needs, as one async context (see STYLE.md §4)."""

from __future__ import annotations

import platform
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiobotocore
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from recstream import tracing
from recstream.aws import async_client
from recstream.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sqs import SQSClient

__all__ = ["USER_AGENT", "Stores", "open_redis", "open_stores"]

USER_AGENT = (
    f"recstream aiobotocore/{aiobotocore.__version__} lang/python#{platform.python_version()}"
)
"""The User-Agent of the stores' AWS clients, given once (botocore's documented
``Config.user_agent``): without it botocore builds its own string (SDK, OS, language,
retry mode, the request's feature ids) twice for every request, about 0.9 M instructions
a call, 2 % of the worker's (session 11 in docs/agents.md). aiobotocore appends
``botocore/{version}``. What is not sent is the per-request list of SDK features AWS
counts for its own statistics."""


def open_redis(settings: Settings) -> aioredis.Redis:
    # Short socket timeouts: a slow Redis must degrade a request, not hang it. Every
    # call is timed into the Redis call metrics (recstream/tracing.py).
    client = aioredis.from_url(
        settings.redis_url,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        health_check_interval=30,
        max_connections=200,
        # After redis-server restarts, every pooled connection is dead: without one retry
        # on a fresh connection, the first command on each failed (the first request after
        # a restart was answered degraded; tests/reliability/test_drill_redis_loss.py).
        # Every write recstream sends is idempotent (event ids, SET NX), so resending one
        # whose reply was lost is safe.
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
    )
    return tracing.instrument_redis(client)


@dataclass(frozen=True)
class Stores:
    redis: aioredis.Redis
    dynamodb: DynamoDBClient
    sqs: SQSClient
    s3: S3Client


@asynccontextmanager
async def open_stores(settings: Settings) -> AsyncIterator[Stores]:
    async with AsyncExitStack() as stack:
        redis = open_redis(settings)
        stack.push_async_callback(redis.aclose)
        # No client-side parameter validation: botocore walks every attribute of every
        # item of a BatchWriteItem (about a tenth of the agents' CPU per call), and
        # DynamoDB validates each request anyway (ValidationException: `RequestRefused`).
        dynamodb = await stack.enter_async_context(
            async_client(settings, "dynamodb", parameter_validation=False, user_agent=USER_AGENT)
        )
        sqs = await stack.enter_async_context(async_client(settings, "sqs", user_agent=USER_AGENT))
        s3 = await stack.enter_async_context(async_client(settings, "s3", user_agent=USER_AGENT))
        yield Stores(redis=redis, dynamodb=dynamodb, sqs=sqs, s3=s3)
