"""The harness: metrics against hand-computed values, the three protocols on tiny logs,
the tuning record, and `recstream evaluate` end to end on small files."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recstream.errors import ConfigurationError
from recstream.settings import Settings
from training.data import LogBuilder, load_movielens
from training.evaluate import (
    LeaveLastOut,
    NextView,
    Query,
    SessionNextClick,
    evaluate_model,
    metrics_from_ranks,
    rank_of,
    register,
    run_evaluation,
)
from training.models import Popularity, RecentlyViewed
from training.tuning import grid_search, harness_entries, model_specs, tune_blend

T0 = 1_511_600_000.0


def test_rank_of_breaks_ties_by_item_code_and_misses_non_candidates() -> None:
    scores = np.array([0.5, 0.9, 0.5, -np.inf, 0.1])
    assert rank_of(scores, 1) == 1
    assert rank_of(scores, 0) == 2
    assert rank_of(scores, 2) == 3  # tied with item 0, which comes first
    assert rank_of(scores, 4) == 4
    assert rank_of(scores, 3) is None


def test_metrics_by_hand() -> None:
    ranks = [1, 3, 10, 11, 20, 21, None, 2]
    got = metrics_from_ranks(ranks)
    n = len(ranks)
    assert got["hr@10"] == pytest.approx(4 / n)
    assert got["hr@20"] == pytest.approx(6 / n)
    ndcg = 1 / math.log2(2) + 1 / math.log2(4) + 1 / math.log2(11) + 1 / math.log2(3)
    assert got["ndcg@10"] == pytest.approx(ndcg / n)
    assert got["mrr@20"] == pytest.approx((1 + 1 / 3 + 1 / 10 + 1 / 11 + 1 / 20 + 1 / 2) / n)
    assert metrics_from_ranks([]) == {"hr@10": 0.0, "ndcg@10": 0.0, "hr@20": 0.0, "mrr@20": 0.0}


def sessions_log() -> LogBuilder:
    builder = LogBuilder()
    # training sessions start before T0 + 100; test sessions after
    for session, start, items in (
        ("s1", T0, "abc"),
        ("s2", T0 + 10, "ab"),
        ("s3", T0 + 200, "abz"),  # z never seen in training: dropped
        ("s4", T0 + 300, "c"),  # one click: no prefix to predict from
    ):
        for step, item in enumerate(items):
            builder.add(session, item, start + step, "click", session=session)
    return builder


def test_session_next_click_protocol() -> None:
    log = sessions_log().build()
    protocol = SessionNextClick()
    train, test = protocol.split(log, test_start=T0 + 100)
    assert sorted(set(log.session_ids[train.sessions])) == ["s1", "s2"]
    queries = protocol.queries(train, test)
    code = log.item_index()
    assert [(q.history.tolist(), q.target) for q in queries] == [([code["a"]], code["b"])]
    # the default cutoff is 85% of the time range (T0 + 256.7): only s4 starts after it
    default_train, _ = protocol.split(log)
    assert len(default_train) == 8
    # popularity ranks b (2 clicks) after a (2 clicks, lower code): rank 2
    model = Popularity(half_life_days=None).fit(train)
    metrics = evaluate_model(model, queries)
    assert metrics["hr@10"] == 1.0
    assert metrics["mrr@20"] == 0.5
    assert metrics["targets"] == 1


def test_next_view_protocol_uses_earlier_test_events_as_history() -> None:
    builder = LogBuilder({"view": 1.0, "purchase": 5.0})
    builder.add("u", "a", T0, "view")
    builder.add("u", "b", T0 + 86400 * 2, "purchase")  # test period, not a target (buy)
    builder.add("u", "a", T0 + 86400 * 2 + 5, "view")  # target; history a, b
    builder.add("new", "a", T0 + 86400 * 2 + 6, "view")  # no earlier event: not a target
    log = builder.build()
    protocol = NextView()
    train, test = protocol.split(log)
    assert len(train) == 1
    assert len(test) == 3
    queries = protocol.queries(train, test)
    code = log.item_index()
    assert [(q.history.tolist(), q.target, q.user) for q in queries] == [
        ([code["a"], code["b"]], code["a"], 0)
    ]
    metrics = evaluate_model(RecentlyViewed(decay=0.5).fit(train), queries)
    assert metrics["hr@10"] == 1.0
    assert metrics["mrr@20"] == 0.5


def test_leave_last_out_breaks_ties_by_row_and_excludes_history(tmp_path: Path) -> None:
    ratings = tmp_path / "ratings.csv"
    ratings.write_text(
        "userId,movieId,rating,timestamp\n"
        "1,10,4,1000000000\n1,20,4,1000000500\n1,30,4,1000000500\n"  # tie: 30 is last
        "2,10,4,1000000000\n2,20,4,1000000100\n2,40,4,1000000200\n"
    )
    log = load_movielens(ratings)
    protocol = LeaveLastOut()
    train, test = protocol.split(log)
    assert sorted(log.item_ids[test.items].tolist()) == ["30", "40"]
    queries = protocol.queries(train, test)
    assert all(q.exclude is not None and set(q.exclude) == set(q.history) for q in queries)
    # validation holds out the second-to-last
    _fit_part, held = protocol.validation_split(train)
    assert sorted(log.item_ids[held.items].tolist()) == ["20", "20"]
    with pytest.raises(ConfigurationError, match="test-start"):
        protocol.split(log, test_start=1.0)
    # popularity: 10 and 20 are excluded for both users, 30 and 40 unseen: all misses
    model = Popularity(half_life_days=None).fit(train)
    assert evaluate_model(model, queries)["hr@20"] == 0.0


def test_grid_search_records_every_trial_and_picks_the_best() -> None:
    builder = LogBuilder()
    t = T0
    for n in range(30):  # users repeat their first item after a detour
        user = f"u{n}"
        for item in ("x", f"d{n}", f"e{n}", "x"):
            builder.add(user, item, t)
            t += 1000
    log = builder.build()
    protocol = NextView(test_days=0.2)
    tuned = grid_search(
        protocol,
        log,
        lambda p: RecentlyViewed(**p),
        {"decay": 0.9, "history_len": 1},
        {"history_len": [1, 3]},
    )
    record = tuned.record
    assert record["metric"] == "ndcg@10"
    # the start point, then each new grid value once (1 is the start: not tried twice)
    assert [t["params"]["history_len"] for t in record["trials"]] == [1, 3]
    assert record["trials"][1]["metrics"]["ndcg@10"] > record["trials"][0]["metrics"]["ndcg@10"]
    assert tuned.params["history_len"] == 3  # x is 3 steps back: history_len 1 misses it
    json.dumps(record)  # the manifest must be able to hold it


def test_grid_search_moves_a_joint_axis_together() -> None:
    # the shape of item-to-item's "normalize,shrink": values only valid in pairs
    builder = LogBuilder()
    t = T0
    for n in range(30):
        for item in ("x", f"d{n}", f"e{n}", "x"):
            builder.add(f"u{n}", item, t)
            t += 1000
    protocol = NextView(test_days=0.2)

    def build(p: Mapping[str, Any]) -> RecentlyViewed:
        return RecentlyViewed(**p)

    tuned = grid_search(
        protocol,
        builder.build(),
        build,
        {"decay": 0.9, "history_len": 1},
        {"decay,history_len": [(0.9, 1), (0.5, 3)]},
    )
    assert [(t["params"]["decay"], t["params"]["history_len"]) for t in tuned.record["trials"]] == [
        (0.9, 1),
        (0.5, 3),
    ]
    assert tuned.params == {"decay": 0.5, "history_len": 3}
    json.dumps(tuned.record)
    with pytest.raises(ConfigurationError, match="needs 2 values"):
        grid_search(protocol, builder.build(), build, {}, {"decay,history_len": [(0.5,)]})


def test_tune_blend_prefers_the_useful_component() -> None:
    builder = LogBuilder()
    t = T0
    for n in range(40):
        for item in (f"a{n}", "d", f"a{n}"):  # the next view repeats the user's own item
            builder.add(f"u{n}", item, t)
            t += 600
    log = builder.build()
    tuned = tune_blend(
        NextView(test_days=0.1),
        log,
        {"recently_viewed": {"last_weight": 0.01}, "popularity": {}},
        {"popularity": 1.0, "recently_viewed": 0.0},
        fixed="popularity",
    )
    assert tuned.params["weights"]["recently_viewed"] > 0
    assert tuned.record["best"] > tuned.record["trials"][0]["metrics"]["ndcg@10"]


def test_harness_entries_and_unknown_names() -> None:
    names = [e.name for e in harness_entries("yoochoose")]
    # the learned ranker follows the blend whose components' parameters it reuses
    assert names[-2:] == ["blend", "ranker"]
    assert "ranker" not in [e.name for e in harness_entries("movielens")]
    assert "sknn+repeat" in names
    assert "readme:most-popular" in [e.name for e in harness_entries("movielens")]
    with pytest.raises(ConfigurationError, match="unknown harness entries"):
        harness_entries("taobao", ["nope"])
    # `recstream train` gets the same defaults (--no-tune builds them), e.g. item-to-item's
    # shrinkage, which the class itself leaves at 0; popularity is fixed at the agents'
    # half-life, not searched
    (i2i,) = model_specs(LeaveLastOut(), "movielens", ["item2item"])
    assert i2i.defaults["shrink"] == 5.0
    (popularity,) = harness_entries("taobao", ["popularity"])
    assert popularity.tune is None


def test_query_is_a_value() -> None:
    q = Query(np.array([1, 2], np.int32), 3, None, T0)
    assert q.exclude is None
    assert q.target == 3


def test_real_yoochoose_slice_smoke(shared_data: Path) -> None:
    """The dev slice end to end with default parameters: the split and targets are the
    protocol's, and session kNN with repeats is far above popularity (0.61 vs 0.11)."""
    path = shared_data / "yoochoose-rsc15-100k-dev" / "yoochoose-clicks-100k_dev.txt"
    report = run_evaluation("yoochoose", path, models=["popularity", "sknn+repeat"], tune=False)
    assert (report.train_rows, report.test_rows, report.targets) == (13_401, 1_797, 1_152)
    by_name = {r.name: r.metrics for r in report.results}
    assert by_name["sknn+repeat"]["hr@10"] > 0.55
    assert by_name["popularity"]["hr@10"] < 0.2


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="recstream")
    register(root.add_subparsers(dest="command", required=True))
    return root


