"""The feature vectors' durable copy, as the agents and serving share it.

The agents keep each actor's feature vector in Redis (``rs:{ns}:feat:{actor}`` and
``rs:{ns}:emb:{actor}``, agents/features.py) and copy it to DynamoDB
``{prefix}-features`` after every batch (`DynamoFeatures`), to merge it back when Redis
lost the hash; serving reads the same copy to put a lost vector back beside a restored
window (serving/pipeline/state.py). An affinity is stored as ``"{score}@{ts}"``
(`parse_score`).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from recstream.aws import until_processed
from recstream.dynamo import DURABLE_ITEM_BYTES, BatchGets, in_parallel
from recstream.settings import Settings
from recstream.windows import Actor

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

__all__ = ["DynamoFeatures", "FeatureCopy", "parse_score"]


def parse_score(raw: str) -> tuple[float, float]:
    """``"{score}@{ts}"`` -> (score, ts)."""
    score, _, ts = raw.rpartition("@")
    return float(score), float(ts)


@dataclass(frozen=True)
class FeatureCopy:
    """What the durable store holds for one actor."""

    features: dict[str, str]
    embedding: dict[str, bytes]


def _bounded(features: dict[str, str], settings: Settings) -> bytes:
    """The features as JSON, without the weakest affinities beyond the item budget (the
    caps keep a hash far below it; this is the last guard against a refused item)."""
    body = orjson.dumps(features)
    if len(body) <= DURABLE_ITEM_BYTES:
        return body
    kept = dict(features)
    names = sorted(
        (n for n in kept if n.startswith("a:")),
        key=lambda n: abs(parse_score(kept[n])[0]),
    )
    while len(body) > DURABLE_ITEM_BYTES and names:
        del kept[names.pop(0)]
        body = orjson.dumps(kept)
    return body


class DynamoFeatures:
    """Durable feature vectors on ``{prefix}-features``: ``pk`` = ``{ns}#{actor}``,
    ``features`` (JSON of the hash), ``embedding`` (JSON, vector base64) when there is
    one, ``updated_at``, ``expires_at`` (the table's TTL attribute)."""

    def __init__(
        self, client: DynamoDBClient, settings: Settings, reads: BatchGets | None = None
    ) -> None:
        self.client = client
        self.settings = settings
        self.table = settings.features_table
        self.reads = reads or BatchGets(client, settings)
        """Its `get_many` reads (shared with the windows' to coalesce them)."""

    @staticmethod
    def pk(namespace: str, actor: str) -> str:
        return f"{namespace}#{actor}"

    async def put(self, copies: Mapping[Actor, FeatureCopy]) -> None:
        now = time.time()
        requests: list[dict[str, Any]] = []
        for (namespace, actor), copy in copies.items():
            if not copy.features:
                continue
            item: dict[str, Any] = {
                "pk": {"S": self.pk(namespace, actor)},
                "features": {"S": _bounded(copy.features, self.settings).decode()},
                "updated_at": {"N": repr(now)},
                "expires_at": {"N": str(int(now + self.settings.window_ttl_s))},
            }
            if copy.embedding:
                doc = {k: base64.b64encode(v).decode() for k, v in copy.embedding.items()}
                item["embedding"] = {"S": orjson.dumps(doc).decode()}
            requests.append({"PutRequest": {"Item": item}})
        await in_parallel(
            [
                self._batch_write({self.table: requests[start : start + 25]})
                for start in range(0, len(requests), 25)
            ]
        )

    async def delete(self, actors: Iterable[Actor]) -> None:
        """Delete the copies of ``actors`` (absent ones are no error)."""
        requests = [
            {"DeleteRequest": {"Key": {"pk": {"S": self.pk(ns, actor)}}}}
            for ns, actor in sorted(set(actors))
        ]
        await in_parallel(
            [
                self._batch_write({self.table: requests[start : start + 25]})
                for start in range(0, len(requests), 25)
            ]
        )

    async def _batch_write(self, request: dict[str, Any]) -> None:
        """A BatchWriteItem, resending what DynamoDB left unprocessed with backoff."""
        async for _ in until_processed(
            self.client.batch_write_item,
            request,
            "UnprocessedItems",
            f"batch_write_item on {self.table!r}",
            f"DynamoDB kept feature vectors unprocessed on {self.table!r}; raise its capacity",
            self.settings,
        ):
            pass

    async def get_many(self, actors: Sequence[Actor]) -> dict[Actor, FeatureCopy]:
        by_pk = {self.pk(ns, actor): (ns, actor) for ns, actor in actors}
        found: dict[Actor, FeatureCopy] = {}
        for pk, item in (await self.reads.get(self.table, list(by_pk))).items():
            embedding = {}
            if "embedding" in item:
                doc = orjson.loads(item["embedding"]["S"])
                embedding = {k: base64.b64decode(v) for k, v in doc.items()}
            found[by_pk[pk]] = FeatureCopy(orjson.loads(item["features"]["S"]), embedding)
        return found
