"""What every model here shares: dense item scoring, deterministic top-k, save/load.

Each model scores *every* item of the vocabulary it was fitted on for one request
(`ItemScorer.score_items`): a float64 vector with ``-inf`` for items the model would not
recommend at all. `recommend` is the top-k of that vector, ties broken by item code, and
the evaluation harness ranks targets in exactly the same vector, so what is measured is
what is served.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
import orjson

from recstream.errors import ConfigurationError
from recstream.scoring import top_k
from training.base import RedisRecord
from training.data import FloatArray, IntArray, InteractionLog

if TYPE_CHECKING:
    from training.evaluate import Query

__all__ = ["NOT_FITTED", "ItemScorer", "top_k", "zset_of"]

NOT_FITTED = "the model is not fitted; call fit(log) or load(directory) first"


def zset_of(ids: npt.NDArray[np.object_], scores: FloatArray, n: int) -> dict[str, float]:
    """The top ``n`` items of ``scores`` as a Redis sorted-set mapping."""
    return {str(ids[i]): float(scores[i]) for i in top_k(scores, n)}


class ItemScorer:
    """Base class: holds the item (and user) vocabulary and implements the `Model` protocol
    around `score_items`. Subclasses define ``name``, ``__init__(**params)``, `_fit`,
    `score_items`, `_state`/`_restore` (numpy arrays to save) and `redis_records`."""

    name: ClassVar[str] = "base"
    keeps_users: ClassVar[bool] = False
    """Whether the user vocabulary is saved too (models with per-user state)."""
    causal: ClassVar[bool] = False
    """True when a request at time ``now`` only ever uses interactions before ``now``
    (trending): such a model may be fitted on a log reaching past the requests, as live
    counters would be, and the harness does so."""

    def __init__(self, **params: Any) -> None:
        self._params = dict(params)
        self.item_ids: npt.NDArray[np.object_] = np.zeros(0, dtype=object)
        self.user_ids: npt.NDArray[np.object_] = np.zeros(0, dtype=object)
        self._item_index: dict[str, int] | None = None
        self._user_index: dict[str, int] | None = None
        self.fitted = False

    # --- the Model protocol ------------------------------------------------------------
    def fit(self, log: InteractionLog) -> Self:
        if len(log) == 0:
            raise ConfigurationError(
                f"cannot fit {self.name} on an empty log; check the data range and source"
            )
        self.item_ids = log.item_ids
        self.user_ids = log.user_ids
        self._item_index = self._user_index = None
        self._fit(log)
        self.fitted = True
        return self

    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def recommend(
        self, history: list[str], k: int, *, user_id: str | None = None, now: float | None = None
    ) -> list[tuple[str, float]]:
        scores = self.score_items(self.codes(history), user=self.user_code(user_id), now=now)
        return [(str(self.item_ids[i]), float(scores[i])) for i in top_k(scores, k)]

    def save(self, directory: Path) -> None:
        if not self.fitted:
            raise ConfigurationError(f"{self.name}: {NOT_FITTED}")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "params.json").write_text(
            json.dumps({"model": self.name, "params": self.params()}, indent=2)
        )
        (directory / "items.json").write_bytes(orjson.dumps([str(i) for i in self.item_ids]))
        if self.keeps_users:
            (directory / "users.json").write_bytes(orjson.dumps([str(u) for u in self.user_ids]))
        arrays = self._state()
        if arrays:
            np.savez_compressed(directory / "state.npz", **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, directory: Path) -> Self:
        meta = json.loads((directory / "params.json").read_text())
        if meta.get("model") != cls.name:
            raise ConfigurationError(
                f"{directory} holds a {meta.get('model')!r} model, not {cls.name!r}; load it "
                "with the matching class"
            )
        model = cls(**meta["params"])
        model.item_ids = _objects(orjson.loads((directory / "items.json").read_bytes()))
        if cls.keeps_users:
            model.user_ids = _objects(orjson.loads((directory / "users.json").read_bytes()))
        state = directory / "state.npz"
        if state.exists():
            with np.load(state, allow_pickle=False) as data:
                model._restore({key: data[key] for key in data.files})
        model.fitted = True
        return model

    def redis_records(self) -> Iterator[RedisRecord]:
        yield self.params_record()

    # --- helpers -----------------------------------------------------------------------
    def params_record(self) -> RedisRecord:
        """``params``: a hash of the hyper-parameters (JSON values), for serving."""
        return RedisRecord(
            "params",
            "hash",
            {k: orjson.dumps(v) for k, v in {**self.params(), "model": self.name}.items()},
        )

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def codes(self, items: list[str]) -> IntArray:
        """Item ids → codes; ids the model has never seen are dropped."""
        if self._item_index is None:
            self._item_index = {str(item): code for code, item in enumerate(self.item_ids)}
        index = self._item_index
        return np.array([index[i] for i in items if i in index], dtype=np.int32)

    def user_code(self, user_id: str | None) -> int | None:
        if user_id is None or not self.keeps_users:
            return None
        if self._user_index is None:
            self._user_index = {str(user): code for code, user in enumerate(self.user_ids)}
        return self._user_index.get(user_id)

    # --- for subclasses ----------------------------------------------------------------
    def _fit(self, log: InteractionLog) -> None:
        raise NotImplementedError

    def score_items(
        self, history: IntArray, *, user: int | None = None, now: float | None = None
    ) -> FloatArray:
        """Scores of every item code for a request (``-inf``: not a candidate)."""
        raise NotImplementedError

    def score_query(self, query: Query) -> FloatArray:
        """Scores of every item code for one harness query; models that read more than
        the history's items (event types, times: the learned ranker) override this."""
        return self.score_items(query.history, user=query.user, now=query.now)

    def _state(self) -> Mapping[str, npt.NDArray[Any]]:
        return {}

    def _restore(self, state: Mapping[str, npt.NDArray[Any]]) -> None:
        pass

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise ConfigurationError(f"{self.name}: {NOT_FITTED}")


def _objects(values: list[str]) -> npt.NDArray[np.object_]:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
