"""CPU instructions per request of the API, counted by valgrind (callgrind), in process.

    python -m bench.request_cost [--requests 200] [--endpoints recommendations,healthz,events]
    python -m bench.request_cost --app-root ../old-checkout   # the same, another version
    python -m bench.request_cost --stages                     # where a recommendation's time goes

Why instructions: this machine's two vCPUs are shared, and CPU time per request moved by
±30 % between runs of unchanged code when other jobs ran (docs/serving-speed.md). An
instruction count does not move with the neighbours, so two versions of the code can be
compared one after the other, on any day, to within a fraction of a percent.

How: redis-server and the emulator run as usual (MovieLens loaded, item-to-item
published, as `bench.serving` does). The app runs under callgrind in its own process,
called through ASGI without a socket (HTTP parsing is uvicorn's and the same for every
endpoint). Instrumentation is switched on only around the measured requests, after a
warm-up, so imports, start-up and warm-up cost nothing. The budgets are raised for the
run (valgrind makes the code ~50 times slower; a source that missed its 15 ms deadline would
make the answer cheaper, not the code), and the answer cache is off: every
recommendation is computed. Every user is asked for once before the warm-up, so the
in-process caches are as warm as a server's that has run a while.

Endpoints: ``recommendations`` (GET, a random MovieLens user, 20 results),
``healthz`` (GET, the middleware stack and one Redis PING: the floor every request pays),
``events`` (POST one event, from 64 concurrent clients so the producer's group commit
batches as it does under load; its PutRecords calls go to the emulator).

Counts are of the app's process only: redis-server's and the emulator's work is not in
them. Needs valgrind (``apt-get install valgrind``).

``--stages`` runs the same recommendation requests without valgrind and prints the wall
time of each stage of the pipeline per request (each stage's function wrapped with a
clock in the measured process only): a map of where to look, not a count to compare; the
wrappers add about a microsecond a call.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.common import local_settings
from bench.serving import load_state, movielens
from recstream.settings import Settings

ENDPOINTS = ("recommendations", "healthz", "events")
ROOT = Path(__file__).resolve().parent.parent
INNER = "import runpy, sys; runpy.run_path(sys.argv[1])['main'](sys.argv[2:])"
"""Runs this file in the measured process, where ``root`` comes first on the path: the
app (and `bench.serving`) imported are that checkout's, which need not have this file."""
CLIENTS = 64
"""Concurrent posters for ``events``."""


async def asgi_call(
    app: Any, method: str, path: str, query: bytes = b"", body: bytes = b""
) -> tuple[int, bytes]:
    """One request through the app's ASGI callable: (status, body)."""
    headers = [(b"host", b"bench")]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    status = 0
    chunks: list[bytes] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:  # the body was read: the client now only waits for the answer
            await asyncio.Event().wait()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def _event(n: int) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"cost-{n}",
            "event_type": "click",
            "user_id": f"cost-user-{n % 5000}",
            "item_id": str(n * 7 % 9000 + 1),
        }
    )


async def _requests(app: Any, endpoint: str, first: int, count: int, users: Sequence[str]) -> int:
    """``count`` requests to ``endpoint``; how many were not answered as they should."""
    if endpoint == "events":
        bodies = [_event(first + n) for n in range(count)]
        failed = 0

        async def client() -> None:
            nonlocal failed
            while bodies:
                status, _ = await asgi_call(app, "POST", "/v1/events", body=bodies.pop())
                failed += status != 202

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        return failed
    rng = random.Random(first)
    failed = 0
    for _ in range(count):
        if endpoint == "healthz":
            status, _ = await asgi_call(app, "GET", "/healthz")
            failed += status != 200
        else:
            query = f"user_id={rng.choice(users)}&num_results=20".encode()
            status, answer = await asgi_call(app, "GET", "/v1/recommendations", query)
            # a degraded answer would be cheaper than a full one: count it as a failure
            failed += status != 200 or orjson.loads(answer).get("degraded") != []
    return failed


