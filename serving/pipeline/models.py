"""The published models serving reads, loaded once per version and kept in-process.

Training publishes each model under ``rs:{ns}:model:{name}:{version}:…`` and flips
``rs:{ns}:model:{name}:current`` (docs/training.md). The state stage reads every pointer
in its one round trip; this cache holds each model's per-version data (parameters, the
blend's weights, the session-kNN index, ALS item factors and YᵀY, the popularity and
trending lists), read with `recstream.published.read_current_many` so all of it comes
from one version. A new version is loaded in the background while the previous one keeps
serving; a model seen for the first time is waited for within the caller's deadline.

Per-request records (item2item's ``nbr:{item}`` rows) are not loaded here: the sources
read them through the pointer and cache them per version (serving/pipeline/candidates.py).

A pointer that is missing may mean Redis lost its data: with a ``restorer``
(`recstream.model_restore.RegistryRestorer`, wired by the app) every miss is reported to
it, and it restores from S3, in the background, what served before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from recstream.errors import RecstreamError
from recstream.keys import Keys
from recstream.model_restore import RegistryRestorer
from recstream.published import CurrentRecord, read_current_many
from recstream.ranking import FeatureSpec, RankingModel
from recstream.scoring import SessionIndex

__all__ = ["MODEL_NAMES", "ModelCache", "Published"]

log = logging.getLogger(__name__)

MODEL_NAMES = (
    "recently_viewed",
    "item2item",
    "sknn",
    "als",
    "popularity",
    "trending",
    "category_popularity",
    "blend",
    "ranker",
)
"""Every model whose pointer the state stage reads (training's names)."""

# What each model's cached version holds besides ``params``.
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "sknn": ("index",),
    "als": ("factors", "yty"),
    "popularity": ("top",),
    "trending": ("top",),
    "blend": ("weights",),
    "ranker": ("booster",),
}
LOAD_TIMEOUT_S = 30.0
RETRY_AFTER_S = 5.0


@dataclass(slots=True)
class Published:
    """One version of one model, decoded for request-time use."""

    name: str
    version: str
    params: dict[str, Any]
    weights: dict[str, float] = field(default_factory=dict)
    top: list[tuple[str, float]] = field(default_factory=list)
    index: SessionIndex | None = None
    lookup: dict[str, int] = field(default_factory=dict)
    """Item id → row of ``factors`` (ALS) or code of ``index`` (sknn)."""
    item_ids: list[str] = field(default_factory=list)
    factors: npt.NDArray[np.float64] | None = None
    unit_factors: npt.NDArray[np.float64] | None = None
    """Rows of ``factors`` scaled to unit length, for item-to-item cosine (related items)."""
    yty: npt.NDArray[np.float64] | None = None
    ranking: RankingModel | None = None
    """The learned ranker's booster (``ranker`` with ``scorer: lightgbm``), else None."""

    def param(self, name: str, default: Any) -> Any:
        return self.params.get(name, default)


def _decode(name: str, version: str, records: Mapping[str, CurrentRecord]) -> Published:
    params: dict[str, Any] = {}
    raw_params = records["params"].value
    if isinstance(raw_params, dict):
        params = {k: orjson.loads(v) for k, v in raw_params.items()}
    model = Published(name, version, params)
    if name == "blend":
        weights = records["weights"].value
        if isinstance(weights, dict):
            model.weights = {k: float(v) for k, v in weights.items()}
    elif name in ("popularity", "trending"):
        top = records["top"].value
        if isinstance(top, list):
            model.top = top
    elif name == "ranker":
        model.ranking = _ranking(version, params, records["booster"].value)
    elif name == "sknn":
        blob = records["index"].value
        if isinstance(blob, bytes):
            model.index = SessionIndex.from_bytes(blob)
            model.item_ids = [str(i) for i in model.index.item_ids]
            model.lookup = {item: code for code, item in enumerate(model.item_ids)}
    elif name == "als":
        factors, yty = records["factors"].value, records["yty"].value
        if isinstance(factors, dict) and factors and isinstance(yty, bytes):
            model.item_ids = list(factors)
            model.lookup = {item: row for row, item in enumerate(model.item_ids)}
            matrix = np.stack([np.frombuffer(v, dtype="<f4") for v in factors.values()])
            model.factors = matrix.astype(np.float64)
            f = model.factors.shape[1]
            model.yty = np.frombuffer(yty, dtype="<f4").astype(np.float64).reshape(f, f)
            norms = np.linalg.norm(model.factors, axis=1, keepdims=True)
            model.unit_factors = model.factors / np.maximum(norms, 1e-12)
    return model


