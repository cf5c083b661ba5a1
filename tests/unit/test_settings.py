from __future__ import annotations

import importlib.util

import pytest

from recstream import stack
from recstream.settings import Settings


def test_init_script_defaults_match_settings() -> None:
    spec = importlib.util.spec_from_file_location("init_script", stack.INIT_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert stack.resource_env(Settings()) == module.DEFAULTS


def test_env_overrides_and_empty_endpoint_means_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSTREAM_AWS_ENDPOINT_URL", "")
    monkeypatch.setenv("RECSTREAM_STREAM_SHARDS", "8")
    settings = Settings()
    assert settings.aws_endpoint_url is None
    assert not settings.local
    assert settings.stream_shards == 8


def test_production_refuses_loopback_endpoints() -> None:
    with pytest.raises(ValueError, match="loopback"):
        Settings(env="production", aws_endpoint_url="http://127.0.0.1:4566")
    # (production also requires rediss://; tests/reliability/test_production.py)
    tls = "rediss://redis.internal:6380/0"
    assert Settings(env="production", aws_endpoint_url=None, redis_url=tls).aws_endpoint_url is None
    assert Settings(env="production", redis_url=tls).aws_endpoint_url is None  # unset: real AWS


def test_namespace_is_validated() -> None:
    with pytest.raises(ValueError, match="namespace"):
        Settings(namespace="has spaces")


def test_to_env_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(
        aws_endpoint_url=None, namespace="shop", event_weights={"view": 0.5}, stream_shards=3
    )
    for key, value in original.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == original
