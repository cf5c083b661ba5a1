"""`recstream streams ...`: diagnostics of the stream runtime.

    recstream streams status [--app APP_ID] [--json]

shows, per consuming app and shard, the lease owner, the checkpoint, the lag behind the
tip of the shard (MillisBehindLatest after the checkpoint) and the lease age.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict

from recstream.settings import Settings

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``recstream streams status``."""
    streams = subparsers.add_parser("streams", help="stream runtime diagnostics")
    commands = streams.add_subparsers(dest="streams_command", metavar="COMMAND", required=True)
    status = commands.add_parser(
        "status", help="per shard: lease owner, checkpoint, lag and lease age"
    )
    status.add_argument("--app", default=None, help="one app id (default: every app)")
    status.add_argument("--json", action="store_true", help="print JSON lines instead")
    status.set_defaults(handler=cmd_status)


def _short(checkpoint: str) -> str:
    # Real sequence numbers have 56 digits; the tail is what differs between records.
    return checkpoint if len(checkpoint) <= 16 else f"…{checkpoint[-12:]}"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.table import Table

    from streams.kinesis.status import shard_status

    rows = asyncio.run(shard_status(settings, args.app))
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
        return 0
    console = Console()
    if not rows:
        console.print(
            f"no leases for stream {settings.stream_name!r} in {settings.leases_table!r}; "
            "is a worker running (`recstream agents`)?"
        )
        return 0
    table = Table(title=f"stream {settings.stream_name} ({settings.leases_table})")
    for column, justify in (
        ("app", "left"),
        ("shard", "left"),
        ("owner", "left"),
        ("checkpoint", "right"),
        ("lag", "right"),
        ("lease age", "right"),
        ("parents", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=column != "parents")  # type: ignore[arg-type]
    for row in rows:
        owner = row.owner or "[dim]-[/dim]"
        if row.owner and row.expired:
            owner = f"[red]{row.owner} (expired)[/red]"
        checkpoint = _short(row.checkpoint)
        if row.sub_sequence:
            checkpoint += f".{row.sub_sequence}"
        lag = "-" if row.lag_ms is None else f"{row.lag_ms} ms"
        table.add_row(
            row.app_id,
            row.shard_id,
            owner,
            checkpoint,
            lag,
            _age(row.lease_age_s),
            ", ".join(row.parents),
        )
    console.print(table)
    return 0
