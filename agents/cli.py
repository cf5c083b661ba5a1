"""`recstream archive export` and `recstream dlq replay`.

recstream archive export [--namespace NS] [--start T] [--end T] --out FILE|s3://bucket/key
recstream dlq replay [--limit N] [--kind all|windows|attribution|archive|personalize]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from datetime import UTC, datetime

from recstream.settings import Settings

__all__ = ["register"]

DEFAULT_EXPORT_DAYS = 30
REDRIVE_KINDS = ("windows", "attribution", "archive", "personalize")
"""`agents.redrive.REDRIVABLE`, spelled out so that `--help` does not import the agents."""


def parse_time(text: str) -> float:
    """Unix seconds, an ISO date or date-time (UTC unless it says), or ``30m``/``6h``/``7d``
    meaning that long ago. (training/cli.py reads the same forms; agents may not import it.)"""
    value = text.strip()
    units = {"m": 60, "h": 3600, "d": 86400}
    if re.fullmatch(r"\d+(\.\d+)?[mhd]", value.lower()):
        return time.time() - float(value[:-1]) * units[value[-1].lower()]
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time; use unix seconds, 2026-11-01, 2026-11-01T06:00 or 7d (ago)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    archive = subparsers.add_parser("archive", help="the S3 archive of raw events")
    archive_actions = archive.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = archive_actions.add_parser(
        "export",
        help="write Personalize's interactions CSV (for a dataset import job)",
        description="Archived events of [--start, --end) as USER_ID, ITEM_ID, TIMESTAMP, "
        "EVENT_TYPE, EVENT_VALUE, IMPRESSION, RECOMMENDATION_ID rows.",
    )
    export.add_argument("--namespace", default=None, help="default: RECSTREAM_NAMESPACE")
    export.add_argument(
        "--start",
        type=parse_time,
        default=None,
        help=f"events at or after (unix seconds, ISO date, or 7d ago; default: "
        f"{DEFAULT_EXPORT_DAYS}d)",
    )
    export.add_argument("--end", type=parse_time, default=None, help="before (default: now)")
    export.add_argument("--out", required=True, help="a CSV path, or s3://bucket/key.csv")
    export.set_defaults(handler=cmd_archive_export)

    dlq = subparsers.add_parser("dlq", help="the dead-letter queue")
    dlq_actions = dlq.add_subparsers(dest="action", metavar="ACTION", required=True)
    replay = dlq_actions.add_parser(
        "replay",
        help="re-drive dead letters through the agent that set them aside",
        description="Each letter's record runs through the agent its kind names (windows, "
        "attribution, archive; Personalize letters go to PutEvents again), once its cause "
        "is fixed. A letter is deleted only after its re-drive succeeded; letters that "
        "cannot succeed by retrying (records that do not parse) stay and are reported.",
    )
    replay.add_argument("--limit", type=int, default=None, help="at most this many messages")
    replay.add_argument(
        "--kind",
        choices=("all", *REDRIVE_KINDS, "parse"),
        default="all",
        help="which letters to re-drive (default: all that can succeed; parse letters are "
        "only reported, as a record that does not parse cannot succeed)",
    )
    replay.set_defaults(handler=cmd_dlq_replay)


def cmd_archive_export(args: argparse.Namespace, settings: Settings) -> int:
    from agents.archive import export_interactions

    end = time.time() if args.end is None else args.end
    start = end - DEFAULT_EXPORT_DAYS * 86400 if args.start is None else args.start
    stats = export_interactions(settings, start, end, args.out, namespace=args.namespace)
    print(
        f"wrote {stats.rows} interactions to {args.out}"
        + (f" ({stats.anonymous} anonymous, as session:ID)" if stats.anonymous else "")
        + (f"; skipped {stats.without_item} events without an item" if stats.without_item else "")
    )
    return 0


def cmd_dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    from agents.redrive import REDRIVABLE, replay_dead_letters

    kinds = REDRIVABLE if args.kind == "all" else frozenset({args.kind}) & REDRIVABLE
    report = asyncio.run(replay_dead_letters(settings, limit=args.limit, kinds=kinds))
    print(f"received {report.received} dead letters from {settings.dlq_name}")
    print(f"replayed and deleted {report.replayed}")
    for kind, count in sorted(report.replayed_kinds.items()):
        print(f"  {count} through {kind}")
    if report.failed:
        print(f"failed again and kept {report.failed}")
    for kind, count in sorted(report.kept.items()):
        why = "not re-drivable; fix the producer" if kind in ("parse", "unreadable") else "kept"
        print(f"kept {count} of kind {kind!r} ({why})")
    for reason in report.reasons:
        print(f"  {reason}", file=sys.stderr)
    return 1 if report.failed else 0
