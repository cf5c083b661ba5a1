"""``python -m streams.kinesis module:factory``: run one faust worker on Kinesis.

The factory takes `Settings` (built here from RECSTREAM_* variables) and returns the app.
SIGTERM or SIGINT stops it cleanly (commit, release the leases); SIGKILL does not, and the
other workers take its leases once they expire.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from recstream.settings import Settings
from streams.kinesis.app import load_factory, run_worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streams.kinesis", description=__doc__)
    parser.add_argument("factory", help="module:function taking Settings, returning a faust App")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    asyncio.run(run_worker(load_factory(args.factory), Settings()))


if __name__ == "__main__":
    main()
