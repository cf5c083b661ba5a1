"""The `recstream train` and `recstream models` commands (parsed in training/cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
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
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from recstream.errors import ConfigurationError
from recstream.settings import Settings
from training.cli import parse_time, run_every
from training.pipeline import DataPlan, Reporter, TrainReport
from training.publish import VersionInfo, iter_summaries, open_registry

__all__ = [
    "RichReporter",
    "cmd_models_gc",
    "cmd_models_list",
    "cmd_models_promote",
    "cmd_models_restore",
    "cmd_models_rollback",
    "cmd_models_show",
    "cmd_train",
    "results_table",
    "train_once",
    "versions_table",
]


# --- models -------------------------------------------------------------------------------


def _when(unix: float | None) -> str:
    if unix is None:
        return "-"
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%d %H:%M")


_METRIC_ORDER = ("hr@10", "ndcg@10", "hr@20", "mrr@20")


def _metric_columns(table: Table, all_metrics: Sequence[dict[str, float]]) -> list[str]:
    """One right-aligned column per harness metric that any row has."""
    names = [m for m in _METRIC_ORDER if any(m in metrics for metrics in all_metrics)]
    for name in names:
        table.add_column(name.upper(), justify="right", no_wrap=True)
    return names


def _metric_cells(metrics: dict[str, float], names: Sequence[str]) -> list[str]:
    return [f"{metrics[m]:.4f}" if m in metrics else "-" for m in names]


def versions_table(infos: Sequence[VersionInfo]) -> Table:
    """Versions with their data range and held-out metrics (the version id is its UTC
    creation time; `models show` prints everything else)."""
    table = Table(title="published models", title_justify="left", caption="● = serving")
    table.add_column("", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("version (UTC)", no_wrap=True)
    table.add_column("data range (UTC)")
    table.add_column("rows", justify="right", no_wrap=True)
    names = _metric_columns(table, [info.metrics for info in infos])
    table.add_column("records", justify="right", no_wrap=True)
    for info in infos:
        data = info.data
        table.add_row(
            "●" if info.current else "",
            info.name,
            info.version,
            f"{_when(data.get('start'))} → {_when(data.get('end'))}",
            f"{data.get('rows', 0):,}",
            *_metric_cells(info.metrics, names),
            f"{info.records:,}",
            style="bold" if info.current else None,
        )
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


def cmd_models_restore(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> VersionInfo:
        async with open_registry(settings) as registry:
            return await registry.restore(args.name, args.version, promote=args.promote)

    info = asyncio.run(run())
    state = "now serving it" if info.current else "not serving it"
    print(f"{args.name}: restored {info.version} ({info.records:,} records); {state}")
    return 0


def cmd_models_gc(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> Any:
        async with open_registry(settings) as registry:
            return await registry.gc(args.name, keep=args.keep, sweep=args.sweep)

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
        self.progress.update(
            task, description=f"{mark} {self._label(model, stage)} ({seconds:.2f} s)"
        )
        self._stop(task)
        if stage == "publish":
            for (owner, name), sub in self.tasks.items():
                if owner == model and name.startswith("publish "):
                    self._stop(sub)
        self.rows.append((model or "data", stage, seconds, ok))

    def _stop(self, task: TaskID) -> None:
        # An open-ended task (total None) spins forever; close it at what it reached.
        done = self.progress.tasks[self.progress.task_ids.index(task)]
        total = done.total if done.total is not None else max(done.completed, 1)
        self.progress.update(task, total=total, completed=total if done.total is None else None)
        self.progress.stop_task(task)

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
    table = Table(title="training run (held-out metrics)", title_justify="left")
    table.add_column("model", no_wrap=True)
    table.add_column("version", no_wrap=True)
    names = _metric_columns(table, [outcome.metrics for outcome in report.models])
    table.add_column("status")
    for outcome in report.models:
        published = outcome.published
        if outcome.error:
            status = f"[red]failed[/] {outcome.error}"
        elif outcome.held_back:
            status = f"[yellow]held back[/] {outcome.held_back}"
        elif published and published.current:
            status = "[green]serving[/]"
        else:
            status = "published"
        table.add_row(
            outcome.name,
            published.version if published else "-",
            *_metric_cells(outcome.metrics, names),
            status,
        )
    return table


def setup(args: argparse.Namespace, settings: Settings) -> tuple[DataPlan[Any], list[Any]]:
    """The run's plan and models; cheap (nothing is loaded), and raises on bad options."""
    from training import sources

    now = time.time()
    start = None if args.start is None else parse_time(args.start, now=now)
    end = None if args.end is None else parse_time(args.end, now=now)
    wanted = [m.strip() for m in args.models.split(",")] if args.models else None
    return sources.training_setup(
        args.source, args.path, settings, start=start, end=end, wanted=wanted
    )


def train_once(args: argparse.Namespace, settings: Settings, console: Console) -> TrainReport:
    """One run of `recstream train` with progress bars; returns its report."""
    from training.pipeline import run_training

    # Set up again for every run: a relative --start (30d) moves with the schedule.
    plan, specs = setup(args, settings)

    async def run(reporter: RichReporter) -> TrainReport:
        async with open_registry(settings) as registry:
            return await run_training(
                plan,
                specs,
                registry,
                promote=args.promote,
                refit=args.refit,
                tune=args.tune,
                reporter=reporter,
                max_drop=args.max_drop,
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


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    console = Console()
    # One BLAS thread, as `recstream evaluate` (training/evaluate.py says why): a version
    # trained here scores as its evaluation did, whatever the machine's core count.
    with threadpool_limits(limits=1, user_api="blas"):
        if args.every is None:
            return 0 if train_once(args, settings, console).ok else 1
        # A wrong option must stop the command now, not fail every scheduled run.
        setup(args, settings)

        def wait(due: float) -> None:
            console.print(f"next training run at {_when(due)} UTC (every {args.every:.0f} s)")

        run_every(args.every, lambda: train_once(args, settings, console).ok, on_wait=wait)
    return 0  # pragma: no cover - run_every only returns with max_runs
