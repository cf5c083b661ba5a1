"""`recstream evaluate --online` on a tiny slice: the plumbing (collector → Kinesis → a real
agent worker → Redis → published blend → ranking over HTTP), not a figure."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import RunningApi
from tests.integration.test_spine import agent_worker, tail
from training.evaluate import SessionNextClick, load_split
from training.online import run_online

T0 = 1_396_400_000.0


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
    log = tmp_path / "agents.log"
    with agent_worker(api.settings, log):
        try:
            report = await run_online(
                api.settings,
                "yoochoose",
                data,
                api=api.url,
                sessions=2,
                params={"weights": {"recently_viewed": 1.0, "sknn": 1.0}},
            )
        except Exception:
            print(tail(log))
            raise
    assert report.sessions == 2
    # every prefix of the two replayed sessions was asked for, as the offline protocol asks
    assert report.targets == 6
    assert len(expected) >= report.targets
    assert report.served["targets"] == report.offline["targets"] == 6
    assert set(report.served) >= {"hr@10", "ndcg@10", "hr@20", "mrr@20"}
    # the served lists were built from the replayed clicks and the published models:
    # these sessions cycle through their cluster, so the next click is always in reach
    assert report.served["hr@20"] > 0
    assert report.params["weights"] == {"recently_viewed": 1.0, "sknn": 1.0}
