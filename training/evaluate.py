"""The evaluation harness: `recstream evaluate` and the time-split protocols of the datasets.

    recstream evaluate --dataset {yoochoose,taobao,movielens} --train FILE [--test FILE]
                       [--test-start UNIX] [--json OUT] [--models a,b] [--no-tune]

Protocols (as the dataset READMEs in ../shared/data define them):

- ``yoochoose`` (`SessionNextClick`): sessions that *start* before the cutoff train, the
  others test; the default cutoff is 85% of the file's time range. Test clicks on items
  never seen in training are dropped and test sessions need 2 clicks left (session-rec's
  preparation). For every prefix e1..et of a test session predict e(t+1), ranking all
  training items, prefix items included. With ``--test FILE`` the two files are used as
  given.
- ``taobao`` (`NextView`): rows inside the official window; the last 24 hours of the
  data (ending at its newest timestamp) are the test period. Every test ``view`` whose
  user has an earlier event is a target; the history is all of the user's earlier events
  (training plus earlier test-period events); nothing is excluded.
- ``movielens`` (`LeaveLastOut`): per user, the last rating by time (ties by file row) is
  the target, the others train; the user's training items are excluded from the ranking.

Metrics over the targets (rank = 1-based position of the target in the model's ranking,
ties broken by item code, a target the model does not score at all is a miss):
HR@10, NDCG@10 = 1/log2(rank+1) if rank <= 10, HR@20, MRR@20 = 1/rank if rank <= 20.

Hyper-parameters are tuned on a validation split made by the same protocol *inside the
training part* (`training.tuning`); the test part is only used for the final figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from recstream.errors import ConfigurationError
from training.data import (
    IntArray,
    InteractionLog,
    load_movielens,
    load_taobao,
    load_yoochoose,
)
from training.models.common import ItemScorer

if TYPE_CHECKING:
    from recstream.settings import Settings
    from training.base import Model

__all__ = [
    "DATASETS",
    "METRICS",
    "LeaveLastOut",
    "NextView",
    "Protocol",
    "Query",
    "SessionNextClick",
    "evaluate_model",
    "fit_for",
    "load_dataset",
    "load_split",
    "metrics_from_ranks",
    "protocol_for",
    "rank_of",
    "register",
    "run_evaluation",
]

log = logging.getLogger(__name__)

METRICS: Final = ("hr@10", "ndcg@10", "hr@20", "mrr@20")
DATASETS: Final = ("yoochoose", "taobao", "movielens")
DAY: Final = 86400.0
TAOBAO_WINDOW: Final = (1511539200.0, 1512316800.0)
"""The official UserBehavior window, 2017-11-25 to 2017-12-04 China time."""


# --- metrics ------------------------------------------------------------------------------


def rank_of(scores: np.ndarray[Any, np.dtype[np.float64]], target: int) -> int | None:
    """1-based rank of ``target`` (ties broken by lower item code); None if not scored."""
    value = scores[target]
    if not np.isfinite(value):
        return None
    higher = int(np.count_nonzero(scores > value))
    tied_before = int(np.count_nonzero(scores[:target] == value))
    return 1 + higher + tied_before


def metrics_from_ranks(ranks: Sequence[int | None]) -> dict[str, float]:
    """HR@10, NDCG@10, HR@20 and MRR@20 averaged over targets (None = miss)."""
    n = len(ranks)
    if n == 0:
        return {name: 0.0 for name in METRICS}
    hr10 = ndcg10 = hr20 = mrr20 = 0.0
    for rank in ranks:
        if rank is None:
            continue
        if rank <= 10:
            hr10 += 1
            ndcg10 += 1.0 / math.log2(rank + 1)
        if rank <= 20:
            hr20 += 1
            mrr20 += 1.0 / rank
    return {"hr@10": hr10 / n, "ndcg@10": ndcg10 / n, "hr@20": hr20 / n, "mrr@20": mrr20 / n}


@dataclass(frozen=True, slots=True)
class Query:
    """One prediction to make: the history (oldest first), who, when, and the answer."""

    history: IntArray
    target: int
    user: int | None
    now: float
    exclude: IntArray | None = None
    """Items ranked out of the candidates (MovieLens: the user's training items)."""
    log: InteractionLog | None = None
    rows: npt.NDArray[np.int64] | None = None
    """The history's rows in ``log`` (aligned with ``history``): their event types, times
    and weights, for models that read more than the items (the learned ranker)."""

    @classmethod
    def of_session(cls, log: InteractionLog, rows: npt.NDArray[np.int64], t: int) -> Query:
        """A session's click ``rows[t]`` predicted from the clicks before it, at the time of
        the one before (YooChoose's next click: offline and in the online replay)."""
        return cls(
            log.items[rows[:t]],
            int(log.items[rows[t]]),
            None,
            float(log.timestamps[rows[t - 1]]),
            None,
            log,
            rows[:t],
        )

    @classmethod
    def of_user(cls, log: InteractionLog, rows: npt.NDArray[np.int64], p: int) -> Query:
        """A user's event ``rows[p]`` predicted from their events before it, at its time
        (Taobao's next view: offline and in the online replay)."""
        row = rows[p]
        return cls(
            log.items[rows[:p]],
            int(log.items[row]),
            int(log.users[row]),
            float(log.timestamps[row]),
            None,
            log,
            rows[:p],
        )


def fit_for(model: ItemScorer, train: InteractionLog, test: InteractionLog) -> ItemScorer:
    """Fit ``model`` for evaluation on ``test``: on the training part, or for a causal
    model (one that only looks before each request's time) on both parts, as its live
    counters would be at request time."""
    return model.fit(train.join(test) if model.causal else train)


def query_ranks(model: ItemScorer, queries: Iterable[Query]) -> list[int | None]:
    ranks: list[int | None] = []
    for query in queries:
        scores = model.score_query(query)
        if query.exclude is not None and query.exclude.size:
            scores = scores.copy()
            scores[query.exclude] = -np.inf
        ranks.append(rank_of(scores, query.target))
    return ranks


def evaluate_model(model: ItemScorer, queries: Sequence[Query]) -> dict[str, float]:
    """The four metrics of a fitted model on ``queries``, plus ``targets``."""
    return {**metrics_from_ranks(query_ranks(model, queries)), "targets": float(len(queries))}


# --- protocols ----------------------------------------------------------------------------


def _user_sequences(
    log: InteractionLog, by: IntArray
) -> Iterable[np.ndarray[Any, np.dtype[np.int64]]]:
    order, starts = log.groups(by)
    for g in range(len(starts) - 1):
        yield order[starts[g] : starts[g + 1]]


class Protocol(ABC):
    """A time-split evaluation protocol: how to split, and which queries to ask."""

    name: str = ""
    description: str = ""

    @abstractmethod
    def split(
        self, log: InteractionLog, test_start: float | None = None
    ) -> tuple[InteractionLog, InteractionLog]:
        """(training part, test part)."""

    @abstractmethod
    def queries(self, train: InteractionLog, test: InteractionLog) -> list[Query]:
        """The targets of ``test``, with histories from both parts."""

    def validation_split(self, train: InteractionLog) -> tuple[InteractionLog, InteractionLog]:
        """A split of the training part alone, for tuning."""
        return self.split(train)

    def evaluate(
        self, model: Model, train: InteractionLog, test: InteractionLog
    ) -> dict[str, float]:
        """`training.pipeline.DataPlan.evaluate`: metrics of a model fitted on ``train``."""
        if not isinstance(model, ItemScorer):
            raise ConfigurationError(
                f"{type(model).__name__} cannot be evaluated: it does not score items "
                "(training.models.common.ItemScorer)"
            )
        return evaluate_model(model, self.queries(train, test))


@dataclass
class SessionNextClick(Protocol):
    """YooChoose: next click on every prefix of the test sessions."""

    train_fraction: float = 0.85
    filter_unseen: bool = True
    name: str = "session next-click"
    description: str = (
        "sessions starting in the first 85% of the time range train; next click on every "
        "prefix of the others; test clicks on unseen items dropped (session-rec)"
    )

    def cutoff(self, log: InteractionLog) -> float:
        start, end = float(log.timestamps.min()), float(log.timestamps.max())
        return start + self.train_fraction * (end - start)

    def split(
        self, log: InteractionLog, test_start: float | None = None
    ) -> tuple[InteractionLog, InteractionLog]:
        cutoff = self.cutoff(log) if test_start is None else test_start
        first = np.full(log.n_sessions, np.inf)
        np.minimum.at(first, log.sessions, log.timestamps)
        in_test = first[log.sessions] >= cutoff
        return log.select(~in_test), log.select(in_test)

    def queries(self, train: InteractionLog, test: InteractionLog) -> list[Query]:
        seen = np.bincount(train.items, minlength=test.n_items) > 0
        if self.filter_unseen:
            test = test.select(seen[test.items])
        out: list[Query] = []
        for rows in _user_sequences(test, test.sessions):
            out.extend(Query.of_session(test, rows, t) for t in range(1, len(rows)))
        return out


@dataclass
class NextView(Protocol):
    """Taobao (and any user log): next view in the last ``test_days`` days."""

    test_days: float = 1.0
    target_types: tuple[str, ...] = ("view",)
    name: str = "next-view, last 24 h"
    description: str = (
        "last 24 h of the data test; every test view of a user with an earlier event is a "
        "target; history = all the user's earlier events; nothing excluded"
    )

    def split(
        self, log: InteractionLog, test_start: float | None = None
    ) -> tuple[InteractionLog, InteractionLog]:
        if test_start is None:
            test_start = math.ceil(float(log.timestamps.max())) + 1 - self.test_days * DAY
        in_test = log.timestamps >= test_start
        return log.select(~in_test), log.select(in_test)

    def validation_split(self, train: InteractionLog) -> tuple[InteractionLog, InteractionLog]:
        # The training part of a short slice may span less than two test periods; then
        # the validation period is its last half.
        span = float(train.timestamps.max() - train.timestamps.min())
        days = min(self.test_days, span / 2 / DAY)
        return NextView(test_days=days, target_types=self.target_types).split(train)

    def queries(self, train: InteractionLog, test: InteractionLog) -> list[Query]:
        full = train.join(test)
        in_test = np.zeros(len(full), dtype=bool)
        in_test[len(train) :] = True
        codes = [c for c, name in enumerate(full.event_type_names) if name in self.target_types]
        is_target = in_test & np.isin(full.event_types, codes) if codes else in_test
        out: list[Query] = []
        for rows in _user_sequences(full, full.users):
            out.extend(
                Query.of_user(full, rows, int(p)) for p in np.flatnonzero(is_target[rows]) if p > 0
            )
        return out


@dataclass
class LeaveLastOut(Protocol):
    """MovieLens: each user's last interaction (by time, ties by row) is the target."""

    name: str = "temporal leave-last-out"
    description: str = (
        "per user the last rating by time (ties by row) is the target; the user's training "
        "items are excluded; candidates: every training item"
    )

    def split(
        self, log: InteractionLog, test_start: float | None = None
    ) -> tuple[InteractionLog, InteractionLog]:
        if test_start is not None:
            raise ConfigurationError(
                "temporal leave-last-out holds out each user's last rating; it takes no "
                "--test-start (drop it, or evaluate another protocol)"
            )
        order, starts = log.groups(log.users)
        lengths = np.diff(starts)
        last = order[starts[1:][lengths >= 2] - 1]
        in_test = np.zeros(len(log), dtype=bool)
        in_test[last] = True
        return log.select(~in_test), log.select(in_test)

    def queries(self, train: InteractionLog, test: InteractionLog) -> list[Query]:
        histories: dict[int, npt.NDArray[np.int64]] = {}
        for rows in _user_sequences(train, train.users):
            histories[int(train.users[rows[0]])] = rows
        out: list[Query] = []
        for row in np.argsort(test.users, kind="stable"):
            user = int(test.users[row])
            rows = histories.get(user, np.zeros(0, np.int64))
            history = train.items[rows]
            target = int(test.items[row])
            out.append(
                Query(
                    history,
                    target,
                    user,
                    float(test.timestamps[row]),
                    np.unique(history),
                    train,
                    rows,
                )
            )
        return out


# --- datasets ------------------------------------------------------------------------------


def protocol_for(dataset: str) -> Protocol:
    if dataset == "yoochoose":
        return SessionNextClick()
    if dataset == "taobao":
        return NextView()
    if dataset == "movielens":
        return LeaveLastOut()
    raise ConfigurationError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")


def load_dataset(
    dataset: str, path: Path, weights: Mapping[str, float] | None = None
) -> InteractionLog:
    """One file of a dataset in its published format."""
    if dataset == "yoochoose":
        return load_yoochoose(path, weights=weights)
    if dataset == "taobao":
        return load_taobao(path, weights=weights, window=TAOBAO_WINDOW)
    if dataset == "movielens":
        return load_movielens(path, weights=weights)
    raise ConfigurationError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")


def load_split(
    dataset: str,
    train_path: Path,
    test_path: Path | None = None,
    test_start: float | None = None,
    weights: Mapping[str, float] | None = None,
) -> tuple[Protocol, InteractionLog, InteractionLog]:
    """(protocol, training part, test part) for the CLI's arguments."""
    protocol = protocol_for(dataset)
    if test_path is None:
        full = load_dataset(dataset, train_path, weights)
        train, test = protocol.split(full, test_start)
    else:
        first = load_dataset(dataset, train_path, weights)
        second = load_dataset(dataset, test_path, weights)
        full = InteractionLog.concat([first, second], source=f"{train_path} + {test_path}")
        train = full.select(np.arange(len(first)))
        test = full.select(np.arange(len(first), len(full)))
    if len(train) == 0 or len(test) == 0:
        raise ConfigurationError(
            f"the split of {train_path} left {len(train)} training and {len(test)} test rows; "
            "pass another --test-start or a --test file"
        )
    return protocol, train, test


# --- the run ---------------------------------------------------------------------------------


@dataclass
class ModelResult:
    name: str
    metrics: dict[str, float]
    params: dict[str, Any]
    fit_s: float
    eval_s: float
    tune_s: float = 0.0
    search: dict[str, Any] | None = None


@dataclass
class EvaluationReport:
    dataset: str
    protocol: str
    train_rows: int
    test_rows: int
    targets: int
    results: list[ModelResult] = field(default_factory=list)
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "protocol": self.protocol,
            "source": self.source,
            "train_rows": self.train_rows,
            "test_rows": self.test_rows,
            "targets": self.targets,
            "models": [
                {
                    "name": r.name,
                    "metrics": r.metrics,
                    "params": r.params,
                    "seconds": {"tune": r.tune_s, "fit": r.fit_s, "evaluate": r.eval_s},
                    "search": r.search,
                }
                for r in self.results
            ],
        }

    def markdown(self) -> str:
        lines = [
            f"### {self.dataset}: {self.protocol}",
            "",
            f"{self.source}: {self.train_rows:,} training rows, {self.test_rows:,} test rows, "
            f"{self.targets:,} targets.",
            "",
            "| model | HR@10 | NDCG@10 | HR@20 | MRR@20 | fit s |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.results:
            m = r.metrics
            lines.append(
                f"| {r.name} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['hr@20']:.4f} | "
                f"{m['mrr@20']:.4f} | {r.fit_s:.2f} |"
            )
        return "\n".join(lines) + "\n"


Factory = Callable[[dict[str, Any]], ItemScorer]


def run_evaluation(
    dataset: str,
    train_path: Path,
    test_path: Path | None = None,
    *,
    test_start: float | None = None,
    models: Sequence[str] | None = None,
    tune: bool = True,
    weights: Mapping[str, float] | None = None,
    on_result: Callable[[ModelResult], None] | None = None,
) -> EvaluationReport:
    """Load, split, (tune on validation,) fit on training, evaluate on test, per model."""
    from training.tuning import harness_entries

    protocol, train, test = load_split(dataset, train_path, test_path, test_start, weights)
    queries = protocol.queries(train, test)
    report = EvaluationReport(
        dataset=dataset,
        protocol=protocol.name,
        train_rows=len(train),
        test_rows=len(test),
        targets=len(queries),
        source=str(train_path) + ("" if test_path is None else f" + {test_path}"),
    )
    chosen: dict[str, Mapping[str, Any]] = {}
    for entry in harness_entries(dataset, models):
        started = time.perf_counter()
        params: dict[str, Any] = dict(entry.defaults)
        search = None
        if tune and entry.tune is not None:
            tuned = entry.tune(protocol, train, chosen)
            params, search = tuned.params, tuned.record
            chosen[entry.name] = params
        tuned_s = time.perf_counter() - started
        started = time.perf_counter()
        model = fit_for(entry.build(params), train, test)
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        metrics = evaluate_model(model, queries)
        result = ModelResult(
            name=entry.name,
            metrics=metrics,
            params=model.params(),
            fit_s=fit_s,
            eval_s=time.perf_counter() - started,
            tune_s=tuned_s,
            search=search,
        )
        report.results.append(result)
        if on_result is not None:
            on_result(result)
    return report


# --- the CLI --------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `recstream evaluate` to the CLI."""
    parser = subparsers.add_parser(
        "evaluate",
        help="run a dataset's time-split protocol and report HR@10, NDCG@10, HR@20, MRR@20",
        description="Evaluate every model (or --models) with the protocol of the dataset's "
        "README: tune on a validation split of the training part, fit on the training part, "
        "rank the test targets.",
    )
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--train", type=Path, required=True, help="the dataset file (or train)")
    parser.add_argument("--test", type=Path, default=None, help="a separate test file")
    parser.add_argument(
        "--test-start", type=float, default=None, help="unix seconds where the test part begins"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write the results here (and Markdown beside)"
    )
    parser.add_argument("--models", default=None, help="comma-separated entries (default: all)")
    parser.add_argument(
        "--no-tune", dest="tune", action="store_false", help="use default hyper-parameters"
    )
    online = parser.add_argument_group(
        "online", "replay the protocol through the running API and agents (training/online.py)"
    )
    online.add_argument(
        "--online",
        action="store_true",
        help="post the events to the API one at a time and rank what it serves (yoochoose, taobao)",
    )
    online.add_argument("--api", default=None, help="the API's URL (default: api_host:api_port)")
    online.add_argument(
        "--sessions",
        type=int,
        default=None,
        help="replay only the first N test sessions (yoochoose) or users (taobao)",
    )
    online.add_argument(
        "--params",
        type=Path,
        default=None,
        help="a `recstream evaluate --json` report: publish and serve its tuned blend and "
        "ranker (default: the default blend)",
    )
    online.add_argument(
        "--scorer",
        choices=("ranker", "blend"),
        default=None,
        help="serve the learned ranker or the blend alone (default: the ranker when the "
        "--params report has one, else the blend)",
    )
    online.add_argument(
        "--probes",
        type=int,
        default=20,
        help="ask this many targets again with debug=true and compare the served features "
        "with the offline ranker's (default: 20)",
    )
    parser.set_defaults(handler=cmd_evaluate)


def results_table(report: EvaluationReport) -> Any:
    from rich.table import Table

    table = Table(
        title=f"{report.dataset}: {report.protocol} ({report.targets:,} targets)",
        title_justify="left",
    )
    table.add_column("model", no_wrap=True)
    for name in ("HR@10", "NDCG@10", "HR@20", "MRR@20"):
        table.add_column(name, justify="right")
    table.add_column("tune s", justify="right")
    table.add_column("fit s", justify="right")
    for r in report.results:
        m = r.metrics
        table.add_row(
            r.name,
            *(f"{m[k]:.4f}" for k in METRICS),
            f"{r.tune_s:.1f}",
            f"{r.fit_s:.2f}",
        )
    return table


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    if args.online:
        from training.online import cmd_evaluate_online

        return cmd_evaluate_online(args, settings)
    from rich.console import Console

    console = Console()
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    # One BLAS thread: a matrix product's sums come out in another order with another
    # thread count, which moved ALS's and the ranker's figures by up to 0.006 HR@10
    # between machines (YooChoose's ranker: 0.6207 with OpenBLAS's 2 threads here, 0.6267
    # with one). Pinned, a report is the same on any machine.
    with threadpool_limits(limits=1, user_api="blas"), console.status("evaluating") as status:

        def progress(result: ModelResult) -> None:
            status.update(f"evaluated {result.name}: hr@10={result.metrics['hr@10']:.4f}")

        report = run_evaluation(
            args.dataset,
            args.train,
            args.test,
            test_start=args.test_start,
            models=models,
            tune=args.tune,
            weights=settings.event_weights if args.dataset == "taobao" else None,
            on_result=progress,
        )
    console.print(results_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
        markdown = args.json.with_suffix(".md")
        markdown.write_text(report.markdown())
        console.print(f"wrote {args.json} and {markdown}")
    return 0
