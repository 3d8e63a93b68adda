"""API keys with scopes: `admin` (change adapters) and `inference` (generate, OpenAI endpoints, read adapters).

Keys come from settings (`ADAPTER_SERVICE_API_KEYS="admin:KEY1,inference:KEY2"`) or a file of
`<scope> <key>` lines; with no key configured, the API is open. An admin key may do everything. Keys are
compared in constant time against every configured key, so timing reveals neither a match nor a prefix.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path

from fastapi import Request

from ..errors import ForbiddenError, UnauthorizedError

SCOPES = ("admin", "inference")


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


def require(scope: str) -> Callable[[Request], None]:
    """A dependency that lets the request through only with a key of `scope` (or admin)."""

    def check(request: Request) -> None:
        keys: ApiKeys = request.app.state.api_keys
        if not keys.enabled:
            return
        header = request.headers.get("authorization", "")
        presented = header[7:].strip() if header.lower().startswith("bearer ") else ""
        granted = keys.scope_of(presented) if presented else None
        if granted is None:
            raise UnauthorizedError("a valid API key is required (Authorization: Bearer <key>)")
        if granted != "admin" and granted != scope:
            raise ForbiddenError(f"this API key has scope '{granted}'; this endpoint needs '{scope}'",
                                 {"needed": scope, "granted": granted})

    return check
