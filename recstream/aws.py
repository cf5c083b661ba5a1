"""AWS clients built from `Settings`: async (aiobotocore) for the hot paths, sync for tools.

One place decides endpoints and credentials, so real AWS versus the emulator is purely a
matter of configuration. Against an emulator we pass dummy credentials; against real AWS
we pass none and let botocore's normal chain (env, profile, instance role) decide.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Literal, overload
from urllib.parse import urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

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

__all__ = ["async_client", "error_code", "sync_client", "translate"]

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


def _client_kwargs(settings: Settings, service: Service) -> dict[str, Any]:
    endpoint = endpoint_for(settings, service)
    kwargs: dict[str, Any] = {"region_name": settings.aws_region}
    if endpoint is not None:
        kwargs["endpoint_url"] = endpoint
        kwargs.update(_DUMMY_CREDENTIALS)
    return kwargs


_session: AioSession | None = None


def _aio_session() -> AioSession:
    # One session per process: creating a session loads botocore's data files (~50 ms).
    global _session
    if _session is None:
        _session = get_session()
    return _session


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


def sync_client(settings: Settings, service: Service) -> Any:
    """A synchronous boto3 client, for init scripts, the CLI and tests.

    Against an emulator it comes from localstack-client, which pins the endpoint and
    dummy credentials for every service; against real AWS it is a plain boto3 client.
    """
    endpoint = endpoint_for(settings, service)
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5)
    if endpoint is None:
        import boto3

        return boto3.client(service, region_name=settings.aws_region, config=config)
    from localstack_client.session import Session

    parts = urlsplit(endpoint)
    session = Session(localstack_host=parts.netloc, region_name=settings.aws_region)
    return session.client(service, config=config)


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
