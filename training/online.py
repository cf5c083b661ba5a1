"""`recstream evaluate --online`: a protocol replayed through the running API.

    recstream evaluate --online --dataset yoochoose|taobao --train FILE [--test FILE]
                       [--params OFFLINE.json] [--scorer ranker|blend] [--sessions N]
                       [--probes N] [--api URL]

Needs the API (`recstream serve`) and at least one agent worker (`recstream agents`)
running on the same settings. Steps:

1. split the file with the dataset's protocol (YooChoose's `SessionNextClick`, Taobao's
   `NextView`, with the settings' event weights as `recstream evaluate` loads it);
2. Taobao: upsert every item's category into the catalog (``POST /v1/{ns}/items``), so
   the agents keep per-category lists and serving knows the history's categories, as
   offline category popularity does;
3. post every training event to ``POST /v1/{ns}/events`` (the collector), and wait until
   the agents applied each actor's last one (its id in ``rs:{ns}:seen:{actor}``);
4. fit what `recstream train` would serve, with the parameters of a `recstream evaluate
   --json` report (``--params``): the blend's components, the blend and (``--scorer
   ranker``, the default when the report has a ranker) the learned ranker, and publish
   them all through training's publish path, so serving reads them; then wait until the
   API answers with them (it loads a new version on its first requests). Serving ranks
   with a published ranker whose cross-validation chose LightGBM, else with the blend;
5. post the test events of the first ``--sessions`` test sessions (YooChoose) or test
   users (Taobao) one at a time in time order, each once the agents applied the one
   before; just before each target (a session's next click; a user's next view), ask
   ``GET /v1/{ns}/recommendations`` for 20 items ``as_of`` the offline query's time
   (the previous click's; the view's), since the ranker's features are ages measured
   from the request's time, and rank the target in that list.

Without ``--params`` the models keep their defaults: the default blend is served, or with
``--scorer ranker`` a ranker over the default blend's components (the untuned harness).

It reports the harness's metrics (HR@10, NDCG@10, HR@20, MRR@20) of what was served and,
on exactly the same targets (the protocol's own queries), of the served model offline and
of the blend offline. ``--probes N`` asks N of the targets a second time with
``debug=true`` and compares the served candidates' features with the offline ranker's
feature matrix of the same query: which features differ, and by how much (`Probe`).
MovieLens's leave-last-out is not replayed: it excludes the user's training items, which
the API has no reason to do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np
import redis.asyncio as aioredis

from recstream.errors import ConfigurationError
from recstream.keys import Keys
from recstream.settings import Settings
from training.data import InteractionLog
from training.evaluate import (
    NextView,
    Query,
    SessionNextClick,
    evaluate_model,
    fit_for,
    load_split,
    metrics_from_ranks,
)
from training.models import Blend, LearnedRanker
from training.models.blend import COMPONENTS
from training.models.common import ItemScorer
from training.publish import DataRange, RunInfo, open_registry

__all__ = [
    "SCORERS",
    "OnlineReport",
    "Probe",
    "ServedModels",
    "cmd_evaluate_online",
    "print_report",
    "report_table",
    "run_online",
    "served_models",
]

K = 20
BATCH = 500
APPLY_TIMEOUT_S = 60.0
SCORERS: Final = ("ranker", "blend")
PROBES = 20
"""Targets asked a second time with ``debug=true`` by default (`Probe`)."""
FEATURE_TOLERANCE = 1e-4
"""Relative difference under which a served feature equals the offline one (the debug
view rounds to 6 decimals)."""


@dataclass(frozen=True)
class ServedModels:
    """What the replay fits and publishes: the blend (with its components) always, and
    the learned ranker's parameters when it is to serve (None: the blend alone)."""

    blend: dict[str, Any]
    ranker: dict[str, Any] | None = None

    @property
    def scorer(self) -> str:
        return "ranker" if self.ranker is not None else "blend"


