"""The learned ranker: LightGBM lambdarank over the candidate sources' scores and the
user's own history, with the features serving computes (`recstream.ranking`).

Why LightGBM: a well-kept library (Microsoft, MIT licence, wheels for every platform),
lambdarank is its own objective (metarank's LambdaMART is the same model), missing values
are first-class (a source that did not propose an item is "missing", not 0), and a booster
is a text file any version of the library reads back.

Fitting never sees the part it is evaluated on. On the log it is given, it:

1. splits off a later part: YooChoose the sessions of the last ``holdout`` (40%) of the
   time range (the protocol's own 15% leaves ~1,000 queries to learn from), any other
   dataset its protocol's validation split (Taobao: the last day, or the last half);
2. fits the components (the candidate sources) on the earlier part and asks the protocol's
   queries of the validation part: per query, each source's top ``candidates`` items (as
   serving's ``candidates_per_source``) are the candidates, the query's target the one
   positive, and `recstream.ranking.feature_matrix` the features;
3. compares lambdarank with the linear blend of the same candidates (``blend_weights``,
   the tuned blend's) by ``folds``-fold cross-validation over those queries (contiguous
   blocks in time order): unless the out-of-fold NDCG@10 wins by ``min_gain`` the version
   publishes ``scorer: blend`` and serving keeps the linear blend; else the published
   booster is trained on every query;
4. refits the components on the whole log, as the published components are.

Redis records: ``params`` (the hyper-parameters plus ``scorer``, ``sources``,
``history_cap`` and ``features``) and, for ``scorer: lightgbm``, ``booster`` (STRING: the
model text). The components are not duplicated: serving runs their own published models.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
import orjson

from recstream.errors import ConfigurationError
from recstream.ranking import SOURCES, FeatureSpec, History, RankingModel, feature_matrix, lgb_name
from recstream.scoring import top_k
from training.base import RedisRecord
from training.data import FloatArray, IntArray, InteractionLog
from training.models.blend import COMPONENTS, DEFAULT_WEIGHTS
from training.models.common import ItemScorer

if TYPE_CHECKING:
    from training.evaluate import Query

__all__ = ["LearnedRanker", "Pool"]

logger = logging.getLogger(__name__)

BOOSTER_FILE = "booster.txt"
RECORD_FILE = "ranker.json"


class Pool:
    """One query's candidates: item codes, their ids and each source's raw scores (NaN
    where the source did not list the item among its top ``n``)."""

    __slots__ = ("codes", "ids", "scores")

    def __init__(self, codes: IntArray, ids: list[str], scores: dict[str, FloatArray]) -> None:
        self.codes = codes
        self.ids = ids
        self.scores = scores


class LearnedRanker(ItemScorer):
    """Lambdarank over the components' candidates; see the module docstring."""

    name: ClassVar[str] = "ranker"
    keeps_users = True

    def __init__(
        self,
        *,
        components: Mapping[str, Mapping[str, Any]] | None = None,
        dataset: str = "taobao",
        candidates: int = 200,
        history_cap: int = 50,
        holdout: float | None = 0.4,
        num_leaves: int = 15,
        trees: int = 30,
        learning_rate: float = 0.1,
        min_data_in_leaf: int = 100,
        feature_fraction: float = 0.7,
        max_queries: int = 20_000,
        folds: int = 4,
        blend_weights: Mapping[str, float] | None = None,
        min_gain: float = 0.0,
        seed: int = 0,
    ) -> None:
        components = {
            name: dict(params)
            for name, params in (
                components if components is not None else {name: {} for name in DEFAULT_WEIGHTS}
            ).items()
        }
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ConfigurationError(
                f"ranker components {sorted(unknown)} are unknown; use {sorted(COMPONENTS)}"
            )
        if not components:
            raise ConfigurationError("the ranker needs at least one component (a source)")
        weights = dict(blend_weights if blend_weights is not None else DEFAULT_WEIGHTS)
        super().__init__(
            components=components,
            dataset=dataset,
            candidates=candidates,
            history_cap=history_cap,
            holdout=holdout,
            num_leaves=num_leaves,
            trees=trees,
            learning_rate=learning_rate,
            min_data_in_leaf=min_data_in_leaf,
            feature_fraction=feature_fraction,
            max_queries=max_queries,
            folds=folds,
            blend_weights=weights,
            min_gain=min_gain,
            seed=seed,
        )
        self.dataset = dataset
        self.candidates = candidates
        self.blend_weights = weights
        self.min_gain = min_gain
        # serving runs sources in its own order; the features follow that order too
        self.spec = FeatureSpec(tuple(s for s in SOURCES if s in components), history_cap)
        self.models: dict[str, ItemScorer] = {
            name: COMPONENTS[name](**components[name]) for name in self.spec.sources
        }
        self.scorer = "lightgbm"
        self.ranking: RankingModel | None = None
        self.record: dict[str, Any] = {}

    # --- candidates and features (shared by fitting and scoring) ---------------------
    def pool(self, history: IntArray, *, user: int | None, now: float | None) -> Pool:
        """Each component's top ``candidates`` items and their raw scores, as serving's
        sources list them."""
        raw = {name: m.score_items(history, user=user, now=now) for name, m in self.models.items()}
        tops = [top_k(scores, self.candidates) for scores in raw.values()]
        codes = np.unique(np.concatenate(tops)) if tops else np.zeros(0, np.int64)
        scores: dict[str, FloatArray] = {}
        for (name, values), top in zip(raw.items(), tops, strict=True):
            column = np.full(codes.size, np.nan)
            column[np.searchsorted(codes, top)] = values[top]
            scores[name] = column
        return Pool(codes.astype(np.int64), [str(i) for i in self.item_ids[codes]], scores)

    def history_of(self, query: Query) -> History:
        """The query's history as serving's window holds it: newest first, with event
        types, times and weights (items only, as views at ``now``, when the query has no
        log rows)."""
        cap = self.spec.history_cap
        if query.log is None or query.rows is None:
            codes = query.history[::-1][:cap]
            n = len(codes)
            return History(
                tuple(str(i) for i in self.item_ids[codes]),
                ("view",) * n,
                np.full(n, query.now),
                np.ones(n),
            )
        rows = query.rows[::-1][:cap]
        source = query.log
        return History(
            tuple(str(i) for i in source.item_ids[source.items[rows]]),
            tuple(source.event_type_names[t] for t in source.event_types[rows]),
            source.timestamps[rows].astype(np.float64),
            source.weights[rows].astype(np.float64),
        )

    def features(self, query: Query) -> tuple[Pool, FloatArray]:
        pool = self.pool(query.history, user=query.user, now=query.now)
        matrix = feature_matrix(self.spec, pool.ids, pool.scores, self.history_of(query), query.now)
        return pool, matrix

    def blend_scores(self, pool: Pool) -> FloatArray:
        """The linear blend of the pool, as serving's `LinearBlend` computes it."""
        total = np.zeros(len(pool.ids))
        for name, column in pool.scores.items():
            weight = self.blend_weights.get(name, 0.0)
            present = ~np.isnan(column)
            if weight == 0 or not present.any():
                continue
            scale = float(np.abs(column[present]).max()) or 1.0
            total += np.where(present, weight * column / scale, 0.0)
        return total

    # --- fitting -----------------------------------------------------------------------
    def _fit(self, log: InteractionLog) -> None:
        # imported here: training.evaluate imports this package (a cycle at import time)
        from training.evaluate import SessionNextClick, fit_for, protocol_for

        protocol = protocol_for(self.dataset)
        holdout = self._params["holdout"]
        if isinstance(protocol, SessionNextClick) and holdout is not None:
            # the protocol's own validation part (15%) gives too few sessions to learn from
            fit_part, held = SessionNextClick(train_fraction=1.0 - holdout).split(log)
        else:
            fit_part, held = protocol.validation_split(log)
        if len(fit_part) == 0 or len(held) == 0:
            raise ConfigurationError(
                "the log is too small to split off the ranker's training queries; give it "
                "more data or serve the linear blend"
            )
        queries = sorted(protocol.queries(fit_part, held), key=lambda q: q.now)
        queries = queries[-int(self._params["max_queries"]) :]
        if len(queries) < 2:
            raise ConfigurationError(
                f"the ranker's validation part has {len(queries)} queries; it needs at least "
                "2 (give it more data)"
            )
        for model in self.models.values():
            fit_for(model, fit_part, held)
        built = [self.features(q) for q in queries]
        # Learned vs blend, on every query by a booster that did not train on it: ``folds``
        # contiguous blocks in time order (one held-out block of ~300 queries decided by
        # noise on YooChoose's slice). Then the published trees learn from every query.
        folds = max(2, min(int(self._params["folds"]), len(queries)))
        bounds = np.linspace(0, len(queries), folds + 1).round().astype(int)
        learned = blend = 0.0
        for start, end in itertools.pairwise(bounds.tolist()):
            rest = [*range(0, start), *range(end, len(queries))]
            fold = RankingModel(
                self.spec,
                self._train([queries[i] for i in rest], [built[i] for i in rest]),
            )
            block_q, block = queries[start:end], built[start:end]
            share = len(block_q) / len(queries)
            learned += share * self._ndcg(
                block_q, block, lambda p, m, fold=fold: fold.predict(m)[0]
            )
            blend += share * self._ndcg(block_q, block, lambda p, m: self.blend_scores(p))
        self.scorer = "lightgbm" if learned > blend + self.min_gain else "blend"
        if self.scorer == "lightgbm":
            self.ranking = RankingModel(self.spec, self._train(queries, built))
        self.record = {
            "validation": {"fit_rows": len(fit_part), "queries": len(queries), "folds": folds},
            "ndcg@10": {"lightgbm": learned, "blend": blend},
            "scorer": self.scorer,
        }
        logger.info("ranker: %s", self.record)
        # the published model scores with components that saw the whole log
        for model in self.models.values():
            model.fit(log)

    def _train(self, queries: Sequence[Query], built: Sequence[tuple[Pool, FloatArray]]) -> str:
        """A fixed number of trees (``trees``): on the small validation parts of the
        development slices early stopping chose from noise (8 trees on 199 queries)."""
        import lightgbm

        xs, ys, groups = [], [], []
        for query, (pool, matrix) in zip(queries, built, strict=True):
            label = (pool.codes == query.target).astype(np.float64)
            if not label.any() or len(label) < 2:
                continue  # no positive among the candidates: nothing to learn from
            xs.append(matrix)
            ys.append(label)
            groups.append(len(label))
        if not xs:
            raise ConfigurationError(
                "no ranker training query has its target among the candidates; the "
                "components propose nothing useful on this data (serve the linear blend)"
            )
        names = [lgb_name(n) for n in self.spec.names]
        data = lightgbm.Dataset(np.vstack(xs), np.concatenate(ys), group=groups, feature_name=names)
        params: dict[str, Any] = {
            "objective": "lambdarank",
            "num_leaves": self._params["num_leaves"],
            "learning_rate": self._params["learning_rate"],
            "min_data_in_leaf": self._params["min_data_in_leaf"],
            "feature_fraction": self._params["feature_fraction"],
            "num_threads": 1,
            "deterministic": True,
            "force_row_wise": True,
            "seed": self._params["seed"],
            "verbose": -1,
        }
        booster = lightgbm.train(params, data, num_boost_round=int(self._params["trees"]))
        return str(booster.model_to_string())

    @staticmethod
    def _ndcg(
        queries: Sequence[Query],
        built: Sequence[tuple[Pool, FloatArray]],
        score: Any,
    ) -> float:
        total = 0.0
        for query, (pool, matrix) in zip(queries, built, strict=True):
            hit = np.flatnonzero(pool.codes == query.target)
            if hit.size == 0:
                continue
            values = score(pool, matrix)
            target = values[hit[0]]
            # ties broken by item code, as the harness does
            rank = (
                1
                + int(np.count_nonzero(values > target))
                + int(np.count_nonzero((values == target) & (pool.codes < query.target)))
            )
            if rank <= 10:
                total += 1.0 / math.log2(rank + 1)
        return total / max(len(queries), 1)

    # --- scoring -----------------------------------------------------------------------
    def ranking_scores(self, matrix: FloatArray) -> FloatArray:
        if self.ranking is None:
            raise ConfigurationError(f"{self.name}: the booster is missing; fit or load it")
        return self.ranking.predict(matrix)[0]

    def _scores(self, pool: Pool, matrix: FloatArray) -> FloatArray:
        out = np.full(self.n_items, -np.inf)
        if not pool.ids:
            return out
        if self.scorer == "lightgbm":
            out[pool.codes] = self.ranking_scores(matrix)
        else:
            out[pool.codes] = self.blend_scores(pool)
        return out

    def score_query(self, query: Query) -> FloatArray:
        self._check_fitted()
        pool, matrix = self.features(query)
        return self._scores(pool, matrix)

    def score_items(
        self, history: IntArray, *, user: int | None = None, now: float | None = None
    ) -> FloatArray:
        from training.evaluate import Query

        self._check_fitted()
        when = now if now is not None else 0.0
        return self.score_query(Query(history, -1, user, when))

    # --- publishing and files --------------------------------------------------------------
    def params_record(self) -> RedisRecord:
        extra = {
            "scorer": self.scorer,
            "sources": list(self.spec.sources),
            "features": list(self.spec.names),
        }
        return RedisRecord(
            "params",
            "hash",
            {k: orjson.dumps(v) for k, v in {**self.params(), **extra, "model": self.name}.items()},
        )

    def redis_records(self) -> Iterator[RedisRecord]:
        yield self.params_record()
        if self.scorer == "lightgbm" and self.ranking is not None:
            yield RedisRecord("booster", "string", self.ranking.text.encode())

    def save(self, directory: Path) -> None:
        super().save(directory)
        (directory / RECORD_FILE).write_text(
            json.dumps({**self.record, "scorer": self.scorer}, indent=2)
        )
        if self.ranking is not None:
            (directory / BOOSTER_FILE).write_text(self.ranking.text)
        for name, model in self.models.items():
            model.save(directory / name)

    @classmethod
    def load(cls, directory: Path) -> Self:
        ranker = super().load(directory)
        ranker.record = json.loads((directory / RECORD_FILE).read_text())
        ranker.scorer = str(ranker.record.get("scorer", "lightgbm"))
        booster = directory / BOOSTER_FILE
        if booster.exists():
            ranker.ranking = RankingModel(ranker.spec, booster.read_text())
        ranker.models = {
            name: COMPONENTS[name].load(directory / name) for name in ranker.spec.sources
        }
        return ranker
