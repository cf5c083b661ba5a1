"""Drill: which credentials a client of a custom endpoint signs with.

`recstream/aws.py` used to sign every call to a custom endpoint with the emulator's dummy
credentials (``test``), replacing whatever the operator had configured: a VPC endpoint
(or a LocalStack that maps access keys to accounts) got ``test`` instead of the real
key. Now the dummy credentials are only a fallback when botocore's chain finds none.

Each test runs a real HTTP server that answers DynamoDB's ListTables and records the
``Authorization`` header of every request, so the check is on the wire: the access key
id SigV4 names in ``Credential=…/``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from recstream import stack
from recstream.aws import async_client, credentials_kwargs, forget_credentials, sync_client
from recstream.settings import Settings
from tests.conftest import serve_in_thread

CREDENTIAL = re.compile(r"Credential=([^/]+)/")


@dataclass
class Recorder:
    keys: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _app(recorder: Recorder) -> Starlette:
    async def any_call(request: Request) -> Response:
        found = CREDENTIAL.search(request.headers.get("authorization", ""))
        with recorder.lock:
            recorder.keys.append(found.group(1) if found else "")
        return JSONResponse({"TableNames": []}, media_type="application/x-amz-json-1.0")

    return Starlette(routes=[Route("/", any_call, methods=["POST"])])


@pytest.fixture
def endpoint() -> Iterator[tuple[Recorder, str]]:
    recorder = Recorder()
    port = stack.free_port()
    with serve_in_thread(_app(recorder), port):
        yield recorder, f"http://127.0.0.1:{port}"


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A process whose credential chain finds nothing (no env, no files, no role)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none-config"))
    forget_credentials()
    yield
    forget_credentials()


async def _signed_with(settings: Settings, recorder: Recorder) -> tuple[str, str]:
    async with async_client(settings, "dynamodb") as client:
        await client.list_tables()
    sync_client(settings, "dynamodb").list_tables()
    assert len(recorder.keys) == 2
    return recorder.keys[0], recorder.keys[1]


async def test_an_emulator_without_configured_credentials_gets_the_dummy_ones(
    endpoint: tuple[Recorder, str], no_credentials: None
) -> None:
    recorder, url = endpoint
    assert await _signed_with(Settings(aws_endpoint_url=url), recorder) == ("test", "test")


async def test_credentials_from_the_environment_are_never_replaced(
    endpoint: tuple[Recorder, str], no_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder, url = endpoint
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREALKEY000000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "real-secret")
    forget_credentials()
    signed = await _signed_with(Settings(aws_endpoint_url=url), recorder)
    assert signed == ("AKIAREALKEY000000001", "AKIAREALKEY000000001")


async def test_credentials_from_a_profile_file_are_never_replaced(
    endpoint: tuple[Recorder, str],
    no_credentials: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    recorder, url = endpoint
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[default]\naws_access_key_id = AKIAPROFILEKEY000002\naws_secret_access_key = s\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    forget_credentials()
    signed = await _signed_with(Settings(aws_endpoint_url=url), recorder)
    assert signed == ("AKIAPROFILEKEY000002", "AKIAPROFILEKEY000002")


def test_production_and_real_aws_never_get_dummy_credentials(no_credentials: None) -> None:
    production = Settings(
        env="production",
        redis_url="rediss://:a-real-password@redis.internal:6380/0",
        apikey_sigv4_secret="x" * 40,
    )
    # production has no custom endpoint (refused), so it always signs with the chain
    assert production.aws_endpoint_url is None
    assert production.kinesis_endpoint is None
    assert credentials_kwargs(production, None) == {}
    assert credentials_kwargs(Settings(aws_endpoint_url=None), None) == {}
    # local mode, custom endpoint, nothing configured: the emulator's dummy credentials
    assert credentials_kwargs(Settings(), "http://127.0.0.1:4566") == {
        "aws_access_key_id": "test",
        "aws_secret_access_key": "test",
    }
