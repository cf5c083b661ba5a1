"""Fixtures shared by the training tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from recstream.aws import async_client
from recstream.settings import Settings
from training.publish import ModelRegistry


@pytest.fixture
async def registry(
    settings: Settings, redis_client: aioredis.Redis
) -> AsyncIterator[ModelRegistry]:
    """A model registry on the test's Redis namespace and S3 bucket (moto)."""
    async with async_client(settings, "s3") as s3:
        yield ModelRegistry(redis_client, settings, s3)
