"""JSON responses: orjson bodies, and errors with a machine code and a human sentence."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from recstream.settings import NAMESPACE_PATTERN, Settings

__all__ = ["error_response", "json_response", "request_namespace"]

_NAMESPACE = re.compile(NAMESPACE_PATTERN)


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


def request_namespace(request: Request) -> str | Response:
    """The route's ``{namespace}`` (the default one on the short forms), or the 404 that
    says why it is not served here. Every namespaced route checks it the same way."""
    settings: Settings = request.app.state.settings
    namespace = str(request.path_params.get("namespace", settings.namespace))
    if not _NAMESPACE.fullmatch(namespace):
        return error_response(
            404, "bad_namespace", f"namespace {namespace!r} must match {NAMESPACE_PATTERN}"
        )
    if settings.namespaces and namespace not in settings.namespaces:
        return error_response(
            404,
            "unknown_namespace",
            f"namespace {namespace!r} is not served here; use one of {settings.namespaces}",
        )
    return namespace
