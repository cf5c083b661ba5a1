"""faust-streaming on Kinesis: the ``kinesis://`` transport, shard readers and the app
helpers (`make_app`, `running`, `run_worker`). See docs/streams.md."""

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
