"""Stage 4: one score per candidate. `LinearBlend` is the default `Scorer`.

    score(i) = Σ_c w_c · s_c(i) / max_j |s_c(j)|

over the sources c, the maximum taken over this request's candidates of c; a source that
did not propose or score i adds 0. This is training's `Blend` (training/models/blend.py)
term for term: each source's top candidate is in its list, so the per-request maximum is
the one the offline blend divides by, and with the published ``blend`` ``weights`` the
served order matches the offline blend's on the same history.

Without a published blend, `DEFAULT_WEIGHTS` apply: training's defaults
(recently_viewed 1, item2item 1, sknn 1, als 0.5, popularity 0.1) plus small weights for
the sources training's default blend leaves out (trending 0.05, category_popularity 0.05),
so a fresh install still shows what is trending and popular in the user's categories.

`LearnedRanker` is the other `Scorer`: the published ``ranker`` model (LightGBM
lambdarank, training/models/ranker.py) over the request's feature matrix, which the
features stage built with the shared definition (`recstream.ranking`). Its contributions
are per source: Saabas' path attribution summed per source (``u:*`` history features count
for ``recently_viewed``), kept for the sources that proposed the item (and for
``recently_viewed`` when the user has seen it). Scoring 300 candidates with the 30-tree
booster, contributions included, costs ~0.6 ms of one core (docs/serving.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from recstream.ranking import Float64Array, RankingModel
from serving.pipeline.types import Candidate

__all__ = ["DEFAULT_WEIGHTS", "LearnedRanker", "LinearBlend"]

DEFAULT_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {
        "recently_viewed": 1.0,
        "item2item": 1.0,
        "sknn": 1.0,
        "als": 0.5,
        "popularity": 0.1,
        "trending": 0.05,
        "category_popularity": 0.05,
    }
)


class LinearBlend:
    """Training's blend formula over the request's candidates."""

    name = "blend"

    def score(self, candidates: Sequence[Candidate], weights: Mapping[str, float]) -> None:
        scale: dict[str, float] = {}
        for candidate in candidates:
            for source, value in candidate.sources.items():
                scale[source] = max(scale.get(source, 0.0), abs(value))
        # (weight, divisor) of each weighted source; each part is `weight * value / scale`,
        # the very expression (and order of sums) of the shortlist and the offline blend,
        # so equal inputs give equal floats
        terms = {s: (w, scale[s] or 1.0) for s, w in weights.items() if w != 0 and s in scale}
        term = terms.get
        for candidate in candidates:
            contributions: dict[str, float] = {}
            total = 0.0
            for s, v in candidate.sources.items():
                found = term(s)
                if found is not None:
                    part = contributions[s] = found[0] * v / found[1]
                    total += part  # left to right, as the shortlist sums (not sum())
            candidate.score = total
            candidate.contributions = contributions


class LearnedRanker:
    """The published lambdarank model over one request's feature matrix (rows in the
    candidates' order, columns ``model.spec.names``); made per request, it is cheap."""

    name = "ranker"

    def __init__(self, model: RankingModel, matrix: Float64Array) -> None:
        self.model = model
        self.matrix = matrix

    def score(self, candidates: Sequence[Candidate], weights: Mapping[str, float]) -> None:
        if len(candidates) != self.matrix.shape[0]:
            raise ValueError(
                f"the feature matrix has {self.matrix.shape[0]} rows for {len(candidates)} "
                "candidates; build it with serving.pipeline.features.assemble on the same list"
            )
        scores, parts = self.model.predict(self.matrix)
        column = {source: j for j, source in enumerate(self.model.sources)}
        history = column.get("recently_viewed")
        for candidate, score, credited in zip(
            candidates, scores.tolist(), parts.tolist(), strict=True
        ):
            candidate.score = score
            contributions = {s: credited[column[s]] for s in candidate.sources if s in column}
            if history is not None and candidate.seen:
                contributions["recently_viewed"] = credited[history]
            candidate.contributions = contributions
