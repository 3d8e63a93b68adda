"""API keys with scopes: `admin` (change adapters) and `inference` (generate, OpenAI endpoints, read adapters).

Who may call what is declared once, on the routers (`dependencies=[Depends(require(scope))]`), and enforced by
`ApiKeyGate`, an ASGI middleware, before a byte of the request body is read: FastAPI parses a body (and spools a
multipart upload to a temporary file) before route dependencies run, so a dependency alone would let anyone
without a key make the server read and store a large upload. The gate finds the route a request matches and
reads the scope its `require` dependency declares; `/health` and `/metrics` are open; every other path (the
OpenAPI schema and docs, unknown paths) needs a key of any scope. The dependency checks again (it is cheap).

Keys come from settings (`ADAPTER_SERVICE_API_KEYS="admin:KEY1,inference:KEY2"`) or a file of
`<scope> <key>` lines; with no key configured, the API is open. An admin key may do everything. Keys are
compared in constant time against every configured key, so timing reveals neither a match nor a prefix.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path

from fastapi import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ForbiddenError, ServiceError, UnauthorizedError
from .errors import error_response

SCOPES = ("admin", "inference")
OPEN_PATHS = frozenset({"/health", "/metrics"})  # liveness and scraping need no key (see public_health_details)


class ApiKeys:
    def __init__(self, keys: dict[str, str]) -> None:  # key -> scope
        self._keys = list(keys.items())

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @classmethod
    def from_settings(cls, spec: str | None, path: Path | None) -> ApiKeys:
        entries: list[tuple[str, str]] = []
        if spec:
            entries += [tuple(item.split(":", 1)) for item in spec.split(",") if item.strip()]
        if path is not None:
            for line in path.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    scope, _, key = line.strip().partition(" ")
                    entries.append((scope, key.strip()))
        keys: dict[str, str] = {}
        for scope, key in entries:
            scope, key = scope.strip(), key.strip()
            if scope not in SCOPES or not key:
                raise ValueError(f"API key entries must be '<scope>:<key>' with scope in {SCOPES}")
            keys[key] = scope
        return cls(keys)

    def scope_of(self, presented: str) -> str | None:
        found = None
        for key, scope in self._keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(presented.encode(), key.encode()):
                found = scope
        return found


def authorize(keys: ApiKeys, authorization: str, scope: str) -> str | None:
    """The granted scope for an `Authorization` header value (None when keys are off); raises 401 or 403."""
    if not keys.enabled:
        return None
    presented = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    granted = keys.scope_of(presented) if presented else None
    if granted is None:
        raise UnauthorizedError("a valid API key is required (Authorization: Bearer <key>)")
    if granted != "admin" and granted != scope:
        raise ForbiddenError(f"this API key has scope '{granted}'; this endpoint needs '{scope}'",
                             {"needed": scope, "granted": granted})
    return granted


def sees_details(request: Request) -> bool:
    """Whether the caller of an open endpoint (/health, /metrics) may see adapter names: always with a valid key,
    else as `public_health_details` says (default: only when the API is open)."""
    keys: ApiKeys = request.app.state.api_keys
    public = request.app.state.settings.public_health_details
    if public if public is not None else not keys.enabled:
        return True
    header = request.headers.get("authorization", "")
    presented = header[7:].strip() if header.lower().startswith("bearer ") else ""
    return bool(presented) and keys.scope_of(presented) is not None


def require(scope: str) -> Callable[[Request], None]:
    """A dependency that lets the request through only with a key of `scope` (or admin); `ApiKeyGate` reads
    the scope it declares to check it before the body."""

    def check(request: Request) -> None:
        authorize(request.app.state.api_keys, request.headers.get("authorization", ""), scope)

    check.required_scope = scope  # type: ignore[attr-defined]
    return check


def required_scope(routes: list[BaseRoute], scope: Scope) -> str | None:
    """The scope a request needs: its route's declared one; None for the open paths; else `inference`.

    `routes` are the routers' own routes (in the order the app includes them), matched as the app would."""
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            for dependency in getattr(route, "dependencies", ()):
                declared = getattr(dependency.dependency, "required_scope", None)
                if declared is not None:
                    return declared
            break
    path = scope["path"]
    open_page = path == "/ui" or path.startswith("/ui/")  # the admin page holds no data; its calls send the key
    return None if path in OPEN_PATHS or open_page else "inference"


class ApiKeyGate:
    """ASGI middleware: 401/403 from the headers alone, before the app reads the body (then the connection is
    closed, so the unread body is never consumed)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, routes: list[BaseRoute]) -> None:
        self.app, self.keys, self.routes = app, keys, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        needed = required_scope(self.routes, scope)
        if needed is not None:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            try:
                authorize(self.keys, headers.get("authorization", ""), needed)
            except ServiceError as exc:
                response = error_response(exc)
                response.headers["connection"] = "close"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
