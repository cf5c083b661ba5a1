"""The learned ranker's features and its request-time model: one definition for both sides.

Training (training/models/ranker.py) builds the feature matrix of each offline query with
`feature_matrix`, fits LightGBM's lambdarank on it and publishes the booster; serving
(serving/pipeline/features.py and rank.py) builds the matrix of each request with the same
function and scores it with `RankingModel`. Neither side has a copy of the formulas, so the
fitted model sees exactly the features serving computes (tests/training/test_ranker.py
checks it on the same history). It lives in recstream/ because serving must not import
training.

Features of a candidate, in `FeatureSpec.names` order (NaN = missing: LightGBM routes a
missing value down the branch it learnt for "this source did not propose the item"):

- per candidate source ``s`` of the model: ``score:{s}`` (the source's raw score),
  ``norm:{s}`` (score / the request's largest ``|score|`` of that source, as the linear
  blend scales it), ``rank:{s}`` (1 = the source's best, ties by item id);
- ``n_sources``: how many sources proposed the item;
- the user's own events with the item, from the newest ``history_cap`` events (serving's
  window; offline, the query's history cut the same way): ``u:count``, ``u:weight`` (Σ
  event weights), ``u:position`` (0 = the newest event), ``u:age_s`` (seconds since the
  newest one), ``u:last`` (1 when it *is* the newest event), ``u:n:{type}`` per event type,
  ``u:session`` (events in the current session, cut at 30 minutes of inactivity);
- ``u:history``: the per-user history score, Σ weight(type)·0.8^position over the item's
  events, times 0.01 when the item is the very last one (a log that never repeats an item
  twice in a row, Taobao's, makes the last item the one the next view is not), and
  ``u:recency``: Σ weight(type)·2^(-age/1 h);
- the request's history: ``h:length``, ``h:age_s`` (seconds since its newest event),
  ``h:session`` (events in the current session).

The request context (``ctx:hour``, ``ctx:device:*``) is shown in serving's debug view but
is not a model feature: offline logs carry no device, and a replay's hour is not a live
request's.

`RankingModel` scores with LightGBM's ``pred_leaf`` (the tree traversal in C) and sums the
leaves' values in numpy; the same leaf indices give each candidate's per-source
contributions (Saabas' path attribution, XGBoost's ``approx_contribs``): along each tree's
path, the change in the node value at a split is credited to the split feature's source.
That costs one gather per tree, where exact TreeSHAP (``pred_contrib``) costs ~1 ms a row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from scipy import sparse

__all__ = [
    "EVENT_TYPES",
    "SOURCES",
    "FeatureSpec",
    "History",
    "HistoryEvent",
    "RankingModel",
    "feature_matrix",
    "lgb_name",
    "source_ranks",
]

Float64Array = npt.NDArray[np.float64]

SOURCES = (
    "recently_viewed",
    "item2item",
    "sknn",
    "als",
    "popularity",
    "trending",
    "category_popularity",
)
"""Every candidate source serving runs (serving/pipeline/candidates.py), in order."""
EVENT_TYPES = ("view", "click", "like", "add_to_cart", "purchase")
"""Event types with their own ``u:n:{type}`` counter; the others count in ``u:n:other``."""
HISTORY_DECAY = 0.8
LAST_WEIGHT = 0.01
RECENCY_HALF_LIFE_S = 3600.0
SESSION_GAP_S = 1800.0
"""The gap that ends a session: training's default (``InteractionLog`` loaders)."""

_ITEM_FEATURES = (
    "u:count",
    "u:weight",
    "u:position",
    "u:age_s",
    "u:last",
    *(f"u:n:{t}" for t in EVENT_TYPES),
    "u:n:other",
    "u:session",
    "u:history",
    "u:recency",
)
_REQUEST_FEATURES = ("h:length", "h:age_s", "h:session")


class HistoryEvent(Protocol):
    """One event of a user's history (`recstream.windows.WindowEntry` is one)."""

    @property
    def item_id(self) -> str: ...
    @property
    def event_type(self) -> str: ...
    @property
    def timestamp(self) -> float: ...


