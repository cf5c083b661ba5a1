"""The learned ranker's CPU per request: features and scoring of N candidates.

    python -m bench.ranker_speed [--candidates 300] [--trees 30] [--leaves 15] [--runs 200]

A lambdarank booster of the published shape (``trees`` x ``leaves``, LightGBM's own
training on random features) scores requests of ``candidates`` items from the seven
sources with a 50-event history. Printed, the minimum, p50 and p99 over ``runs`` requests
after a warm-up, in milliseconds (on a shared machine the minimum is the CPU cost, the
percentiles add the neighbours' load): the feature matrix (`recstream.ranking.feature_matrix`), the
serving stage that also fills each candidate's debug features (`features.assemble`), the
scoring with contributions (`LearnedRanker.score`: LightGBM ``pred_leaf`` plus the leaf
gathers), and as the reference LightGBM's plain ``predict`` and exact TreeSHAP
(``pred_contrib``) on the same matrix, measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from recstream.ranking import SOURCES, FeatureSpec, History, RankingModel, feature_matrix, lgb_name
from recstream.windows import WindowEntry
from serving.pipeline.features import assemble
from serving.pipeline.rank import LearnedRanker
from serving.pipeline.types import Candidate, RankContext


def _timed(call: Callable[[], object], runs: int) -> tuple[float, float, float]:
    for _ in range(5):
        call()
    took = []
    for _ in range(runs):
        began = time.perf_counter()
        call()
        took.append(time.perf_counter() - began)
    ms = np.array(took) * 1000
    return float(ms.min()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    import lightgbm

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--candidates", type=int, default=300)
    parser.add_argument("--trees", type=int, default=30)
    parser.add_argument("--leaves", type=int, default=15)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    spec = FeatureSpec(SOURCES, 50)
    now = 1_700_000_000.0
    n = args.candidates
    ids = [f"i{k}" for k in range(n)]
    window = [
        WindowEntry(f"i{int(k)}", "view", now - 60.0 * j, f"e{j}")
        for j, k in enumerate(rng.integers(0, n, 50))
    ]
    history = History.of(window, lambda t: 1.0, spec.history_cap)
    scores = {}
    for source in SOURCES:
        column = rng.random(n)
        column[rng.random(n) < 0.6] = np.nan
        scores[source] = column
    matrix = feature_matrix(spec, ids, scores, history, now)
    # a booster of the published shape, trained on random relevance
    queries = 200
    x = np.vstack([feature_matrix(spec, ids, scores, history, now)] * queries)
    x = x + rng.normal(0, 0.1, x.shape)
    y = (rng.random(x.shape[0]) < 1 / n).astype(float)
    booster = lightgbm.train(
        {
            "objective": "lambdarank",
            "num_leaves": args.leaves,
            "min_data_in_leaf": 20,
            "verbose": -1,
            "num_threads": 1,
        },
        lightgbm.Dataset(x, y, group=[n] * queries, feature_name=[lgb_name(f) for f in spec.names]),
        num_boost_round=args.trees,
    )
    model = RankingModel(spec, booster.model_to_string())

    def candidates() -> list[Candidate]:
        out = [Candidate(i) for i in ids]
        for source, column in scores.items():
            for c, v in zip(out, column, strict=True):
                if not np.isnan(v):
                    c.sources[source] = float(v)
        return out

    pool = candidates()
    rows = [
        ("feature_matrix", lambda: feature_matrix(spec, ids, scores, history, now)),
        (
            "assemble (no debug: matrix + seen)",
            lambda: assemble(pool, window, RankContext(), lambda t: 1.0, now, spec, describe=False),
        ),
        (
            "assemble (debug: + per-candidate dicts)",
            lambda: assemble(pool, window, RankContext(), lambda t: 1.0, now, spec),
        ),
        (
            "LearnedRanker.score (+ contributions)",
            lambda: LearnedRanker(model, matrix).score(pool, {}),
        ),
        ("reference: booster.predict", lambda: booster.predict(matrix, num_threads=1)),
        (
            "reference: booster.predict(pred_contrib)",
            lambda: booster.predict(matrix, pred_contrib=True, num_threads=1),
        ),
    ]
    print(f"{n} candidates, {len(spec.names)} features, {args.trees} trees x {args.leaves} leaves")
    print(f"{'step':<42} {'min ms':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, call in rows:
        runs = args.runs if "pred_contrib" not in name else max(5, args.runs // 20)
        low, p50, p99 = _timed(call, runs)
        print(f"{name:<42} {low:>8.3f} {p50:>8.3f} {p99:>8.3f}")


if __name__ == "__main__":
    main()
