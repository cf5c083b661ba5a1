"""AWS clients built from `Settings`: async (aiobotocore) for the hot paths, sync for tools.

One place decides endpoints and credentials, so real AWS versus the emulator is purely a
matter of configuration. Credentials always come from botocore's normal chain (env,
profile, SSO, container or instance role); only when a custom endpoint is set (the
emulator) *and* that chain finds nothing do we pass the emulator's dummy credentials
(``test``/``test``), so configured credentials are never replaced (production mode refuses
custom endpoints, so it always uses the chain). For a loopback endpoint the chain skips
the container and instance role lookups (network calls that time out off AWS): a local
emulator needs no role.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, overload
from urllib.parse import urlsplit

import botocore.session
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.utils import parse_timestamp as botocore_parse_timestamp

from recstream import tracing
from recstream.errors import (
    RecstreamError,
    RequestRefused,
    ResourceNotFound,
    StoreUnavailable,
    ThroughputExceeded,
)
from recstream.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_kinesis import KinesisClient
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sqs import SQSClient

__all__ = [
    "async_client",
    "credentials_kwargs",
    "error_code",
    "forget_credentials",
    "has_configured_credentials",
    "parse_timestamp",
    "sync_client",
    "translate",
    "until_processed",
]

Service = Literal["kinesis", "dynamodb", "s3", "sqs"]

_DUMMY_CREDENTIALS = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
_THROTTLED = {
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "LimitExceededException",
    "RequestLimitExceeded",
}
_MISSING = {"ResourceNotFoundException", "NoSuchBucket", "AWS.SimpleQueueService.NonExistentQueue"}
# The request itself is invalid (DynamoDB: an item over 400 KB, a malformed value): only
# these are deterministic. Credentials or permissions errors are not in the set, because
# they are the deployment's fault, not the record's, and must not dead-letter records.
_REFUSED = {"ValidationException", "SerializationException"}


def endpoint_for(settings: Settings, service: Service) -> str | None:
    return settings.kinesis_endpoint if service == "kinesis" else settings.aws_endpoint_url


_LOOPBACK = re.compile(r"^(localhost|127\.\d+\.\d+\.\d+|::1)$")
_REMOTE_PROVIDERS = ("container-role", "iam-role")
"""botocore's credential providers that ask a metadata endpoint over the network."""


@functools.cache
def has_configured_credentials(remote_lookups: bool = True) -> bool:
    """Whether botocore's credential chain finds credentials in this process (cached:
    the chain reads files and may ask a metadata endpoint). ``remote_lookups=False``
    leaves out the container and instance role providers."""
    session = botocore.session.get_session()
    resolver = session.get_component("credential_provider")
    if not remote_lookups:
        for name in _REMOTE_PROVIDERS:
            resolver.remove(name)
    try:
        return resolver.load_credentials() is not None
    except BotoCoreError:
        # Something is configured but broken (an unknown AWS_PROFILE, a bad file): never
        # paper over it with dummy credentials; botocore reports it on the first call.
        return True


def credentials_kwargs(settings: Settings, endpoint: str | None) -> dict[str, str]:
    """Credentials to pass to a client of ``endpoint``: none (botocore's chain decides),
    except the emulator's dummy ones for a custom endpoint when the chain finds none."""
    if endpoint is None:
        return {}
    loopback = bool(_LOOPBACK.match(urlsplit(endpoint).hostname or ""))
    if has_configured_credentials(remote_lookups=not loopback):
        return {}
    return dict(_DUMMY_CREDENTIALS)


def _client_kwargs(settings: Settings, service: Service) -> dict[str, Any]:
    endpoint = endpoint_for(settings, service)
    kwargs: dict[str, Any] = {"region_name": settings.aws_region}
    if endpoint is not None:
        kwargs["endpoint_url"] = endpoint
    kwargs.update(credentials_kwargs(settings, endpoint))
    return kwargs


_session: AioSession | None = None


def _aio_session() -> AioSession:
    # One session per process: creating a session loads botocore's data files (~50 ms).
    global _session
    if _session is None:
        _session = get_session()
        # Every client of the process is timed into the Redis/AWS call metrics
        # (recstream/tracing.py): botocore copies the session's hooks into each client.
        tracing.instrument_aws(_session)
        _session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=parse_timestamp
        )
    return _session


