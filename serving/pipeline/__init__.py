"""The ranking pipeline, one module per stage (docs/serving.md).

state.py       the actor's live state in one Redis round trip (+ DynamoDB fallback)
memo.py        the answer cache: an unchanged request's answer served again
candidates.py  every published and live source, bounded and time-boxed
features.py    per-candidate features
rank.py        the `Scorer` protocol and the default linear blend
seen.py        keep | demote | exclude what the user already interacted with
diversity.py   category cap, MMR (off by default)
explain.py     reasons and the debug view
log.py         what was served, for attribution
ranker.py      the stages in order, inside the request's deadline
"""

from __future__ import annotations

from serving.pipeline.ranker import Ranker
from serving.pipeline.result import Recommendation, Recommendations
from serving.pipeline.types import Candidate, CandidateFilter, ItemCatalog, RankContext, Scorer

__all__ = [
    "Candidate",
    "CandidateFilter",
    "ItemCatalog",
    "RankContext",
    "Ranker",
    "Recommendation",
    "Recommendations",
    "Scorer",
]
