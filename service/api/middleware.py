"""Per-request context: a request id (from `X-Request-ID` or new) in logs and the response, metrics, access log."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..app import Generation
from ..logging_setup import request_id_var
from ..metrics import ServiceMetrics
from .body_limit import body_limit
from .errors import error_body

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
log = logging.getLogger("service.access")


QUIET_PATHS = frozenset({"/health", "/metrics"})  # polled by probes and scrapers: their lines log at debug


def count_tokens(request: Request, generation: Generation) -> None:
    """Let the request's access-log line carry this generation's prompt and completion tokens (filled live as
    its events pass, so a streamed response's line, written when its body ends, has them all)."""
    counts = getattr(request.state, "token_counts", None)
    if counts is None:
        counts = request.state.token_counts = []
    counts.append(generation.tokens)


def install_request_middleware(
    app: FastAPI, metrics: ServiceMetrics, max_body_bytes: int, max_upload_bytes: int
) -> None:
    @app.middleware("http")
    async def request_context(request: Request, call_next):
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        try:
            response = _body_too_large(request, max_body_bytes, max_upload_bytes) or await call_next(request)
        except BaseException:
            _finish(request, request_id, 500, start, metrics)
            raise
        finally:
            request_id_var.reset(token)
        response.headers[REQUEST_ID_HEADER] = request_id
        body = getattr(response, "body_iterator", None)
        if body is None:
            _finish(request, request_id, response.status_code, start, metrics)
            return response
        # The line is written when the body has been sent: a stream's duration and tokens are then known.
        response.body_iterator = _then(body, lambda: _finish(request, request_id, response.status_code, start,
                                                              metrics))
        return response


async def _then(body: AsyncIterator, done: Callable[[], None]) -> AsyncIterator:
    try:
        async for chunk in body:
            yield chunk
    finally:
        done()


def _finish(request: Request, request_id: str, status: int, start: float, metrics: ServiceMetrics) -> None:
    """The request's metrics and its one access-log line."""
    elapsed = time.perf_counter() - start
    route = request.scope.get("route")
    endpoint = getattr(route, "path", "unmatched")  # the route template keeps label cardinality low
    adapter = getattr(request.state, "adapter_id", "")
    metrics.requests.labels(endpoint, request.method, str(status), adapter).inc()
    metrics.latency.labels(endpoint).observe(elapsed)
    counts = getattr(request.state, "token_counts", [])
    tokens_in, tokens_out = sum(c.prompt for c in counts), sum(c.completion for c in counts)
    client = f"{request.client.host}:{request.client.port}" if request.client else "-"
    level = logging.DEBUG if request.url.path in QUIET_PATHS else logging.INFO
    token = request_id_var.set(request_id)
    try:
        # The adapter that was asked for (even one that does not exist): who asked for what, in every format.
        log.log(level, "%s %s %s -> %d in %.1f ms adapter=%s%s", client, request.method, request.url.path, status,
                elapsed * 1000, adapter or "-", f" tokens={tokens_in}/{tokens_out}" if counts else "",
                extra={"client": client, "method": request.method, "path": request.url.path, "status": status,
                       "duration_ms": round(elapsed * 1000, 3), "adapter": adapter or None,
                       "tokens_in": tokens_in if counts else None, "tokens_out": tokens_out if counts else None})
    finally:
        request_id_var.reset(token)


def _body_too_large(request: Request, limit: int, upload_limit: int) -> JSONResponse | None:
    """413 for a body over its limit, judged by Content-Length before a byte of it is read: JSON bodies over
    `limit`, multipart uploads over `upload_limit` (chunked bodies are counted as they arrive: body_limit.py)."""
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        return None
    max_bytes, code, message = body_limit(dict(request.headers), limit, upload_limit)
    if int(length) <= max_bytes:
        return None
    shown = upload_limit if code == "upload_too_large" else limit
    return JSONResponse(error_body(code, message, {"max_bytes": shown}), status_code=413)
