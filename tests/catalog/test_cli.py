"""`recstream catalog load` as a user runs it, into real Redis and DynamoDB (moto)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from recstream.catalog_cli import read_items_csv
from recstream.errors import ValidationFailed
from recstream.keys import Keys
from recstream.settings import Settings
from streams.schema import Item
from tests.conftest import REPO


def load(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recstream.cli", "catalog", "load", *args],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def hot_item(settings: Settings, namespace: str, item_id: str) -> Item | None:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        raw = client.get(Keys(namespace).item(item_id))
    finally:
        client.close()
    return None if raw is None else Item.model_validate_json(raw)


def test_load_movielens_and_a_personalize_items_csv(settings: Settings, tmp_path: Path) -> None:
    # The real file's first 300 movies: all 9,742 take ~10 s on moto (390 BatchWriteItem
    # calls), which the suite need not pay to check the same code path.
    lines = (REPO / "data/movielens-small/movies.csv").read_text(encoding="utf-8").splitlines()
    movies = tmp_path / "movies.csv"
    movies.write_text("\n".join(lines[:301]) + "\n", encoding="utf-8")
    items = tmp_path / "items.csv"
    items.write_text("ITEM_ID,CATEGORY,price,COLOUR\nsku1,Shoes|Men,9.5,red\nsku2,,,\n")
    result = load(
        settings, "--movielens", str(movies), "--items", str(items), "--namespace", "shop"
    )
    assert result.returncode == 0, result.stderr
    assert "loaded 302 items" in result.stdout
    toy = hot_item(settings, "shop", "1")
    assert toy is not None
    assert toy.title == "Toy Story (1995)"
    assert toy.categories == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert "COLOUR" in result.stderr  # named, not silently dropped
    sku1 = hot_item(settings, "shop", "sku1")
    assert sku1 is not None
    assert (sku1.categories, sku1.price) == (["Shoes", "Men"], 9.5)
    assert hot_item(settings, "shop", "sku2") is not None


def test_a_bad_row_is_reported_with_its_line(tmp_path: Path) -> None:
    items = tmp_path / "items.csv"
    items.write_text("ITEM_ID,PRICE\nsku1,1\nsku2,cheap\n")
    with pytest.raises(ValidationFailed, match=f"{items}:3"):
        read_items_csv(items)
    with pytest.raises(ValidationFailed, match="does not exist"):
        read_items_csv(tmp_path / "nope.csv")
