"""``recstream catalog load``: fill the item/user catalog from CSV files.

    recstream catalog load --items items.csv [--namespace NS]      Personalize items CSV
    recstream catalog load --users users.csv                       Personalize users CSV
    recstream catalog load --movielens data/movielens-small/movies.csv   titles and genres

A Personalize items CSV has ``ITEM_ID`` and any of ``CATEGORIES`` (or ``CATEGORY``,
``GENRES``; pipe-separated), ``BRAND``, ``PRICE``, ``CREATION_TIMESTAMP``, ``TITLE``
(column names in any case). Columns the items schema has no field for are named on
stderr, not dropped silently. A bad row stops the load with its line number; rows before
it are stored (loading is idempotent: run it again after fixing the file).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from recstream.aws import async_client
from recstream.catalog import RedisDynamoCatalog
from recstream.errors import ValidationFailed
from recstream.settings import NAMESPACE_PATTERN, Settings
from recstream.stores import open_redis
from streams.schema import Item, User, problems_from

__all__ = ["read_items_csv", "read_movielens", "read_users_csv", "register"]

BATCH: Final = 500
_ITEM_COLUMNS: Final = {"ITEM_ID", "CATEGORIES", "CATEGORY", "GENRES", "BRAND", "PRICE"} | {
    "CREATION_TIMESTAMP",
    "TITLE",
}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    catalog = subparsers.add_parser("catalog", help="the item and user catalog")
    commands = catalog.add_subparsers(dest="catalog_command", metavar="COMMAND", required=True)
    load = commands.add_parser("load", help="load items or users from CSV files")
    load.add_argument("--items", type=Path, help="a Personalize items CSV (ITEM_ID, ...)")
    load.add_argument("--users", type=Path, help="a Personalize users CSV (USER_ID, ...)")
    load.add_argument(
        "--movielens", type=Path, help="MovieLens movies.csv (movieId, title, genres)"
    )
    load.add_argument("--namespace", default=None, help="default: RECSTREAM_NAMESPACE")
    load.set_defaults(handler=cmd_load)


def _rows(path: Path, what: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row with upper-case column names) of a CSV file."""
    if not path.is_file():
        raise ValidationFailed(f"{what} file {path} does not exist; pass an existing CSV", [])
    with path.open(newline="", encoding="utf-8") as handle:
        for line, raw in enumerate(csv.DictReader(handle), start=2):
            yield line, {k.strip().upper(): (v or "").strip() for k, v in raw.items() if k}


def _bad_row(path: Path, line: int, exc: Exception) -> ValidationFailed:
    if isinstance(exc, ValidationError):
        detail = "; ".join(f"{p.field}: {p.problem}" for p in problems_from(exc))
    elif isinstance(exc, KeyError):
        detail = f"column {exc} is missing"
    else:
        detail = str(exc)
    return ValidationFailed(f"{path}:{line}: {detail}; fix or remove the row", [])


def read_items_csv(path: Path) -> tuple[list[Item], list[str]]:
    """The items of a Personalize items CSV, and the columns that have no Item field."""
    items: list[Item] = []
    ignored: list[str] = []
    for line, row in _rows(path, "items"):
        if not ignored and line == 2:
            ignored = sorted(set(row) - _ITEM_COLUMNS)
        if "GENRES" in row and "CATEGORIES" not in row and "CATEGORY" not in row:
            row["CATEGORIES"] = row["GENRES"]
        try:
            items.append(Item.from_csv_row(row))
        except (ValueError, KeyError) as exc:
            raise _bad_row(path, line, exc) from exc
    return items, ignored


def read_users_csv(path: Path) -> list[User]:
    users: list[User] = []
    for line, row in _rows(path, "users"):
        try:
            users.append(User.from_csv_row(row))
        except (ValueError, KeyError) as exc:
            raise _bad_row(path, line, exc) from exc
    return users


def read_movielens(path: Path) -> list[Item]:
    """MovieLens ``movies.csv``: item id = movieId (as the ratings' events use it),
    title, and genres as categories ("(no genres listed)" is none)."""
    items: list[Item] = []
    for line, row in _rows(path, "movies"):
        try:
            items.append(
                Item.model_validate(
                    {"item_id": row["MOVIEID"], "title": row["TITLE"], "categories": row["GENRES"]}
                )
            )
        except (ValueError, KeyError) as exc:
            raise _bad_row(path, line, exc) from exc
    return items


async def load(settings: Settings, namespace: str, items: list[Item], users: list[User]) -> None:
    redis = open_redis(settings)
    try:
        async with async_client(settings, "dynamodb") as dynamodb:
            # No process cache: this process only writes.
            catalog = RedisDynamoCatalog(redis, dynamodb, settings, cache_size=0)
            for start in range(0, len(items), BATCH):
                await catalog.put_items(namespace, items[start : start + BATCH])
            for start in range(0, len(users), BATCH):
                await catalog.put_users(namespace, users[start : start + BATCH])
    finally:
        await redis.aclose()


def cmd_load(args: argparse.Namespace, settings: Settings) -> int:
    if not (args.items or args.users or args.movielens):
        print("recstream catalog load: pass --items, --users or --movielens", file=sys.stderr)
        return 2
    namespace = args.namespace or settings.namespace
    if not re.fullmatch(NAMESPACE_PATTERN, namespace):
        print(
            f"recstream catalog load: --namespace must match {NAMESPACE_PATTERN}", file=sys.stderr
        )
        return 2
    items: list[Item] = []
    users: list[User] = []
    if args.items:
        loaded, ignored = read_items_csv(args.items)
        items += loaded
        if ignored:
            print(
                f"recstream catalog load: {args.items}: columns {ignored} have no field in the "
                "items schema (ITEM_ID, CATEGORIES, BRAND, PRICE, CREATION_TIMESTAMP, TITLE) "
                "and are not stored",
                file=sys.stderr,
            )
    if args.movielens:
        items += read_movielens(args.movielens)
    if args.users:
        users = read_users_csv(args.users)
    asyncio.run(load(settings, namespace, items, users))
    print(
        f"loaded {len(items)} items and {len(users)} users into namespace {namespace!r} "
        f"({settings.catalog_table} and Redis)"
    )
    return 0
