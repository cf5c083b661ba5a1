"""`recstream` subcommands of the training package.

recstream train [--source S] [--path FILE] [--start T] [--end T] [--models a,b] [--every 24h]
recstream models list [NAME] [--json]
recstream models show NAME [VERSION]
recstream models promote NAME VERSION
recstream models rollback NAME
recstream models gc NAME [--keep K] [--sweep]
recstream models restore NAME [VERSION] [--no-promote]
recstream evaluate ...            (training/evaluate.py)

This module only parses: the commands live in training/commands.py and are imported when
one runs, so that building the `recstream` parser stays cheap (the AWS clients alone take
most of a second to import).
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recstream.settings import Settings

__all__ = ["parse_duration", "parse_time", "register", "run_every"]

Handler = Callable[[argparse.Namespace, "Settings"], int]


def _lazy(name: str) -> Handler:
    def handler(args: argparse.Namespace, settings: Settings) -> int:
        from training import commands

        return int(getattr(commands, name)(args, settings))

    handler.__name__ = name
    return handler


log = logging.getLogger(__name__)

SOURCES = ("archive", "csv", "movielens", "taobao", "yoochoose")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """``30m``, ``6h``, ``24h``, ``7d``, ``1h30m``, ``90s`` → seconds (argparse type)."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; write a number and a unit, e.g. 30m, 6h, 24h, 7d"
        )
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return seconds


def parse_time(text: str, *, now: float | None = None) -> float:
    """A point in time: unix seconds, an ISO date or date-time (UTC unless it says), or a
    duration meaning that long ago (``7d``), resolved against ``now``."""
    value = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value) and len(value.split(".")[0]) >= 9:
        return float(value)
    if _DURATION.match(value.lower()):
        try:
            return (time.time() if now is None else now) - parse_duration(value)
        except argparse.ArgumentTypeError:
            pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time; use unix seconds, 2026-11-01, 2026-11-01T06:00 or 7d (ago)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1), e.g. 0.3")
    return value


def _time_arg(text: str) -> str:
    parse_time(text)  # validate now, resolve at each run (``7d`` moves with the schedule)
    return text


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `train`, `models` and `evaluate` (training/evaluate.py)."""
    train = subparsers.add_parser(
        "train",
        help="train, evaluate and publish the models (once, or --every 24h)",
        description="Load interactions, fit each model, evaluate it on a held-out time "
        "split, publish it as a new version and switch serving to it.",
    )
    train.add_argument("--source", choices=SOURCES, default="archive", help="default: archive")
    train.add_argument(
        "--path",
        type=Path,
        default=None,
        help="the input file (csv: a Personalize interactions CSV; movielens, taobao, "
        "yoochoose: the dataset's file, default: the bundled or shared copy)",
    )
    train.add_argument(
        "--start",
        type=_time_arg,
        default=None,
        help="train on interactions from this time on: 2026-11-01, unix seconds, or 30d "
        "for 30 days before each run (archive default: 30d)",
    )
    train.add_argument(
        "--end", type=_time_arg, default=None, help="and before this time (default: now)"
    )
    train.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    train.add_argument(
        "--every",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="retrain on a schedule: 30m, 6h, 24h, 7d (default: run once)",
    )
    train.add_argument(
        "--no-promote",
        dest="promote",
        action="store_false",
        help="publish the new versions but keep serving the current ones",
    )
    train.add_argument(
        "--no-refit",
        dest="refit",
        action="store_false",
        help="publish the model fitted on the training part instead of refitting on all data",
    )
    train.add_argument(
        "--no-tune",
        dest="tune",
        action="store_false",
        help="skip the hyper-parameter search and fit each model with its defaults "
        "(quicker; the demo uses it)",
    )
    train.add_argument(
        "--max-drop",
        type=_fraction,
        default=None,
        metavar="FRACTION",
        help="publish but do not promote a model whose held-out NDCG@10 or training rows "
        "fall below (1 - FRACTION) of the serving version's, e.g. 0.3 (default: always "
        "promote)",
    )
    train.add_argument("--json", type=Path, default=None, help="write the run's report here")
    train.set_defaults(handler=_lazy("cmd_train"))

    models = subparsers.add_parser("models", help="list, promote, roll back published models")
    actions = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="versions with data range, metrics and current")
    listing.add_argument("name", nargs="?", help="one model (default: every model)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_lazy("cmd_models_list"))
    show = actions.add_parser("show", help="print a version's manifest (default: current)")
    show.add_argument("name")
    show.add_argument("version", nargs="?")
    show.set_defaults(handler=_lazy("cmd_models_show"))
    promote = actions.add_parser("promote", help="serve the given complete version")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.set_defaults(handler=_lazy("cmd_models_promote"))
    rollback = actions.add_parser("rollback", help="serve the version before the current one")
    rollback.add_argument("name")
    rollback.set_defaults(handler=_lazy("cmd_models_rollback"))
    restore = actions.add_parser(
        "restore", help="rebuild a version's Redis data from S3 (e.g. after Redis lost it)"
    )
    restore.add_argument("name")
    restore.add_argument("version", nargs="?", help="default: the newest in S3")
    restore.add_argument(
        "--no-promote", dest="promote", action="store_false", help="do not serve it"
    )
    restore.set_defaults(handler=_lazy("cmd_models_restore"))
    gc = actions.add_parser("gc", help="delete old versions now (publishing also does this)")
    gc.add_argument("name")
    gc.add_argument("--keep", type=int, default=None, help="default: model_keep_versions")
    gc.add_argument(
        "--sweep",
        action="store_true",
        help="also scan the model's Redis keys for any that no version owns",
    )
    gc.set_defaults(handler=_lazy("cmd_models_gc"))

    from training import evaluate

    evaluate.register(subparsers)


def run_every(
    interval: float,
    run_once: Callable[[], bool],
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
    max_runs: int | None = None,
    on_wait: Callable[[float], None] | None = None,
) -> int:
    """Call ``run_once`` every ``interval`` seconds, counted from each run's start.

    A run that raises is logged and the schedule goes on (the serving versions stay as
    they were). A run that overruns the interval starts the next one at once, without
    queueing the missed ones. Returns how many runs succeeded (when ``max_runs`` ends it).
    """
    succeeded = runs = 0
    while True:
        started = clock()
        try:
            succeeded += bool(run_once())
        except Exception:
            log.exception("a scheduled training run failed; retrying at the next slot")
        runs += 1
        if max_runs is not None and runs >= max_runs:
            return succeeded
        due = started + interval
        now = clock()
        if due > now:
            if on_wait is not None:
                on_wait(due)
            sleep(due - now)
