"""Per-request context: a request id (from `X-Request-ID` or new) in logs and the response, metrics, access log."""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..logging_setup import request_id_var
from ..metrics import ServiceMetrics
from .body_limit import body_limit
from .errors import error_body

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
log = logging.getLogger("service.access")


def install_request_middleware(
    app: FastAPI, metrics: ServiceMetrics, max_body_bytes: int, max_upload_bytes: int
) -> None:
    @app.middleware("http")
    async def request_context(request: Request, call_next):
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        start, status = time.perf_counter(), 500
        try:
            response = _body_too_large(request, max_body_bytes, max_upload_bytes) or await call_next(request)
            status = response.status_code
            response.headers[REQUEST_ID_HEADER] = request_id
            return response
        finally:
            elapsed = time.perf_counter() - start
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "unmatched")  # the route template keeps label cardinality low
            adapter = getattr(request.state, "adapter_id", "")
            metrics.requests.labels(endpoint, request.method, str(status), adapter).inc()
            metrics.latency.labels(endpoint).observe(elapsed)
            # The adapter that was asked for (even one that does not exist): who asked for what, in every format.
            log.info("%s %s -> %d in %.1f ms adapter=%s", request.method, request.url.path, status, elapsed * 1000,
                     adapter or "-",
                     extra={"method": request.method, "path": request.url.path, "status": status,
                            "duration_ms": round(elapsed * 1000, 3), "adapter": adapter})
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
