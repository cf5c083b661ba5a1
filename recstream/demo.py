"""`recstream demo`: the whole path on one laptop, with a real dataset.

1. start the local stack (redis-server, moto server) and create the resources;
2. start the stream agents and the API as child processes;
3. replay MovieLens ratings (shipped in data/, GroupLens licence kept beside it) through
   ``POST /v1/events``, with a progress bar;
4. show a visitor's recommendations, click a few movies live, and show them again,
   timing how long the click takes to change the answer;
5. leave the API running, URL printed, until Ctrl-C.

Replayed events carry deterministic ids (``ml-{user}-{movie}``). A second run finds the
last of them already applied and skips the replay rather than posting it again: the
agents remember only each user's latest ids (``RECSTREAM_DEDUP_PER_ACTOR``), so a full
second replay would count the oldest events of the busiest users twice.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from recstream.commands import bring_up
from recstream.errors import StackError
from recstream.keys import Keys
from recstream.settings import Settings

__all__ = ["run_demo"]

ROOT = Path(__file__).resolve().parent.parent
MOVIELENS = ROOT / "data" / "movielens-small"
VISITOR = "demo-visitor"
LIVE_CLICKS = ("1", "2355", "3114")  # Toy Story, A Bug's Life, Toy Story 2


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


def _start_child(name: str, args: list[str], settings: Settings) -> Child:
    log = settings.state_dir.resolve() / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "recstream.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **settings.to_env()},
        )
    return Child(name, process, log)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop_child(child: Child) -> None:
    if child.process.poll() is None:
        child.process.terminate()
        try:
            child.process.wait(15)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait(5)


def _wait_for_api(url: str, child: Child, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise StackError(f"the API exited early; see {child.log}")
        with contextlib.suppress(httpx.HTTPError):
            # /readyz, not /healthz: ready once the start-up warm-up made its first
            # answer, so the demo's first table is not a cold process's
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.2)
    raise StackError(f"the API did not answer at {url} within {timeout:.0f}s; see {child.log}")


@dataclass(frozen=True)
class Replay:
    """A real dataset turned into events, plus what to click live afterwards."""

    name: str
    events: list[dict[str, Any]]
    titles: dict[str, str]
    live_clicks: tuple[str, ...]
    path: Path | None = None
    """The dataset file, for training (None: the bundled copy)."""


def movielens(limit: int, data_dir: Path) -> Replay:
    return Replay("MovieLens", movielens_events(limit), movie_titles(), LIVE_CLICKS)


def _last_session_items(events: list[dict[str, Any]], key: str) -> tuple[str, ...]:
    """Three distinct items a real visitor of the dataset looked at together."""
    last = events[-1][key]
    items = dict.fromkeys(e["item_id"] for e in events if e[key] == last)
    return tuple(list(items)[:3]) or (events[-1]["item_id"],)


def yoochoose(limit: int, data_dir: Path) -> Replay:
    # CC BY-NC-ND: never copied into the repository, read from ../shared/data at run time.
    path = data_dir / "yoochoose-rsc15-100k-dev" / "yoochoose-clicks-100k_dev.txt"
    with _open_dataset(path) as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    rows.sort(key=lambda r: float(r["Time"]))
    events = [
        {
            "event_id": f"yc-{r['SessionId']}-{r['ItemId']}-{r['Time']}",
            "event_type": "click",
            "session_id": r["SessionId"],
            "item_id": r["ItemId"],
            "timestamp": float(r["Time"]),
        }
        for r in rows[-limit:]
    ]
    return Replay("YooChoose", events, {}, _last_session_items(events, "session_id"), path)


TAOBAO_TYPES = {"pv": "view", "cart": "add_to_cart", "fav": "like", "buy": "purchase"}


def taobao(limit: int, data_dir: Path) -> Replay:
    path = data_dir / "taobao-userbehavior-head-dev" / "UserBehavior_head_dev.csv"
    with _open_dataset(path) as handle:
        rows = [r for r in csv.reader(handle) if len(r) == 5]
    rows.sort(key=lambda r: int(r[4]))
    events = [
        {
            "event_id": f"tb-{user}-{item}-{kind}-{ts}",
            "event_type": TAOBAO_TYPES.get(kind, kind),
            "user_id": user,
            "item_id": item,
            "timestamp": int(ts),
            "properties": {"category": category},
        }
        for user, item, category, kind, ts in rows[-limit:]
    ]
    return Replay("Taobao", events, {}, _last_session_items(events, "user_id"), path)


def _open_dataset(path: Path) -> Any:
    if not path.is_file():
        raise StackError(
            f"{path} not found; pass --data-dir pointing at the folder holding the shared "
            "datasets (the licence of this one forbids shipping it in the repository)"
        )
    return path.open(newline="")


DATASETS = {"movielens": movielens, "yoochoose": yoochoose, "taobao": taobao}


def movielens_events(limit: int) -> list[dict[str, Any]]:
    """The most recent ``limit`` ratings as events, oldest first."""
    with (MOVIELENS / "ratings.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows.sort(key=lambda r: int(r["timestamp"]))
    return [
        {
            "event_id": f"ml-{r['userId']}-{r['movieId']}",
            # A 4-5 star rating is a like; anything lower still says "watched".
            "event_type": "like" if float(r["rating"]) >= 4.0 else "view",
            "user_id": r["userId"],
            "item_id": r["movieId"],
            "timestamp": int(r["timestamp"]),
            "event_value": float(r["rating"]),
        }
        for r in rows[-limit:]
    ]


def moved_to_now(events: list[dict[str, Any]], now: float | None = None) -> list[dict[str, Any]]:
    """The events with their times moved together so that the newest is a minute ago.

    The datasets are years old (MovieLens' newest rating is of 2018): replayed as they
    are, the agents' popularity, decayed with a 30-day half-life, is about 1e-29 of its
    value by now and nothing trends in the last 24 h, so a new visitor's answer was the
    demo's own live clicks and films scored 0.000. Moved, the replay reads as the last
    months of a live site; gaps between events, and so sessions, are kept."""
    if not events:
        return events
    shift = (time.time() if now is None else now) - 60 - max(e["timestamp"] for e in events)
    return [{**e, "timestamp": e["timestamp"] + shift} for e in events]


def movie_titles() -> dict[str, str]:
    with (MOVIELENS / "movies.csv").open(newline="") as handle:
        return {row["movieId"]: row["title"] for row in csv.DictReader(handle)}


def _batches(items: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def replay(console: Console, client: httpx.Client, name: str, events: list[dict[str, Any]]) -> int:
    accepted = 0
    with Progress(
        TextColumn(f"[bold]replaying {name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("replay", total=len(events))
        for batch in _batches(events, 500):
            response = client.post("/v1/events", json=batch)
            if response.status_code != 202:
                raise StackError(f"the collector answered {response.status_code}: {response.text}")
            accepted += len(response.json()["accepted"])
            progress.advance(task, len(batch))
    return accepted


def applied(settings: Settings, events: list[tuple[str, str]]) -> bool:
    """Whether the agents have applied every (actor, event id)."""
    keys = Keys(settings.namespace)
    with redis.Redis.from_url(settings.redis_url) as r:
        return all(r.zscore(keys.seen(actor), event_id) is not None for actor, event_id in events)


def wait_until_applied(
    settings: Settings, events: list[tuple[str, str]], timeout: float = 180
) -> float:
    """Wait until the agents have applied these events; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if applied(settings, events):
            return time.monotonic() - started
        time.sleep(0.05)
    raise StackError(
        f"the agents did not apply the replayed events within {timeout:.0f}s; "
        f"see {settings.state_dir / 'agents.log'}"
    )


def show(console: Console, title: str, payload: dict[str, Any], titles: dict[str, str]) -> None:
    """One recommendation response as a table (titles where the dataset has them)."""
    # The title on its own line: as a table title rich wraps it to the table's width,
    # which a short list makes narrow.
    console.print(f"[bold]{title}[/bold]")
    table = Table()
    table.add_column("#", justify="right")
    table.add_column("movie" if titles else "item")
    table.add_column("score", justify="right")
    table.add_column("why")

    def why(reason: str) -> str:
        if reason.startswith("similar_to:"):
            source = reason.removeprefix("similar_to:")
            return f"similar to {titles.get(source, source)}"
        return reason.replace("_", " ")

    for rank, item in enumerate(payload["items"], 1):
        table.add_row(
            str(rank),
            titles.get(item["item_id"], item["item_id"]),
            f"{item['score']:.3f}",
            ", ".join(why(r) for r in item["reasons"]),
        )
    console.print(table)


def train_item2item(console: Console, settings: Settings, dataset: str, path: Path | None) -> None:
    """Publish an item-to-item model for the dataset, unless one is already serving."""
    with redis.Redis.from_url(settings.redis_url) as r:
        if r.exists(Keys(settings.namespace).model_pointer("item2item")):
            console.print("an item-to-item model is already serving; not retraining")
            return
    console.print(f"training item-to-item on {dataset} (first run only; about 15 s)…")
    # the model's defaults: the hyper-parameter search took a minute more, for a demo
    args = ["train", "--source", dataset, "--models", "item2item", "--no-tune"]
    if path is not None:
        args += ["--path", str(path)]
    started = time.monotonic()
    log = settings.state_dir.resolve() / "train.log"
    with log.open("ab") as out:
        result = subprocess.run(
            [sys.executable, "-m", "recstream.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **settings.to_env(), "COLUMNS": "120"},
            check=False,
        )
    if result.returncode != 0:
        raise StackError(f"training failed; see {log}")
    console.print(f"item-to-item model published in {time.monotonic() - started:.0f}s")


def reflects(answer: dict[str, Any], clicked: set[str]) -> bool:
    """Whether an answer shows the clicks: a clicked item (kept by the seen policy), or
    an item recommended because it is similar to one."""
    for item in answer["items"]:
        if item["item_id"] in clicked:
            return True
        for reason in item.get("reasons", []):
            kind, _, about = reason.partition(":")
            if kind == "similar_to" and about in clicked:
                return True
    return False


def run_demo(
    settings: Settings,
    *,
    events: int,
    wait: bool,
    dataset: str = "movielens",
    data_dir: Path = ROOT.parent / "shared" / "data",
) -> int:
    console = Console()
    console.rule("[bold]recstream demo")
    if dataset == "movielens" and "RECSTREAM_SEEN_POLICY" not in os.environ:
        # Films already watched are not recommended again; a shop's namespace keeps
        # re-views (they convert). The per-namespace policy, as a user would set it (a
        # policy the user set wins).
        policies = {**settings.seen_policy, settings.namespace: "exclude"}
        settings = settings.model_copy(update={"seen_policy": policies})
        console.print(
            f"films already watched are excluded in namespace {settings.namespace!r} "
            f"(RECSTREAM_SEEN_POLICY='{json.dumps(policies)}')"
        )
    for line in bring_up(settings):
        console.print(f"started {line}")
    # SIGTERM (a `kill`, a closed terminal) as an exit that runs the `finally` below: by
    # default Python dies on it at once and left the agents and the API running.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    children = [
        _start_child("agents", ["agents"], settings),
        _start_child("api", ["serve"], settings),
    ]
    try:
        _wait_for_api(settings.api_url, children[1])
        console.print(f"API up at {settings.api_url}; agents logging to {children[0].log}")
        data = DATASETS[dataset](events, data_dir)
        titles, live_clicks = data.titles, data.live_clicks
        replayed = moved_to_now(data.events)
        tail = [
            (e.get("user_id") or f"session:{e['session_id']}", e["event_id"])
            for e in replayed[-50:]
        ]
        with httpx.Client(base_url=settings.api_url, timeout=60) as client:
            if applied(settings, tail):
                console.print(
                    f"{data.name} was already replayed into namespace {settings.namespace!r}; "
                    "skipping the replay (`recstream down` and a new state dir start afresh)"
                )
            else:
                started = time.monotonic()
                accepted = replay(console, client, data.name, replayed)
                took = time.monotonic() - started
                console.print(
                    f"{accepted} events accepted in {took:.1f}s ({accepted / took:,.0f}/s)"
                )
                lag = wait_until_applied(settings, tail)
                console.print(f"agents caught up {lag:.1f}s after the last batch was accepted")

            train_item2item(console, settings, dataset, data.path)

            # A fresh visitor each run, so an earlier demo's clicks do not show up as history.
            visitor = f"{VISITOR}-{int(time.time())}"
            params: dict[str, str | int] = {"user_id": visitor, "num_results": 8}
            before = client.get("/v1/recommendations", params=params).json()
            show(console, f"Recommendations for {visitor}, before any click", before, titles)

            clicks = [
                {"event_type": "click", "user_id": visitor, "item_id": item} for item in live_clicks
            ]
            console.print("clicking live: " + ", ".join(titles.get(i, i) for i in live_clicks))
            clicked_at = time.monotonic()
            client.post("/v1/events", json=clicks).raise_for_status()
            after = before
            changed_at: float | None = None
            while time.monotonic() - clicked_at < 30:
                after = client.get("/v1/recommendations", params=params).json()
                if reflects(after, set(live_clicks)):
                    changed_at = changed_at or time.monotonic()
                    # A source that missed its deadline (a busy machine, cold caches)
                    # leaves the answer partial: ask again to show the whole one.
                    if not after.get("degraded"):
                        break
                time.sleep(0.01)
            latency = ((changed_at or time.monotonic()) - clicked_at) * 1000
            show(console, f"Recommendations for {visitor}, after the clicks", after, titles)
            if after.get("degraded"):
                missed = ", ".join(after["degraded"])
                console.print(f"(a partial answer: {missed} missed the deadline)")
            console.print(f"click → changed recommendations in [bold]{latency:.0f} ms[/bold]")

        console.rule()
        console.print(f"API: {settings.api_url}")
        console.print(
            f"  curl '{settings.api_url}/v1/recommendations?user_id=414&num_results=5'\n"
            f"  curl -X POST {settings.api_url}/v1/events -H 'content-type: application/json' "
            """-d '{"event_type":"click","user_id":"me","item_id":"1"}'"""
        )
        if wait:
            console.print("serving until Ctrl-C (`recstream down` stops Redis and the emulator)")
            with contextlib.suppress(KeyboardInterrupt):
                while all(c.process.poll() is None for c in children):
                    time.sleep(0.5)
        return 0
    finally:
        for child in children:
            _stop_child(child)
        signal.signal(signal.SIGTERM, previous)
