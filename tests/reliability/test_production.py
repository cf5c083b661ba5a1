"""Production mode: refusals at start-up, encryption at rest, trimmed client errors."""

from __future__ import annotations

import logging

import httpx
import pytest
from pydantic import ValidationError

from recstream.aws import sync_client
from recstream.settings import Settings
from tests.conftest import LocalStack, make_settings
from tests.reliability.conftest import running
from tests.serving.test_collector import click

GOOD = {
    "env": "production",
    "redis_url": "rediss://:a-long-real-password@redis.internal:6380/0",
    "apikey_sigv4_secret": "q" * 40,
}


def test_a_sound_production_configuration_starts_and_requires_keys() -> None:
    settings = Settings(**GOOD)  # type: ignore[arg-type]
    assert settings.api_keys_required
    assert settings.aws_endpoint_url is None  # real AWS


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"redis_url": "redis://:pw-long-enough@redis.internal:6379/0"}, "rediss://"),
        ({"redis_url": "rediss://:test@redis.internal:6380/0"}, "default password"),
        ({"require_api_keys": False}, "RECSTREAM_REQUIRE_API_KEYS"),
        ({"apikey_sigv4_secret": "short"}, "RECSTREAM_APIKEY_SIGV4_SECRET"),
        ({"aws_endpoint_url": "https://vpce.example.com"}, "RECSTREAM_AWS_ENDPOINT_URL"),
        ({"aws_endpoint_url": "http://127.0.0.1:4566"}, "loopback"),
    ],
)
def test_production_refuses(override: dict[str, object], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        Settings(**{**GOOD, **override})  # type: ignore[arg-type]


def test_local_mode_allows_what_production_refuses() -> None:
    local = Settings(redis_url="redis://127.0.0.1:6379/0", require_api_keys=False)
    assert not local.api_keys_required


def test_resources_are_encrypted_at_rest(settings: Settings) -> None:
    dynamodb = sync_client(settings, "dynamodb")
    for table in (settings.windows_table, settings.leases_table, settings.apikeys_table):
        description = dynamodb.describe_table(TableName=table)["Table"]
        assert description["SSEDescription"]["Status"] == "ENABLED", table
    s3 = sync_client(settings, "s3")
    rules = s3.get_bucket_encryption(Bucket=settings.bucket)["ServerSideEncryptionConfiguration"][
        "Rules"
    ]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    s3.put_object(Bucket=settings.bucket, Key="probe", Body=b"x")
    assert s3.head_object(Bucket=settings.bucket, Key="probe")["ServerSideEncryption"] == "AES256"


async def test_production_trims_operator_hints_from_client_errors(
    local_stack: LocalStack, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing stream answers 500 with the collector's hint ("run `recstream up`",
    the endpoint). In production the client gets the code, a generic sentence, the
    request id and which events to resend; the detail goes to the log."""
    base = make_settings(local_stack, rate_limit_enabled=False)
    # model_copy skips validation: production refuses the loopback emulator, which is
    # what this test must talk to.
    production = base.model_copy(
        update={"env": "production", "require_api_keys": False, "stream_name": "no-such-stream"}
    )
    caplog.set_level(logging.ERROR, logger="recstream.access")
    with running(production) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            response = await client.post(
                "/v1/events", json=[click("u1"), click("u2")], headers={"X-Request-Id": "req-42"}
            )
            invalid = await client.post("/v1/events", json={"event_type": "view"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "req-42"
    body = response.json()
    assert "recstream up" not in response.text
    assert "127.0.0.1" not in response.text
    assert body["error"]["request_id"] == "req-42"
    assert body["error"]["message"].startswith("internal error")
    assert [f["index"] for f in body["failed"]] == [0, 1]
    logged = [r for r in caplog.records if r.getMessage().startswith("trimmed 500")]
    assert logged
    assert "recstream up" in logged[0].getMessage()
    # 4xx answers keep their fixes: they are the client's to act on.
    assert invalid.status_code == 422
    assert "user_id" in invalid.text


async def test_local_mode_keeps_the_hints(local_stack: LocalStack) -> None:
    settings = make_settings(local_stack, rate_limit_enabled=False)
    with running(settings.model_copy(update={"stream_name": "no-such-stream"})) as api:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            response = await client.post("/v1/events", json=[click("u1")])
    assert response.status_code == 500
    assert "recstream up" in response.text


def test_security_settings_survive_to_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Child processes get settings through `to_env`; unset values come back unset."""
    for name, value in Settings().to_env().items():
        monkeypatch.setenv(name, value)
    again = Settings()
    assert again.require_api_keys is None
    assert again.rate_limit_enabled is None
    assert again.apikey_sigv4_secret is None
