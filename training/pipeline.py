"""One training run: load data → tune → fit → evaluate on a held-out split → refit → publish.

The run is generic over where its data comes from (a `DataPlan`: how to load, split,
describe and evaluate a log) and which models it trains (`ModelSpec`s), so the same code
serves `recstream train` on the S3 archive, on a Personalize CSV or on a research dataset,
and the tests can drive it with a tiny model.

Per model, the stages are:

    tune      hyper-parameter search on the training part only (the spec splits off its own
              validation part); its record goes into the manifest
    fit       on the training part
    evaluate  on the held-out part, which no stage before has seen
    refit     on the whole log, so the published model knows the newest interactions
              (skipped with ``refit=False``: then the evaluated model is published)
    publish   `training.publish.ModelRegistry.publish`: S3 + Redis, then the atomic switch

A model that fails at any stage is reported and skipped; the others still publish, and the
version it would have replaced keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from training.base import Model
from training.publish import DataRange, ModelRegistry, Progress, RunInfo, VersionInfo

__all__ = [
    "DataPlan",
    "ModelOutcome",
    "ModelSpec",
    "Reporter",
    "TrainReport",
    "Tuned",
    "run_training",
]

log = logging.getLogger(__name__)

LogT = TypeVar("LogT")


@dataclass(frozen=True, slots=True)
class Tuned:
    """What a hyper-parameter search chose, and the record of how (for the manifest)."""

    params: dict[str, Any]
    record: Any = None
    """JSON-serialisable: the trials tried and their validation metrics."""


@dataclass(frozen=True)
class ModelSpec(Generic[LogT]):
    """One model to train: how to build it from parameters and, optionally, how to tune it."""

    name: str
    build: Callable[[Mapping[str, Any]], Model]
    """Parameters → an unfitted model (empty mapping: the model's defaults)."""
    tune: Callable[[LogT], Tuned] | None = None
    """Search on the training part; must not look at the held-out part."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """The parameters of an untuned run (`--no-tune`): the harness's defaults, the
    search's start, which `recstream evaluate --no-tune` measures too."""


@dataclass(frozen=True)
class DataPlan(Generic[LogT]):
    """Where a run's interactions come from and how it holds some out."""

    source: str
    """Shown in manifests and tables, e.g. "archive 2026-11-01..2026-11-23" or a file path."""
    load: Callable[[], LogT]
    split: Callable[[LogT], tuple[LogT, LogT]]
    """The log → (training part, held-out part), by time."""
    describe: Callable[[LogT], DataRange]
    evaluate: Callable[[Model, LogT, LogT], dict[str, float]]
    """(model fitted on the training part, training part, held-out part) → metrics."""
    fit_for_evaluation: Callable[[Model, LogT, LogT], Model] | None = None
    """(unfitted model, training part, held-out part) → the model to evaluate; default:
    fit on the training part. The harness fits causal models (those that only look before
    each request's time) on both parts, as their live counters would be."""


class Reporter:
    """How a run tells the outside world what it is doing; the base class says nothing.

    `recstream train` subclasses it with rich progress bars.
    """

    def stage_started(self, model: str | None, stage: str) -> None:
        """A stage starts (``model`` is None for the shared ones: load and split)."""

    def stage_finished(self, model: str | None, stage: str, seconds: float, ok: bool) -> None:
        """A stage ended, after ``seconds``; ``ok`` is False if it raised."""

    def publish_progress(self, model: str) -> Progress | None:
        """A callback for the publish of ``model`` (files and records written)."""
        return None


@dataclass
class ModelOutcome:
    """What happened to one model in a run."""

    name: str
    published: VersionInfo | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    held_back: str | None = None
    """Why the new version was published but not promoted (the guard tripped)."""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainReport:
    """The outcome of one run: shared timings and one `ModelOutcome` per model."""

    data: DataRange | None = None
    timings: dict[str, float] = field(default_factory=dict)
    models: list[ModelOutcome] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(
            m.error is None and m.held_back is None for m in self.models
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "error": self.error,
            "data": None if self.data is None else self.data.as_dict(),
            "timings": self.timings,
            "models": [
                {
                    "name": m.name,
                    "version": None if m.published is None else m.published.version,
                    "current": bool(m.published and m.published.current),
                    "metrics": m.metrics,
                    "params": m.params,
                    "error": m.error,
                    "held_back": m.held_back,
                    "timings": m.timings,
                }
                for m in self.models
            ],
        }


async def _guard(
    registry: ModelRegistry,
    name: str,
    data: DataRange,
    metrics: Mapping[str, float],
    max_drop: float,
    metric: str,
) -> str | None:
    """Why the new version must not replace the serving one, or None if it may."""
    serving = next((v for v in await registry.versions(name) if v.current), None)
    if serving is None:
        return None
    floor = 1.0 - max_drop
    old_rows = int(serving.data.get("rows") or 0)
    if old_rows and data.rows < floor * old_rows:
        return (
            f"trained on {data.rows:,} rows, under {floor:.0%} of the {old_rows:,} of serving "
            f"version {serving.version}"
        )
    old, new = serving.metrics.get(metric), metrics.get(metric)
    if old is not None and new is not None and new < floor * old:
        return (
            f"{metric} {new:.4f} is under {floor:.0%} of serving version {serving.version}'s "
            f"{old:.4f}"
        )
    return None


def _fit(model: Model, log: object) -> Model:
    # The run is generic over its log type; a plan's models fit the log its plan loads
    # (InteractionLog for every real source), which the protocol cannot express.
    return model.fit(log)  # type: ignore[arg-type]


@contextmanager
def _timed(
    reporter: Reporter, timings: dict[str, float], model: str | None, stage: str
) -> Iterator[None]:
    reporter.stage_started(model, stage)
    started = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        seconds = time.perf_counter() - started
        timings[stage] = seconds
        reporter.stage_finished(model, stage, seconds, ok)


async def run_training(
    plan: DataPlan[LogT],
    specs: Sequence[ModelSpec[LogT]],
    registry: ModelRegistry,
    *,
    promote: bool = True,
    refit: bool = True,
    tune: bool = True,
    reporter: Reporter | None = None,
    max_drop: float | None = None,
    guard_metric: str = "ndcg@10",
) -> TrainReport:
    """Train, evaluate and publish every model in ``specs`` on the data ``plan`` loads.

    With ``max_drop`` (a fraction), a new version whose ``guard_metric`` or training rows
    fall below ``(1 - max_drop)`` times the serving version's is published but not
    promoted: a data outage or a broken run must not replace a good model.
    """
    reporter = reporter or Reporter()
    report = TrainReport()
    try:
        with _timed(reporter, report.timings, None, "load"):
            full = plan.load()
            report.data = plan.describe(full)
        if isinstance(full, Sized) and len(full) == 0:
            report.error = (
                f"{plan.source} has no interactions; check the path or the time range "
                "(--start/--end), or let the archive agent collect events first"
            )
            return report
        with _timed(reporter, report.timings, None, "split"):
            train, held_out = plan.split(full)
        sizes = [len(part) if isinstance(part, Sized) else None for part in (train, held_out)]
        if 0 in sizes:
            report.error = (
                f"splitting {plan.source} left {sizes[0]} training and {sizes[1]} held-out "
                "rows; train on a longer time range (--start/--end) or more data"
            )
            return report
    except Exception as exc:
        log.exception("loading the training data failed")
        report.error = f"loading {plan.source} failed: {exc}"
        return report

    for spec in specs:
        outcome = ModelOutcome(name=spec.name)
        report.models.append(outcome)
        stage = "tune"
        try:
            tuned = Tuned(params=dict(spec.defaults))
            if tune and spec.tune is not None:
                with _timed(reporter, outcome.timings, spec.name, "tune"):
                    tuned = spec.tune(train)
            stage = "fit"
            with _timed(reporter, outcome.timings, spec.name, "fit"):
                model = spec.build(tuned.params)
                if plan.fit_for_evaluation is None:
                    model = _fit(model, train)
                else:
                    model = plan.fit_for_evaluation(model, train, held_out)
            outcome.params = model.params()
            stage = "evaluate"
            with _timed(reporter, outcome.timings, spec.name, "evaluate"):
                outcome.metrics = plan.evaluate(model, train, held_out)
            if refit:
                stage = "refit"
                with _timed(reporter, outcome.timings, spec.name, "refit"):
                    model = _fit(spec.build(tuned.params), full)
            stage = "publish"
            with _timed(reporter, outcome.timings, spec.name, "publish"):
                data = plan.describe(full if refit else train)
                switch = promote
                if promote and max_drop is not None:
                    outcome.held_back = await _guard(
                        registry, model.name, data, outcome.metrics, max_drop, guard_metric
                    )
                    switch = outcome.held_back is None
                info = RunInfo(
                    data=data,
                    metrics=outcome.metrics,
                    search=tuned.record,
                    extra={
                        "evaluation": {
                            "held_out": plan.describe(held_out).as_dict(),
                            "fitted_on": "training part",
                            "published_fit": "whole log" if refit else "training part",
                        },
                        "timings": {**report.timings, **outcome.timings},
                        "held_back": outcome.held_back,
                    },
                )
                outcome.published = await registry.publish(
                    model, info, promote=switch, progress=reporter.publish_progress(spec.name)
                )
        except Exception as exc:
            # One model failing must not stop the others; its old version keeps serving.
            log.exception("model %s failed at %s", spec.name, stage)
            outcome.error = f"{stage}: {exc}"
    return report