def test_cli_runs_a_two_file_yoochoose_evaluation(tmp_path: Path) -> None:
    header = "SessionId\tItemId\tTime\n"
    rows = []
    for n in range(40):
        base = T0 + n * 100
        rows.append(f"{n}\t{100 + n % 5}\t{base}\n{n}\t{200 + n % 5}\t{base + 1}\n")
    (tmp_path / "train.txt").write_text(header + "".join(rows[:30]))
    (tmp_path / "test.txt").write_text(header + "".join(rows[30:]))
    out = tmp_path / "results.json"
    args = parser().parse_args(
        [
            "evaluate",
            "--dataset",
            "yoochoose",
            "--train",
            str(tmp_path / "train.txt"),
            "--test",
            str(tmp_path / "test.txt"),
            "--json",
            str(out),
            "--models",
            "popularity,sknn,item2item",
            "--no-tune",
        ]
    )
    assert args.handler(args, Settings()) == 0
    report = json.loads(out.read_text())
    assert report["targets"] == 10
    assert report["dataset"] == "yoochoose"
    by_name = {m["name"]: m["metrics"] for m in report["models"]}
    # 10x always follows with 20x: co-occurrence models find it first
    assert by_name["item2item"]["hr@10"] == 1.0
    assert by_name["item2item"]["mrr@20"] == 1.0
    # neighbour sessions hold the query item as often as the answer: a tie, and the
    # query item has the lower code, so the answer is second
    assert by_name["sknn"]["hr@10"] == 1.0
    assert by_name["sknn"]["mrr@20"] == 0.5
    assert by_name["popularity"]["mrr@20"] < 1.0
    markdown = out.with_suffix(".md").read_text()
    assert "| item2item | 1.0000 |" in markdown
