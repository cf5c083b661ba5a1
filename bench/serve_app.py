"""One API process for bench/serving.py: the real app, or the bare reference endpoint.

    python -m bench.serve_app --app real|bare --port 8000 [--event-loop asyncio|uvloop|auto]
        [--http h11|httptools|auto] [--parser python|auto] [--workers 1]

Settings come from the RECSTREAM_* environment, as for `recstream serve`.

``bare`` is the reference: a raw ASGI callable (no framework, no ranking) that makes the
same Redis round trips a recommendation makes in steady state, through the same store
code: the actor's live state and the model pointers (`read_state`, one pipelined round
trip) and the served log (`serving.pipeline.log.ServedLog`, batched in the background);
item-level data the ranker caches in-process, so a steady load costs it no other reads.
It answers a small fixed JSON body. When the pipeline changes what a request reads,
change `bare_app` to match; bench/serving.py prints the Redis commands per request of
both, measured from Redis's INFO commandstats, so a mismatch shows.

``--workers N`` runs N processes on the port, as `recstream serve --workers N` does.

``--parser python`` forces redis-py's pure-Python RESP parser even when hiredis is
installed, so the effect of hiredis can be measured in one environment.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import orjson
import uvicorn
from redis.exceptions import RedisError

from agents.state import RedisHotStore
from recstream.errors import RecstreamError
from recstream.settings import Settings
from recstream.stores import open_redis
from serving.pipeline.log import ServedLog
from serving.pipeline.state import read_state
from serving.workers import serve as serve_workers

__all__ = ["bare_app", "bare_from_env", "main"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def bare_app(settings: Settings) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    state: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    redis = open_redis(settings)
                    state["redis"] = redis
                    state["hot"] = RedisHotStore(redis, settings)
                    state["served"] = ServedLog(redis, settings)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state["served"].drain()
                    await state["redis"].aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        query = parse_qs(scope["query_string"].decode())
        namespace = settings.namespace
        hot: RedisHotStore = state["hot"]
        body: bytes
        status = 200
        try:
            body = await answer(scope["path"], query, namespace, hot)
        except (RecstreamError, RedisError) as exc:  # overload: counted as errors, as 503s
            status, body = 503, orjson.dumps({"error": str(exc)})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def answer(
        path: str, query: dict[str, list[str]], namespace: str, hot: RedisHotStore
    ) -> bytes:
        if path == "/healthz":
            await state["redis"].ping()
            return b'{"ok":true}'
        actor = query.get("user_id", ["anonymous"])[0]
        # The pipeline's one round trip per request (window, features, embedding, model
        # pointers); item-level data (neighbours, popularity, trending) it caches in-process
        # for item_cache_ttl_s, so a steady load costs it no other Redis reads.
        live = await read_state(state["redis"], namespace, actor, settings.window_size)
        # ...and, like every answer, it logs what it served (batched in the background).
        shown = [entry.item_id for entry in live.window[:20]]
        served: ServedLog = state["served"]
        served.record(
            namespace, uuid.uuid4().hex, actor=actor, strategy="bare", variant="bare",
            items=shown, context={},
        )  # fmt: skip
        return orjson.dumps({"window": len(live.window), "versions": len(live.versions)})

    return app


def bare_from_env() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The reference endpoint for uvicorn's worker processes (settings from env)."""
    return bare_app(Settings())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--app", choices=["real", "bare"], required=True)
    parser.add_argument("--port", type=int, required=True)
    # (not ``--loop``: faust reads ``--loop``/``-L`` from sys.argv when it is imported;
    # the API no longer imports it, but one import path to it would break the bench)
    parser.add_argument("--event-loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    parser.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"])
    parser.add_argument("--parser", default="auto", choices=["auto", "python"])
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    # the app's own modules must not see this script's options (faust, above)
    sys.argv = sys.argv[:1]
    if args.parser == "python":
        # open_redis calls redis.asyncio.from_url at call time: give it the pure-Python
        # RESP3 parser, as when hiredis is not installed.
        import redis.asyncio
        from redis._parsers import _AsyncRESP3Parser

        original = redis.asyncio.from_url

        def from_url(url: str, **kwargs: Any) -> Any:
            return original(url, parser_class=_AsyncRESP3Parser, **kwargs)

        redis.asyncio.from_url = from_url
    settings = Settings()
    if args.workers > 1:
        if (args.event_loop, args.http, args.parser) != ("auto", "auto", "auto"):
            parser.error("--workers > 1 measures the parts `recstream serve` picks (auto)")
        if args.app == "real":
            from serving.app import run

            run(settings, "127.0.0.1", args.port, workers=args.workers)
        else:
            # as `recstream serve --workers N` runs them: a socket per worker
            serve_workers(
                uvicorn.Config(
                    "bench.serve_app:bare_from_env",
                    factory=True,
                    workers=args.workers,
                    host="127.0.0.1",
                    port=args.port,
                    log_level="warning",
                    access_log=False,
                )
            )
        return
    if args.app == "real":
        from serving.app import create_app

        app: Any = create_app(settings)
    else:
        app = bare_app(settings)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop=args.event_loop,
        http=args.http,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
