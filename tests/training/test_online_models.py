"""What `recstream evaluate --online` publishes, read from a `recstream evaluate --json`
report (training/online.py's `served_models`); the replay itself is
tests/integration/test_online.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from recstream.errors import ConfigurationError
from training.online import ServedModels, served_models

BLEND = {"weights": {"recently_viewed": 1.0, "sknn": 0.5}, "components": {"sknn": {"k": 20}}}
CHOSEN = {"dataset": "taobao", "components": {"sknn": {"k": 20}}, "blend_weights": {"sknn": 1.0}}


def report(path: Path, *models: dict[str, Any], dataset: str = "taobao") -> Path:
    path.write_text(json.dumps({"dataset": dataset, "models": list(models)}))
    return path


def blend_entry() -> dict[str, Any]:
    return {"name": "blend", "params": BLEND, "search": {"trials": []}}


def ranker_entry() -> dict[str, Any]:
    # its params are the fitted model's (every default spelled out); the search record
    # holds what the run chose, which is what bench.served_quality fits
    return {"name": "ranker", "params": {**CHOSEN, "trees": 30}, "search": {"chosen": CHOSEN}}


def test_the_ranker_serves_when_the_report_has_one(tmp_path: Path) -> None:
    path = report(tmp_path / "r.json", blend_entry(), ranker_entry())
    assert served_models(path, None, "taobao") == ServedModels(BLEND, CHOSEN)
    assert served_models(path, "ranker", "taobao").scorer == "ranker"
    assert served_models(path, "blend", "taobao") == ServedModels(BLEND)


def test_an_untuned_report_gives_the_rankers_own_params(tmp_path: Path) -> None:
    entry = {**ranker_entry(), "search": None}
    path = report(tmp_path / "r.json", blend_entry(), entry)
    assert served_models(path, None, "taobao").ranker == {**CHOSEN, "trees": 30}


def test_without_a_report_the_defaults() -> None:
    assert served_models(None) == ServedModels({})
    assert served_models(None, "ranker") == ServedModels({}, {})


def test_a_report_without_the_asked_model_says_how_to_make_one(tmp_path: Path) -> None:
    path = report(tmp_path / "r.json", blend_entry())
    assert served_models(path, None, "taobao") == ServedModels(BLEND)  # the blend, then
    with pytest.raises(ConfigurationError, match="no 'ranker' entry; run `recstream evaluate"):
        served_models(path, "ranker", "taobao")
    with pytest.raises(ConfigurationError, match="no 'blend' entry"):
        served_models(report(tmp_path / "n.json", ranker_entry()), None, "taobao")
    with pytest.raises(ConfigurationError, match="a report on 'yoochoose', not 'taobao'"):
        served_models(
            report(tmp_path / "y.json", blend_entry(), dataset="yoochoose"), None, "taobao"
        )
