"""A lease worker in its own process, so a test can SIGKILL it.

Usage: ``python -m tests.streams.lease_worker APP_ID WORKER_ID`` with RECSTREAM_* set.
Prints one JSON line ``{"owned": [...]}`` after every assignment change.
"""

from __future__ import annotations

import asyncio
import json
import sys

from recstream.settings import Settings
from streams.leases import LeaseCoordinator


async def main(app_id: str, worker_id: str) -> None:
    settings = Settings()
    coordinator: LeaseCoordinator

    async def on_change(assigned: frozenset[str], revoked: frozenset[str]) -> None:
        print(json.dumps({"owned": sorted(coordinator.owned())}), flush=True)

    coordinator = LeaseCoordinator(
        settings,
        app_id=app_id,
        stream_name=settings.stream_name,
        worker_id=worker_id,
        on_change=on_change,
    )
    await coordinator.start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