def parse_timestamp(value: Any) -> datetime:
    """botocore's timestamp parsing, without dateutil for epoch seconds.

    JSON services (Kinesis, DynamoDB) send times as epoch seconds, which botocore turns
    into a datetime in dateutil's ``tzlocal()``: ~10 µs a value, and ``.timestamp()`` on
    it as much again, for every record GetRecords returns (session 8: about 2 % of the
    agents' CPU). The same instant in UTC takes half a microsecond; every other form
    (ISO 8601, RFC 822 strings) goes to botocore's own parser."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OSError, OverflowError, ValueError):
            pass  # out of the platform's range: botocore has a fallback
    return botocore_parse_timestamp(value)


@overload
def async_client(
    settings: Settings, service: Literal["kinesis"], **config: Any
) -> AbstractAsyncContextManager[KinesisClient]: ...
@overload
def async_client(
    settings: Settings, service: Literal["dynamodb"], **config: Any
) -> AbstractAsyncContextManager[DynamoDBClient]: ...
@overload
def async_client(
    settings: Settings, service: Literal["s3"], **config: Any
) -> AbstractAsyncContextManager[S3Client]: ...
@overload
def async_client(
    settings: Settings, service: Literal["sqs"], **config: Any
) -> AbstractAsyncContextManager[SQSClient]: ...
def async_client(settings: Settings, service: Service, **config: Any) -> Any:
    """An aiobotocore client as an async context manager (``async with``)."""
    # Retries are ours to make (partial PutRecords failures, throttling), so botocore's
    # own retry is kept short to not stack delays on top of ours.
    aio_config = AioConfig(
        retries={"max_attempts": config.pop("max_attempts", 3), "mode": "standard"},
        connect_timeout=config.pop("connect_timeout", 5),
        read_timeout=config.pop("read_timeout", 30),
        max_pool_connections=config.pop("max_pool_connections", 50),
        **config,
    )
    return _aio_session().create_client(
        service, config=aio_config, **_client_kwargs(settings, service)
    )


def forget_credentials() -> None:
    """Resolve credentials afresh on the next client (after the environment's credentials
    changed: a test, a rotated profile). Processes otherwise resolve them once."""
    global _session
    import boto3

    has_configured_credentials.cache_clear()
    _session = None
    boto3.DEFAULT_SESSION = None


def sync_client(settings: Settings, service: Service) -> Any:
    """A synchronous boto3 client, for init scripts, the CLI and tests, with the same
    endpoint and credentials as `async_client`."""
    import boto3

    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5)
    return boto3.client(service, config=config, **_client_kwargs(settings, service))


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def translate(
    exc: BaseException, what: str, settings: Settings, service: Service | None = None
) -> RecstreamError:
    """Turn a botocore error into a recstream error whose message says what to do.

    ``service`` names the endpoint in the message (Kinesis may have its own)."""
    code = error_code(exc)
    endpoint = endpoint_for(settings, service) if service else settings.aws_endpoint_url
    where = endpoint or "AWS"
    if code in _THROTTLED:
        return ThroughputExceeded(f"{what} was throttled by {where} ({code}); retry with backoff")
    if code in _MISSING:
        hint = "run `recstream up`" if settings.local else "create it (localstack/init scripts)"
        return ResourceNotFound(f"{what} not found at {where}; {hint}")
    if code in _REFUSED:
        return RequestRefused(
            f"{what} was refused by {where} as invalid ({code}: {exc}); the same request "
            "will fail again, so fix its content"
        )
    if isinstance(exc, (BotoCoreError, ClientError, OSError)):
        return StoreUnavailable(
            f"{what} failed at {where}: {exc}; is the endpoint up? (`recstream up` starts "
            "the local stack)"
        )
    return StoreUnavailable(f"{what} failed: {exc!r}")


async def until_processed(
    call: Callable[..., Awaitable[Any]],
    request: dict[str, Any],
    unprocessed: str,
    doing: str,
    exhausted: str,
    settings: Settings,
    attempts: int = 10,
) -> AsyncIterator[Mapping[str, Any]]:
    """Yield the responses of a DynamoDB batch call (BatchGetItem, BatchWriteItem),
    resending what it left ``unprocessed`` (routine under throttling) with backoff; a
    failed call is translated as ``doing``, and ``attempts`` rounds without an end raise
    ``exhausted``, which should say what to change (the table's capacity)."""
    pending = request
    for attempt in range(attempts):
        try:
            response = await call(RequestItems=pending)
        except (BotoCoreError, ClientError) as exc:
            raise translate(exc, doing, settings) from exc
        yield response
        pending = dict(response.get(unprocessed) or {})
        if not pending:
            return
        await asyncio.sleep(min(1.0, 0.05 * 2**attempt))
    raise StoreUnavailable(exhausted)
