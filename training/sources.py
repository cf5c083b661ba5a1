"""What `recstream train` trains on and which models it trains.

`training_setup` turns the command's ``--source/--path/--start/--end/--models`` into a
`training.pipeline.DataPlan` and its `ModelSpec`s, from the pieces the rest of the package
provides: the loaders (training/data.py, training/archive.py), the protocols
(training/evaluate.py: how to hold out and how to score) and the tuned harness entries
(training/tuning.py).

    source     loader                           held-out protocol            tuned as
    archive    S3 archive, [start, end)         next view/click, last 24 h   taobao
    csv        Personalize interactions CSV     next view/click, last 24 h   taobao
    movielens  ratings.csv                      temporal leave-last-out      movielens
    taobao     UserBehavior csv                 next view, last 24 h         taobao
    yoochoose  session-rec clicks (tsv)         session next-click           yoochoose

Event weights are `Settings.event_weights`, except MovieLens, whose ratings all count
the same (as in the harness).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from recstream.errors import ConfigurationError
from recstream.settings import Settings
from training.archive import load_archive
from training.base import Model
from training.data import InteractionLog, load_personalize_csv
from training.evaluate import NextView, Protocol, fit_for, load_dataset, protocol_for
from training.models.common import ItemScorer
from training.pipeline import DataPlan, ModelSpec
from training.publish import DataRange
from training.tuning import harness_entries, model_specs

__all__ = ["DEFAULT_ARCHIVE_DAYS", "default_path", "training_setup"]

DEFAULT_ARCHIVE_DAYS = 30.0
"""With no --start, `recstream train --source archive` reads this many days back."""

_REPO = Path(__file__).resolve().parent.parent
_SHARED = (_REPO.parent / "shared" / "data", _REPO / "data")
_DEFAULT_FILES = {
    "movielens": ("movielens-small", "ratings.csv"),
    "taobao": ("taobao-userbehavior-head-dev", "UserBehavior_head_dev.csv"),
    "yoochoose": ("yoochoose-rsc15-100k-dev", "yoochoose-clicks-100k_dev.txt"),
}
_TUNED_AS = {"archive": "taobao", "csv": "taobao"}


def default_path(source: str) -> Path | None:
    """The bundled or shared copy of a research dataset, if it is on this machine."""
    if source not in _DEFAULT_FILES:
        return None
    folder, name = _DEFAULT_FILES[source]
    for root in (_REPO / "data", *_SHARED):
        candidate = root / folder / name
        if candidate.is_file():
            return candidate
    return None


def _describe(source: str) -> Callable[[InteractionLog], DataRange]:
    def describe(part: InteractionLog) -> DataRange:
        return DataRange(
            source=source,
            start=part.start,
            end=part.end,
            rows=len(part),
            users=int(np.unique(part.users).size),
            items=int(np.unique(part.items).size),
        )

    return describe


class _YoungLogNextView(NextView):
    """NextView for the archive of a stack that may be young: a log spanning less than
    two test periods (a stack up for hours) holds out its last half instead of leaving
    nothing to train on, as `NextView.validation_split` does for tuning."""

    def split(
        self, log: InteractionLog, test_start: float | None = None
    ) -> tuple[InteractionLog, InteractionLog]:
        if test_start is None and len(log):
            span = float(log.timestamps.max() - log.timestamps.min())
            if span < 2 * self.test_days * 86400:
                short = NextView(test_days=span / 2 / 86400, target_types=self.target_types)
                return short.split(log)
        return super().split(log, test_start)


def _day(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%d %H:%M")


def training_setup(
    source: str,
    path: Path | None,
    settings: Settings,
    *,
    start: float | None = None,
    end: float | None = None,
    wanted: Sequence[str] | None = None,
) -> tuple[DataPlan[InteractionLog], list[ModelSpec[InteractionLog]]]:
    """The plan and the models of one `recstream train` run."""
    protocol: Protocol
    if source == "archive":
        end = time.time() if end is None else end
        start = end - DEFAULT_ARCHIVE_DAYS * 86400 if start is None else start
        label = f"archive s3://{settings.bucket} {_day(start)} → {_day(end)} UTC"
        window = (start, end)

        def load() -> InteractionLog:
            return load_archive(settings, window[0], window[1])

        protocol = _YoungLogNextView(target_types=("view", "click"))
    elif source == "csv":
        if path is None:
            raise ConfigurationError(
                "--source csv needs --path: a Personalize interactions CSV "
                "(USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE,EVENT_VALUE)"
            )
        csv_path = path
        label = str(csv_path)

        def load() -> InteractionLog:
            return load_personalize_csv(csv_path, weights=settings.event_weights)

        protocol = NextView(target_types=("view", "click"))
    elif source in _DEFAULT_FILES:
        file = path or default_path(source)
        if file is None:
            folder, name = _DEFAULT_FILES[source]
            raise ConfigurationError(
                f"no {source} file found (looked for {folder}/{name} under data/ and "
                "../shared/data); pass --path FILE"
            )
        label = str(file)
        dataset, dataset_file = source, file
        weights = None if source == "movielens" else settings.event_weights

        def load() -> InteractionLog:
            return load_dataset(dataset, dataset_file, weights)

        protocol = protocol_for(source)
    else:
        raise ConfigurationError(
            f"unknown source {source!r}; use archive, csv, movielens, taobao or yoochoose"
        )

    if source != "archive" and (start is not None or end is not None):
        # The window applies to the research files too: handy for retraining on a slice.
        read = load

        def load() -> InteractionLog:
            return read().between(start, end)

    def fit(model: Model, train: InteractionLog, held_out: InteractionLog) -> Model:
        # As the harness does: causal models (trending, which only counts events before
        # each request's time) see both parts, as live counters would at request time;
        # the others, popularity included, only the training part.
        if isinstance(model, ItemScorer):
            return fit_for(model, train, held_out)
        return model.fit(train)

    plan = DataPlan(
        source=label,
        load=load,
        split=protocol.split,
        describe=_describe(label),
        evaluate=protocol.evaluate,
        fit_for_evaluation=fit,
    )
    tuned_as = _TUNED_AS.get(source, source)
    if wanted is not None:
        known = {
            e.name
            for e in harness_entries(tuned_as)
            if not e.name.startswith("readme:") and "+" not in e.name
        }
        unknown = sorted(set(wanted) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown model(s) {unknown} for --source {source}; choose from {sorted(known)}"
            )
    return plan, model_specs(protocol, tuned_as, wanted)