def served_models(
    report: Path | None, scorer: str | None = None, dataset: str | None = None
) -> ServedModels:
    """The blend's and the ranker's parameters in a `recstream evaluate --json` report,
    as `bench.served_quality` reads them: the blend's tuned ``params``, the ranker's
    ``search.chosen`` (the components and blend weights its run chose; the rest are the
    ranker's defaults). ``scorer`` None: the ranker when the report has one.

    Without a report: the default blend and, with ``scorer="ranker"``, a ranker with its
    defaults over the default blend's components and weights (`_fit`)."""
    if scorer is not None and scorer not in SCORERS:
        raise ConfigurationError(f"unknown scorer {scorer!r}; use one of {', '.join(SCORERS)}")
    if report is None:
        return ServedModels({}, {} if scorer == "ranker" else None)
    doc = json.loads(report.read_text())
    if dataset is not None and doc.get("dataset") not in (None, dataset):
        raise ConfigurationError(
            f"{report} is a report on {doc['dataset']!r}, not {dataset!r}; run "
            f"`recstream evaluate --dataset {dataset} --train FILE --json OUT.json` for one"
        )
    entries = {m.get("name"): m for m in doc.get("models", [])}
    if "blend" not in entries:
        raise ConfigurationError(
            f"{report} has no 'blend' entry; run `recstream evaluate --dataset D --train "
            "FILE --json OUT.json` (without --models) to make one"
        )
    blend = dict(entries["blend"]["params"])
    if scorer == "blend" or (scorer is None and "ranker" not in entries):
        return ServedModels(blend)
    if "ranker" not in entries:
        raise ConfigurationError(
            f"{report} has no 'ranker' entry; run `recstream evaluate --dataset "
            f"{dataset or doc.get('dataset', 'D')} --train FILE --json OUT.json` (the "
            "ranker is evaluated on yoochoose and taobao), or pass --scorer blend"
        )
    entry = entries["ranker"]
    return ServedModels(blend, dict((entry.get("search") or {}).get("chosen", entry["params"])))


@dataclass
class Probe:
    """Targets asked again with ``debug=true``: the scorer that answered (``ranker@v…``
    or ``blend@v…``), where each source's candidates came from (``live:pop:decayed``,
    ``published:v…``, ``degraded``...), and, when a learned ranker served, each feature
    whose served value differs from the offline ranker's feature matrix of the same query
    (over the candidates both ranked), with how often and by how much."""

    queries: int = 0
    scorers: list[str] = field(default_factory=list)
    origins: dict[str, dict[str, int]] = field(default_factory=dict)
    """source → origin → answers."""
    compared: int = 0
    """(query, candidate) pairs in both the served debug view and the offline pool."""
    only_served: int = 0
    """Candidates the API listed (among its debug view's 200) that offline did not."""
    mismatches: dict[str, dict[str, float]] = field(default_factory=dict)
    """feature → ``pairs`` that differ, of them ``missing_served`` (the served candidate
    lacks it: its source did not list the item) and ``missing_offline``, and over the
    others the largest difference ``max_abs`` with its ``served`` and ``offline`` values."""

    def add(self, name: str, served: float, offline: float) -> None:
        seen = self.mismatches.setdefault(
            name, {"pairs": 0, "missing_served": 0, "missing_offline": 0, "max_abs": 0.0}
        )
        seen["pairs"] += 1
        if math.isnan(served) or math.isnan(offline):
            seen["missing_served" if math.isnan(served) else "missing_offline"] += 1
            return
        gap = abs(served - offline)
        if gap > seen["max_abs"]:
            seen.update(max_abs=gap, served=served, offline=offline)

    def as_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "scorers": sorted(set(self.scorers)),
            "origins": self.origins,
            "compared_pairs": self.compared,
            "only_served": self.only_served,
            "mismatched_features": self.mismatches,
        }


@dataclass
class OnlineReport:
    dataset: str
    sessions: int
    targets: int
    scorer: str
    """What was published to serve: ``ranker`` or ``blend``."""
    served: dict[str, float]
    offline: dict[str, float]
    """The served model, offline, on the same targets."""
    offline_blend: dict[str, float]
    """The blend, offline, on the same targets (the same as ``offline`` for the blend)."""
    degraded: int
    """Responses that named a degraded store or source."""
    params: dict[str, Any]
    degraded_by: dict[str, int] = field(default_factory=dict)
    """How many responses named each degraded store or source."""
    versions: dict[str, str] = field(default_factory=dict)
    ranker_choice: str | None = None
    """The fitted ranker's cross-validated choice: ``lightgbm`` (serving runs the booster)
    or ``blend`` (its version publishes no booster; serving keeps the linear blend)."""
    probe: Probe = field(default_factory=Probe)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "sessions": self.sessions,
            "targets": self.targets,
            "scorer": self.scorer,
            "ranker_choice": self.ranker_choice,
            "served": self.served,
            "offline_same_targets": self.offline,
            "offline_blend_same_targets": self.offline_blend,
            "degraded_responses": self.degraded,
            "degraded_by": self.degraded_by,
            "blend_params": self.params.get("blend", {}),
            "ranker_params": self.params.get("ranker"),
            "versions": self.versions,
            "probe": self.probe.as_dict(),
        }


