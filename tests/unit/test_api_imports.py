"""The API process does not import faust: only the agents run it. faust's import costs
the API's start-up (~0.14 s and ~7 MB here) and reads ``--loop``/``-L`` from the command
line, which broke `bench.serve_app` once its imports reached faust (session 15)."""

from __future__ import annotations

import subprocess
import sys


def test_the_api_and_its_producer_load_without_faust() -> None:
    code = (
        "import sys, serving.app, streams.producer, agents.windows, streams.kinesis; "
        "assert 'faust' not in sys.modules, 'faust imported'; "
        "streams.kinesis.make_app; "  # the app helpers are still there, imported on use
        "assert 'faust' in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
