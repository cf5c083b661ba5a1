"""Events in motion: the event schema, the record envelope, the Kinesis producer and the
faust ``kinesis://`` transport (shard readers, leases, checkpoints)."""
