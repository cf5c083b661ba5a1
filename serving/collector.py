"""``POST /v1/events``: validate events with the one schema and put them on Kinesis.

Accepted bodies: one event object, a JSON array of events, or ``{"events": [...]}``, with
at most ``Settings.max_batch`` (500) events. Outcomes:

* ``202``: every valid event is on the stream. ``accepted`` lists their indexes and ids;
  ``rejected`` lists every invalid event with each bad field and how to fix it.
* ``422``: nothing valid (malformed JSON, wrong types, missing ids...), or any invalid
  event when ``?atomic=true``.
* ``413``: too many events in one request, or a body over 5 MiB.
* ``503``: Kinesis refused some valid events even after retries; they are listed under
  ``failed`` with their ids, and the sender should retry exactly those.

Nothing is dropped silently: every input index appears in exactly one of the lists.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from recstream.errors import FieldProblem, RecstreamError
from serving.http import error_response, json_response
from serving.metrics import EVENTS
from streams.producer import KinesisProducer
from streams.schema import Event, problems_from

__all__ = ["MAX_BODY_BYTES", "collect"]

MAX_BODY_BYTES = 5 * 1024 * 1024
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


async def read_capped(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it passes ``limit`` (chunked bodies have no length)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _items(body: Any) -> list[Any] | None:
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        if "events" in body and set(body) <= {"events"}:
            events = body["events"]
            return events if isinstance(events, list) else None
        return [body]
    return None


async def collect(request: Request, namespace: str, producer: KinesisProducer) -> Response:
    settings = request.app.state.settings
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        # Refuse before reading: a huge body should cost the server nothing.
        return error_response(
            413, "body_too_large", f"the body is {declared} bytes; send at most {MAX_BODY_BYTES}"
        )
    raw = await read_capped(request, MAX_BODY_BYTES)
    if raw is None:
        return error_response(
            413, "body_too_large", f"the body is over {MAX_BODY_BYTES} bytes; send less"
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return error_response(
            422,
            "malformed_body",
            f"the body is not valid JSON ({exc}); send an event object, an array of events, "
            'or {"events": [...]}',
        )
    items = _items(body)
    if items is None:
        return error_response(
            422,
            "malformed_body",
            'send an event object, an array of events, or {"events": [...]} with an array',
        )
    if not items:
        return error_response(
            422, "empty_batch", "the body holds no events; send at least one event"
        )
    if len(items) > settings.max_batch:
        return error_response(
            413,
            "batch_too_large",
            f"{len(items)} events in one request; split them into batches of at most "
            f"{settings.max_batch}",
        )

    atomic_flag = request.query_params.get("atomic", "false").lower()
    if atomic_flag not in _FLAGS:
        # An unreadable flag must not silently mean "not atomic".
        return error_response(
            422, "bad_atomic", f"atomic={atomic_flag!r} is not a boolean; use atomic=true or false"
        )
    atomic = _FLAGS[atomic_flag]

    valid: list[tuple[int, Event]] = []
    rejected: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        problems: list[FieldProblem]
        if not isinstance(item, dict):
            problems = [
                FieldProblem("body", f"event {index} is not a JSON object", "send an object")
            ]
        elif item.get("namespace", namespace) != namespace:
            problems = [
                FieldProblem(
                    "namespace",
                    f"namespace {item['namespace']!r} does not match the route's {namespace!r}",
                    f"post to /v1/{item['namespace']}/events or drop the field",
                )
            ]
        else:
            try:
                valid.append((index, Event.model_validate({**item, "namespace": namespace})))
                continue
            except ValidationError as exc:
                problems = problems_from(exc)
        rejected.append({"index": index, "errors": [p.as_dict() for p in problems]})

    if rejected and (atomic or not valid):
        EVENTS.labels(outcome="rejected").inc(len(items) if atomic else len(rejected))
        return json_response(
            {
                "error": {
                    "code": "invalid_events",
                    "message": f"{len(rejected)} of {len(items)} events are invalid; "
                    "fix the fields listed under `rejected` and send them again"
                    + ("; nothing was accepted (atomic)" if atomic and valid else ""),
                },
                "accepted": [],
                "rejected": rejected,
                "failed": [],
            },
            status_code=422,
        )

    try:
        results = await producer.put_events([event for _, event in valid])
    except RecstreamError as exc:
        EVENTS.labels(outcome="failed").inc(len(valid))
        return error_response(503, exc.code, str(exc), headers={"Retry-After": "1"})
    accepted = [
        {"index": index, "event_id": result.event_id}
        for (index, _), result in zip(valid, results, strict=True)
        if result.ok
    ]
    failed = [
        {"index": index, "event_id": result.event_id, "error": result.error}
        for (index, _), result in zip(valid, results, strict=True)
        if not result.ok
    ]
    EVENTS.labels(outcome="accepted").inc(len(accepted))
    EVENTS.labels(outcome="rejected").inc(len(rejected))
    EVENTS.labels(outcome="failed").inc(len(failed))
    payload = {"accepted": accepted, "rejected": rejected, "failed": failed}
    if failed:
        # Retriable (throttling, an outage): 503 and resend the failed ids. Otherwise the
        # deployment is broken (e.g. the stream is missing) and resending will not help.
        if all(r.retriable for r in results if not r.ok):
            return json_response(payload, status_code=503, headers={"Retry-After": "1"})
        return json_response(payload, status_code=500)
    return json_response(payload, status_code=202)
