"""`recstream` subcommands of the training package.

recstream train [--source S] [--path FILE] [--start T] [--end T] [--models a,b] [--every 24h]
recstream models list [NAME] [--json]
recstream models show NAME [VERSION]
recstream models promote NAME VERSION
recstream models rollback NAME
recstream models gc NAME [--keep K]
recstream evaluate ...            (training/evaluate.py)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from recstream.errors import ConfigurationError
from recstream.settings import Settings
from training.pipeline import Reporter, TrainReport
from training.publish import VersionInfo, iter_summaries, open_registry

__all__ = ["parse_duration", "parse_time", "register", "run_every"]

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


def _time_arg(text: str) -> str:
    parse_time(text)  # validate now, resolve at each run (``7d`` moves with the schedule)
    return text


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `train`, `models` and (once it exists) `evaluate`."""
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
        help="the input file or directory (csv: Personalize interactions CSV; movielens, "
        "taobao, yoochoose: the dataset's file; default: the bundled/shared copy)",
    )
    train.add_argument(
        "--start",
        type=_time_arg,
        default=None,
        help="archive: first day to read (2026-11-01, unix seconds, or 30d for 30 days ago)",
    )
    train.add_argument("--end", type=_time_arg, default=None, help="archive: last time to read")
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
    train.add_argument("--json", type=Path, default=None, help="write the run's report here")
    train.set_defaults(handler=cmd_train)

    models = subparsers.add_parser("models", help="list, promote, roll back published models")
    actions = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="versions with data range, metrics and current")
    listing.add_argument("name", nargs="?", help="one model (default: every model)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=cmd_models_list)
    show = actions.add_parser("show", help="print a version's manifest (default: current)")
    show.add_argument("name")
    show.add_argument("version", nargs="?")
    show.set_defaults(handler=cmd_models_show)
    promote = actions.add_parser("promote", help="serve the given complete version")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.set_defaults(handler=cmd_models_promote)
    rollback = actions.add_parser("rollback", help="serve the version before the current one")
    rollback.add_argument("name")
    rollback.set_defaults(handler=cmd_models_rollback)
    gc = actions.add_parser("gc", help="delete old versions now (publishing also does this)")
    gc.add_argument("name")
    gc.add_argument("--keep", type=int, default=None, help="default: model_keep_versions")
    gc.set_defaults(handler=cmd_models_gc)

    # The evaluation harness is built beside this module; wire it in once it exists.
    if importlib.util.find_spec("training.evaluate") is not None:
        importlib.import_module("training.evaluate").register(subparsers)


# --- models -------------------------------------------------------------------------------


def _when(unix: float | None) -> str:
    if unix is None:
        return "-"
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%d %H:%M")


def _metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())) or "-"


