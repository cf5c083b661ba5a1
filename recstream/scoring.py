"""Scoring formulas shared by training (offline), the agents and serving (live).

One definition each, so an offline evaluation and a live answer agree on the same
events. Training re-exports them from `training.models`; agents and serving import them
from here, because the lower layers must not import training.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["trend_scores"]

FloatArray = npt.NDArray[np.floating[Any]]


def trend_scores(recent: FloatArray, previous: FloatArray, gamma: float) -> FloatArray:
    """The trending formula on per-item window counts (``-inf`` where both are zero):
    ``recent + gamma · (recent - previous)``, the next window's count extrapolated
    linearly from the last two (``gamma=0``: plain windowed counts)."""
    trend = recent + gamma * (recent - previous)
    return np.where((recent > 0) | (previous > 0), trend, -np.inf)
