"""Fixtures for the reliability and security tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from recstream import stack
from recstream.apikeys import ApiKeyStore
from recstream.aws import async_client
from recstream.settings import Settings
from serving.app import create_app
from tests.conftest import LocalStack, make_settings, serve_in_thread


@pytest.fixture
def settings_fuzz(local_stack: LocalStack) -> Settings:
    # The fuzzer posts far beyond any sane per-IP rate: rate limits are tested elsewhere.
    return make_settings(local_stack, rate_limit_enabled=False)


SIGV4_SERVER_SECRET = "k" * 16 + "test-server-secret-0123456789"


@dataclass
class SecureApi:
    url: str
    settings: Settings

    async def key(self, *scopes: str, namespaces: tuple[str, ...] = ("*",)) -> str:
        """A fresh API key with these scopes, created through the real DynamoDB store."""
        async with async_client(self.settings, "dynamodb") as client:
            _, plaintext = await ApiKeyStore(client, self.settings).create(scopes, namespaces)
        return plaintext


def secure_settings(local: LocalStack, **overrides: object) -> Settings:
    values: dict[str, Any] = {
        "require_api_keys": True,
        "apikey_sigv4_secret": SIGV4_SERVER_SECRET,
        "rate_limit_enabled": False,
        **overrides,
    }
    return make_settings(local, **values)


@contextmanager
def running(settings: Settings, app: Any = None) -> Iterator[SecureApi]:
    port = stack.free_port()
    with serve_in_thread(app if app is not None else create_app(settings), port):
        yield SecureApi(url=f"http://127.0.0.1:{port}", settings=settings)


@pytest.fixture
def secure_api(local_stack: LocalStack) -> Iterator[SecureApi]:
    """The API with keys required (no key cache, so revocation is immediate)."""
    with running(secure_settings(local_stack, apikey_cache_ttl_s=0.0)) as api:
        yield api
