"""faust-streaming on Kinesis: the ``kinesis://`` transport, shard readers and the app
helpers (`make_app`, `running`, `run_worker`). See docs/streams.md.

The names are imported when first used (PEP 562): what only reads or writes records (the
API's producer, `unpack`) imports `streams.kinesis.shards` without faust, whose import
costs the API's start-up and reads ``--loop``/``-L`` from the command line."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streams.kinesis.app import MANDATORY, consumer_of, make_app, run_worker, running
    from streams.kinesis.shards import ShardMap, list_shards, partition_of, shard_id_of, unpack

__all__ = [
    "MANDATORY",
    "ShardMap",
    "consumer_of",
    "list_shards",
    "make_app",
    "partition_of",
    "run_worker",
    "running",
    "shard_id_of",
    "unpack",
]

_HOME = {
    **dict.fromkeys(("MANDATORY", "consumer_of", "make_app", "run_worker", "running"), "app"),
    **dict.fromkeys(("ShardMap", "list_shards", "partition_of", "shard_id_of", "unpack"), "shards"),
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
