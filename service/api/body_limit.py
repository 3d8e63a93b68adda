"""A 413 for a chunked request body (no Content-Length) as soon as it passes its limit.

A body with a Content-Length over its limit is refused before it is read (see middleware.py). A chunked
one can only be judged while it arrives: without this, the multipart parser would spool all of it to a
temporary file, however large, before the store's byte budget rejected it. Here the body is counted as the
app reads it; past the limit the read fails, whatever the app answers to that is dropped, and the client
gets the same JSON 413 as for a declared length.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body

MULTIPART_OVERHEAD = 1024 * 1024  # room for part headers and boundaries on top of the upload limit


class BodyTooLarge(Exception):
    """Raised into the app's body read once the body passes its limit."""


def body_limit(headers: dict[str, str], max_body_bytes: int, max_upload_bytes: int) -> tuple[int, str, str]:
    """(limit, error code, message) for a request: uploads (multipart) and JSON bodies have their own limits."""
    if headers.get("content-type", "").startswith("multipart/"):
        limit = max_upload_bytes + MULTIPART_OVERHEAD
        return limit, "upload_too_large", f"upload exceeds the limit of {max_upload_bytes} bytes"
    return max_body_bytes, "body_too_large", f"request body exceeds {max_body_bytes} bytes"


class StreamedBodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app, self.max_body_bytes, self.max_upload_bytes = app, max_body_bytes, max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["type"] != "http" or "content-length" in headers:
            await self.app(scope, receive, send)
            return
        limit, code, message = body_limit(headers, self.max_body_bytes, self.max_upload_bytes)
        shown_limit = self.max_upload_bytes if code == "upload_too_large" else self.max_body_bytes
        received, exceeded, started = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, exceeded
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge()
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's reaction to the failed read is replaced by the 413 below
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            body = json.dumps(error_body(code, message, {"max_bytes": shown_limit})).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
