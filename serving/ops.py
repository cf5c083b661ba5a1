"""``GET /readyz``: every dependency reachable (``/healthz`` stays the liveness probe).

Checks Redis, the DynamoDB tables the API reads, the Kinesis stream it writes and the S3
bucket, concurrently, each within ``Settings.ready_timeout_s``, and that the start-up
warm-up is done (``warm-up``: the published models loaded and one answer made, so the
first request a load balancer sends is not a cold one). ``200 {"ok": true, ...}`` when all
answer; ``503`` naming each one that failed. In production the answer says only which
failed; the reason goes to the log (it names endpoints).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from recstream.settings import Settings
from serving.http import json_response

__all__ = ["readyz", "routes"]

log = logging.getLogger(__name__)


async def _check(
    name: str, probe: Callable[[], Awaitable[object]], budget_s: float
) -> tuple[str, str]:
    try:
        await asyncio.wait_for(probe(), budget_s)
    except TimeoutError:
        return name, f"no answer within {budget_s:g}s"
    except Exception as exc:  # report every failure: this is the readiness endpoint
        return name, f"{type(exc).__name__}: {exc}"
    return name, "ok"


async def readyz(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    redis = request.app.state.redis
    clients = request.app.state.security.clients
    tables = [settings.windows_table]
    if settings.api_keys_required:
        tables.append(settings.apikeys_table)
    probes: list[tuple[str, Callable[[], Awaitable[object]]]] = [("redis", redis.ping)]
    for table in tables:
        probes.append(
            (f"dynamodb:{table}", lambda t=table: clients.dynamodb.describe_table(TableName=t))  # type: ignore[misc]
        )
    probes.append(
        (
            f"kinesis:{settings.stream_name}",
            lambda: clients.kinesis.describe_stream_summary(StreamName=settings.stream_name),
        )
    )
    probes.append((f"s3:{settings.bucket}", lambda: clients.s3.head_bucket(Bucket=settings.bucket)))
    timeout = settings.ready_timeout_s
    results = dict(await asyncio.gather(*(_check(name, probe, timeout) for name, probe in probes)))
    # Not ready until the start-up warm-up is done: models loaded, connections open, one
    # answer made. A first request before it is answered, but slower and maybe degraded.
    ranker = getattr(request.app.state, "ranker", None)
    if ranker is not None and not ranker.warmed:
        results["warm-up"] = "loading the published models and making a first answer"
    ok = all(v == "ok" for v in results.values())
    if not ok:
        log.warning("not ready: %s", {k: v for k, v in results.items() if v != "ok"})
        if settings.env == "production":
            results = {
                k: v if v == "ok" or k == "warm-up" else "failed" for k, v in results.items()
            }
    return json_response(
        {"ok": ok, "checks": results, "unready": sorted(k for k, v in results.items() if v != "ok")}
        if not ok
        else {"ok": True, "checks": results},
        status_code=200 if ok else 503,
    )


def routes() -> list[BaseRoute]:
    return [Route("/readyz", readyz, methods=["GET"])]
