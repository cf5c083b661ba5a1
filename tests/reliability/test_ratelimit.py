"""GCRA rate limits in a real Redis, through a real uvicorn server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from recstream import stack
from tests.conftest import LocalStack
from tests.reliability.conftest import running, secure_settings
from tests.serving.test_collector import click

pytestmark = pytest.mark.timeout(180)


async def post(url: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await client.post("/v1/events", json=click(), headers=headers)


async def test_a_key_over_its_limit_gets_429_with_headers_then_recovers(
    local_stack: LocalStack,
) -> None:
    # One request per 5 s with a 3-request burst for events:write (slow enough that even a
    # loaded machine sends faster than it refills); the per-IP limit stays out of the way.
    settings = secure_settings(
        local_stack,
        rate_limit_enabled=True,
        rate_limits={"events:write": 0.2, "recommendations:read": 1.0, "admin": 1.0},
        rate_limit_burst_s=15.0,
        rate_limit_ip=1000.0,
    )
    with running(settings) as api:
        key = await api.key("events:write")
        other = await api.key("events:write")
        first = await post(api.url, key)
        assert first.status_code == 202
        assert first.headers["RateLimit-Limit"] == "3"
        assert first.headers["RateLimit-Remaining"] == "2"
        assert int(first.headers["RateLimit-Reset"]) >= 1
        for _ in range(100):
            limited = await post(api.url, key)
            if limited.status_code == 429:
                break
            assert limited.status_code == 202
        else:
            pytest.fail("the key was never limited")
        assert limited.json()["error"]["code"] == "rate_limited"
        assert limited.headers["RateLimit-Remaining"] == "0"
        retry_after = int(limited.headers["Retry-After"])
        assert retry_after >= 1
        # Another key is limited separately.
        assert (await post(api.url, other)).status_code == 202
        # After Retry-After the key is admitted again.
        await asyncio.sleep(retry_after)
        assert (await post(api.url, key)).status_code == 202


async def test_concurrent_requests_never_exceed_the_burst(local_stack: LocalStack) -> None:
    """The Lua script is atomic: of 20 simultaneous requests exactly the burst (5) pass
    (the rate, one per 100 s, refills nothing meanwhile)."""
    settings = secure_settings(
        local_stack,
        rate_limit_enabled=True,
        rate_limits={"events:write": 0.01, "recommendations:read": 1.0, "admin": 1.0},
        rate_limit_burst_s=500.0,
        rate_limit_ip=1000.0,
    )
    with running(settings) as api:
        key = await api.key("events:write")
        responses = await asyncio.gather(*(post(api.url, key) for _ in range(20)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [202] * 5 + [429] * 15


async def test_the_ip_limit_applies_without_any_key(local_stack: LocalStack) -> None:
    settings = secure_settings(
        local_stack,
        require_api_keys=False,
        rate_limit_enabled=True,
        rate_limit_ip=0.01,
        rate_limit_burst_s=200.0,
    )
    with running(settings) as api:
        codes = [(await post(api.url)).status_code for _ in range(3)]
        assert codes == [202, 202, 429]
        limited = await post(api.url)
        assert "client address" in limited.json()["error"]["message"]
        assert int(limited.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_when_redis_is_down(local_stack: LocalStack, tmp_path: Path, mode: str) -> None:
    """A private redis-server is stopped under the running API: fail-open admits the
    request, fail-closed refuses it with 503; once Redis is back, limits apply again."""
    port = stack.free_port()
    redis_server = stack.start_redis(port, tmp_path / "redis")
    try:
        settings = secure_settings(
            local_stack,
            require_api_keys=False,
            redis_url=f"redis://127.0.0.1:{port}/0",
            rate_limit_enabled=True,
            rate_limit_ip=0.01,
            rate_limit_burst_s=100.0,  # one request, then 429
            rate_limit_fail=mode,
        )
        with running(settings) as api:
            assert (await post(api.url)).status_code == 202
            assert (await post(api.url)).status_code == 429
            redis_server.stop()
            down = await post(api.url)
            if mode == "open":
                assert down.status_code == 202
            else:
                assert down.status_code == 503
                assert down.json()["error"]["code"] == "rate_limit_unavailable"
                assert down.headers["Retry-After"] == "1"
            # Redis comes back empty: one request is admitted, then the limit holds.
            redis_server = stack.start_redis(port, tmp_path / "redis")
            codes = [(await post(api.url)).status_code for _ in range(2)]
            assert codes == [202, 429]
    finally:
        redis_server.stop()
