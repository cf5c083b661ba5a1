"""The core subcommands: up, down, serve, agents, demo."""

from __future__ import annotations

import argparse
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
    down = subparsers.add_parser("down", help="stop what `recstream up` started")
    down.set_defaults(handler=cmd_down)

    serve = subparsers.add_parser("serve", help="run the API (collector and ranking)")
    serve.add_argument("--host", default=None, help="default: RECSTREAM_API_HOST")
    serve.add_argument("--port", type=int, default=None, help="default: RECSTREAM_API_PORT")
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
        server = stack.start_redis(redis_port, state / "redis")
        stack.write_pidfile(state, server)
        started.append(f"redis-server on 127.0.0.1:{redis_port}")
    moto_port = _port(settings.aws_endpoint_url, "RECSTREAM_AWS_ENDPOINT_URL")
    if not stack.port_open(moto_port):
        server = stack.start_moto(moto_port, state)
        stack.write_pidfile(state, server)
        started.append(f"moto server on {server.url}")
    if kinesis_mock or settings.kinesis_endpoint_url:
        port = _port(settings.kinesis_endpoint_url, "RECSTREAM_KINESIS_ENDPOINT_URL")
        if not stack.port_open(port):
            server = stack.start_kinesis_mock(port, state, settings.kinesis_mock_dir.resolve())
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


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    state = settings.state_dir.resolve()
    stopped = [p.stem for p in sorted(Path(state).glob("*.pid")) if stack.stop_pidfile(p)]
    print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from serving.app import run

    run(settings, host=args.host or settings.api_host, port=args.port or settings.api_port)
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
