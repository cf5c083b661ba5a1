"""`recstream trending rebuild`: rebuild popularity and trending from the S3 archive.

Run it after Redis lost its data (a flush, a failover to an empty replica), once the
catalog's hot copy is back (per-category lists need the items' categories): it replaces
the namespace's popularity, time buckets and trend lists with what the archived events
of the popularity horizon make of them (duplicates in the archive count once).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from recstream.settings import Settings

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    trending = subparsers.add_parser("trending", help="decayed popularity and trend lists")
    commands = trending.add_subparsers(dest="trending_command", metavar="COMMAND", required=True)
    rebuild = commands.add_parser(
        "rebuild", help="rebuild popularity and trends of a namespace from the S3 archive"
    )
    rebuild.add_argument("--namespace", help="default: RECSTREAM_NAMESPACE")
    rebuild.add_argument(
        "--half-lives",
        type=float,
        default=20.0,
        help="how far back to read, in popularity half-lives (20: older events weigh < 1e-6)",
    )
    rebuild.set_defaults(handler=cmd_rebuild)


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from agents.trending import rebuild
    from recstream.archive import read_events
    from recstream.stores import open_redis

    namespace = args.namespace or settings.namespace
    end = time.time() + 86400  # events may be up to a day ahead of this clock
    start = end - 86400 - args.half_lives * settings.popularity_half_life_s

    async def run() -> int:
        redis = open_redis(settings)
        try:
            events = read_events(settings, start, end, namespace=namespace)
            stats = await rebuild(redis, settings, namespace, events)
        finally:
            await redis.aclose()
        print(
            f"rebuilt the trends of {namespace!r} from {stats.events} archived events "
            f"({stats.duplicates} duplicates skipped)"
        )
        return 0

    return asyncio.run(run())
