"""JSON responses: orjson bodies, and errors with a machine code and a human sentence."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

__all__ = ["error_response", "json_response"]


def json_response(
    payload: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(payload),
        status_code=status_code,
        media_type="application/json",
        headers=dict(headers or {}),
    )


def error_response(
    status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    return json_response(
        {"error": {"code": code, "message": message}}, status_code=status_code, headers=headers
    )
