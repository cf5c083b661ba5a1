"""What `recstream train` trains on and which models it trains: the `DataPlan` for each
``--source`` and the `ModelSpec` of each model.

This wires the data loaders (training/data.py), the models (training/models/) and the
evaluation harness (training/evaluate.py) into `training.pipeline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recstream.errors import ConfigurationError
from recstream.settings import Settings
from training.pipeline import DataPlan, ModelSpec

__all__ = ["data_plan", "model_specs"]


def data_plan(
    source: str,
    path: Path | None,
    settings: Settings,
    *,
    start: float | None = None,
    end: float | None = None,
) -> DataPlan[Any]:
    """The plan that loads ``source`` (archive, csv, movielens, taobao, yoochoose)."""
    raise ConfigurationError(
        f"training on {source!r} needs the data loaders (training/data.py), which are not "
        "wired in yet"
    )


def model_specs(settings: Settings, wanted: Sequence[str] | None = None) -> list[ModelSpec[Any]]:
    """Every trainable model, or just the ``wanted`` ones, in publishing order."""
    raise ConfigurationError("no models are wired into `recstream train` yet")
