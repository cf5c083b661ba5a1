"""`recstream evaluate --online`: a protocol replayed through the running API.

    recstream evaluate --online --dataset yoochoose|taobao --train FILE [--test FILE]
                       [--params OFFLINE.json] [--sessions N] [--api URL]

Needs the API (`recstream serve`) and at least one agent worker (`recstream agents`)
running on the same settings. Steps:

1. split the file with the dataset's protocol (YooChoose's `SessionNextClick`, Taobao's
   `NextView`);
2. post every training event to ``POST /v1/{ns}/events`` (the collector), and wait until
   the agents applied each actor's last one (its id in ``rs:{ns}:seen:{actor}``);
3. fit the blend (parameters from ``--params``: a ``recstream evaluate --json`` report,
   else the defaults) and each of its components on the training part, and publish them
   all through training's publish path, so serving reads them;
4. for each test session (YooChoose) or test user (Taobao), the first ``--sessions``,
   post its test events one at a time, each once the agents applied the one before;
   just before each target (a session's next click; a user's next view), ask
   ``GET /v1/{ns}/recommendations`` for 20 items and rank the target in that list.

It reports the harness's metrics (HR@10, NDCG@10, HR@20, MRR@20) of what was served, and,
on exactly the same targets (the protocol's own queries), of the same fitted blend
offline. MovieLens's leave-last-out is not replayed: it excludes the user's training
items, which the API has no reason to do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis.asyncio as aioredis

from recstream.errors import ConfigurationError
from recstream.keys import Keys
from recstream.settings import Settings
from training.data import InteractionLog
from training.evaluate import (
    NextView,
    Query,
    SessionNextClick,
    evaluate_model,
    load_split,
    metrics_from_ranks,
)
from training.models import Blend
from training.publish import DataRange, RunInfo, open_registry

__all__ = ["OnlineReport", "cmd_evaluate_online", "report_table", "run_online"]

K = 20
BATCH = 500
APPLY_TIMEOUT_S = 60.0


@dataclass
class OnlineReport:
    dataset: str
    sessions: int
    targets: int
    served: dict[str, float]
    offline: dict[str, float]
    degraded: int
    """Responses that named a degraded store or source."""
    params: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "sessions": self.sessions,
            "targets": self.targets,
            "served": self.served,
            "offline_same_targets": self.offline,
            "degraded_responses": self.degraded,
            "blend_params": self.params,
        }


def blend_params(report: Path | None, name: str = "blend") -> dict[str, Any]:
    """The tuned parameters of entry ``name`` in a `recstream evaluate --json` report."""
    if report is None:
        return {}
    doc = json.loads(report.read_text())
    for model in doc.get("models", []):
        if model.get("name") == name:
            return dict(model["params"])
    raise ConfigurationError(
        f"{report} has no {name!r} entry; run `recstream evaluate --json` with it first"
    )


def _events(log: InteractionLog, rows: Sequence[int], prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "event_id": f"{prefix}-{int(log.row[r])}",
            "event_type": log.event_type_names[int(log.event_types[r])],
            "user_id": str(log.user_ids[int(log.users[r])]),
            "item_id": str(log.item_ids[int(log.items[r])]),
            "timestamp": float(log.timestamps[r]),
        }
        for r in rows
    ]


class _Replay:
    def __init__(self, settings: Settings, api: str, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.api = api
        self.client = client
        self.redis = aioredis.from_url(settings.redis_url)

    async def post(self, events: list[dict[str, Any]]) -> None:
        for start in range(0, len(events), BATCH):
            chunk = events[start : start + BATCH]
            response = await self.client.post(
                f"/v1/{self.settings.namespace}/events", json={"events": chunk}
            )
            if response.status_code != 202 or response.json().get("rejected"):
                raise ConfigurationError(
                    f"the collector refused the replay ({response.status_code}): "
                    f"{response.text[:500]}"
                )

    async def applied(self, last: Mapping[str, str], within: float = APPLY_TIMEOUT_S) -> None:
        """Wait until the agents applied each actor's given event; give up only when
        ``within`` seconds pass without progress (a bulk replay takes a while)."""
        pending = dict(last)
        deadline = time.monotonic() + within
        while pending:
            before = len(pending)
            pipe = self.redis.pipeline(transaction=False)
            actors = list(pending)
            for actor in actors:
                pipe.zscore(self.keys.seen(actor), pending[actor])
            for actor, score in zip(actors, await pipe.execute(), strict=True):
                if score is not None:
                    del pending[actor]
            if not pending:
                return
            if len(pending) < before:
                deadline = time.monotonic() + within
            elif time.monotonic() > deadline:
                raise ConfigurationError(
                    f"the agents applied none of {len(pending)} events for {within:.0f}s; "
                    "is `recstream agents` running on the same settings?"
                )
            await asyncio.sleep(0.02)

    async def recommend(self, actor: str) -> tuple[list[str], bool]:
        response = await self.client.get(
            f"/v1/{self.settings.namespace}/recommendations",
            params={"user_id": actor, "num_results": str(K)},
        )
        response.raise_for_status()
        body = response.json()
        return [item["item_id"] for item in body["items"]], bool(body["degraded"])

    async def aclose(self) -> None:
        await self.redis.aclose()


@dataclass
class _Sequence:
    """One actor's test events in time order (rows of ``log``), and which of them are
    targets: the API is asked for recommendations just before each target is posted."""

    rows: list[int]
    targets: list[Query | None]


def _session_sequences(train: InteractionLog, test: InteractionLog) -> list[_Sequence]:
    """YooChoose: each test session's clicks (clicks on unseen items dropped, >= 2 left);
    every click after the first is a target, its history the session's earlier clicks:
    exactly `SessionNextClick.queries`."""
    seen = np.bincount(train.items, minlength=test.n_items) > 0
    keep = np.flatnonzero(seen[test.items])
    sub = test.select(keep)
    order, starts = sub.groups(sub.sessions)
    out = []
    for g in range(len(starts) - 1):
        rows = keep[order[starts[g] : starts[g + 1]]]
        if len(rows) < 2:
            continue
        items = test.items[rows]
        targets: list[Query | None] = [None]
        for t in range(1, len(rows)):
            when = float(test.timestamps[rows[t - 1]])
            targets.append(Query(items[:t], int(items[t]), None, when))
        out.append(_Sequence(rows.tolist(), targets))
    return out


def _next_view_targets(protocol: NextView, full: InteractionLog, n_train: int) -> list[_Sequence]:
    """Taobao: each user's test-period events in time order; a view with an earlier event
    of the same user is a target, its history all the user's earlier events (training and
    test): exactly `NextView.queries` on ``full`` = training + test."""
    codes = [c for c, name in enumerate(full.event_type_names) if name in protocol.target_types]
    order, starts = full.groups(full.users)
    out = []
    for g in range(len(starts) - 1):
        rows = order[starts[g] : starts[g + 1]]
        test_positions = [p for p, r in enumerate(rows) if r >= n_train]
        if not test_positions:
            continue
        items = full.items[rows]
        targets: list[Query | None] = []
        for p in test_positions:
            row = rows[p]
            is_target = p > 0 and (not codes or int(full.event_types[row]) in codes)
            targets.append(
                Query(items[:p], int(items[p]), int(full.users[row]), float(full.timestamps[row]))
                if is_target
                else None
            )
        if any(t is not None for t in targets):
            out.append(_Sequence([int(rows[p]) for p in test_positions], targets))
    return out


async def run_online(
    settings: Settings,
    dataset: str,
    train_path: Path,
    test_path: Path | None = None,
    *,
    api: str | None = None,
    sessions: int | None = None,
    params: Mapping[str, Any] | None = None,
) -> OnlineReport:
    """``sessions``: how many test sessions (YooChoose) or test users (Taobao) to replay."""
    protocol, train, test = load_split(dataset, train_path, test_path)
    if isinstance(protocol, SessionNextClick):
        replayed, sequences = test, _session_sequences(train, test)
    elif isinstance(protocol, NextView):
        replayed = train.join(test)
        sequences = _next_view_targets(protocol, replayed, len(train))
    else:
        raise ConfigurationError(
            f"--online replays the session (yoochoose) and next-view (taobao) protocols, "
            f"not {protocol.name!r} ({dataset}): its history is not what the API sees"
        )
    sequences = sequences[:sessions]
    blend = Blend(**dict(params or {})).fit(train)

    async with httpx.AsyncClient(base_url=api or settings.api_url, timeout=30) as client:
        replay = _Replay(settings, api or settings.api_url, client)
        try:
            order = np.lexsort((train.row, train.timestamps))
            events = _events(train, order.tolist(), "train")
            await replay.post(events)
            await replay.applied({e["user_id"]: e["event_id"] for e in events})

            run = RunInfo(
                data=DataRange(
                    source=str(train_path), start=train.start, end=train.end, rows=len(train)
                )
            )
            async with open_registry(settings) as registry:
                for model in blend.models.values():
                    await registry.publish(model, run)
                await registry.publish(blend, run)

            ranks: list[int | None] = []
            queries: list[Query] = []
            degraded = 0
            for sequence in sequences:
                posted = _events(replayed, sequence.rows, "test")
                for event, query in zip(posted, sequence.targets, strict=True):
                    if query is not None:
                        served, was_degraded = await replay.recommend(event["user_id"])
                        degraded += was_degraded
                        target = event["item_id"]
                        ranks.append(served.index(target) + 1 if target in served else None)
                        queries.append(query)
                    await replay.post([event])
                    await replay.applied({event["user_id"]: event["event_id"]})
        finally:
            await replay.aclose()
    offline = evaluate_model(blend, queries)
    return OnlineReport(
        dataset=dataset,
        sessions=len(sequences),
        targets=len(ranks),
        served={**metrics_from_ranks(ranks), "targets": float(len(ranks))},
        offline=offline,
        degraded=degraded,
        params=blend.params(),
    )


def report_table(report: OnlineReport) -> Any:
    """The served and offline metrics side by side (a rich Table)."""
    from rich.table import Table

    table = Table(
        title=f"{report.dataset}: served vs offline blend on the same {report.targets:,} "
        f"targets ({report.sessions:,} sessions or users)",
        title_justify="left",
    )
    table.add_column("")
    for name in ("HR@10", "NDCG@10", "HR@20", "MRR@20"):
        table.add_column(name, justify="right")
    for label, metrics in (("served (API)", report.served), ("offline blend", report.offline)):
        table.add_row(
            label, *(f"{metrics[k]:.4f}" for k in ("hr@10", "ndcg@10", "hr@20", "mrr@20"))
        )
    return table


def cmd_evaluate_online(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console

    console = Console()
    with console.status("replaying through the API"):
        report = asyncio.run(
            run_online(
                settings,
                args.dataset,
                args.train,
                args.test,
                api=args.api,
                sessions=args.sessions,
                params=blend_params(args.params),
            )
        )
    console.print(report_table(report))
    console.print(f"degraded responses: {report.degraded}")
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
        console.print(f"wrote {args.json}")
    return 0
