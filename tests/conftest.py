"""Real local servers for the whole suite: redis-server, moto server and kinesis-mock.

They start once per session on free loopback ports, through the same `recstream.stack`
functions that `recstream up` uses. A server that cannot start fails the tests that need
it; nothing is skipped. Every test gets its own namespace and resource names, so tests
never see each other's data.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvicorn

from recstream import stack
from recstream.settings import Settings

REPO = Path(__file__).resolve().parent.parent
# The real datasets: ../shared/data beside a developer's checkout, or the workplace copy
# when CI runs from a clone elsewhere. MovieLens small also ships in data/ (licence allows).
SHARED_DATA_CANDIDATES = (REPO.parent / "shared" / "data", Path("/work/shared/data"))


@dataclass(frozen=True)
class LocalStack:
    redis_url: str
    moto_url: str
    """The AWS endpoint: moto's (`recstream.emulator`), or LocalStack's in its tier."""
    kinesis_mock_url: str
    engine: str = "embedded"
    """`Settings.emulator` of the session: "embedded" (moto) or "localstack"."""


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    workdir = tmp_path_factory.mktemp("stack")
    defaults = Settings()
    servers: list[stack.Server] = []
    try:
        servers.append(stack.start_redis(stack.free_port(), workdir / "redis"))
        if defaults.emulator == "localstack":
            # The second tier: `RECSTREAM_EMULATOR=localstack ./dev test` (docs/local-stack.md).
            servers.append(stack.start_localstack(stack.free_port(), workdir, defaults))
        else:
            servers.append(stack.start_moto(stack.free_port(), workdir))
        servers.append(
            stack.start_kinesis_mock(
                stack.free_port(), workdir, defaults.kinesis_mock_dir.resolve()
            )
        )
        redis_server, moto, kinesis_mock = servers
        yield LocalStack(
            redis_url=f"redis://127.0.0.1:{redis_server.port}/0",
            moto_url=moto.url,
            kinesis_mock_url=kinesis_mock.url,
            engine=defaults.emulator,
        )
    finally:
        for server in reversed(servers):
            server.stop()


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_settings(
    local: LocalStack, *, kinesis_mock: bool = False, **overrides: object
) -> Settings:
    """Settings with fresh resource names and namespace; resources are created here."""
    name = unique()
    values: dict[str, object] = {
        "aws_endpoint_url": local.moto_url,
        "kinesis_endpoint_url": local.kinesis_mock_url if kinesis_mock else None,
        "redis_url": local.redis_url,
        "namespace": name,
        "stream_name": f"{name}-events",
        "table_prefix": name,
        "bucket": f"{name}-archive",
        "dlq_name": f"{name}-dlq",
        **overrides,
    }
    settings = Settings(**values)  # type: ignore[arg-type]
    stack.create_resources(settings)
    return settings


@pytest.fixture
def settings(local_stack: LocalStack) -> Settings:
    """Fresh resources on moto, and a fresh namespace in the shared Redis."""
    return make_settings(local_stack)


@pytest.fixture
def kinesis_mock_settings(local_stack: LocalStack) -> Settings:
    """Like `settings`, but Kinesis is kinesis-mock (56-digit sequence numbers)."""
    return make_settings(local_stack, kinesis_mock=True)


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets in ../shared/data (present on developer machines and in CI)."""
    for candidate in SHARED_DATA_CANDIDATES:
        if candidate.is_dir():
            return candidate
    pytest.fail(f"the shared datasets are missing; looked in {SHARED_DATA_CANDIDATES}")


@dataclass
class RunningApi:
    url: str
    settings: Settings


@contextmanager
def serve_in_thread(app: Any, port: int) -> Iterator[None]:
    """Run a real uvicorn server on a thread for the duration of the block."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the API server did not start; see the log above")
        time.sleep(0.02)
    # The start-up warm-up (models, first store calls, one answer) runs after the
    # lifespan: wait for it as /readyz does, so it does not run beside the test's first
    # requests. Bounded: with a store down at start it may take its own timeouts.
    ranker = getattr(getattr(app, "state", None), "ranker", None)
    warm_deadline = time.monotonic() + 10
    while ranker is not None and not ranker.warmed and time.monotonic() < warm_deadline:
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(15)
        if thread.is_alive():
            pytest.fail("the API server did not stop within 15 s")


@pytest.fixture
def api(settings: Settings) -> Iterator[RunningApi]:
    """The API as a real uvicorn server on a free port, wired to this test's resources."""
    from serving.app import create_app

    port = stack.free_port()
    with serve_in_thread(create_app(settings), port):
        yield RunningApi(url=f"http://127.0.0.1:{port}", settings=settings)
