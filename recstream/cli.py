"""The `recstream` command line.

    recstream up | down            start / stop the embedded local stack
    recstream serve                the API (collector + ranking), default 127.0.0.1:8000
    recstream agents               the stream workers
    recstream demo                 everything above, then replay a real dataset
    recstream streams status       per-shard owner, checkpoint, lag and lease age
    recstream train | evaluate | models ...   offline training (see training/cli.py)
    recstream catalog load         fill the item/user catalog from CSV (recstream/catalog_cli.py)
    recstream archive export | dlq replay     the S3 archive, the dead-letter queue
    recstream trending rebuild     popularity and trend lists from the S3 archive
    recstream keys create | list | revoke     API keys (see docs/security.md)

Each package adds its own subcommands through a ``register(subparsers)`` function, so
this module only wires them together.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from recstream.errors import RecstreamError
from recstream.settings import Settings

__all__ = ["main"]

Handler = Callable[[argparse.Namespace, Settings], int]


def _registrars() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    # Imported lazily so that `recstream up` does not pay for faust's or numpy's import.
    from agents import cli as agents_cli
    from agents import trending_cli
    from recstream import apikeys_cli, catalog_cli, commands
    from streams import cli as streams_cli
    from training import cli as training_cli

    return [
        commands.register,
        streams_cli.register,
        training_cli.register,
        catalog_cli.register,
        agents_cli.register,
        trending_cli.register,
        apikeys_cli.register,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recstream",
        description="Real-time recommendations on Kinesis, DynamoDB, S3, SQS and Redis.",
        epilog="Settings come from RECSTREAM_* environment variables; see README.md.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _registrars():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        settings = Settings()
    except ValueError as exc:
        print(f"recstream: invalid settings: {exc}", file=sys.stderr)
        return 2
    try:
        return handler(args, settings)
    except RecstreamError as exc:
        print(f"recstream: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
