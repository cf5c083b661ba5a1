"""Served quality, measured online: `recstream evaluate --online` on a private stack.

    python -m bench.online [--dataset yoochoose|taobao] [--sessions N] [--params REPORT.json]
                           [--scorer ranker|blend] [--probes N] [--path FILE] [--json OUT.json]

Starts its own redis-server and AWS emulator on free ports, the API (`serving.app`, one
process) and one agent worker (`recstream agents`), exactly as a user runs them, then
replays the dataset's protocol through them (training/online.py): every training event
through the collector, the components, the blend and the learned ranker of a
`recstream evaluate --json` report (``--params``) published, and for each test session
(YooChoose) or user (Taobao) its events one at a time, the API asked before each target
as of the target query's time. It prints the served metrics beside the served model's and
the blend's offline metrics on the very same targets. The dataset defaults to the
development slice in ../shared/data.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from bench.common import local_settings, start_api, wait_http
from recstream import stack
from recstream.settings import Settings
from training.online import OnlineReport, print_report, run_online, served_models
from training.sources import default_path

__all__ = ["main"]


def start_agents(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **settings.to_env(),
        # a replay waits for each event before the next: poll often
        "RECSTREAM_POLL_INTERVAL_S": "0.02",
        "RECSTREAM_AGENT_BATCH_WINDOW_S": "0.005",
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "recstream.cli", "agents"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def measure(args: argparse.Namespace) -> OnlineReport:
    path = args.path or default_path(args.dataset)
    if path is None:
        raise SystemExit(f"no {args.dataset} slice found; pass --path FILE")
    with local_settings() as settings, tempfile.TemporaryDirectory() as tmp:
        port = stack.free_port()
        # the access log's line per request (tens of thousands here) is left out
        api = start_api(settings.model_copy(update={"log_level": "WARNING"}), port)
        agents = start_agents(settings, Path(tmp) / "agents.log")
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_http(url, api)
            return await run_online(
                settings,
                args.dataset,
                path,
                api=url,
                sessions=args.sessions,
                models=served_models(args.params, args.scorer, args.dataset),
                probes=args.probes,
            )
        finally:
            for process in (agents, api):
                process.terminate()
                process.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=["yoochoose", "taobao"], default="yoochoose")
    parser.add_argument("--path", type=Path, help="default: the dev slice in ../shared/data")
    parser.add_argument("--sessions", type=int, default=None, help="test sessions/users")
    parser.add_argument(
        "--params",
        type=Path,
        help="a `recstream evaluate --json` report: its tuned blend and ranker",
    )
    parser.add_argument(
        "--scorer",
        choices=["ranker", "blend"],
        default=None,
        help="default: the ranker when the report has one, else the blend",
    )
    parser.add_argument("--probes", type=int, default=20, help="targets also asked with debug=true")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    # One BLAS thread for the API and the agent worker (they inherit the environment):
    # OpenBLAS's own threads, with the agents and this replay busy on a 2-core machine,
    # made a request's ALS fold-in (two small products and a 128x128 solve) take 40-180 ms
    # instead of ~0.3, and item2item then missed its deadline in a third of the answers
    # (docs/serving.md, the online replay). The quality measured is the models', not that.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    report = asyncio.run(measure(args))
    print_report(report, Console())
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))


if __name__ == "__main__":
    main()
