"""Served vs offline quality: the dataset protocol replayed through the serving pipeline.

    python -m bench.served_quality --dataset {yoochoose,taobao} --train FILE --params OUT.json
        [--scorer ranker|blend] [--limit N] [--json RESULT]

``--params`` is a `recstream evaluate --json` report: its tuned components, blend and
ranker parameters are fitted on the protocol's training part and published through
training's real publish path (a private redis-server and moto S3, started and stopped
here). Every training event is applied to the live state with the agents' own
`RedisHotStore.apply`; then, in time order, before each target the pipeline
(`serving.pipeline.Ranker.recommend`, in-process, 20 items) is asked for the target's
actor, and the target event is applied after. The same targets are ranked offline by the
same fitted model, and both rows are printed with the harness's metrics.

The pipeline reads its clock for the features' ages (``u:age_s``, ``u:recency``); a
replay runs faster than its events' time, so the pipeline's ``time.time`` is the replay
clock: the time of the event the target follows, as the offline query's ``now`` is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis

import serving.pipeline.ranker as ranker_module
from agents.state import RedisHotStore
from recstream import stack
from recstream.settings import Settings
from recstream.windows import MemoryDurableWindows
from serving.pipeline import Ranker
from streams.schema import Event, Item
from training.data import InteractionLog
from training.evaluate import (
    SessionNextClick,
    evaluate_model,
    fit_for,
    load_split,
    metrics_from_ranks,
)
from training.models import Blend, LearnedRanker
from training.models.blend import COMPONENTS
from training.publish import DataRange, RunInfo, open_registry

K = 20
BATCH = 1000


class _Clock:
    """`time` for the pipeline module: the replay's clock for ``time()``."""

    def __init__(self) -> None:
        self.now = 0.0

    def module(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(time=lambda: self.now, perf_counter=time.perf_counter)


def _events(log: InteractionLog, rows: np.ndarray[Any, Any], ns: str) -> Iterator[Event]:
    for r in rows:
        yield Event(
            namespace=ns,
            event_id=f"r{int(log.row[r])}-{int(r)}",
            event_type=log.event_type_names[int(log.event_types[r])],
            user_id=str(log.user_ids[int(log.users[r])]),
            item_id=str(log.item_ids[int(log.items[r])]),
            timestamp=float(log.timestamps[r]),
        )


class _Catalog:
    """The log's item categories as the catalog hook (category popularity reads them)."""

    def __init__(self, log: InteractionLog) -> None:
        categories = log.category_of()
        self.known = {
            str(item): Item(item_id=str(item), categories=[str(log.category_ids[c])])
            for item, c in zip(log.item_ids, categories, strict=True)
            if c >= 0
        }

    async def items(self, namespace: str, item_ids: Sequence[str]) -> Mapping[str, Item]:
        return {i: self.known[i] for i in item_ids if i in self.known}

    def cached_items(self, namespace: str, item_ids: Sequence[str]) -> Mapping[str, Item] | None:
        return {i: self.known[i] for i in item_ids if i in self.known}


async def replay(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    # what each entry's tuning chose (the model's own defaults for the rest)
    chosen = {
        m["name"]: (m["search"] or {}).get("chosen", m["params"])
        if m["name"] == "ranker"
        else m["params"]
        for m in report["models"]
    }
    weights = dict(Settings().event_weights) if args.dataset == "taobao" else None
    protocol, train, test = load_split(args.dataset, Path(args.train), weights=weights)
    queries = protocol.queries(train, test)
    sessions = isinstance(protocol, SessionNextClick)
    if sessions:  # the test clicks the protocol keeps (it drops clicks on unseen items)
        seen = np.bincount(train.items, minlength=test.n_items) > 0
        test = test.select(seen[test.items])
    blend = Blend(**chosen["blend"]).fit(train)
    parts = chosen["blend"]["components"]
    models: list[Any] = [COMPONENTS[name](**parts[name]).fit(train) for name in blend.weights]
    offline: Any = blend
    if args.scorer == "ranker":
        offline = fit_for(LearnedRanker(**chosen["ranker"]), train, test)
        models.append(offline)
    offline_metrics = evaluate_model(offline, queries)

    with tempfile.TemporaryDirectory() as tmp:
        servers = [
            stack.start_redis(stack.free_port(), Path(tmp) / "redis"),
            stack.start_moto(stack.free_port(), Path(tmp)),
        ]
        try:
            settings = Settings(
                redis_url=f"redis://127.0.0.1:{servers[0].port}/0",
                aws_endpoint_url=servers[1].url,
                namespace="replay",
                bucket="replay-models",
                table_prefix="replay",
                ranking_budget_ms=60_000,
                store_timeout_ms=30_000,
                source_timeout_ms=30_000,
            )
            stack.create_resources(settings)
            run = RunInfo(data=DataRange("replay", train.start, train.end, len(train)))
            async with open_registry(settings) as registry:
                for model in [*models, blend]:
                    await registry.publish(model, run)
            served = await _served(settings, train, test, sessions, args)
        finally:
            for server in reversed(servers):
                server.stop()
    return {
        "dataset": args.dataset,
        "scorer": args.scorer,
        "offline_targets": len(queries),
        "offline": offline_metrics,
        **served,
    }


async def _served(
    settings: Settings,
    train: InteractionLog,
    test: InteractionLog,
    sessions: bool,
    args: argparse.Namespace,
) -> dict[str, Any]:
    ns = settings.namespace
    client = aioredis.from_url(settings.redis_url)
    clock = _Clock()
    setattr(ranker_module, "time", clock.module())  # noqa: B010 (the replay clock)
    try:
        hot = RedisHotStore(client, settings)
        events = list(_events(train, np.argsort(train.timestamps, kind="stable"), ns))
        for start in range(0, len(events), BATCH):
            await hot.apply(events[start : start + BATCH])
        pipeline = Ranker(
            client,
            MemoryDurableWindows(),
            settings,
            catalog=_Catalog(train) if not sessions else None,
        )
        await pipeline.warm(ns)
        last: dict[str, float] = {e.user_id or "": e.timestamp for e in events}
        ranks: list[int | None] = []
        took: list[float] = []
        for event in _events(test, np.argsort(test.timestamps, kind="stable"), ns):
            actor = event.user_id or ""
            # the protocol's targets: a session's next click (YooChoose), a view of a user
            # with an earlier event (Taobao); the query's time: the last click, the view's
            if actor in last and (sessions or event.event_type == "view"):
                clock.now = last[actor] if sessions else event.timestamp
                began = time.perf_counter()
                answer = await pipeline.recommend(ns, actor, K)
                took.append(time.perf_counter() - began)
                items = [r.item_id for r in answer.items]
                ranks.append(items.index(event.item_id) + 1 if event.item_id in items else None)
                if args.limit and len(ranks) >= args.limit:
                    break
            await hot.apply([event])
            last[actor] = event.timestamp
        await pipeline.aclose()
        return {
            "served_targets": len(ranks),
            "served": metrics_from_ranks(ranks),
            "request_ms_p50": float(np.median(took) * 1000) if took else None,
        }
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--dataset", choices=("yoochoose", "taobao"), required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--params", required=True)
    parser.add_argument("--scorer", choices=("ranker", "blend"), default="ranker")
    parser.add_argument("--limit", type=int, default=0, help="stop after N served targets")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = asyncio.run(replay(args, json.loads(Path(args.params).read_text())))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
