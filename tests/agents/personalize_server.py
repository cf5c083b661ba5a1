"""A real HTTP server that speaks Amazon Personalize Events' ``PutEvents`` (tests only).

There is no Personalize emulator, so the tests run this one: a Starlette app on uvicorn
that accepts exactly botocore's rest-json wire format for ``POST /events`` (the
``personalize-events`` service model: required members, ``eventList`` of 1 to 10,
``recommendationId`` of at most 40 characters, ``properties`` a JSON string of at most
1024 characters, ``impression`` of 1 to 25 ids), records what it accepted, and can be
told to fail for a while: 5xx answers or 400 ``ThrottlingException``, with the
``x-amzn-ErrorType`` header botocore reads the error code from; or to refuse given
events as invalid, every time (400 ``InvalidInputException``).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from recstream import stack
from tests.conftest import serve_in_thread

TRACKING_ID = "tracker-0123456789"


@dataclass
class Failure:
    status: int
    code: str


@dataclass
class Tracker:
    """What the server accepted, and the failures it still has to answer with."""

    tracking_id: str = TRACKING_ID
    calls: list[dict[str, Any]] = field(default_factory=list)
    """Accepted PutEvents requests (their JSON bodies)."""
    attempts: int = 0
    failures: list[Failure] = field(default_factory=list)
    failing: Failure | None = None
    """While set, every request fails like this (an outage)."""
    refused: set[str] = field(default_factory=set)
    """Event ids refused as invalid, every time: a call holding one is a 400
    InvalidInputException, as Personalize answers a call with one invalid event."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_next(self, n: int, status: int = 500, code: str = "InternalFailure") -> None:
        with self.lock:
            self.failures.extend(Failure(status, code) for _ in range(n))

    def refuse(self, event_ids: set[str]) -> None:
        """Refuse calls holding these events until `refuse(set())`."""
        self.refused = set(event_ids)

    def outage(self, status: int = 503, code: str = "ServiceUnavailable") -> None:
        self.failing = Failure(status, code)

    def recover(self) -> None:
        self.failing = None

    @property
    def events(self) -> list[dict[str, Any]]:
        return [event for call in self.calls for event in call["eventList"]]

    def event_ids(self) -> Counter[str]:
        return Counter(str(event["eventId"]) for event in self.events)


def _error(status: int, code: str, message: str) -> Response:
    return JSONResponse(
        {"message": message}, status_code=status, headers={"x-amzn-ErrorType": code}
    )


def _invalid(body: dict[str, Any]) -> str | None:
    """What botocore's model says is wrong with a PutEvents body, if anything."""
    for name in ("trackingId", "sessionId", "eventList"):
        if name not in body:
            return f"{name} is required"
    if not 1 <= len(body["sessionId"]) <= 256:
        return "sessionId must have 1 to 256 characters"
    events = body["eventList"]
    if not isinstance(events, list) or not 1 <= len(events) <= 10:
        return "eventList must hold 1 to 10 events"
    for event in events:
        if "eventType" not in event or "sentAt" not in event:
            return "eventType and sentAt are required"
        if not isinstance(event["sentAt"], int | float):
            return "sentAt must be a unix timestamp"
        if len(event.get("recommendationId", "")) > 40:
            return "recommendationId must have at most 40 characters"
        impression = event.get("impression")
        if impression is not None and not 1 <= len(impression) <= 25:
            return "impression must hold 1 to 25 item ids"
        properties = event.get("properties")
        if properties is not None:
            if not isinstance(properties, str) or len(properties) > 1024:
                return "properties must be a JSON string of at most 1024 characters"
            if not isinstance(json.loads(properties), dict):
                return "properties must be a JSON object"
    return None


def build_app(tracker: Tracker) -> Starlette:
    async def put_events(request: Request) -> Response:
        body = await request.json()
        with tracker.lock:
            tracker.attempts += 1
            failure = tracker.failing or (tracker.failures.pop(0) if tracker.failures else None)
        if failure is not None:
            return _error(failure.status, failure.code, "injected failure")
        if not request.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256"):
            return _error(403, "UnrecognizedClientException", "request is not signed")
        problem = _invalid(body)
        refused = [
            e["eventId"] for e in body.get("eventList", []) if e.get("eventId") in tracker.refused
        ]
        if problem is None and refused:
            problem = f"event {refused[0]} is invalid"
        if problem is not None:
            return _error(400, "InvalidInputException", problem)
        if body["trackingId"] != tracker.tracking_id:
            return _error(404, "ResourceNotFoundException", "no such event tracker")
        with tracker.lock:
            tracker.calls.append(body)
        return Response(status_code=200)

    return Starlette(routes=[Route("/events", put_events, methods=["POST"])])


@contextmanager
def running_tracker() -> Iterator[tuple[Tracker, str]]:
    """The server on a free loopback port: (its tracker, its endpoint URL)."""
    tracker = Tracker()
    port = stack.free_port()
    with serve_in_thread(build_app(tracker), port):
        yield tracker, f"http://127.0.0.1:{port}"
