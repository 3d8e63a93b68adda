"""Typed answers of the adapter service and its error, shared by the sync and async clients.

Each response type keeps the JSON it was built from in `raw` (left out of `repr` and equality), so fields the
server adds later are not lost and the CLI can print exactly what the server said.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


def _from_json(cls: type[T], data: dict[str, Any], **nested: Any) -> T:
    """Build a response dataclass from its JSON object: unknown keys are ignored (kept in `raw`)."""
    names = {f.name for f in fields(cls)} - {"raw"}  # type: ignore[arg-type]
    values = {k: v for k, v in data.items() if k in names}
    return cls(**{**values, **nested, "raw": data})


@dataclass(frozen=True)
class Health:
    status: str
    model: str
    device: str
    active_adapter: str | None
    adapters: int
    adapter_bytes: int
    requests_running: int
    requests_waiting: int
    adapters_resident: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Health:
        return _from_json(cls, data)


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    type: str
    rank: int
    alpha: float
    target_modules: list[str] | str | None
    modules_to_save: list[str]
    resident_bytes: int
    sha256: str
    active: bool
    created_at: str
    resident: bool = False
    load_ms: float | None = None
    served: bool = True  # False: unloaded (files kept on the server, not served)
    pinned: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterInfo:
        return _from_json(cls, data)


@dataclass(frozen=True)
class AdapterList:
    adapters: list[AdapterInfo]
    active: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterList:
        return _from_json(cls, data, adapters=[AdapterInfo.from_json(a) for a in data.get("adapters", [])])


@dataclass(frozen=True)
class ActiveResult:
    active: str | None
    fused: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ActiveResult:
        return _from_json(cls, data, fused=bool(data.get("fused")))


@dataclass(frozen=True)
class DeleteResult:
    deleted: str
    freed_bytes: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeleteResult:
        return _from_json(cls, data)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Usage:
        return cls(prompt_tokens=data["prompt_tokens"], completion_tokens=data["completion_tokens"])


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    adapter_id: str
    finish_reason: str
    usage: Usage
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerateResult:
        return _from_json(cls, data, usage=Usage.from_json(data["usage"]))


@dataclass(frozen=True)
class TokenEvent:
    """One streamed token; `text` is the text it completed (may be empty while a character is partial)."""

    token_id: int
    text: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class StreamEnd:
    """The last event of a stream: why it stopped, the token counts and the whole text."""

    finish_reason: str
    usage: Usage
    text: str
    adapter_id: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


StreamEvent = TokenEvent | StreamEnd


class ServiceError(Exception):
    """An error answer of the service (`{"error": {"code", "message", "details"}}`) or no answer at all.

    `status` is the HTTP status, or None when the server could not be reached (see ServiceConnectionError).
    """

    def __init__(self, status: int | None, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.details: Any = details if details is not None else {}

    @classmethod
    def from_response(cls, response: httpx.Response) -> ServiceError:
        """Parse an error response whose body has been read; non-JSON bodies become `http_<status>`."""
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and "code" in error:
            return cls(response.status_code, str(error["code"]), str(error.get("message", "")), error.get("details"))
        text = response.text.strip()[:500] or response.reason_phrase
        return cls(response.status_code, f"http_{response.status_code}", text)


class ServiceConnectionError(ServiceError):
    """The server did not answer: not reachable at the URL, or no response within the timeout."""

    def __init__(self, base_url: str, exc: httpx.TransportError) -> None:
        if isinstance(exc, httpx.TimeoutException):
            code, message = "timeout", f"no response from {base_url} in time ({type(exc).__name__})"
        else:
            code, message = "unreachable", f"the server is not reachable at {base_url} ({exc or type(exc).__name__})"
        super().__init__(None, code, message)


def parse_stream_event(data: dict[str, Any], status: int) -> StreamEvent:
    """One `data: {...}` event of a generation stream; an `error` event raises ServiceError."""
    if isinstance(data.get("error"), dict):
        error = data["error"]
        raise ServiceError(status, str(error.get("code", "stream_error")), str(error.get("message", "")),
                           error.get("details"))
    if "token_id" in data:
        return TokenEvent(token_id=int(data["token_id"]), text=str(data.get("text", "")), raw=data)
    return StreamEnd(finish_reason=str(data.get("finish_reason")), usage=Usage.from_json(data["usage"]),
                     text=str(data.get("text", "")), adapter_id=data.get("adapter_id"), raw=data)


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """The JSON of a `data: {...}` line; None for blank lines, comments and other fields."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:"):].strip()
    return json.loads(payload) if payload else None