def _events(log: InteractionLog, rows: Sequence[int], prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "event_id": f"{prefix}-{int(log.row[r])}",
            "event_type": log.event_type_names[int(log.event_types[r])],
            "user_id": str(log.user_ids[int(log.users[r])]),
            "item_id": str(log.item_ids[int(log.items[r])]),
            "timestamp": float(log.timestamps[r]),
        }
        for r in rows
    ]


def _catalog(log: InteractionLog) -> list[dict[str, Any]]:
    """Every item with a category, as the catalog takes it (its main category only: the
    one the per-category lists and offline category popularity use)."""
    categories = log.category_of()
    return [
        {"item_id": str(item), "categories": [str(log.category_ids[c])]}
        for item, c in zip(log.item_ids, categories.tolist(), strict=True)
        if c >= 0
    ]


class _Replay:
    def __init__(self, settings: Settings, api: str, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.api = api
        self.client = client
        self.redis = aioredis.from_url(settings.redis_url)

    async def post(self, events: list[dict[str, Any]]) -> None:
        for start in range(0, len(events), BATCH):
            chunk = events[start : start + BATCH]
            response = await self.client.post(
                f"/v1/{self.settings.namespace}/events", json={"events": chunk}
            )
            if response.status_code != 202 or response.json().get("rejected"):
                raise ConfigurationError(
                    f"the collector refused the replay ({response.status_code}): "
                    f"{response.text[:500]}"
                )

    async def upsert_items(self, items: list[dict[str, Any]]) -> None:
        size = self.settings.catalog_max_batch
        for start in range(0, len(items), size):
            response = await self.client.post(
                f"/v1/{self.settings.namespace}/items", json={"items": items[start : start + size]}
            )
            if response.status_code != 200 or response.json().get("rejected"):
                raise ConfigurationError(
                    f"the catalog refused the replay's items ({response.status_code}): "
                    f"{response.text[:500]}"
                )

    async def applied(self, last: Mapping[str, str], within: float = APPLY_TIMEOUT_S) -> None:
        """Wait until the agents applied each actor's given event; give up only when
        ``within`` seconds pass without progress (a bulk replay takes a while)."""
        pending = dict(last)
        deadline = time.monotonic() + within
        while pending:
            before = len(pending)
            pipe = self.redis.pipeline(transaction=False)
            actors = list(pending)
            for actor in actors:
                pipe.zscore(self.keys.seen(actor), pending[actor])
            for actor, score in zip(actors, await pipe.execute(), strict=True):
                if score is not None:
                    del pending[actor]
            if not pending:
                return
            if len(pending) < before:
                deadline = time.monotonic() + within
            elif time.monotonic() > deadline:
                raise ConfigurationError(
                    f"the agents applied none of {len(pending)} events for {within:.0f}s; "
                    "is `recstream agents` running on the same settings?"
                )
            await asyncio.sleep(0.02)

    async def recommend(
        self, actor: str, as_of: float, *, debug: bool = False
    ) -> tuple[list[str], list[str], dict[str, Any] | None]:
        """The served list for ``actor`` as of ``as_of``, what was degraded, and the
        debug view when asked for."""
        params = {"user_id": actor, "num_results": str(K), "as_of": repr(as_of)}
        if debug:
            params["debug"] = "true"
        response = await self.client.get(
            f"/v1/{self.settings.namespace}/recommendations", params=params
        )
        response.raise_for_status()
        body = response.json()
        items = [item["item_id"] for item in body["items"]]
        return items, [str(d) for d in body["degraded"]], body.get("debug")

    async def serving(self, actor: str, scorer: str, within: float = APPLY_TIMEOUT_S) -> None:
        """Wait until the API answers ``actor`` with ``scorer`` (``ranker@{version}``),
        undegraded: it loads a newly published version on its first requests, and until
        then ranks with what it has (the blend instead of a ranker still loading)."""
        deadline = time.monotonic() + within
        last: Any = None
        while time.monotonic() < deadline:
            _, missed, debug = await self.recommend(actor, time.time(), debug=True)
            last = (debug or {}).get("scorer"), missed
            if last == (scorer, []):
                return
            await asyncio.sleep(0.1)
        raise ConfigurationError(
            f"the API did not serve {scorer} within {within:.0f}s of its publish (it answered "
            f"with {last[0]}, degraded {last[1]}); does it read the same Redis as this replay?"
        )

    async def aclose(self) -> None:
        await self.redis.aclose()


@dataclass
class _Sequence:
    """One actor's test events in time order (rows of ``log``), and which of them are
    targets: the API is asked for recommendations just before each target is posted."""

    rows: list[int]
    targets: list[Query | None]


def _session_sequences(train: InteractionLog, test: InteractionLog) -> list[_Sequence]:
    """YooChoose: each test session's clicks (clicks on unseen items dropped, >= 2 left);
    every click after the first is a target, its history the session's earlier clicks:
    exactly `SessionNextClick.queries` (its time the previous click's)."""
    seen = np.bincount(train.items, minlength=test.n_items) > 0
    keep = np.flatnonzero(seen[test.items])
    sub = test.select(keep)
    order, starts = sub.groups(sub.sessions)
    out = []
    for g in range(len(starts) - 1):
        rows = keep[order[starts[g] : starts[g + 1]]]
        if len(rows) < 2:
            continue
        targets: list[Query | None] = [None]
        targets += [Query.of_session(test, rows, t) for t in range(1, len(rows))]
        out.append(_Sequence(rows.tolist(), targets))
    return out


def _next_view_targets(protocol: NextView, full: InteractionLog, n_train: int) -> list[_Sequence]:
    """Taobao: each user's test-period events in time order; a view with an earlier event
    of the same user is a target, its history all the user's earlier events (training and
    test): exactly `NextView.queries` on ``full`` = training + test (its time the view's)."""
    codes = [c for c, name in enumerate(full.event_type_names) if name in protocol.target_types]
    order, starts = full.groups(full.users)
    out = []
    for g in range(len(starts) - 1):
        rows = order[starts[g] : starts[g + 1]]
        test_positions = [p for p, r in enumerate(rows) if r >= n_train]
        if not test_positions:
            continue
        targets: list[Query | None] = []
        for p in test_positions:
            is_target = p > 0 and (not codes or int(full.event_types[rows[p]]) in codes)
            targets.append(Query.of_user(full, rows, p) if is_target else None)
        if any(t is not None for t in targets):
            out.append(_Sequence([int(rows[p]) for p in test_positions], targets))
    return out


def _in_time_order(
    log: InteractionLog, sequences: Sequence[_Sequence]
) -> tuple[list[int], list[Query | None]]:
    """The sequences' events merged in time order (ties by file row, as each sequence
    is ordered), with their targets. Replayed one sequence after another, the live
    popularity lists would count clicks of later sessions at an earlier session's
    request; in time order the live state at a request holds what had happened by then,
    as it would have live (and as `bench.served_quality` replays)."""
    steps = [
        (float(log.timestamps[r]), int(log.row[r]), r, query)
        for sequence in sequences
        for r, query in zip(sequence.rows, sequence.targets, strict=True)
    ]
    steps.sort(key=lambda step: step[:3])
    return [step[2] for step in steps], [step[3] for step in steps]


@dataclass
class _Fitted:
    """The models the replay publishes (and compares what was served with)."""

    components: list[ItemScorer]
    blend: Blend
    ranker: LearnedRanker | None

    @property
    def published(self) -> list[ItemScorer]:
        """In publish order: the components before the models that read them."""
        ranker = [self.ranker] if self.ranker is not None else []
        return [*self.components, self.blend, *ranker]


def _fit(
    models: ServedModels, dataset: str, train: InteractionLog, test: InteractionLog
) -> _Fitted:
    """As `bench.served_quality` fits them: each component with the blend's parameters
    (every component the blend names, a zero weight included: the ranker reads them all),
    the blend, and the ranker as the harness fits it (`fit_for`)."""
    blend = Blend(**models.blend).fit(train)
    parts: dict[str, dict[str, Any]] = dict(blend.params()["components"])
    ranker: LearnedRanker | None = None
    if models.ranker is not None:
        ranker_params: dict[str, Any] = {
            "dataset": dataset,
            "components": parts,
            "blend_weights": blend.weights,
            **models.ranker,
        }
        ranker = LearnedRanker(**ranker_params)
        fit_for(ranker, train, test)
        # serving runs the published components: the ones the ranker was fitted with
        parts = {**parts, **ranker.params()["components"]}
    components = [COMPONENTS[name](**params).fit(train) for name, params in parts.items()]
    return _Fitted(components, blend, ranker)


def _close(served: float, offline: float) -> bool:
    if math.isnan(served) or math.isnan(offline):
        return math.isnan(served) and math.isnan(offline)
    return abs(served - offline) <= FEATURE_TOLERANCE * max(1.0, abs(offline))


def _compare(
    probe: Probe, debug: Mapping[str, Any], ranker: LearnedRanker | None, query: Query
) -> None:
    """Fold one debug answer into ``probe``: its scorer and sources, and with a learned
    ranker each served candidate's features against the offline feature matrix of
    ``query`` (`LearnedRanker.features`: the same components, history and time)."""
    probe.queries += 1
    probe.scorers.append(str(debug.get("scorer", "")))
    for source, info in (debug.get("sources") or {}).items():
        origin = str(info.get("origin", ""))
        counts = probe.origins.setdefault(source, {})
        counts[origin] = counts.get(origin, 0) + 1
    if ranker is None or ranker.scorer != "lightgbm":
        return
    pool, matrix = ranker.features(query)
    row_of = {item: r for r, item in enumerate(pool.ids)}
    names = ranker.spec.names
    for candidate in debug.get("candidates", []):
        row = row_of.get(str(candidate["item_id"]))
        if row is None:
            probe.only_served += 1
            continue
        probe.compared += 1
        features: Mapping[str, float] = candidate.get("features", {})
        for j, name in enumerate(names):
            served, offline = float(features.get(name, math.nan)), float(matrix[row, j])
            if not _close(served, offline):
                probe.add(name, served, offline)


async def run_online(
    settings: Settings,
    dataset: str,
    train_path: Path,
    test_path: Path | None = None,
    *,
    api: str | None = None,
    sessions: int | None = None,
    models: ServedModels | None = None,
    probes: int = PROBES,
) -> OnlineReport:
    """``sessions``: how many test sessions (YooChoose) or test users (Taobao) to replay;
    ``models``: what to publish and serve (default: the default blend); ``probes``: how
    many targets, spread over the replay, are asked again with ``debug=true``."""
    models = models or ServedModels({})
    # Taobao's event types weigh as `recstream evaluate` weighs them (the tuned parameters
    # were chosen on that log), and as the agents and serving weigh the live events
    weights = settings.event_weights if dataset == "taobao" else None
    protocol, train, test = load_split(dataset, train_path, test_path, weights=weights)
    if isinstance(protocol, SessionNextClick):
        replayed, sequences = test, _session_sequences(train, test)
    elif isinstance(protocol, NextView):
        replayed = train.join(test)
        sequences = _next_view_targets(protocol, replayed, len(train))
    else:
        raise ConfigurationError(
            f"--online replays the session (yoochoose) and next-view (taobao) protocols, "
            f"not {protocol.name!r} ({dataset}): its history is not what the API sees"
        )
    sequences = sequences[:sessions]
    fitted = _fit(models, dataset, train, test)
    total = sum(q is not None for s in sequences for q in s.targets)
    every = max(1, math.ceil(total / probes)) if probes > 0 else 0

    async with httpx.AsyncClient(base_url=api or settings.api_url, timeout=60) as client:
        replay = _Replay(settings, api or settings.api_url, client)
        try:
            catalog = _catalog(train)
            if catalog:
                await replay.upsert_items(catalog)
            order = np.lexsort((train.row, train.timestamps))
            events = _events(train, order.tolist(), "train")
            await replay.post(events)
            await replay.applied({e["user_id"]: e["event_id"] for e in events})

            run = RunInfo(
                data=DataRange(
                    source=str(train_path), start=train.start, end=train.end, rows=len(train)
                )
            )
            versions: dict[str, str] = {}
            async with open_registry(settings) as registry:
                for model in fitted.published:
                    versions[model.name] = (await registry.publish(model, run)).version
            learned = fitted.ranker is not None and fitted.ranker.scorer == "lightgbm"
            await replay.serving(
                events[-1]["user_id"],
                f"ranker@{versions['ranker']}" if learned else f"blend@{versions['blend']}",
            )

            ranks: list[int | None] = []
            queries: list[Query] = []
            degraded = 0
            degraded_by: dict[str, int] = {}
            probe = Probe()
            rows, targets = _in_time_order(replayed, sequences)
            posted = _events(replayed, rows, "test")
            for event, query in zip(posted, targets, strict=True):
                if query is not None:
                    actor = event["user_id"]
                    served, missed, _ = await replay.recommend(actor, query.now)
                    degraded += bool(missed)
                    for name in missed:
                        degraded_by[name] = degraded_by.get(name, 0) + 1
                    target = event["item_id"]
                    ranks.append(served.index(target) + 1 if target in served else None)
                    queries.append(query)
                    if every and (len(ranks) - 1) % every == 0 and probe.queries < probes:
                        _, _, debug = await replay.recommend(actor, query.now, debug=True)
                        _compare(probe, debug or {}, fitted.ranker, query)
                await replay.post([event])
                await replay.applied({event["user_id"]: event["event_id"]})
        finally:
            await replay.aclose()
    offline_blend = evaluate_model(fitted.blend, queries)
    offline = offline_blend if fitted.ranker is None else evaluate_model(fitted.ranker, queries)
    return OnlineReport(
        dataset=dataset,
        sessions=len(sequences),
        targets=len(ranks),
        scorer=models.scorer,
        served={**metrics_from_ranks(ranks), "targets": float(len(ranks))},
        offline=offline,
        offline_blend=offline_blend,
        degraded=degraded,
        degraded_by=degraded_by,
        params={
            "blend": fitted.blend.params(),
            "ranker": fitted.ranker.params() if fitted.ranker is not None else None,
        },
        versions=versions,
        ranker_choice=fitted.ranker.scorer if fitted.ranker is not None else None,
        probe=probe,
    )


def report_table(report: OnlineReport) -> Any:
    """The served and offline metrics side by side (a rich Table)."""
    from rich.table import Table

    served = "ranker" if report.scorer == "ranker" else "blend"
    if report.ranker_choice == "blend":
        served = "ranker (its validation chose the blend)"
    table = Table(
        title=f"{report.dataset}: served ({served}) vs offline on the same "
        f"{report.targets:,} targets ({report.sessions:,} sessions or users)",
        title_justify="left",
    )
    table.add_column("")
    for name in ("HR@10", "NDCG@10", "HR@20", "MRR@20"):
        table.add_column(name, justify="right")
    rows = [("served (API)", report.served), (f"offline {report.scorer}", report.offline)]
    if report.scorer != "blend":
        rows.append(("offline blend", report.offline_blend))
    for label, metrics in rows:
        table.add_row(
            label, *(f"{metrics[k]:.4f}" for k in ("hr@10", "ndcg@10", "hr@20", "mrr@20"))
        )
    return table


def print_report(report: OnlineReport, console: Any) -> None:
    """The table, the degraded answers and what the probes found (a rich Console)."""
    console.print(report_table(report))
    named = ", ".join(f"{k} {v}" for k, v in sorted(report.degraded_by.items()))
    console.print(f"degraded responses: {report.degraded}" + (f" ({named})" if named else ""))
    probe = report.probe
    if probe.queries:
        console.print(
            f"probes: {probe.queries} targets asked with debug=true, served by "
            f"{', '.join(sorted(set(probe.scorers)))}; {probe.compared:,} candidates compared "
            "with the offline ranker's features"
        )
        for source, origins in sorted(probe.origins.items()):
            console.print(f"  {source}: " + ", ".join(f"{o} {n}" for o, n in origins.items()))
        for name, gap in sorted(probe.mismatches.items(), key=lambda kv: -kv[1]["pairs"]):
            line = (
                f"  {name}: {int(gap['pairs'])} differ ({int(gap['missing_served'])} missing "
                f"served, {int(gap['missing_offline'])} missing offline)"
            )
            if "served" in gap:
                line += (
                    f", max |served - offline| {gap['max_abs']:.6g} ({gap['served']:.6g} vs "
                    f"{gap['offline']:.6g})"
                )
            console.print(line)


def cmd_evaluate_online(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console

    console = Console()
    models = served_models(args.params, args.scorer, args.dataset)
    with console.status(f"replaying through the API ({models.scorer})"):
        report = asyncio.run(
            run_online(
                settings,
                args.dataset,
                args.train,
                args.test,
                api=args.api,
                sessions=args.sessions,
                models=models,
                probes=args.probes,
            )
        )
    print_report(report, console)
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
        console.print(f"wrote {args.json}")
    return 0
