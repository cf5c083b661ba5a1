"""What the API's start sets up for the whole process."""

from __future__ import annotations

import httpx
import numpy as np
import scipy.linalg  # noqa: F401  (its own OpenBLAS, loaded by the API's models)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from threadpoolctl import threadpool_info  # type: ignore[import-untyped]

from recstream import stack
from serving.app import create_app
from serving.http import json_response
from tests.conftest import LocalStack, make_settings, serve_in_thread


def blas_threads() -> list[int]:
    return [int(pool["num_threads"]) for pool in threadpool_info() if pool["user_api"] == "blas"]


async def blas(request: Request) -> Response:
    return json_response({"threads": blas_threads()})


async def test_the_api_runs_numpy_s_blas_on_one_thread(local_stack: LocalStack) -> None:
    """A request's ALS fold-in runs on the event loop; OpenBLAS's own threads, competing
    with the agents and the other workers for the cores, made it 40-180 ms instead of
    ~0.3 ms (docs/serving.md). The start limits BLAS to one thread, and the stop gives
    the process its own setting back. (This machine's default is a thread per core; on
    one core the check could not tell.)"""
    np.dot(np.ones((64, 64)), np.ones((64, 64)))  # BLAS loaded
    before = blas_threads()
    assert before, "no BLAS library threadpoolctl sees"
    app = create_app(make_settings(local_stack))
    app.router.routes.append(Route("/blas", blas))
    port = stack.free_port()
    with serve_in_thread(app, port):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            answer = await client.get("/blas")
    assert answer.json() == {"threads": [1] * len(before)}
    assert blas_threads() == before