def _ranking(version: str, params: Mapping[str, Any], booster: Any) -> RankingModel | None:
    """The ranker's booster, or None (serving keeps the linear blend) when the version
    chose the blend or was published by code whose features differ from this code's."""
    if params.get("scorer") != "lightgbm" or not isinstance(booster, bytes):
        return None
    try:
        spec = FeatureSpec(tuple(params["sources"]), int(params["history_cap"]))
        if list(spec.names) != list(params.get("features", [])):
            raise ValueError("its feature list differs from this code's")
        return RankingModel(spec, booster.decode())
    except (KeyError, TypeError, ValueError) as exc:
        log.warning(
            "ranker version %s cannot serve (%s); the linear blend serves instead. "
            "Retrain and publish the ranker with this code version",
            version,
            exc,
        )
        return None


class ModelCache:
    """Per (namespace, model): the newest loaded version, and the load in progress."""

    def __init__(self, redis: aioredis.Redis, restorer: RegistryRestorer | None = None) -> None:
        self.redis = redis
        self.restorer = restorer
        """Told about every missing pointer (it restores lost models from S3)."""
        self._loaded: dict[tuple[str, str], Published] = {}
        self._loading: dict[tuple[str, str, str], asyncio.Task[Published | None]] = {}
        self._failed: dict[tuple[str, str, str], float] = {}

    async def _load(self, namespace: str, name: str) -> Published | None:
        suffixes = ["params", *_SUFFIXES.get(name, ())]
        try:
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                records = await read_current_many(
                    self.redis, Keys(namespace), name, suffixes, limit=None
                )
        except (TimeoutError, RedisError, RecstreamError, OSError) as exc:
            log.warning("loading model %s of namespace %s failed: %s", name, namespace, exc)
            return None
        if records is None:
            return None
        version = records["params"].version
        model = await asyncio.to_thread(_decode, name, version, records)
        current = self._loaded.get((namespace, name))
        if current is None or current.version != version:
            self._loaded[(namespace, name)] = model
        return model

    def _start(self, namespace: str, name: str, version: str) -> asyncio.Task[Published | None]:
        key = (namespace, name, version)
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(namespace, name))
            self._loading[key] = task

            def done(t: asyncio.Task[Published | None]) -> None:
                self._loading.pop(key, None)
                if t.cancelled() or t.exception() is not None or t.result() is None:
                    self._failed[key] = time.monotonic()

            task.add_done_callback(done)
        return task

    def get_now(
        self, namespace: str, name: str, version: str | None
    ) -> tuple[bool, Published | None]:
        """``(True, model)`` when `get` would answer at once, with what it would answer;
        ``(False, None)`` when it would wait for a first load (started here). The
        ranker's synchronous pass (serving/pipeline/ranker.py) asks this."""
        if version is None:
            self._loaded.pop((namespace, name), None)
            if self.restorer is not None:
                self.restorer.notice(namespace)
            return True, None
        current = self._loaded.get((namespace, name))
        if current is not None and current.version == version:
            return True, current
        failed = self._failed.get((namespace, name, version))
        if failed is not None and time.monotonic() - failed < RETRY_AFTER_S:
            return True, current
        self._start(namespace, name, version)
        return current is not None, current

    async def get(
        self, namespace: str, name: str, version: str | None, wait: float
    ) -> Published | None:
        """The model at ``version`` (the pointer just read), or the previous one while it
        loads; None when nothing is published. Waits at most ``wait`` seconds, and only
        when no version at all is loaded yet."""
        ready, current = self.get_now(namespace, name, version)
        if ready or wait <= 0 or version is None:
            return current
        return await self._wait(namespace, name, version, wait)

    async def ensure(
        self, namespace: str, name: str, version: str | None, wait: float
    ) -> Published | None:
        """The model at ``version``, waiting (at most ``wait`` seconds) for its load even
        while another version is in memory, where `get` answers with that one at once:
        for start-up and tests, which must see the version just pointed at (a test that
        rolled back read the previous version while the rolled-back one still loaded)."""
        _, current = self.get_now(namespace, name, version)
        if version is None or (current is not None and current.version == version):
            return current
        if (namespace, name, version) not in self._loading:
            return current  # (its load failed a moment ago: what serves meanwhile)
        return await self._wait(namespace, name, version, wait)

    async def _wait(self, namespace: str, name: str, version: str, wait: float) -> Published | None:
        """What is loaded once the load of ``version`` (started by `get_now`) ends, or
        ``wait`` seconds pass."""
        task = self._start(namespace, name, version)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await asyncio.shield(task)
        return self._loaded.get((namespace, name))

    def loaded_versions(self, namespace: str) -> dict[str, str]:
        """Versions held in memory: what serves while Redis does not answer."""
        return {name: m.version for (ns, name), m in self._loaded.items() if ns == namespace}

    async def aclose(self) -> None:
        if self.restorer is not None:
            await self.restorer.aclose()
        for task in list(self._loading.values()):
            task.cancel()
        for task in list(self._loading.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
