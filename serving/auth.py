"""Authentication and authorization: API keys with scopes, per namespace (pure ASGI).

A request presents its key as ``Authorization: Bearer rs_<id>_<secret>`` or
``X-Api-Key: rs_<id>_<secret>``; the Personalize-compatible routes also accept AWS SigV4
(``Authorization: AWS4-HMAC-SHA256 Credential=rs_<id>/...``), checked by recomputing the
signature with botocore's own signer. Outcomes: no key or a wrong one, 401; a key
without the route's scope or namespace, 403; otherwise the request goes on with the key
in ``scope["state"]["api_key"]`` (the per-key rate limit reads it).

`ROUTE_SCOPES` is the one table of which route needs which scope. A route it does not
list needs ``admin``: a new route is closed until someone decides otherwise.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from recstream.apikeys import ApiKey, ApiKeyStore, key_id_from_access_key, sigv4_secret
from recstream.errors import RecstreamError
from recstream.settings import Settings
from serving.middleware import BodyTooLarge, read_body, replay, send_error

__all__ = ["ROUTE_SCOPES", "AuthMiddleware", "RouteRule", "rule_for"]

Need = Literal["events:write", "recommendations:read", "admin", "ops", "open"]


@dataclass(frozen=True, slots=True)
class RouteRule:
    methods: frozenset[str] | None
    """None: any method."""
    path: re.Pattern[str]
    need: Need
    """A scope, ``ops`` (open or admin per ``Settings.ops_routes_open``) or ``open``."""
    sigv4: bool = False
    """Whether SigV4-signed requests are accepted (the Personalize-compatible routes)."""


def _rule(methods: str | None, path: str, need: Need, sigv4: bool = False) -> RouteRule:
    allowed = frozenset(methods.split(",")) if methods else None
    return RouteRule(allowed, re.compile(path), need, sigv4)


_NS = r"/v1(?:/(?P<namespace>[^/]+))?"
# First match wins. The order follows the router's (serving/app.py), so a path that two
# routes could match is judged as the route that serves it: the filter routes come
# before the catalog's (GET /v1/items/filters lists namespace "items"'s filters), and
# the catalog's short forms before the namespaced ones (/v1/items/a/b is item "a/b").
ROUTE_SCOPES: Final[tuple[RouteRule, ...]] = (
    _rule("GET,HEAD", r"^/(healthz|readyz|metrics)$", "ops"),
    # The contract is public: clients need it before they hold a key.
    _rule("GET,HEAD", r"^/(openapi\.json|docs)$", "open"),
    _rule("POST", rf"^{_NS}/events$", "events:write"),
    _rule(None, rf"^{_NS}/filters(/[^/]+)?$", "admin"),
    # Reading an item is what a page showing recommendations does; writes stay admin.
    _rule("GET,HEAD", r"^/v1/items/.+$", "recommendations:read"),
    _rule("GET,HEAD", r"^/v1/(?P<namespace>[^/]+)/items/.+$", "recommendations:read"),
    _rule(
        "GET,POST",
        rf"^{_NS}/(recommendations|related-items|trending|personalized-ranking)$",
        "recommendations:read",
    ),
    _rule(None, rf"^{_NS}/(filters|catalog|items|users|admin)(/.*)?$", "admin"),
    _rule(None, r"^/admin(/.*)?$", "admin"),
    _rule(None, r"^/personalize-runtime(/.*)?$", "recommendations:read", sigv4=True),
    _rule(None, r"^/personalize-events(/.*)?$", "events:write", sigv4=True),
)
_DEFAULT: Final = RouteRule(None, re.compile(""), "admin")
# A signed request older (or newer) than this is refused, as AWS does.
MAX_SIGV4_SKEW_S: Final = 15 * 60
_CREDENTIAL = re.compile(
    r"Credential=(?P<akid>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)"
    r"/aws4_request"
)
_SIGNED = re.compile(r"SignedHeaders=(?P<headers>[^,\s]+)")
_SIGNATURE = re.compile(r"Signature=(?P<sig>[0-9a-f]{64})")


def rule_for(method: str, path: str) -> tuple[RouteRule, str | None]:
    """The rule a request falls under, and the namespace in its path (None: the default)."""
    for rule in ROUTE_SCOPES:
        match = rule.path.match(path)
        if match and (rule.methods is None or method in rule.methods):
            return rule, match.groupdict().get("namespace")
    return _DEFAULT, None


class AuthMiddleware:
    """Checks every HTTP request against `ROUTE_SCOPES` (see the module docstring).

    The key store comes from ``app.state.security`` (opened in the lifespan), so the
    middleware can be built before the app starts."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.settings.api_keys_required:
            await self.app(scope, receive, send)
            return
        rule, namespace = rule_for(scope["method"], scope["path"])
        if rule.need == "open" or (rule.need == "ops" and self.settings.ops_routes_open):
            await self.app(scope, receive, send)
            return
        need = "admin" if rule.need == "ops" else rule.need
        if namespace is None:
            # Routes without a namespace in the path (the short forms, the Personalize-
            # compatible ones, /admin) serve the default namespace: a key limited to
            # other namespaces must not reach it through them.
            namespace = self.settings.namespace
        headers = Headers(scope=scope)
        store: ApiKeyStore = scope["app"].state.security.keys
        authorization = headers.get("authorization", "")
        try:
            if authorization.startswith("AWS4-HMAC-SHA256 ") and rule.sigv4:
                try:
                    body = await read_body(receive, self.settings.max_body_bytes)
                except BodyTooLarge:
                    await send_error(
                        send,
                        413,
                        "body_too_large",
                        f"send at most {self.settings.max_body_bytes} bytes",
                    )
                    return
                key = await self._sigv4(scope, headers, authorization, body, store)
                receive = replay(body, receive)
            else:
                key = await self._bearer(headers, authorization, store)
        except RecstreamError as exc:
            # The key store is down: not the client's fault, and not a reason to let it in.
            await send_error(
                send,
                503,
                "auth_unavailable",
                f"API keys cannot be checked right now ({exc.code}); retry shortly",
                {"Retry-After": "1"},
            )
            return
        if isinstance(key, str):
            await send_error(
                send, 401, "unauthorized", key, {"WWW-Authenticate": 'Bearer realm="recstream"'}
            )
            return
        if not key.allows(need, namespace):
            where = f" in namespace {namespace!r}" if namespace else ""
            await send_error(
                send,
                403,
                "forbidden",
                f"this API key lacks the {need!r} scope{where}; create a key with "
                f"`recstream keys create --scope {need} --namespace {namespace or '*'}`",
            )
            return
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)

    async def _bearer(
        self, headers: Headers, authorization: str, store: ApiKeyStore
    ) -> ApiKey | str:
        presented = headers.get("x-api-key", "")
        if authorization.lower().startswith("bearer "):
            presented = authorization[7:].strip()
        if not presented:
            return (
                "this route needs an API key: send `Authorization: Bearer rs_…` or "
                "`X-Api-Key: rs_…` (create one with `recstream keys create`)"
            )
        key = await store.verify(presented)
        if key is None:
            return "the API key is not valid (unknown, revoked or mistyped)"
        return key

    async def _sigv4(
        self, scope: Scope, headers: Headers, authorization: str, body: bytes, store: ApiKeyStore
    ) -> ApiKey | str:
        credential = _CREDENTIAL.search(authorization)
        signed = _SIGNED.search(authorization)
        signature = _SIGNATURE.search(authorization)
        amz_date = headers.get("x-amz-date", "")
        if not (credential and signed and signature and amz_date):
            return (
                "malformed SigV4 Authorization header (Credential, SignedHeaders, Signature "
                "and X-Amz-Date are required)"
            )
        try:
            when = datetime.strptime(amz_date, SIGV4_TIMESTAMP).replace(tzinfo=UTC)
        except ValueError:
            return "X-Amz-Date must look like 20250131T120000Z"
        if abs((datetime.now(UTC) - when).total_seconds()) > MAX_SIGV4_SKEW_S:
            return "the signature is more than 15 minutes old or ahead; check the client's clock"
        key_id = key_id_from_access_key(credential.group("akid"))
        secret = sigv4_secret(self.settings, key_id) if key_id else None
        if key_id is None or secret is None:
            return "unknown access key id (SigV4 access keys are rs_<id> of an API key)"
        key = await store.lookup(key_id)
        if key is None:
            return "unknown or revoked access key id"
        names = signed.group("headers").split(";")
        if "host" not in names:
            return "SigV4 must sign the host header"
        signed_headers = {name: headers.get(name, "") for name in names}
        raw_path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        url = f"http://{headers.get('host', '')}{raw_path.decode('latin-1')}"
        if query:
            url += "?" + query.decode("latin-1")
        request = AWSRequest(method=scope["method"], url=url, data=body, headers=signed_headers)
        request.context["timestamp"] = amz_date
        signer = SigV4Auth(
            Credentials(credential.group("akid"), secret),
            credential.group("service"),
            credential.group("region"),
        )
        expected = signer.signature(
            signer.string_to_sign(request, signer.canonical_request(request)), request
        )
        if not hmac.compare_digest(expected, signature.group("sig")):
            return (
                "the SigV4 signature does not match (wrong secret access key, or the "
                "request was altered)"
            )
        return key