STAGES: tuple[tuple[str, str, str], ...] = (
    # (module, attribute, label): the stages of `Ranker._rank`, in the order they run
    ("serving.pipeline.ranker", "Ranker._parse", "state: parse the read"),
    ("serving.pipeline.ranker", "Ranker._source_now", "sources, all"),
    ("serving.pipeline.candidates", "Sources.repeat", "  recently_viewed"),
    ("serving.pipeline.candidates", "Sources.item2item_now", "  item2item"),
    ("serving.pipeline.candidates", "Sources.trending_now", "  trending"),
    ("serving.pipeline.candidates", "Sources.popular_now", "  popularity"),
    ("serving.pipeline.candidates", "Sources.category_popularity_now", "  category_popularity"),
    ("serving.pipeline.ranker", "shortlist", "shortlist"),
    ("serving.pipeline.ranker", "Ranker._merge", "merge"),
    ("serving.pipeline.ranker", "assemble", "features"),
    ("serving.pipeline.ranker", "apply_seen", "seen policy"),
    ("serving.pipeline.ranker", "Ranker._because", "explanations: item2item's because"),
    ("serving.pipeline.ranker", "Ranker._answer", "answer"),
)


def _clock_stages() -> dict[str, list[float]]:
    """Wrap each of `STAGES` with a clock; {label: [seconds, calls]}, filled as they run."""
    import importlib

    spent: dict[str, list[float]] = {}
    for module_name, attribute, label in STAGES:
        owner: Any = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        static = isinstance(raw, staticmethod)
        function = raw.__func__ if static else raw
        slot = spent[label] = [0.0, 0.0]

        def clocked(*args: Any, _f: Any = function, _slot: list[float] = slot, **kw: Any) -> Any:
            began = time.perf_counter()
            try:
                return _f(*args, **kw)
            finally:
                _slot[0] += time.perf_counter() - began
                _slot[1] += 1

        setattr(owner, name, staticmethod(clocked) if static else clocked)
    return spent