@dataclass(frozen=True, slots=True)
class History:
    """A user's recent events, newest first (the order of serving's window)."""

    items: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    times: Float64Array = field(default_factory=lambda: np.zeros(0))
    weights: Float64Array = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def of(
        cls, events: Iterable[HistoryEvent], weight: Callable[[str], float], cap: int
    ) -> History:
        """The newest ``cap`` of ``events`` (given newest first)."""
        kept = list(events)[: max(cap, 0)]
        return cls(
            tuple(e.item_id for e in kept),
            tuple(e.event_type for e in kept),
            np.array([e.timestamp for e in kept], dtype=np.float64),
            np.array([weight(e.event_type) for e in kept], dtype=np.float64),
        )

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """Which sources a model was fitted on and how much history it reads; published in
    the ranker's ``params`` so serving builds the same columns."""

    sources: tuple[str, ...]
    history_cap: int = 50

    def __post_init__(self) -> None:
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown:
            raise ValueError(f"unknown ranker sources {unknown}; use some of {list(SOURCES)}")

    @property
    def names(self) -> tuple[str, ...]:
        per_source = tuple(
            f"{kind}:{s}" for s in self.sources for kind in ("score", "norm", "rank")
        )
        return (*per_source, "n_sources", *_ITEM_FEATURES, *_REQUEST_FEATURES)

    @property
    def groups(self) -> tuple[str | None, ...]:
        """The source each feature's contribution is credited to: its own source, the
        user's history (``u:*``) to ``recently_viewed``; request-wide features to None
        (they move every candidate alike and explain no single item)."""
        out: list[str | None] = []
        for name in self.names:
            if name.startswith(("score:", "norm:", "rank:")):
                out.append(name.split(":", 1)[1])
            elif name.startswith("u:"):
                out.append("recently_viewed")
            else:
                out.append(None)
        return tuple(out)


def source_ranks(item_ids: Sequence[str], scores: Float64Array) -> Float64Array:
    """1-based rank of each item among those the source scored (NaN: not scored), best
    first, ties by item id: the order every source lists its candidates in."""
    ranks = np.full(len(item_ids), np.nan)
    present = np.flatnonzero(~np.isnan(scores))
    if present.size:
        ids: npt.NDArray[np.str_] = np.array([item_ids[int(i)] for i in present], dtype=np.str_)
        order = np.lexsort((ids, -scores[present]))
        ranks[present[order]] = np.arange(1, present.size + 1, dtype=np.float64)
    return ranks


def _current_session(times: Float64Array) -> int:
    """How many of the newest events (``times`` newest first) are in the current session."""
    if times.size == 0:
        return 0
    gaps = np.flatnonzero((times[:-1] - times[1:]) > SESSION_GAP_S)
    return int(gaps[0]) + 1 if gaps.size else int(times.size)


def feature_matrix(
    spec: FeatureSpec,
    item_ids: Sequence[str],
    scores: Mapping[str, Float64Array],
    history: History,
    now: float,
) -> Float64Array:
    """The features of ``item_ids`` (rows) in ``spec.names`` order (columns).

    ``scores[s]`` holds source ``s``'s raw score of each item, NaN where it did not propose
    it; a source of ``spec`` missing from ``scores`` proposed nothing. ``history`` is cut to
    ``spec.history_cap`` here, whatever the caller passed."""
    n = len(item_ids)
    width = 3 * len(spec.sources)
    out = np.full((n, len(spec.names)), np.nan)
    proposed = np.zeros(n)
    for k, source in enumerate(spec.sources):
        raw = scores.get(source)
        if raw is None:
            continue
        raw = np.asarray(raw, dtype=np.float64)
        present = ~np.isnan(raw)
        if not present.any():
            continue
        scale = float(np.abs(raw[present]).max()) or 1.0
        out[:, 3 * k] = raw
        out[:, 3 * k + 1] = raw / scale
        out[:, 3 * k + 2] = source_ranks(item_ids, raw)
        proposed += present
    out[:, width] = proposed

    cap = max(spec.history_cap, 0)
    items, types = history.items[:cap], history.types[:cap]
    times, weights = history.times[:cap], history.weights[:cap]
    session = _current_session(times)
    item_cols = width + 1
    request_cols = item_cols + len(_ITEM_FEATURES)
    out[:, request_cols] = len(items)
    out[:, request_cols + 1] = now - times[0] if len(items) else np.nan
    out[:, request_cols + 2] = session
    # the user's own events, per item: a loop over at most `cap` events
    per_item: dict[str, list[float]] = {}
    for position, item in enumerate(items):
        stats = per_item.get(item)
        if stats is None:
            stats = [0.0] * len(_ITEM_FEATURES)
            stats[2] = float(position)
            stats[3] = max(0.0, now - float(times[position]))
            stats[4] = 1.0 if position == 0 else 0.0
            per_item[item] = stats
        w = float(weights[position])
        kind = types[position]
        stats[0] += 1.0
        stats[1] += w
        stats[5 + (EVENT_TYPES.index(kind) if kind in EVENT_TYPES else len(EVENT_TYPES))] += 1.0
        if position < session:
            stats[-3] += 1.0
        stats[-2] += w * HISTORY_DECAY**position
        stats[-1] += w * math.pow(
            2.0, -max(0.0, now - float(times[position])) / RECENCY_HALF_LIFE_S
        )
    if items:
        per_item[items[0]][-2] *= LAST_WEIGHT  # the very last item, demoted
    zeros = [0.0, 0.0, math.nan, math.nan, 0.0] + [0.0] * (len(_ITEM_FEATURES) - 5)
    block = np.array([per_item.get(item, zeros) for item in item_ids], dtype=np.float64).reshape(
        n, len(_ITEM_FEATURES)
    )
    out[:, item_cols:request_cols] = block
    return out


