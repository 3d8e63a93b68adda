"""The only place where errors become HTTP: the code -> status table, and `{"error": {...}}` bodies.

Every error leaves the API as `{"error": {"code", "message", "details"}}` with the status of its code.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MAX_ECHO_CHARS, ServiceError

log = logging.getLogger(__name__)
MAX_MESSAGE_CHARS = 2000  # an error message (it may quote input, already cut by service.errors.echo)
MAX_DETAIL_ITEMS = 50  # list items and dict entries kept in `details`

STATUS_BY_CODE: dict[str, int] = {
    # adapters
    "adapter_not_found": 404,
    "adapter_exists": 409,
    "adapter_limit_reached": 409,
    "pin_limit_reached": 409,
    "invalid_adapter_id": 422,
    "invalid_adapter": 422,
    "mixed_batch_unsupported": 422,
    "not_mergeable": 422,
    "invalid_merge": 422,
    "incompatible_sources": 422,
    # uploads and the store
    "upload_too_large": 413,
    "body_too_large": 413,
    "invalid_upload": 422,
    "insufficient_storage": 507,
    "store_error": 500,
    "store_locked": 503,
    # server paths
    "path_loading_disabled": 403,
    "path_not_allowed": 403,
    "path_not_found": 404,
    "invalid_path": 422,
    # adapter sources (hub, S3)
    "invalid_source": 422,
    "source_not_found": 404,
    "source_access_denied": 403,
    "source_unavailable": 502,
    # requests
    "invalid_request": 422,
    "empty_prompt": 422,
    "prompt_too_long": 422,
    "too_many_prompts": 422,
    "too_many_messages": 422,
    "invalid_token_id": 422,
    "max_new_tokens_too_large": 422,
    "overloaded": 429,
    "timeout": 504,
    "generation_failed": 500,
    "non_finite_logits": 422,
    "replica_unavailable": 503,
    "unauthorized": 401,
    "forbidden": 403,
    "not_supported": 501,
}
_HEADERS_BY_CODE: dict[str, dict[str, str]] = {
    "overloaded": {"Retry-After": "1"},
    "replica_unavailable": {"Retry-After": "1"},
    "unauthorized": {"WWW-Authenticate": "Bearer"},
}


def status_of(code: str) -> int:
    """HTTP status of an error code; an unlisted code of a client-facing error is a 400."""
    return STATUS_BY_CODE.get(code, 400)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def capped(value: Any, limit: int = MAX_ECHO_CHARS) -> Any:
    """`value` with every string cut to `limit` chars and every list or dict to MAX_DETAIL_ITEMS entries:
    an error body never repeats a huge input (a 10 MB regex, a 10 MB JSON key) back."""
    if isinstance(value, str):
        return _cut(value, limit)
    if isinstance(value, dict):
        items = list(value.items())
        out = {_cut(str(k), limit): capped(v, limit) for k, v in items[:MAX_DETAIL_ITEMS]}
        if len(items) > MAX_DETAIL_ITEMS:
            out["..."] = f"{len(items) - MAX_DETAIL_ITEMS} more"
        return out
    if isinstance(value, (list, tuple)):
        kept = [capped(v, limit) for v in value[:MAX_DETAIL_ITEMS]]
        return kept + ([f"... {len(value) - MAX_DETAIL_ITEMS} more"] if len(value) > MAX_DETAIL_ITEMS else [])
    return value


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    # Detail strings (e.g. a load report's problem lines, which may quote a pattern) get the message's room.
    return {"error": {"code": code, "message": _cut(message, MAX_MESSAGE_CHARS),
                      "details": capped(details or {}, MAX_MESSAGE_CHARS)}}


class ErrorJSONResponse(JSONResponse):
    """JSON that always encodes: a lone surrogate a client sent (say in a dict key) is written escaped."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


def error_response(exc: ServiceError) -> JSONResponse:
    return ErrorJSONResponse(error_body(exc.code, exc.message, exc.details), status_code=status_of(exc.code),
                             headers=_HEADERS_BY_CODE.get(exc.code))


def _json(status: int, code: str, message: str, details: Any = None, headers=None) -> JSONResponse:
    return ErrorJSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        # the message names the fields at fault (`body.logprobs: ...`), so a client's log says what to change
        named = "; ".join(f"{'.'.join(str(part)[:80] for part in e['loc'])}: {str(e['msg'])[:200]}"
                          for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        return _json(422, "invalid_request", f"the request does not match the API schema: {named}{more}",
                     {"errors": errors})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _json(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _json(500, "internal_error", f"{type(exc).__name__}: {exc}")