async def _inner(
    endpoint: str,
    warm: int,
    count: int,
    users: Sequence[str],
    profile: str | None = None,
    stages: bool = False,
) -> None:
    """In the process valgrind runs: warm up, then the measured requests between two
    lines on stdin (the parent switches instrumentation on and off there)."""
    from serving.app import create_app  # (imported here: the parent does not need it)

    spent = _clock_stages() if stages else None
    app = create_app(Settings())
    async with app.router.lifespan_context(app):
        if endpoint == "recommendations":
            # every user once first: the measured requests find the caches (neighbour
            # rows, catalog records) as a server that has run a while does
            for user in users:
                await asgi_call(app, "GET", "/v1/recommendations", f"user_id={user}".encode())
        failed = await _requests(app, endpoint, 0, warm, users)
        if spent is not None:
            for slot in spent.values():
                slot[:] = [0.0, 0.0]
            began, cpu = time.perf_counter(), time.process_time()
            failed += await _requests(app, endpoint, 1_000_000, count, users)
            wall, cpu = time.perf_counter() - began, time.process_time() - cpu
            print(f"per request: {wall / count * 1e6:.0f} µs wall, {cpu / count * 1e6:.0f} µs CPU")
            for label, (seconds, calls) in spent.items():
                each = seconds / count * 1e6
                print(f"  {label:<36} {each:7.1f} µs  ({calls / count:.2f} a request)")
            print(f"DONE {failed}", flush=True)
            return
        if profile is not None:
            # cProfile instead of callgrind: where the time goes by Python function
            # (its per-call overhead inflates call-heavy code; the shares, not the total)
            profiler = cProfile.Profile()
            profiler.enable()
            failed += await _requests(app, endpoint, 1_000_000, count, users)
            profiler.disable()
            profiler.dump_stats(profile)
            print(f"DONE {failed}", flush=True)
            return
        print(f"READY {failed}", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        failed = await _requests(app, endpoint, 1_000_000, count, users)
        print(f"DONE {failed}", flush=True)
        await asyncio.to_thread(sys.stdin.readline)


def _environment(
    settings: Settings, users: Sequence[str], root: Path, log_level: str
) -> dict[str, str]:
    """The measured process's environment: the stack's addresses, and the settings that
    make every request do its whole work."""
    env = dict(os.environ)
    for name in ("aws_endpoint_url", "kinesis_endpoint_url", "redis_url", "state_dir"):
        value = getattr(settings, name)
        if value is not None:
            env[f"RECSTREAM_{name.upper()}"] = str(value)
    env.update(
        {
            "RECSTREAM_ANSWER_CACHE_TTL_S": "0",
            "RECSTREAM_RANKING_BUDGET_MS": "60000",
            "RECSTREAM_STORE_TIMEOUT_MS": "30000",
            "RECSTREAM_SOURCE_TIMEOUT_MS": "30000",
            "RECSTREAM_LOG_LEVEL": log_level,
            # Refreshes that a clock drives (live lists every second, catalog records and
            # neighbour rows after their TTL) are amortized over ~1,000 requests a second
            # in production; under valgrind's slowness they would fall on every few
            # requests, and how many fell in the measured window varied the count by
            # ±15 % between runs. Off here, so the count is the request's own work.
            "RECSTREAM_LIVE_LIST_TTL_S": "86400",
            "RECSTREAM_CATALOG_CACHE_TTL_S": "86400",
            "RECSTREAM_ITEM_CACHE_TTL_S": "86400",
            # string hashing fixed: set and dict orders (and so the work of ties and
            # merges) otherwise differ from run to run, and moved the count by ~3 %
            "PYTHONHASHSEED": "0",
            "BENCH_USERS": ",".join(users),
            "PYTHONPATH": str(root),  # the app measured: this checkout's, or --app-root's
        }
    )
    return env


def _run_inner(
    settings: Settings,
    endpoint: str,
    warm: int,
    count: int,
    users: Sequence[str],
    root: Path,
    log_level: str,
    *extra: str,
    **output: Any,
) -> None:
    """The measured requests in a process of their own without valgrind (``extra``: what
    to do there instead of counting; ``output``: where its stdout or stderr goes)."""
    env = _environment(settings, users, root, log_level)
    subprocess.run(
        [sys.executable, "-c", INNER, __file__, "--inner", endpoint, "--warm", str(warm),
         "--requests", str(count), *extra],
        cwd=root, env=env, check=True, **output,
    )  # fmt: skip


def profile(
    settings: Settings,
    endpoint: str,
    warm: int,
    count: int,
    users: Sequence[str],
    path: Path,
    root: Path = ROOT,
    log_level: str = "INFO",
) -> None:
    """The same requests under cProfile (no valgrind); the statistics go to ``path``."""
    _run_inner(settings, endpoint, warm, count, users, root, log_level,
               "--profile", str(path), stdout=subprocess.DEVNULL)  # fmt: skip


def stage_times(
    settings: Settings, warm: int, count: int, users: Sequence[str], root: Path, log_level: str
) -> None:
    """`--stages`: the recommendation requests without valgrind, each stage clocked; the
    measured process prints the table."""
    _run_inner(settings, "recommendations", warm, count, users, root, log_level,
               "--stages", stderr=subprocess.DEVNULL)  # fmt: skip


def measure(
    settings: Settings,
    endpoint: str,
    warm: int,
    count: int,
    users: Sequence[str],
    root: Path = ROOT,
    log_level: str = "INFO",
    keep: Path | None = None,
) -> float:
    """Instructions per request of ``endpoint`` in a process of its own under callgrind
    (its dump copied to ``keep``, when given, for `callgrind_annotate`)."""
    valgrind = shutil.which("valgrind")
    control = shutil.which("callgrind_control")
    if valgrind is None or control is None:
        raise SystemExit("bench.request_cost needs valgrind: apt-get install valgrind")
    env = _environment(settings, users, root, log_level)
    with tempfile.TemporaryDirectory(prefix="recstream-cost-") as tmp:
        out = Path(tmp) / "callgrind.out"
        process = subprocess.Popen(
            [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
             sys.executable, "-c", INNER, __file__, "--inner", endpoint,
             "--warm", str(warm), "--requests", str(count)],
            cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert process.stdin is not None
        assert process.stdout is not None

        def step(word: str) -> int:
            for line in process.stdout:  # type: ignore[union-attr]
                if line.startswith(word):
                    return int(line.split()[1])
            raise SystemExit(f"the app under valgrind stopped before {word} ({endpoint})")

        def callgrind(switch: str) -> None:
            subprocess.run(
                [control, "-i", switch, str(process.pid)], check=True, capture_output=True
            )

        step("READY")
        callgrind("on")
        process.stdin.write("\n")
        process.stdin.flush()
        failed = step("DONE")
        callgrind("off")
        process.stdin.write("\n")
        process.stdin.flush()
        process.wait(600)
        if failed:
            raise SystemExit(f"{failed} of {count} {endpoint} requests failed or degraded")
        totals = [
            int(line.split()[1])
            for line in out.read_text().splitlines()
            if line.startswith(("totals:", "summary:"))
        ]
        if keep is not None:
            shutil.copyfile(out, keep)
    return max(totals) / count


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="measured, per endpoint")
    parser.add_argument("--warm", type=int, default=300, help="requests before measuring")
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument("--events", type=int, default=0, help="newest N ratings; 0 = all")
    parser.add_argument(
        "--app-root",
        type=Path,
        default=ROOT,
        help="measure the app of another checkout (e.g. a `git worktree` of an older "
        "commit), with this one's data and stack: a before/after comparison",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="the app's (INFO, as deployed, writes an access line per request)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="instead of counting, profile the measured requests with cProfile and print "
        "where the time goes by function (the statistics stay in PROFILE.{endpoint})",
    )
    parser.add_argument(
        "--callgrind-out",
        type=Path,
        help="keep each endpoint's callgrind dump as CALLGRIND_OUT.{endpoint} (read it with "
        "callgrind_annotate: where the instructions go by C function and library)",
    )
    parser.add_argument(
        "--stages",
        action="store_true",
        help="instead of counting, time each stage of the recommendation pipeline per "
        "request (no valgrind; wall time, a map rather than a measure to compare)",
    )
    parser.add_argument("--inner", choices=ENDPOINTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        users = os.environ.get("BENCH_USERS", "").split(",")
        where = str(args.profile) if args.profile is not None else None
        asyncio.run(_inner(args.inner, args.warm, args.requests, users, where, args.stages))
        return
    endpoints = [e for e in args.endpoints.split(",") if e]
    unknown = set(endpoints) - set(ENDPOINTS)
    if unknown:
        raise SystemExit(f"unknown endpoints {sorted(unknown)}: choose from {ENDPOINTS}")
    with local_settings() as settings:
        events = movielens(args.events)
        asyncio.run(load_state(settings, events))
        users = sorted({e.user_id for e in events if e.user_id})[:610]
        if args.stages:
            stage_times(settings, args.warm, args.requests, users, args.app_root.resolve(),
                        args.log_level)  # fmt: skip
            return
        if args.profile is not None:
            for e in endpoints:
                path = args.profile.with_suffix(f".{e}")
                profile(settings, e, args.warm, args.requests, users, path.resolve(),
                        args.app_root.resolve(), args.log_level)  # fmt: skip
                print(f"\n{e}: {args.requests} requests under cProfile ({path})")
                stats = pstats.Stats(str(path))
                stats.sort_stats("tottime").print_stats(25)
                stats.sort_stats("cumulative").print_stats(40)
            return
        costs = {
            e: measure(
                settings,
                e,
                args.warm,
                args.requests,
                users,
                args.app_root.resolve(),
                args.log_level,
                args.callgrind_out.with_suffix(f".{e}") if args.callgrind_out else None,
            )
            for e in endpoints
        }
    print(
        f"\nCPU instructions per request, the app's process ({args.requests} measured each; "
        f"the app of {args.app_root.resolve()})"
    )
    for endpoint, cost in costs.items():
        ratio = f"  ({cost / costs['healthz']:.1f} x /healthz)" if "healthz" in costs else ""
        print(f"  {endpoint:<16} {cost / 1e6:7.3f} M{ratio}")


if __name__ == "__main__":
    main()
