"""recstream's exceptions: one root, a short tree, and messages that say what to do.

    RecstreamError
    ├── ConfigurationError        a setting is wrong; fix the RECSTREAM_* variable named
    ├── StoreUnavailable          Redis or an AWS service did not answer   (retriable)
    │   └── ResourceNotFound      a stream, table or bucket is missing; run `recstream up`
    ├── ThroughputExceeded        AWS throttled us                         (retriable)
    ├── ValidationFailed          an event or request is malformed; carries every problem
    ├── RequestRefused            a store refused one request as invalid (e.g. a DynamoDB
    │                             item over 400 KB): retrying the same request cannot help
    └── StackError                `recstream up` could not start a local server

Botocore and redis errors are translated at the store boundary with ``raise ... from exc``,
so callers never need to import either library to handle a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConfigurationError",
    "FieldProblem",
    "RecstreamError",
    "RequestRefused",
    "ResourceNotFound",
    "StackError",
    "StoreUnavailable",
    "ThroughputExceeded",
    "ValidationFailed",
]


class RecstreamError(Exception):
    """Root of every error recstream raises on purpose."""

    retriable: bool = False
    code: str = "recstream_error"


class ConfigurationError(RecstreamError):
    code = "configuration_error"


class StoreUnavailable(RecstreamError):
    retriable = True
    code = "store_unavailable"


class ResourceNotFound(StoreUnavailable):
    retriable = False
    code = "resource_not_found"


class ThroughputExceeded(RecstreamError):
    retriable = True
    code = "throughput_exceeded"


class RequestRefused(RecstreamError):
    """Deterministic: the same request fails the same way, so the agents dead-letter the
    record that causes it instead of retrying it forever."""

    code = "request_refused"


class StackError(RecstreamError):
    code = "stack_error"


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One thing wrong with one field: where it is, what is wrong, how to fix it."""

    field: str
    problem: str
    fix: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "problem": self.problem, "fix": self.fix}


class ValidationFailed(RecstreamError):
    code = "validation_failed"

    def __init__(self, message: str, problems: list[FieldProblem]) -> None:
        super().__init__(message)
        self.problems = problems
