"""The core subcommands: up, down, status, serve, agents, demo."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from urllib.parse import urlsplit

from recstream import stack
from recstream.errors import StackError
from recstream.settings import Settings

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = subparsers.add_parser(
        "up", help="start redis-server and the AWS emulator, create resources"
    )
    up.add_argument(
        "--kinesis-mock",
        action="store_true",
        help="also start kinesis-mock (on RECSTREAM_KINESIS_ENDPOINT_URL's port)",
    )
    up.set_defaults(handler=cmd_up)
    down = subparsers.add_parser("down", help="stop what `recstream up` started (data is kept)")
    down.add_argument(
        "--wipe",
        action="store_true",
        help="also delete the stack's data (Redis, emulator state), so the next `up` is clean",
    )
    down.set_defaults(handler=cmd_down)
    status = subparsers.add_parser(
        "status", help="what the local stack runs, where its data lives and how big it is"
    )
    status.set_defaults(handler=cmd_status)

    serve = subparsers.add_parser("serve", help="run the API (collector and ranking)")
    serve.add_argument("--host", default=None, help="default: RECSTREAM_API_HOST")
    serve.add_argument("--port", type=int, default=None, help="default: RECSTREAM_API_PORT")
    serve.add_argument(
        "--workers", type=int, default=None, help="API processes; default: RECSTREAM_API_WORKERS"
    )
    serve.set_defaults(handler=cmd_serve)

    agents = subparsers.add_parser("agents", help="run the stream agents (one worker)")
    agents.set_defaults(handler=cmd_agents)

    demo = subparsers.add_parser("demo", help="start everything and replay a real dataset")
    demo.add_argument("--events", type=int, default=20_000, help="how many events to replay")
    demo.add_argument(
        "--dataset",
        choices=["movielens", "yoochoose", "taobao"],
        default="movielens",
        help="movielens ships in data/; the others are read from --data-dir at run time",
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent.parent / "shared" / "data",
        help="folder with the shared datasets (default: ../shared/data)",
    )
    demo.add_argument(
        "--no-wait", action="store_true", help="exit after the demo instead of serving until Ctrl-C"
    )
    demo.set_defaults(handler=cmd_demo)


def _port(url: str | None, what: str) -> int:
    if not url:
        raise StackError(f"{what} is not set; `recstream up` needs a local endpoint")
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
        raise StackError(
            f"{what}={url} is not a loopback URL with a port; `up` runs servers locally"
        )
    return parts.port


def bring_up(settings: Settings, *, kinesis_mock: bool = False) -> list[str]:
    """Start whatever of the local stack is not already answering, then create resources."""
    state = settings.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    redis_port = urlsplit(settings.redis_url).port or 6379
    if not stack.port_open(redis_port):
        server = stack.start_redis(redis_port, state / "redis", durable=True)
        stack.write_pidfile(state, server)
        started.append(f"redis-server on 127.0.0.1:{redis_port}")
    moto_port = _port(settings.aws_endpoint_url, "RECSTREAM_AWS_ENDPOINT_URL")
    if not stack.port_open(moto_port):
        server = stack.start_moto(
            moto_port,
            state,
            state_dir=state / "moto",
            snapshot_every_s=settings.emulator_snapshot_s,
            max_records_per_shard=settings.emulator_max_records,
        )
        stack.write_pidfile(state, server)
        started.append(f"moto server on {server.url}")
    if kinesis_mock or settings.kinesis_endpoint_url:
        port = _port(settings.kinesis_endpoint_url, "RECSTREAM_KINESIS_ENDPOINT_URL")
        if not stack.port_open(port):
            server = stack.start_kinesis_mock(
                port, state, settings.kinesis_mock_dir.resolve(), persist_dir=state / "kinesis-mock"
            )
            stack.write_pidfile(state, server)
            started.append(f"kinesis-mock on {server.url}")
    stack.create_resources(settings)
    return started


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    started = bring_up(settings, kinesis_mock=args.kinesis_mock)
    for line in started:
        print(f"started {line}")
    if not started:
        print("the local stack was already running")
    print(
        f"resources ready: stream {settings.stream_name}, tables {settings.table_prefix}-*, "
        f"bucket {settings.bucket}, queue {settings.dlq_name}"
    )
    return 0


# What `up` keeps under the state directory: (server, pid file stem, data folder).
DATA = (
    ("redis-server", "redis-server", "redis"),
    ("moto server", "moto-server", "moto"),
    ("kinesis-mock", "kinesis-mock", "kinesis-mock"),
)


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    state = settings.state_dir.resolve()
    stopped = [p.stem for p in sorted(Path(state).glob("*.pid")) if stack.stop_pidfile(p)]
    print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    if args.wipe:
        for _, _, folder in DATA:
            shutil.rmtree(state / folder, ignore_errors=True)
        print(f"deleted the stack's data under {state}; the next `recstream up` starts clean")
    return 0


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console
    from rich.table import Table

    state = settings.state_dir.resolve()
    table = Table(title=f"local stack ({state})")
    for column in ("server", "state", "pid", "address", "data", "size"):
        table.add_column(column, justify="right" if column in ("pid", "size") else "left")
    for name, stem, folder in DATA:
        running = stack.read_pidfile(state / f"{stem}.pid")
        data = state / folder
        table.add_row(
            name,
            "[green]running[/green]" if running else "[dim]stopped[/dim]",
            str(running[0]) if running else "",
            f"127.0.0.1:{running[1]}" if running else "",
            str(data) if data.exists() else "[dim](none)[/dim]",
            _size(stack.disk_usage(data)) if data.exists() else "",
        )
    Console().print(table)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from serving.app import run

    run(
        settings,
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        workers=args.workers,
    )
    return 0


def cmd_agents(args: argparse.Namespace, settings: Settings) -> int:
    from agents.worker import run

    return run(settings)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from recstream.demo import run_demo

    return run_demo(
        settings,
        events=args.events,
        wait=not args.no_wait,
        dataset=args.dataset,
        data_dir=args.data_dir,
    )
