"""InteractionLog and its file loaders, on small files written here and on the real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data import (
    DataError,
    InteractionLog,
    LogBuilder,
    load_items_csv,
    load_movielens,
    load_personalize_csv,
    load_taobao,
    load_users_csv,
    load_yoochoose,
)


def test_builder_codes_weights_and_gap_sessions() -> None:
    builder = LogBuilder({"view": 1.0, "purchase": 5.0}, session_gap_s=100)
    builder.add("u1", "a", 1000.0, "view")
    builder.add("u1", "b", 1050.0, "purchase")
    builder.add("u1", "a", 1300.0, "view")  # > 100 s later: a new session
    builder.add("u2", "b", 1010.0, "add_to_cart")  # unknown type weighs 1
    log = builder.build()
    assert list(log.user_ids) == ["u1", "u2"]
    assert list(log.item_ids) == ["a", "b"]
    assert log.items.tolist() == [0, 1, 0, 1]
    assert log.weights.tolist() == [1.0, 5.0, 1.0, 1.0]
    assert log.sessions[0] == log.sessions[1] != log.sessions[2]
    assert log.sessions[3] not in (log.sessions[0], log.sessions[2])
    assert log.n_sessions == 3
    reweighted = log.with_weights({"view": 2.0, "purchase": 10.0, "add_to_cart": 3.0})
    assert reweighted.weights.tolist() == [2.0, 10.0, 2.0, 3.0]


def test_select_keeps_vocabulary_and_join_restores() -> None:
    builder = LogBuilder()
    for i, (user, item, t) in enumerate([("u", "x", 3.0), ("v", "y", 1.0), ("u", "z", 2.0)]):
        builder.add(user, item, t + 1e9, session=str(i))
    log = builder.build()
    early, late = log.select(log.timestamps < 1e9 + 2.5), log.select(log.timestamps >= 1e9 + 2.5)
    assert early.item_ids is log.item_ids
    assert len(early) == 2
    assert len(late) == 1
    joined = early.join(late)
    assert sorted(joined.row.tolist()) == [0, 1, 2]
    assert log.sorted().items.tolist() == [1, 2, 0]
    order, starts = log.groups(log.users)
    assert [log.items[order[starts[g] : starts[g + 1]]].tolist() for g in range(2)] == [
        [2, 0],
        [1],
    ]


def test_concat_merges_vocabularies() -> None:
    a, b = LogBuilder(), LogBuilder()
    a.add("u1", "x", 1e9, session="s1", category="c1")
    b.add("u2", "y", 1e9 + 1, session="s2")
    b.add("u1", "x", 1e9 + 2, session="s1")
    merged = InteractionLog.concat([a.build(), b.build()])
    assert list(merged.item_ids) == ["x", "y"]
    assert merged.items.tolist() == [0, 1, 0]
    assert merged.users.tolist() == [0, 1, 0]
    assert merged.sessions.tolist() == [0, 1, 0]
    assert merged.category_of().tolist() == [0, -1]


def test_personalize_csv(tmp_path: Path) -> None:
    interactions = tmp_path / "interactions.csv"
    interactions.write_text(
        "USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE,EVENT_VALUE\n"
        "u1,i1,1700000000,view,\n"
        "u1,i2,1700000010,PURCHASE,2\n"
        "u2,i1,1700000020,,\n"
    )
    items = tmp_path / "items.csv"
    items.write_text("ITEM_ID,CATEGORIES,PRICE\ni1,shoes|running,10\ni2,hats,3.5\n")
    users = tmp_path / "users.csv"
    users.write_text("USER_ID,AGE\nu1,30\nu2,\n")
    log = load_personalize_csv(interactions, items_csv=items, use_event_value=True)
    assert len(log) == 3
    assert set(log.event_type_names) == {"view", "purchase", "click"}
    assert log.weights.tolist() == [1.0, 10.0, 1.0]  # purchase 5 x value 2; click 1
    assert [log.category_ids[c] for c in log.category_of()] == ["shoes", "hats"]
    assert [i.price for i in load_items_csv(items)] == [10.0, 3.5]
    assert [u.attributes for u in load_users_csv(users)] == [{"age": "30"}, {}]


def test_personalize_csv_errors_name_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("USER,ITEM\nu,i\n")
    with pytest.raises(DataError, match="USER_ID"):
        load_personalize_csv(bad)
    bad.write_text("USER_ID,ITEM_ID,TIMESTAMP\nu,i,yesterday\n")
    with pytest.raises(DataError, match=r"bad\.csv:2"):
        load_personalize_csv(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_personalize_csv(tmp_path / "missing.csv")


def test_research_formats(tmp_path: Path) -> None:
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("userId,movieId,rating,timestamp\n1,10,4.0,964982703\n1,20,3.5,964981247\n")
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n10,"A, the (1995)",Comedy|Drama\n20,B,(no genres listed)\n'
    )
    movies = load_movielens(ratings)
    assert len(movies) == 2
    assert movies.event_type_names == ("like",)
    assert movies.weights.tolist() == [1.0, 1.0]
    assert [movies.category_ids[c] if c >= 0 else None for c in movies.category_of()] == [
        "Comedy",
        None,
    ]

    taobao = tmp_path / "UserBehavior.csv"
    taobao.write_text("1,100,7,pv,1511544070\n1,101,8,buy,1511544080\n2,100,7,cart,1411544090\n")
    log = load_taobao(taobao, window=(1511539200, 1512316800))
    assert len(log) == 2  # the row before the window is dropped
    assert [log.event_type_names[e] for e in log.event_types] == ["view", "purchase"]
    assert log.weights.tolist() == [1.0, 5.0]
    taobao.write_text("1,100,7,like,1511544070\n")
    with pytest.raises(DataError, match="pv\\|cart\\|fav\\|buy"):
        load_taobao(taobao)

    clicks = tmp_path / "clicks.txt"
    clicks.write_text(
        "SessionId\tItemId\tTime\n7\t1\t1396413533.1\n7\t2\t1396413545.8\n8\t1\t1.4e9\n"
    )
    sessions = load_yoochoose(clicks)
    assert sessions.n_sessions == 2
    assert sessions.sessions.tolist() == [0, 0, 1]
    assert sessions.timestamps[1] == pytest.approx(1396413545.8)


def test_real_datasets_load(shared_data: Path) -> None:
    movielens = load_movielens(shared_data / "movielens-small" / "ratings.csv")
    assert (len(movielens), movielens.n_users, movielens.n_items) == (100_836, 610, 9_724)
    taobao = load_taobao(shared_data / "taobao-userbehavior-head-dev" / "UserBehavior_head_dev.csv")
    assert (len(taobao), taobao.n_users, taobao.n_items) == (14_325, 688, 11_477)
    assert np.bincount(taobao.event_types).sum() == 14_325
    yoochoose = load_yoochoose(
        shared_data / "yoochoose-rsc15-100k-dev" / "yoochoose-clicks-100k_dev.txt"
    )
    assert (len(yoochoose), yoochoose.n_sessions, yoochoose.n_items) == (15_198, 3_868, 2_039)