class RankingModel:
    """A fitted LightGBM booster with its `FeatureSpec`, ready to score requests.

    Built once per published version (serving's model cache decodes it in a thread):
    the booster's text, and per tree the leaves' values and each leaf's path attribution
    per source (``contributions``)."""

    def __init__(self, spec: FeatureSpec, booster_text: str) -> None:
        import lightgbm

        self.spec = spec
        self.text = booster_text
        self.booster = lightgbm.Booster(model_str=booster_text)
        names = list(self.booster.feature_name())
        if names != [lgb_name(n) for n in spec.names]:
            raise ValueError(
                "the booster's features do not match its published feature spec; "
                "republish the ranker from this code version"
            )
        self.sources = tuple(dict.fromkeys(g for g in spec.groups if g is not None))
        group_index = {s: i for i, s in enumerate(self.sources)}
        # the last column collects the request-wide features (no source of their own)
        feature_group = [
            group_index[g] if g is not None else len(self.sources) for g in spec.groups
        ]
        trees = self.booster.dump_model()["tree_info"]
        leaves = max(int(t["num_leaves"]) for t in trees) if trees else 1
        self.leaf_values = np.zeros((len(trees), leaves))
        self.leaf_parts = np.zeros((len(trees), leaves, len(self.sources) + 1))
        self.base = 0.0
        for t, tree in enumerate(trees):
            root = tree["tree_structure"]
            root_value = float(root.get("internal_value", root.get("leaf_value", 0.0)))
            self.base += root_value
            self._walk(t, root, root_value, np.zeros(len(self.sources) + 1), feature_group)
        # one row per (tree, leaf): a request's leaves select rows by a sparse product
        self._offsets = np.arange(len(trees), dtype=np.intp) * leaves
        self._flat_values = self.leaf_values.ravel()
        self._flat_parts = self.leaf_parts.reshape(len(trees) * leaves, -1)

    def _walk(
        self,
        t: int,
        node: Mapping[str, Any],
        value: float,
        parts: Float64Array,
        feature_group: Sequence[int],
    ) -> None:
        if "leaf_index" in node or "split_index" not in node:
            leaf = int(node.get("leaf_index", 0))
            self.leaf_values[t, leaf] = float(node.get("leaf_value", value))
            self.leaf_parts[t, leaf] = parts
            return
        group = feature_group[int(node["split_feature"])]
        for child in (node["left_child"], node["right_child"]):
            child_value = float(child.get("internal_value", child.get("leaf_value", 0.0)))
            child_parts = parts.copy()
            child_parts[group] += child_value - value
            self._walk(t, child, child_value, child_parts, feature_group)

    def predict(self, matrix: Float64Array) -> tuple[Float64Array, Float64Array]:
        """(score per row, contributions per row: one column per source of
        ``self.sources``, then one for the request-wide features). Per row,
        ``score = base + Σ contributions``."""
        if matrix.shape[0] == 0:
            return np.zeros(0), np.zeros((0, len(self.sources) + 1))
        leaf = np.asarray(
            self.booster.predict(matrix, pred_leaf=True, num_threads=1), dtype=np.intp
        ).reshape(matrix.shape[0], -1)
        n, trees = leaf.shape
        chosen = sparse.csr_matrix(
            (
                np.ones(n * trees),
                (leaf + self._offsets).ravel(),
                np.arange(0, n * trees + 1, trees),
            ),
            shape=(n, self._flat_values.size),
        )
        return np.asarray(chosen @ self._flat_values), np.asarray(chosen @ self._flat_parts)


def lgb_name(name: str) -> str:
    """A feature's name as LightGBM stores it: LightGBM refuses JSON's special characters
    (``:`` among them) in feature names, so ``score:sknn`` is ``score__sknn`` there."""
    return name.replace(":", "__")
