"""Training benchmark: fit time and peak memory per model, and how fit time scales.

    python -m bench.training [--data DIR] [--repeat 3] [--fractions 0.1,0.25,0.5,1]
                             [--datasets movielens,taobao] [--models a,b]

For each dataset (MovieLens small, the Taobao slice) and each model with its default
parameters it prints:

- fit time p50 / p99 over ``--repeat`` fits and the throughput (input rows per second);
- the ratio of the p50 to the reference, the popularity model's p50 measured in the same
  run (counting is the cheapest thing any model does with the log);
- the peak memory traced by tracemalloc during one fit (numpy buffers included; memory a
  C extension allocates on its own, e.g. inside implicit's solver, is not seen);
- scaling: the fit time on the first 10%..100% of the rows in time order, and the growth
  order k of time ~ rows^k, fitted by least squares on the log-log points.

It is a program, never part of the test run.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from training.data import InteractionLog, load_movielens, load_taobao
from training.evaluate import TAOBAO_WINDOW
from training.models import MODELS, ItemScorer

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
FALLBACK_DATA = Path("/work/shared/data")
REFERENCE = "popularity"
SMALL = {"als": {"factors": 64}, "segmentation": {"factors": 64}}


def loaders(data: Path) -> dict[str, Callable[[], InteractionLog]]:
    return {
        "movielens": lambda: load_movielens(data / "movielens-small" / "ratings.csv"),
        "taobao": lambda: load_taobao(
            data / "taobao-userbehavior-head-dev" / "UserBehavior_head_dev.csv",
            window=TAOBAO_WINDOW,
        ),
    }


def build(name: str) -> ItemScorer:
    return MODELS[name](**SMALL.get(name, {}))


def fit_seconds(name: str, log: InteractionLog) -> float:
    model = build(name)
    gc.collect()
    started = time.perf_counter()
    model.fit(log)
    return time.perf_counter() - started


def peak_bytes(name: str, log: InteractionLog) -> int:
    model = build(name)
    gc.collect()
    tracemalloc.start()
    try:
        model.fit(log)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def growth_order(rows: Sequence[int], seconds: Sequence[float]) -> float:
    x = np.log(np.asarray(rows, dtype=np.float64))
    y = np.log(np.maximum(np.asarray(seconds, dtype=np.float64), 1e-6))
    slope, _ = np.polyfit(x, y, 1)
    return float(slope)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=None, help="the shared datasets directory")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fractions", default="0.1,0.25,0.5,1")
    parser.add_argument("--datasets", default="movielens,taobao")
    parser.add_argument(
        "--models",
        default="popularity,trending,recently_viewed,category_popularity,item2item,sknn,als,"
        "segmentation,blend",
    )
    args = parser.parse_args(argv)
    data = args.data or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else FALLBACK_DATA)
    fractions = [float(f) for f in args.fractions.split(",")]
    names = [m.strip() for m in args.models.split(",")]
    if REFERENCE not in names:
        names.insert(0, REFERENCE)

    for dataset in args.datasets.split(","):
        log = loaders(data)[dataset]().sorted()
        print(f"\n## {dataset}: {len(log):,} rows, {log.n_users:,} users, {log.n_items:,} items")
        print(
            f"{'model':22s} {'p50 s':>8s} {'p99 s':>8s} {'rows/s':>12s} {'x ref':>8s} "
            f"{'peak MiB':>9s}"
        )
        timings: dict[str, list[float]] = {}
        for name in names:
            fit_seconds(name, log)  # warm-up: imports, caches
            timings[name] = [fit_seconds(name, log) for _ in range(args.repeat)]
        reference = statistics.median(timings[REFERENCE])
        for name in names:
            samples = timings[name]
            p50 = statistics.median(samples)
            print(
                f"{name:22s} {p50:8.3f} {percentile(samples, 0.99):8.3f} "
                f"{len(log) / p50:12,.0f} {p50 / reference:8.1f} "
                f"{peak_bytes(name, log) / 2**20:9.1f}"
            )

        print(f"\nscaling on {dataset}: fit seconds (p50 of {args.repeat}) at each fraction")
        sizes = [max(1, int(len(log) * f)) for f in fractions]
        header = " ".join(f"{f:>8.0%}" for f in fractions)
        print(f"{'model':22s} {header} {'order k':>8s}")
        for name in names:
            seconds = [
                statistics.median(
                    fit_seconds(name, log.select(np.arange(n))) for _ in range(args.repeat)
                )
                for n in sizes
            ]
            cells = " ".join(f"{s:8.3f}" for s in seconds)
            print(f"{name:22s} {cells} {growth_order(sizes, seconds):8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
