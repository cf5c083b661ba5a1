"""`recstream evaluate --online` on a tiny slice: the plumbing (collector → Kinesis → a real
agent worker → Redis → published blend → ranking over HTTP), not a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import RunningApi
from tests.integration.test_spine import agent_worker, tail
from training.evaluate import NextView, SessionNextClick, load_split
from training.online import OnlineReport, ServedModels, run_online

T0 = 1_396_400_000.0


async def replay(
    api: RunningApi, tmp_path: Path, dataset: str, data: Path, **options: Any
) -> OnlineReport:
    """`run_online` against ``api`` with one agent worker; its log is printed on failure."""
    log = tmp_path / "agents.log"
    with agent_worker(api.settings, log):
        try:
            return await run_online(api.settings, dataset, data, api=api.url, **options)
        except Exception:
            print(tail(log))
            raise


def tiny_yoochoose(path: Path) -> Path:
    """40 sessions in two clusters of items (1-4 and 5-8), one an hour."""
    lines = ["SessionId\tItemId\tTime"]
    for s in range(40):
        items = [1, 2, 3, 4] if s % 2 == 0 else [5, 6, 7, 8]
        for step in range(4):
            item = items[(s + step) % 4]
            lines.append(f"{s + 1}\t{item}\t{T0 + s * 3600 + step * 60:.3f}")
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_online_replay_ranks_what_the_api_serves(api: RunningApi, tmp_path: Path) -> None:
    data = tiny_yoochoose(tmp_path / "clicks.txt")
    protocol, train, test = load_split("yoochoose", data)
    assert isinstance(protocol, SessionNextClick)
    expected = [q for q in protocol.queries(train, test)]
    served = ServedModels({"weights": {"recently_viewed": 1.0, "sknn": 1.0}})
    report = await replay(api, tmp_path, "yoochoose", data, sessions=2, models=served)
    assert report.sessions == 2
    # every prefix of the two replayed sessions was asked for, as the offline protocol asks
    assert report.targets == 6
    assert len(expected) >= report.targets
    assert report.served["targets"] == report.offline["targets"] == 6
    assert set(report.served) >= {"hr@10", "ndcg@10", "hr@20", "mrr@20"}
    # the served lists were built from the replayed clicks and the published models:
    # these sessions cycle through their cluster, so the next click is always in reach
    assert report.served["hr@20"] > 0
    assert report.params["blend"]["weights"] == {"recently_viewed": 1.0, "sknn": 1.0}
    assert report.scorer == "blend"
    assert report.offline == report.offline_blend
    # the blend served: the debug answer names the published blend version
    assert set(report.probe.scorers) == {f"blend@{report.versions['blend']}"}


async def test_online_replay_serves_the_learned_ranker(api: RunningApi, tmp_path: Path) -> None:
    """The ranker path: a tiny ranker (3 trees) fitted and published beside the blend, the
    API ranking with its booster, and asked as of each target's logged time (the history
    ages the ranker reads match the offline feature matrix of the same query)."""
    data = tiny_yoochoose(tmp_path / "clicks.txt")
    ranker = {"trees": 3, "min_data_in_leaf": 5, "folds": 2, "min_gain": -2.0}
    weights = {"recently_viewed": 1.0, "sknn": 1.0}
    served = ServedModels({"weights": weights}, ranker)
    report = await replay(api, tmp_path, "yoochoose", data, sessions=2, models=served, probes=6)
    assert report.scorer == "ranker"
    assert report.ranker_choice == "lightgbm"
    assert report.targets == report.offline["targets"] == report.offline_blend["targets"] == 6
    # every probed answer came from the published ranker's booster, not the blend
    assert report.probe.queries == 6
    assert set(report.probe.scorers) == {f"ranker@{report.versions['ranker']}"}
    assert report.probe.compared > 0
    # as_of applied: the served history ages are the offline query's, candidate by
    # candidate (the logged clicks are from 2014: from the server's clock they are years)
    ages = {"u:age_s", "u:recency", "h:age_s"}
    assert not ages & set(report.probe.mismatches), report.probe.mismatches


def tiny_taobao(path: Path) -> Path:
    """12 users over three days, each viewing around one cluster of items (1-4 or 5-8),
    with a cart add now and then; the last day is the test period of `NextView`."""
    t0 = 1_511_500_000
    lines = []
    for user in range(1, 13):
        items = [1, 2, 3, 4] if user % 2 else [5, 6, 7, 8]
        for step in range(6):
            behaviour = "cart" if step == 2 else "pv"
            when = t0 + step * 43_200 + user * 60  # two events a day
            lines.append(f"{user},{items[step % 4]},{100 + user % 2},{behaviour},{when}")
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_online_replay_of_the_next_view_protocol(api: RunningApi, tmp_path: Path) -> None:
    data = tiny_taobao(tmp_path / "UserBehavior.csv")
    protocol, train, test = load_split("taobao", data)
    assert isinstance(protocol, NextView)
    expected = protocol.queries(train, test)
    report = await replay(api, tmp_path, "taobao", data, sessions=3)
    assert report.sessions == 3
    # the three users' test views, each asked for before it was posted
    mine = sorted({q.user for q in expected if q.user is not None})[:3]
    assert report.targets == sum(1 for q in expected if q.user in mine) > 0
    assert report.served["targets"] == report.offline["targets"] == report.targets
    assert report.served["hr@20"] > 0