def versions_table(infos: Sequence[VersionInfo]) -> Table:
    table = Table(title="published models", title_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("data range (UTC)")
    table.add_column("rows", justify="right")
    table.add_column("metrics")
    table.add_column("records", justify="right")
    for info in infos:
        data = info.data
        table.add_row(
            "●" if info.current else "",
            info.name,
            info.version,
            _when(info.created),
            f"{_when(data.get('start'))} → {_when(data.get('end'))}",
            f"{data.get('rows', 0):,}",
            _metrics(info.metrics),
            f"{info.records:,}",
            style="bold" if info.current else None,
        )
    table.caption = "● = serving"
    return table


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    async def fetch() -> list[VersionInfo]:
        async with open_registry(settings) as registry:
            names = [args.name] if args.name else await registry.names()
            return [info for name in names for info in await registry.versions(name)]

    infos = asyncio.run(fetch())
    if args.json:
        print(json.dumps(list(iter_summaries(infos)), indent=2))
    elif not infos:
        what = f"model {args.name!r}" if args.name else "any model"
        print(f"no published versions of {what} in namespace {settings.namespace!r}")
    else:
        Console().print(versions_table(infos))
    return 0


def cmd_models_show(args: argparse.Namespace, settings: Settings) -> int:
    async def fetch() -> dict[str, Any]:
        async with open_registry(settings) as registry:
            version = args.version or await registry.current(args.name)
            if version is None:
                raise ConfigurationError(
                    f"model {args.name!r} has no serving version; name one "
                    f"(`recstream models list {args.name}`)"
                )
            return await registry.manifest(args.name, version)

    print(json.dumps(asyncio.run(fetch()), indent=2))
    return 0


def cmd_models_promote(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> None:
        async with open_registry(settings) as registry:
            await registry.promote(args.name, args.version)

    asyncio.run(run())
    print(f"{args.name}: now serving {args.version}")
    return 0


def cmd_models_rollback(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> tuple[str | None, str]:
        async with open_registry(settings) as registry:
            before = await registry.current(args.name)
            return before, await registry.rollback(args.name)

    before, after = asyncio.run(run())
    print(f"{args.name}: rolled back from {before} to {after}")
    return 0


def cmd_models_gc(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> Any:
        async with open_registry(settings) as registry:
            return await registry.gc(args.name, keep=args.keep)

    report = asyncio.run(run())
    print(
        f"{args.name}: retired {len(report.retired)} version(s), removed "
        f"{len(report.abandoned)} abandoned publish(es), {report.redis_keys} Redis key(s) "
        f"and {report.s3_objects} S3 object(s)"
    )
    return 0


# --- train ------------------------------------------------------------------------------------


class RichReporter(Reporter):
    """Progress bars per stage, and a table of stage timings at the end."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[tuple[str | None, str], TaskID] = {}
        self.rows: list[tuple[str, str, float, bool]] = []

    def _label(self, model: str | None, stage: str) -> str:
        return f"{model or 'data'} · {stage}"

    def stage_started(self, model: str | None, stage: str) -> None:
        self.tasks[(model, stage)] = self.progress.add_task(self._label(model, stage), total=None)

    def stage_finished(self, model: str | None, stage: str, seconds: float, ok: bool) -> None:
        task = self.tasks[(model, stage)]
        mark = "[green]✓[/]" if ok else "[red]✗[/]"
        total = self.progress.tasks[self.progress.task_ids.index(task)].total or 1
        self.progress.update(
            task,
            description=f"{mark} {self._label(model, stage)} ({seconds:.2f} s)",
            total=total,
            completed=total,
        )
        self.rows.append((model or "data", stage, seconds, ok))

    def publish_progress(self, model: str) -> Callable[[str, int, int | None], None]:
        def advance(stage: str, count: int, total: int | None) -> None:
            key = (model, f"publish {stage}")
            if key not in self.tasks:
                self.tasks[key] = self.progress.add_task(
                    f"  {self._label(model, 'publish ' + stage)}", total=total
                )
            self.progress.advance(self.tasks[key], count)

        return advance

    def timings_table(self) -> Table:
        table = Table(title="stage timings", title_justify="left")
        table.add_column("model")
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        for model, stage, seconds, ok in self.rows:
            table.add_row(model, stage, f"{seconds:.2f}", style=None if ok else "red")
        return table


def results_table(report: TrainReport) -> Table:
    table = Table(title="training run", title_justify="left")
    table.add_column("model", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("held-out metrics")
    table.add_column("status")
    for outcome in report.models:
        published = outcome.published
        if outcome.error:
            status = f"[red]failed[/] {outcome.error}"
        elif published and published.current:
            status = "[green]serving[/]"
        else:
            status = "published"
        table.add_row(
            outcome.name,
            published.version if published else "-",
            _metrics(outcome.metrics),
            status,
        )
    return table


def train_once(args: argparse.Namespace, settings: Settings, console: Console) -> TrainReport:
    """One run of `recstream train` with progress bars; returns its report."""
    from training.pipeline import run_training
    from training.sources import data_plan, model_specs

    now = time.time()
    start = None if args.start is None else parse_time(args.start, now=now)
    end = None if args.end is None else parse_time(args.end, now=now)
    plan = data_plan(args.source, args.path, settings, start=start, end=end)
    wanted = [m.strip() for m in args.models.split(",")] if args.models else None
    specs = model_specs(settings, wanted)

    async def run(reporter: RichReporter) -> TrainReport:
        async with open_registry(settings) as registry:
            return await run_training(
                plan, specs, registry, promote=args.promote, refit=args.refit, reporter=reporter
            )

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    console.rule(f"training on {plan.source} · {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
    with Progress(*columns, console=console, transient=False) as progress:
        reporter = RichReporter(progress)
        report = asyncio.run(run(reporter))
    if report.error:
        console.print(f"[red]run failed:[/] {report.error}")
    console.print(reporter.timings_table())
    if report.models:
        console.print(results_table(report))
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2, default=str))
    return report


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


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    console = Console()
    if args.every is None:
        return 0 if train_once(args, settings, console).ok else 1

    def wait(due: float) -> None:
        console.print(f"next training run at {_when(due)} UTC (every {args.every:.0f} s)")

    run_every(args.every, lambda: train_once(args, settings, console).ok, on_wait=wait)
    return 0  # pragma: no cover - run_every only returns with max_runs
